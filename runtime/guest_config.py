"""Handing a VM's ``GuestConfig`` to its guest init: three ways in, one encoding.

Data flow: the executor builds a ``GuestConfig`` for each VM and puts it in the ``VMSpec``
(``reconciler/guest_config.py`` defines it, its limits and its length-prefixed encoding; this
module re-exports them for the runtimes). Every runtime hands the encoded bytes to the init
(``guest/init.c``, see ``guest/README.md``):

* QEMU and Firecracker: ``write_vm_initrd`` writes a per-VM initrd in the VM's directory, the
  artifact's initramfs followed by a small uncompressed ``newc`` cpio archive holding
  ``/etc/reconciler/vm.conf`` (mode 0600). The kernel unpacks concatenated archives in order, and
  both VMMs take a single initrd file, so one artifact still serves every replica.
* the process runtime: ``write_config_file`` writes the same bytes to a file that the init reads
  with ``--vm-config``.

Nothing per-VM is on the kernel command line any more: there a TAB, a quote or a long value
could add kernel parameters or be cut, and everything showed in ``ps``. ``builders/cpio.py``
writes whole gzip-compressed images to a path; a segment of a few hundred bytes needs neither,
hence the few lines of ``newc`` here.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from reconciler.guest_config import GuestConfig, GuestConfigError, encode

__all__ = [
    "GUEST_PATH",
    "VM_INITRD",
    "GuestConfig",
    "GuestConfigError",
    "encode",
    "initramfs_segment",
    "write_config_file",
    "write_vm_initrd",
]

GUEST_PATH = "etc/reconciler/vm.conf"  # inside the guest, where the init looks for it
VM_INITRD = "initrd.img"  # the per-VM initrd, in the VM's directory


# ------------------------------------------------------------------ the initramfs segment --


def _newc(inode: int, mode: int, name: str, data: bytes) -> bytes:
    """One ``newc`` cpio member, padded to 4 bytes as the format (and the kernel) requires."""
    raw = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return header + raw + _pad(len(header) + len(raw)) + data + _pad(len(data))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def initramfs_segment(config: GuestConfig) -> bytes:
    """An uncompressed cpio archive holding the encoded configuration at ``GUEST_PATH``."""
    blob = encode(config)
    return b"".join(
        [
            _newc(1, stat.S_IFDIR | 0o755, "etc", b""),
            _newc(2, stat.S_IFDIR | 0o755, "etc/reconciler", b""),
            _newc(3, stat.S_IFREG | 0o600, GUEST_PATH, blob),
            _newc(0, 0, "TRAILER!!!", b""),
        ]
    )


def write_vm_initrd(
    base: Path, config: GuestConfig, output: Path, *, owner: tuple[int, int] | None = None
) -> Path:
    """Write ``base`` (the artifact's initramfs) followed by the per-VM segment to ``output``,
    mode 0600 (owned by ``owner`` when given: a VMM that opens it after dropping root),
    atomically; returns ``output``."""
    segment = initramfs_segment(config)  # first: a bad value leaves nothing behind
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".initrd-", dir=output.parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as out, base.open("rb") as source:
            shutil.copyfileobj(source, out, 1024 * 1024)
            # The kernel looks for the next archive on a 4-byte boundary and skips NULs.
            out.write(_pad(out.tell()) + segment)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return output


def write_config_file(config: GuestConfig, output: Path) -> Path:
    """Write the encoded configuration alone (the process runtime's ``--vm-config``), 0600."""
    blob = encode(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".vm-conf-", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return output
