"""Byte-reproducible initramfs archives: ``newc`` cpio written in Python, gzip without a
timestamp.

Same inputs, same bytes: entries are sorted, owners are 0:0, every mtime is 0, inode numbers
are assigned in order, and gzip gets ``mtime=0`` and no file name (what ``gzip -n`` does). Being
written here rather than with ``cpio(1)`` also lets an unprivileged build add the device node
``/dev/console``, which the kernel needs to give PID 1 a console.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path


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


def write_initramfs(entries: list[Entry], output: Path) -> None:
    """Write ``entries`` (parents are added when missing) as a gzip-compressed newc archive."""
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
    with (
        output.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as compressed,
    ):
        for chunk in chunks:
            compressed.write(chunk)
