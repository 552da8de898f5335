"""Volumes on this host: the disk files (and process-runtime directories) that outlive a VM.

Where it sits: the executor asks ``prepare`` for each volume of a VM it is about to start (the
VM is stopped then), and hands the result to the runtime in ``VMSpec.volumes``: QEMU and
Firecracker attach the ext4 image as one more virtio-blk disk (serial and label = the volume's
name, which is how the guest init finds it), the process runtime bind-mounts the directory.
``reconciler volumes`` lists, removes, snapshots and restores them through
``reconciler/execution/volumes.py``, which knows the VMs; this module knows only files.

Layout under the state directory (private, 0700, like the rest of it)::

    volumes/<vm>/<name>.ext4              a VM runtime's disk: sparse, mkfs.ext4 once
    volumes/<vm>/<name>/                  the process runtime's directory, owned by the VM's uid
    volume-snapshots/<vm>/<name>/<UTC time>.ext4 | <UTC time>/

A disk is only ever created (once, when missing) or grown (``truncate`` + ``resize2fs``,
offline, while its VM is stopped): nothing here shrinks or reformats one, and only ``remove``
deletes it (a prune with ``reclaimPolicy: delete``, or ``reconciler volumes rm``). A directory
volume has no size limit of its own (the size is the host filesystem's); that is the price of
a bind mount, which needs no loop device and nothing mounted on the host between boots.

Threat model: the disk's *content* is the guest's, so it is hostile input. The host never mounts
it; ``e2fsck`` and ``resize2fs`` (a grow) parse it, so they run in bubblewrap: no capability,
new namespaces (no network), a read-only ``/usr`` and the one image as the only writable file.
A bug they have in front of a crafted filesystem stays there; at worst a grow fails. A
directory volume is written by the workload's uid: the host copies it without following its
symlinks and changes the ownership of its top only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ToolMissingError, VMRuntimeError
from runtime.process.sandbox import HostLayout
from runtime.protocol import VolumeAttachment
from runtime.qemu.qmp import QMP_FAILURES, qmp_connection

__all__ = ["SnapshotInfo", "VolumeAttachment", "VolumeError", "VolumeInfo"]

VOLUMES_DIR = "volumes"
SNAPSHOTS_DIR = "volume-snapshots"
DISK_SUFFIX = ".ext4"
MIB = 1024 * 1024
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?")
_VM = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_STAMP = re.compile(r"\d{8}T\d{6}(\.\d{6})?Z")
TOOL_SECONDS = 600.0


class VolumeError(VMRuntimeError):
    """A volume that cannot be created, grown, copied or found."""


@dataclass(frozen=True)
class VolumeInfo:
    """A volume found under the state directory (``reconciler volumes ls``)."""

    vm: str
    name: str
    path: Path
    directory: bool
    size_bytes: int  # apparent size of a disk; bytes in use of a directory
    used_bytes: int  # blocks allocated on the host
    modified: float


@dataclass(frozen=True)
class SnapshotInfo:
    vm: str
    name: str
    stamp: str  # "20260101T120000.000000Z", also the snapshot's id
    path: Path
    size_bytes: int
    used_bytes: int
    taken: float


def _check_names(vm: str, name: str) -> None:
    # Both come from the store or the command line; neither may walk out of the directory.
    if not _VM.fullmatch(vm) or len(vm) > 63:
        raise VolumeError(f"{vm!r} is not a VM name")
    if not _NAME.fullmatch(name):
        raise VolumeError(f"{name!r} is not a volume name (1-16 of [a-z0-9-])")


def disk_path(state_dir: Path, vm: str, name: str) -> Path:
    _check_names(vm, name)
    return state_dir / VOLUMES_DIR / vm / f"{name}{DISK_SUFFIX}"


def directory_path(state_dir: Path, vm: str, name: str) -> Path:
    _check_names(vm, name)
    return state_dir / VOLUMES_DIR / vm / name


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise ToolMissingError(name, "volumes need it; install it with `apt-get install e2fsprogs`")
    return found


def _confined(argv: list[str], image: Path) -> list[str]:
    """``argv`` (an e2fsprogs tool working on ``image``) inside bubblewrap, the image at
    ``/volume``: what a crafted filesystem could make the tool do stays in there."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ToolMissingError("bwrap", "growing a volume needs it: apt-get install bubblewrap")
    layout = HostLayout.probe()
    outer = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    outer += ["--ro-bind", "/usr", "/usr"]
    for path, target in sorted(layout.links.items()):
        outer += ["--symlink", target, path]
    for path in layout.directories:
        outer += ["--ro-bind", path, path]
    outer += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    outer += ["--bind", str(image), "/volume", "--"]
    return [*outer, *[("/volume" if a == str(image) else a) for a in argv]]


def _run(argv: list[str], what: str, *, ok: tuple[int, ...] = (0,)) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VolumeError(f"{what}: {exc}") from exc
    if done.returncode not in ok:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise VolumeError(f"{what}: {lines[-1] if lines else f'exit {done.returncode}'}")


def ensure_disk(path: Path, size_mib: int, label: str) -> str:
    """Create the ext4 image at ``path`` if missing, or grow it to ``size_mib``; never shrinks.
    Returns what was done: ``created``, ``grown``, ``kept`` or ``larger`` (the disk is bigger
    than declared: kept as it is, a rollback or a volume declared again smaller)."""
    wanted = size_mib * MIB
    if path.exists():
        size = path.stat().st_size
        if size >= wanted:
            return "kept" if size == wanted else "larger"
        # Offline: the VM is stopped. e2fsck first, because resize2fs refuses a filesystem that
        # was not cleanly checked (a VMM killed with -9 leaves the journal to replay).
        check = [_tool("e2fsck"), "-f", "-p", str(path)]
        # e2fsck exits 1 when it fixed something, which is what it is run for.
        _run(_confined(check, path), f"checking volume {path.name}", ok=(0, 1))
        os.truncate(path, wanted)
        _run(_confined([_tool("resize2fs"), str(path)], path), f"growing volume {path.name}")
        return "grown"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".new-", suffix=DISK_SUFFIX, dir=path.parent)
    try:
        os.ftruncate(fd, wanted)  # sparse: blocks are allocated as the guest writes
        os.close(fd)
        _run(
            [
                _tool("mkfs.ext4"),
                "-q",
                "-F",
                "-L",
                label,
                "-m",
                "0",
                # Inode tables made here (as unwritten extents: fast, still mostly sparse),
                # not zeroed lazily by the guest's kernel after the mount: under TCG that
                # thread cost every first boot about a fifth of its time. The journal of a
                # fresh file reads as zeros already.
                "-E",
                "lazy_itable_init=0,lazy_journal_init=1,nodiscard",
                temporary,
            ],
            f"formatting volume {path.name}",
        )
        os.replace(temporary, path)  # complete or absent: a crash leaves no half-made volume
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return "created"


def ensure_directory(path: Path) -> str:
    """The process runtime's volume directory (the runtime gives its top to the VM's uid)."""
    created = not path.exists()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise VolumeError(f"{path} is not a directory")
    path.mkdir(mode=0o700, exist_ok=True)
    return "created" if created else "kept"


def _usage(path: Path) -> tuple[int, int]:
    """(size, allocated bytes) of a file or, summed, of a directory tree."""
    if not path.is_dir() or path.is_symlink():
        info = path.lstat()
        return info.st_size, info.st_blocks * 512
    size = used = 0
    for root, dirs, files in os.walk(path):
        for entry in (*dirs, *files):
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, entry))
                size += info.st_size
                used += info.st_blocks * 512
    return size, used


def list_volumes(state_dir: Path) -> list[VolumeInfo]:
    found = []
    base = state_dir / VOLUMES_DIR
    for vm_dir in sorted(base.iterdir()) if base.is_dir() else []:
        for entry in sorted(vm_dir.iterdir()):
            directory = entry.is_dir() and not entry.is_symlink()
            name = entry.name if directory else entry.name.removesuffix(DISK_SUFFIX)
            if entry.name.startswith(".") or not _NAME.fullmatch(name):
                continue
            if not directory and not entry.name.endswith(DISK_SUFFIX):
                continue
            size, used = _usage(entry)
            found.append(
                VolumeInfo(vm_dir.name, name, entry, directory, size, used, entry.stat().st_mtime)
            )
    return found


def find_volume(state_dir: Path, vm: str, name: str) -> VolumeInfo:
    for info in list_volumes(state_dir):
        if info.vm == vm and info.name == name:
            return info
    raise VolumeError(f"no volume {vm}/{name} on this host (see `reconciler volumes ls`)")


def remove_volume(state_dir: Path, vm: str, name: str) -> list[Path]:
    """Delete the volume's disk and directory, whichever exist; returns what was removed."""
    removed = []
    for path in (disk_path(state_dir, vm, name), directory_path(state_dir, vm, name)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path)
    with contextlib.suppress(OSError):
        (state_dir / VOLUMES_DIR / vm).rmdir()  # only when it was the VM's last volume
    return removed


# ---------------------------------------------------------------------------- snapshots --


def _snapshot_dir(state_dir: Path, vm: str, name: str) -> Path:
    _check_names(vm, name)
    return state_dir / SNAPSHOTS_DIR / vm / name


def _copy(source: Path, target: Path) -> None:
    """Copy a disk (sparse) or a directory tree (symlinks as links, owners and modes kept) to
    ``target``, which appears only when complete."""
    temporary = target.with_name(f".partial-{target.name}")
    if temporary.is_dir():
        shutil.rmtree(temporary)
    temporary.unlink(missing_ok=True)
    if source.is_dir():
        argv = ["cp", "-a", "--no-dereference", "--", str(source), str(temporary)]
    else:
        argv = ["cp", "--sparse=always", "--", str(source), str(temporary)]
    _run(argv, f"copying {source.name}")
    os.replace(temporary, target)


def snapshot(state_dir: Path, volume: VolumeInfo) -> SnapshotInfo:
    """Copy ``volume`` as it is now; the caller has paused or stopped its VM."""
    stamp = (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() // 1000 % 10**6:06d}Z"
    )
    where = _snapshot_dir(state_dir, volume.vm, volume.name)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = where / (stamp if volume.directory else stamp + DISK_SUFFIX)
    _copy(volume.path, target)
    size, used = _usage(target)
    return SnapshotInfo(volume.vm, volume.name, stamp, target, size, used, target.stat().st_mtime)


def list_snapshots(state_dir: Path) -> list[SnapshotInfo]:
    found = []
    base = state_dir / SNAPSHOTS_DIR
    for vm_dir in sorted(base.iterdir()) if base.is_dir() else []:
        for volume_dir in sorted(vm_dir.iterdir()):
            for entry in sorted(volume_dir.iterdir()):
                stamp = entry.name.removesuffix(DISK_SUFFIX)
                if not _STAMP.fullmatch(stamp):
                    continue  # a copy that never completed
                size, used = _usage(entry)
                found.append(
                    SnapshotInfo(
                        vm_dir.name,
                        volume_dir.name,
                        stamp,
                        entry,
                        size,
                        used,
                        entry.stat().st_mtime,
                    )
                )
    return found


def restore(state_dir: Path, volume: VolumeInfo, stamp: str | None) -> SnapshotInfo:
    """Put snapshot ``stamp`` (the latest when None) back in place of ``volume``; its VM is
    stopped. The current data is replaced only once the copy is complete."""
    snapshots = [
        s for s in list_snapshots(state_dir) if s.vm == volume.vm and s.name == volume.name
    ]
    chosen = [s for s in snapshots if stamp is None or s.stamp == stamp]
    if not chosen:
        what = f"snapshot {stamp}" if stamp else "any snapshot"
        raise VolumeError(f"volume {volume.vm}/{volume.name} has no {what}")
    picked = chosen[-1]
    if picked.path.is_dir() != volume.directory:
        raise VolumeError(f"snapshot {picked.stamp} is not of the same kind as {volume.path.name}")
    incoming = volume.path.with_name(f".restore-{volume.path.name}")
    _copy(picked.path, incoming)
    if volume.directory:
        # Two renames: a directory cannot replace a non-empty one atomically.
        outgoing = volume.path.with_name(f".old-{volume.path.name}")
        os.replace(volume.path, outgoing)
        os.replace(incoming, volume.path)
        shutil.rmtree(outgoing)
    else:
        os.replace(incoming, volume.path)
    return picked


# ------------------------------------------------------------------------------ pausing --


@contextlib.contextmanager
def qemu_paused(qmp_socket: Path) -> Iterator[None]:
    """QEMU's vCPUs stopped (QMP ``stop``, which also drains and flushes the disks to their
    files) for the duration; ``cont`` afterwards, whatever happened."""

    def refused(exc: Exception) -> Exception:
        return VolumeError(f"cannot pause the VM through {qmp_socket.name}: {exc}")

    with qmp_connection(qmp_socket, timeout=10.0, on_refused=refused) as monitor:
        try:
            monitor.cmd("stop")
        except QMP_FAILURES as exc:
            raise refused(exc) from exc
        try:
            yield
        finally:
            with contextlib.suppress(*QMP_FAILURES):
                monitor.cmd("cont")


def _descendants(pid: int) -> list[int]:
    found, level = [], [pid]
    while level:
        found += level
        following = []
        for parent in level:
            with contextlib.suppress(OSError, ValueError):
                text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
                following += [int(c) for c in text.split()]
        level = following
    return found


@contextlib.contextmanager
def processes_paused(pid: int) -> Iterator[None]:
    """Every process of a process VM (``pid`` and its descendants) stopped with SIGSTOP, so no
    write is in flight while its directory is copied; SIGCONT afterwards."""
    stopped = []
    try:
        # Twice: a process forked while the first pass ran is caught by the second.
        for _ in range(2):
            for child in _descendants(pid):
                if child not in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGSTOP)
                        stopped.append(child)
        yield
    finally:
        for child in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
