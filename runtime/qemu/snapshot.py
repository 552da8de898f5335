"""Pre-booted QEMU snapshots: start a VM from a saved template instead of booting its kernel.

Where it sits: ``QemuRuntime.start`` (``driver.py``) asks ``SnapshotCache.ensure`` for the
snapshot of a VM's artifact and machine shape when snapshots are on
(``RECONCILER_QEMU_SNAPSHOTS=1``), starts QEMU with the same command line plus
``-incoming defer`` (``argv.py``, ``SnapshotRole.RESTORE``), then ``restore`` feeds it the saved
state over QMP and sends the VM its own configuration on the console.

How a snapshot is made, once per key: a template VM boots the artifact with a configuration
that holds only ``snapshot-template 1`` (no env, no secret, no address). The guest init loads
its modules, prints ``snapshot-ready`` and blocks reading its console (``guest/init.c``,
``await_snapshot_config``); the host then pauses the template and migrates it into a file.
So the saved memory holds nothing per VM, and one file serves every VM of the artifact. A
restored VM continues from that read: the runtime writes ``<length>\\n<vm.conf bytes>`` to
the console socket (QEMU's console log records only what the guest writes, never this input),
and the init sets up the VM's own MAC address (the device state is the template's), network,
volumes, secrets and workload as after a boot. With the configuration go the host's clock and
64 fresh random bytes: the init sets the clock (the template's stopped when it was saved) and
reseeds the kernel's random generator (else every VM of one snapshot would draw the same
"random" numbers, as Firecracker's snapshot documentation warns).

The key is content-addressed: the kernel's and the initramfs's digests (the init is inside the
initramfs), the kernel command line, vCPUs, memory, accelerator, the QEMU binary and its version,
and whether the VM has a NIC: anything that shapes the devices or the guest memory. Template and
restore use the same ``qemu_argv`` (same devices in the same order) except the NIC's backend
(the template has no TAP) and ``-incoming``. The state file is passed to QEMU as a descriptor over
QMP (``getfd``), both ways: a confined QEMU can neither ``exec`` (``spawn=deny``) nor see the
state directory (it is chrooted), and the file stays root's, mode 0600.

Not for VMs with a root disk or volumes: their disks are per VM, and a template that had
mounted or probed another disk would hand its cached view of that disk to every restore.
``eligible`` says why; the driver boots those VMs as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from reconciler.errors import ConfigError, VMRuntimeError
from reconciler.guest_config import GuestConfig, encode
from runtime.console import last_event, read_markers
from runtime.detached import alive, launch_detached, running_pid
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec
from runtime.qemu.argv import (
    CONSOLE_LOG,
    CONSOLE_SOCKET,
    PID_FILE,
    QMP_SOCKET,
    SnapshotRole,
    qemu_argv,
)
from runtime.qemu.qmp import qmp_connection

SNAPSHOTS_ENV = "RECONCILER_QEMU_SNAPSHOTS"  # "1": start eligible VMs from snapshots
SNAPSHOTS = "qemu-snapshots"  # under the state directory
VMSTATE = "vmstate"  # the migration stream: memory and device state of the paused template
META = "snapshot.json"
FORMAT = 1  # bump when what a snapshot holds changes
READY_SECONDS = 180.0  # the template's boot, under TCG on a loaded host
MIGRATE_SECONDS = 120.0
CONFIG_SECONDS = 60.0  # from the restore to the init's next marker
CONNECT_SECONDS = 5.0  # QMP refusing a connection for longer means QEMU is gone
KEEP = 8  # snapshots kept, the most recently used (each is about the guest's touched memory)
KEEP_RECENT_SECONDS = 600.0  # and never one used this recently (a start may be restoring it)
TEMPLATE_NAME = "snapshot-template"
TEMPLATE_MAC = "52:54:00:00:00:02"  # replaced in every restored VM by its own


def snapshots_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``RECONCILER_QEMU_SNAPSHOTS`` turns snapshots on ("1") or off ("0", unset); read
    by the runtime itself, like the build sandbox's network switch, so every caller obeys it."""
    value = (os.environ if environ is None else environ).get(SNAPSHOTS_ENV, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{SNAPSHOTS_ENV} must be 0 or 1, not {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Snapshot:
    """One cached template: ``vmstate`` is restored, ``initrd`` given to QEMU as the template
    had it (QEMU loads it before the state replaces the memory: the same bytes keep every ROM
    and size the same)."""

    key: str
    directory: Path

    @property
    def vmstate(self) -> Path:
        return self.directory / VMSTATE

    @property
    def initrd(self) -> Path:
        return self.directory / VM_INITRD


def eligible(spec: VMSpec) -> str:
    """Why ``spec`` cannot start from a snapshot, or "" when it can."""
    if spec.kernel is None or spec.initrd is None:
        return "it has no kernel and initramfs to make a template of"
    if spec.rootfs is not None:
        return "it has a root disk (per VM: a template would have probed another disk)"
    if spec.volumes:
        return "it has volumes (per-VM disks a template cannot have)"
    return ""


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: a replaced file is hashed again, an unchanged one once.
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    info = path.stat()
    return _file_digest(str(path), info.st_size, info.st_mtime_ns)


@functools.cache
def qemu_version(binary: str) -> str:
    return subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]


def snapshot_key(spec: VMSpec, *, accel: str, binary: str, extra_kernel_args: str) -> str:
    """The content address of the template ``spec`` restores from."""
    if spec.kernel is None or spec.initrd is None:
        raise VMRuntimeError(f"VM {spec.name} has no kernel and initramfs to snapshot")
    shape = {
        "format": FORMAT,
        "kernel": file_digest(spec.kernel),
        "initrd": file_digest(spec.initrd),
        "cmdline": spec.kernel_cmdline,
        "extra": extra_kernel_args,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "accel": accel,
        "qemu": [binary, qemu_version(binary)],
        "nic": spec.network is not None,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


class SnapshotCache:
    """The snapshots of this host, one directory per key under ``<state dir>/qemu-snapshots``;
    a missing one is made by booting its template (under a lock: concurrent starts of one
    artifact make it once)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / SNAPSHOTS

    def ensure(
        self,
        spec: VMSpec,
        *,
        accel: str,
        binary: str,
        extra_kernel_args: str,
        confine: Sequence[str],
    ) -> Snapshot:
        encode(spec.guest)  # a configuration the init cannot take fails before anything starts
        key = snapshot_key(spec, accel=accel, binary=binary, extra_kernel_args=extra_kernel_args)
        snapshot = Snapshot(key, self.root / key)
        with contextlib.suppress(FileNotFoundError):
            os.utime(snapshot.directory / META)  # used: the pruning keeps the recent ones
            return snapshot
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(self.root / f".{key}.lock"):
            if not (snapshot.directory / META).exists():
                self._make(
                    spec,
                    snapshot=snapshot,
                    accel=accel,
                    binary=binary,
                    extra_kernel_args=extra_kernel_args,
                    confine=confine,
                )
                self.prune()
        return snapshot

    def prune(self, keep: int = KEEP) -> list[str]:
        """Remove all but the ``keep`` most recently used snapshots (and never one used in the
        last ``KEEP_RECENT_SECONDS``); returns the keys removed."""
        used = []
        for meta in self.root.glob(f"*/{META}"):
            with contextlib.suppress(FileNotFoundError):
                used.append((meta.stat().st_mtime, meta.parent))
        used.sort(reverse=True)
        cutoff = time.time() - KEEP_RECENT_SECONDS
        removed = []
        for when, directory in used[keep:]:
            if when < cutoff:
                # (Its lock file stays: a start may hold it; it is empty.)
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory.name)
        return removed

    def discard(self, snapshot: Snapshot) -> None:
        """Forget ``snapshot`` (one that QEMU could not restore)."""
        shutil.rmtree(snapshot.directory, ignore_errors=True)

    def _make(
        self,
        spec: VMSpec,
        *,
        snapshot: Snapshot,
        accel: str,
        binary: str,
        extra_kernel_args: str,
        confine: Sequence[str],
    ) -> None:
        assert spec.initrd is not None  # eligible() was asked first
        # Short: QEMU's sockets live here, and a UNIX socket path has 108 bytes.
        work = self.root / f".t{snapshot.key[:8]}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        template = replace(
            spec,
            name=TEMPLATE_NAME,
            vm_dir=work,
            guest=GuestConfig(snapshot_template=True),
            network=(
                replace(spec.network, tap="", mac=TEMPLATE_MAC)
                if spec.network is not None
                else None
            ),
        )
        started = time.monotonic()
        try:
            write_vm_initrd(spec.initrd, template.guest, work / VM_INITRD)
            argv = qemu_argv(
                template,
                accel=accel,
                binary=binary,
                extra_kernel_args=extra_kernel_args,
                confine=confine,
                snapshot=SnapshotRole.TEMPLATE,
            )
            launched = launch_detached(argv, work / "qemu.log")
            try:
                _wait_ready(work, launched)
                booted = time.monotonic() - started
                with _monitor(work) as monitor:
                    monitor.cmd("stop")
                    _migrate_out(monitor, work / VMSTATE)
                    with contextlib.suppress(QMPError, OSError, EOFError):
                        monitor.cmd("quit")
            finally:
                _end(work, launched)
            os.chmod(work / VMSTATE, 0o600)
            meta = {
                "key": snapshot.key,
                "kernel": str(spec.kernel),
                "initrd": str(spec.initrd),
                "template_boot_seconds": round(booted, 3),
                "made_seconds": round(time.monotonic() - started, 3),
                "vmstate_bytes": (work / VMSTATE).stat().st_size,
                "at": time.time(),
            }
            (work / META).write_text(json.dumps(meta, indent=2) + "\n")
            for leftover in (CONSOLE_LOG, CONSOLE_SOCKET, QMP_SOCKET, PID_FILE, "qemu.log"):
                (work / leftover).unlink(missing_ok=True)
            shutil.rmtree(snapshot.directory, ignore_errors=True)
            os.replace(work, snapshot.directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content: a hard link, a copy across filesystems."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        os.chmod(target, 0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _monitor(vm_dir: Path, timeout: float = 10.0) -> Iterator[QEMUMonitorProtocol]:
    # A connection refused right after QEMU created its socket was seen on a heavily loaded
    # host: tried again for a few seconds before QEMU's log is asked why.
    with qmp_connection(
        vm_dir / QMP_SOCKET,
        timeout=timeout,
        retry_for=CONNECT_SECONDS,
        on_refused=lambda exc: _why_not(vm_dir, f"QMP not answering ({exc})"),
    ) as monitor:
        yield monitor


def _why_not(vm_dir: Path, what: str) -> VMRuntimeError:
    error = last_event(read_markers(vm_dir / CONSOLE_LOG), "error")
    log = vm_dir / "qemu.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    reason = str(error["message"]) if error else (lines[-1] if lines else "no output")
    return VMRuntimeError(f"{vm_dir.name}: {what}: {reason}")


def _wait_ready(work: Path, launched: int) -> None:
    """Until the template's init reports ``snapshot-ready`` (it then waits on its console)."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        markers = read_markers(work / CONSOLE_LOG)
        if last_event(markers, "snapshot-ready") is not None:
            return
        if last_event(markers, "error", "poweroff") is not None:
            raise _why_not(work, "the snapshot template stopped before it was ready")
        if not alive(launched, work):
            raise _why_not(work, "the snapshot template's QEMU ended before it was ready")
        time.sleep(0.02)
    raise _why_not(
        work, f"the snapshot template was not ready within {READY_SECONDS:g} s (an old init?)"
    )


def _end(work: Path, launched: int) -> None:
    pid = running_pid(work / PID_FILE, work) or (launched if alive(launched, work) else None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(pid, work) and time.monotonic() < deadline:
        time.sleep(0.02)


def _migration_done(monitor: QEMUMonitorProtocol, what: str, vm_dir: Path) -> None:
    deadline = time.monotonic() + MIGRATE_SECONDS
    while time.monotonic() < deadline:
        try:
            reply = monitor.cmd("query-migrate")
        except (QMPError, OSError, EOFError) as exc:
            # QEMU ends when it cannot load a stream; its log says why.
            raise _why_not(vm_dir, f"{what} failed") from exc
        info = reply if isinstance(reply, dict) else {}
        status = str(info.get("status", "none"))
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status)
            raise VMRuntimeError(f"{vm_dir.name}: {what} failed: {detail}")
        time.sleep(0.01)
    raise VMRuntimeError(f"{vm_dir.name}: {what} took more than {MIGRATE_SECONDS:g} s")


def _pass_fd(monitor: QEMUMonitorProtocol, fd: int, name: str) -> None:
    # getfd takes the descriptor that comes with it over the socket (SCM_RIGHTS).
    monitor.send_fd_scm(fd)
    monitor.cmd("getfd", fdname=name)


def _migrate_out(monitor: QEMUMonitorProtocol, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pass_fd(monitor, fd, "vmstate")
    finally:
        os.close(fd)
    try:
        monitor.cmd("migrate", uri="fd:vmstate")
    except QMPError as exc:
        raise VMRuntimeError(f"snapshot template: QEMU refused to save it: {exc}") from exc
    _migration_done(monitor, "saving the snapshot", path.parent)


def restore(spec: VMSpec, snapshot: Snapshot) -> None:
    """Load ``snapshot`` into the QEMU just started for ``spec`` with ``-incoming defer``, let it
    run, and send the guest init its configuration on the console."""
    fd = os.open(snapshot.vmstate, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _monitor(spec.vm_dir) as monitor:
            _pass_fd(monitor, fd, "vmstate")
            try:
                monitor.cmd("migrate-incoming", uri="fd:vmstate")
            except QMPError as exc:
                raise VMRuntimeError(f"{spec.name}: QEMU refused the snapshot: {exc}") from exc
            _migration_done(monitor, "restoring the snapshot", spec.vm_dir)
            _wait_running(monitor, spec)
    finally:
        os.close(fd)
    guest = replace(spec.guest, clock_ns=time.time_ns(), entropy=secrets.token_bytes(64))
    if spec.network is not None:
        guest = replace(guest, mac=spec.network.mac)
    send_config(spec.vm_dir / CONSOLE_SOCKET, encode(guest))


def _wait_running(monitor: QEMUMonitorProtocol, spec: VMSpec) -> None:
    # The template was paused when it was saved, and QEMU keeps a restored guest in the run
    # state it was saved in: ``cont`` lets it run.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = monitor.cmd("query-status")
        status = str(reply.get("status", "")) if isinstance(reply, dict) else ""
        if status == "running":
            return
        if status == "paused":
            monitor.cmd("cont")
            continue
        time.sleep(0.005)
    raise VMRuntimeError(f"{spec.name}: the restored VM did not start running")


def send_config(console: Path, blob: bytes) -> None:
    """Write ``<length>\\n<blob>`` to the guest's console (the init in snapshot mode reads it
    raw), and stay connected until the init has taken it: QEMU drops what it has not yet handed
    to the guest when the client hangs up. The init's next marker (``booted``, or an ``error``)
    says it has."""
    log = console.parent / CONSOLE_LOG
    seen = len(read_markers(log))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(str(console))
            sock.sendall(b"%d\n" % len(blob) + blob)
        except OSError as exc:
            raise VMRuntimeError(
                f"cannot send the VM its configuration on {console}: {exc}"
            ) from exc
        deadline = time.monotonic() + CONFIG_SECONDS
        while time.monotonic() < deadline:
            if last_event(read_markers(log)[seen:], "booted", "error") is not None:
                return
            time.sleep(0.005)
    raise VMRuntimeError(
        f"{console.parent.name}: the restored guest did not take its configuration within "
        f"{CONFIG_SECONDS:g} s"
    )
