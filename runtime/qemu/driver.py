"""``QemuRuntime``: start, inspect and stop one VM under ``qemu-system-x86_64 -M microvm``.

The VM is daemonized by QEMU itself and found again from its directory (pid file, QMP socket,
console log), so a reconciler that exits or restarts adopts running VMs instead of killing or
duplicating them. Health comes from the guest init's console markers, state from QMP.

Every start writes the VM's own initrd (the artifact's initramfs plus the init's per-VM
configuration) into its directory, and QEMU runs confined (``confine.py``): a seccomp filter,
and an unprivileged user once it has opened what it needs as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from reconciler.errors import ToolMissingError, VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.console import last_event, read_markers
from runtime.console_log import ConsoleLog
from runtime.detached import alive, launch_detached, running_pid, wait_gone
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec, VMStatus
from runtime.qemu.accel import kvm_usable
from runtime.qemu.argv import CONSOLE_LOG, PID_FILE, QMP_SOCKET, SnapshotRole, qemu_argv
from runtime.qemu.confine import confinement
from runtime.qemu.machine import tcg_kernel_args
from runtime.qemu.qmp import qmp_connection
from runtime.qemu.snapshot import (
    Snapshot,
    SnapshotCache,
    eligible,
    link_or_copy,
    restore,
    snapshots_wanted,
)

START_SECONDS = 30.0
# After the grace period the guest init gives its workload, the time it may take to sync and
# power off before QEMU is told to quit.
POWEROFF_SECONDS = 3.0
QEMU_LOG = "qemu.log"  # QEMU's own stderr: why it failed to start
CHROOT = "qemu-chroot"  # under the state directory: the empty root confined QEMUs end in


class QemuRuntime:
    kind = RuntimeKind.QEMU

    def __init__(
        self,
        *,
        state_dir: Path,
        binary: str = "qemu-system-x86_64",
        accel: str = "auto",
        netns: str | None = None,
        confine: bool = True,
        snapshots: bool | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.binary = binary
        self.accel = accel
        self.netns = netns  # run VMs inside this network namespace (where their TAPs are)
        self.confine = confine  # seccomp and an unprivileged user; off only to debug QEMU
        # Start eligible VMs from a pre-booted template (snapshot.py) instead of booting them;
        # by default as $RECONCILER_QEMU_SNAPSHOTS says.
        wanted = snapshots_wanted() if snapshots is None else snapshots
        self.snapshots = SnapshotCache(state_dir) if wanted else None

    def _binary(self) -> str:
        found = shutil.which(self.binary)
        if found is None:
            raise ToolMissingError(self.binary, "install it with `apt-get install qemu-system-x86`")
        return found

    def choose_accel(self, spec: VMSpec) -> str:
        if self.accel != "auto":
            return self.accel
        if spec.kernel is None or spec.initrd is None:
            return "tcg"
        version = subprocess.run(
            [self._binary(), "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n", 1)[0]
        usable = kvm_usable(
            spec.kernel,
            spec.initrd,
            cache=self.state_dir / "kvm-probe.json",
            qemu_version=version,
            binary=self._binary(),
        )
        return "kvm" if usable else "tcg"

    def _pid(self, spec: VMSpec) -> int | None:
        return running_pid(spec.vm_dir / PID_FILE, spec.vm_dir)

    def start(self, spec: VMSpec) -> VMStatus:
        current = self.status(spec)
        if current.state is VMState.RUNNING:
            return current  # adopt: never a second QEMU for the same VM
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        for stale in (PID_FILE, QMP_SOCKET, "console.sock"):
            (spec.vm_dir / stale).unlink(missing_ok=True)
        # Each boot gets a fresh console log (health is read from it); the last one is kept.
        ConsoleLog(spec.vm_dir).new_boot()
        accel = self.choose_accel(spec)
        binary = self._binary()
        extra = tcg_kernel_args() if accel == "tcg" else ""
        confine = confinement(binary).argv(self._chroot()) if self.confine else []
        snapshot: Snapshot | None = None
        if self.snapshots is not None and not eligible(spec):
            snapshot = self.snapshots.ensure(
                spec, accel=accel, binary=binary, extra_kernel_args=extra, confine=confine
            )
            # The template's own initrd (no per-VM value): the guest's memory comes from the
            # snapshot; the VM's configuration goes to the restored init on its console.
            link_or_copy(snapshot.initrd, spec.vm_dir / VM_INITRD)
        elif spec.initrd is not None:
            write_vm_initrd(spec.initrd, spec.guest, spec.vm_dir / VM_INITRD)
        elif spec.guest.env or spec.guest.args or spec.guest.address:
            raise VMRuntimeError(f"{spec.name}: no initramfs to carry the VM's configuration")
        argv = qemu_argv(
            spec,
            accel=accel,
            binary=binary,
            extra_kernel_args=extra,
            confine=confine,
            snapshot=SnapshotRole.RESTORE if snapshot is not None else None,
        )
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        # Detached: QEMU is re-parented to the host's init, never a child (or a zombie) of
        # the reconciler, and survives it.
        qemu_log = spec.vm_dir / QEMU_LOG
        qemu_log.unlink(missing_ok=True)
        launched = launch_detached(argv, qemu_log)
        self._wait_started(spec, launched, qemu_log)
        if snapshot is not None and self.snapshots is not None:
            try:
                restore(spec, snapshot)
            except VMRuntimeError:
                self.stop(spec, grace_seconds=0)
                self.snapshots.discard(snapshot)  # the next start makes it again
                raise
        status = self.status(spec)
        if status.state is not VMState.RUNNING:
            raise VMRuntimeError(f"VM {spec.name} exited right after starting: {status.detail}")
        if not status.detail:
            # QEMU answered QMP, so its machine is built: the kernel and the initrd are in guest
            # memory. The per-VM initrd holds the VM's env and secrets; it leaves the host now
            # (every start writes a new one).
            (spec.vm_dir / VM_INITRD).unlink(missing_ok=True)
        return status

    def _chroot(self) -> Path:
        chroot = self.state_dir / CHROOT
        chroot.mkdir(mode=0o755, parents=True, exist_ok=True)
        if any(chroot.iterdir()):
            raise VMRuntimeError(f"{chroot} must be empty: confined QEMUs chroot to it")
        return chroot

    def _wait_started(self, spec: VMSpec, launched: int, qemu_log: Path) -> None:
        """Until QEMU has written its pid file and opened its QMP socket, or has exited."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._pid(spec) is not None and (spec.vm_dir / QMP_SOCKET).exists():
                return
            if not alive(launched, spec.vm_dir):
                break
            time.sleep(0.01)  # QEMU builds its machine in tens of milliseconds
        text = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
        lines = text.strip().splitlines()
        reason = lines[-1] if lines else "no output"
        with contextlib.suppress(ProcessLookupError):
            os.kill(launched, signal.SIGKILL)
        raise VMRuntimeError(f"QEMU could not start VM {spec.name}: {reason}")

    @contextlib.contextmanager
    def _qmp(self, spec: VMSpec) -> Iterator[QEMUMonitorProtocol]:
        with qmp_connection(spec.vm_dir / QMP_SOCKET, timeout=5.0) as monitor:
            yield monitor

    def status(self, spec: VMSpec) -> VMStatus:
        ConsoleLog(spec.vm_dir).maintain()  # rotated by size, sampled for `logs --since`
        console = spec.vm_dir / CONSOLE_LOG
        markers = read_markers(console)
        pid = self._pid(spec)
        if pid is None:
            ended = last_event(markers, "workload-exited")
            if last_event(markers, "poweroff") and ended is not None:
                code = int(ended["code"])
                state = VMState.STOPPED if code == 0 else VMState.FAILED
                return VMStatus(
                    spec.name, state, None, f"workload exited with code {code}", console
                )
            detail = "QEMU is not running" if markers else "never started"
            return VMStatus(
                spec.name, VMState.MISSING if markers else VMState.PENDING, None, detail, console
            )
        state, detail = VMState.RUNNING, ""
        try:
            with self._qmp(spec) as monitor:
                reply = monitor.cmd("query-status")
            answer = reply if isinstance(reply, dict) else {}
            run_state = str(answer.get("status", "unknown"))
            if run_state not in ("running", "prelaunch"):
                state, detail = VMState.FAILED, f"QEMU reports {run_state}"
        except (OSError, EOFError, QMPError) as exc:
            detail = f"QMP not answering: {exc}"
        error = last_event(markers, "error")
        if error is not None and not detail:
            detail = str(error.get("message", ""))
        return VMStatus(spec.name, state, pid, detail, console)

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        """Press the VM's power button and return the moment QEMU has exited.

        The guest init takes the ACPI power button as a stop request: SIGTERM to the workload,
        SIGKILL after its grace period, a "stopped" marker, sync, power off; QEMU then exits by
        itself. Only a guest that does not power off within ``grace_seconds`` (plus the time a
        power-off takes) is made to: QMP ``quit``, then SIGKILL."""
        pid = self._pid(spec)
        if pid is None:
            return self.status(spec)
        with contextlib.suppress(OSError, EOFError, QMPError), self._qmp(spec) as monitor:
            monitor.cmd("system_powerdown")
        if not wait_gone(pid, spec.vm_dir, grace_seconds + POWEROFF_SECONDS):
            with contextlib.suppress(OSError, EOFError, QMPError), self._qmp(spec) as monitor:
                monitor.cmd("quit")
            if not wait_gone(pid, spec.vm_dir, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, spec.vm_dir, 5.0)
        return self.status(spec)
