"""Byte-reproducible initramfs archives: ``newc`` cpio written in Python, then compressed (or
not) the way the kernel unpacks fastest.

Same inputs, same bytes: entries are sorted, owners are 0:0, every mtime is 0, inode numbers
are assigned in order, gzip gets ``mtime=0`` and no file name (what ``gzip -n`` does) and
``lz4 -l`` (the legacy frame, the only one the kernel reads) has no header fields that vary.
Being written here rather than with ``cpio(1)`` also lets an unprivileged build add the device
node ``/dev/console``, which the kernel needs to give PID 1 a console.

The kernel unpacks the initramfs before init runs, in the guest, so its decompression is boot
time; under TCG every guest instruction is emulated and decompression is the most expensive way
to move bytes (``bench/results/boot.md`` measures gzip, LZ4 and none with each kernel). The
archive the runtime appends per VM is always uncompressed (``runtime/guest_config.py``); the
kernel accepts concatenated archives of different compressions.
"""

from __future__ import annotations

import enum
import gzip
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from builders.toolchain import require
from reconciler.errors import BuildError


class Compression(enum.Enum):
    GZIP = "gzip"
    LZ4 = "lz4"
    NONE = "none"

    @property
    def kernel_option(self) -> str | None:
        """The kernel configuration option that must be ``y`` to unpack it (none for none)."""
        return {"gzip": "CONFIG_RD_GZIP", "lz4": "CONFIG_RD_LZ4"}.get(self.value)


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without a leading "/"
    mode: int  # full st_mode (type and permissions)
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file_entry(path: str, source: Path, mode: int | None = None) -> Entry:
    perms = mode if mode is not None else (0o755 if source.stat().st_mode & 0o111 else 0o644)
    return Entry(path, stat.S_IFREG | perms, source.read_bytes())


def char_device(path: str, major: int, minor: int, perms: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perms, b"", (major, minor))


def _header(inode: int, entry: Entry, name: bytes) -> bytes:
    fields = (
        inode,
        entry.mode,
        0,
        0,
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,
        len(entry.data),
        0,
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad(length: int) -> bytes:
    return b"\0" * ((4 - length % 4) % 4)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def archive(entries: list[Entry]) -> bytes:
    """``entries`` (parents are added when missing) as an uncompressed newc archive."""
    by_path = {e.path.strip("/"): e for e in entries}
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            by_path.setdefault("/".join(parts[:i]), directory("/".join(parts[:i])))
    chunks: list[bytes] = []
    for inode, path in enumerate(sorted(by_path), start=1):
        entry = by_path[path]
        name = path.encode()
        header = _header(inode, entry, name)
        chunks += [
            header,
            name,
            b"\0",
            _pad(len(header) + len(name) + 1),
            entry.data,
            _pad(len(entry.data)),
        ]
    trailer_name = b"TRAILER!!!"
    trailer = _header(0, Entry("", 0), trailer_name)
    chunks += [trailer, trailer_name, b"\0", _pad(len(trailer) + len(trailer_name) + 1)]
    return b"".join(chunks)


def write_initramfs(
    entries: list[Entry], output: Path, compression: Compression = Compression.GZIP
) -> None:
    """Write ``entries`` (parents are added when missing) as a newc archive, compressed."""
    data = archive(entries)
    if compression is Compression.NONE:
        output.write_bytes(data)
    elif compression is Compression.GZIP:
        with (
            output.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as out,
        ):
            out.write(data)
    else:
        # -l: the legacy frame, which is what the kernel's unlz4 reads (not the LZ4 frame
        # format); -9: decompression speed does not depend on the level, size does.
        result = subprocess.run(
            [require("lz4"), "-l", "-9", "-q", "-c"], input=data, capture_output=True, check=False
        )
        if result.returncode != 0:
            raise BuildError(f"lz4 failed: {result.stderr.decode(errors='replace').strip()}")
        output.write_bytes(result.stdout)


def compression_of(path: Path) -> Compression:
    """How an initramfs file is compressed, by its magic (what the kernel looks at)."""
    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return Compression.GZIP
    if head.startswith(b"\x02\x21\x4c\x18"):
        return Compression.LZ4
    if head.startswith(b"070701"):
        return Compression.NONE
    raise BuildError(f"{path} is not an initramfs this project writes (gzip, lz4 or newc)")
