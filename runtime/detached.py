"""What every runtime shares about the processes it leaves running: starting one detached from
the reconciler, finding it again from its pid file, and telling from the console markers how a
VM or process that is gone ended."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

from reconciler.errors import VMRuntimeError
from reconciler.model import VMState
from runtime.console import last_event, read_markers
from runtime.protocol import VMStatus


def alive(pid: int, vm_dir: Path) -> bool:
    """True when ``pid`` runs (not a zombie) for the VM in ``vm_dir``; a recycled pid is not."""
    # Plain open() on str paths: the daemon asks this of every VM every cycle, and pathlib's
    # overhead was a third of a no-op cycle with 1,000 VMs (bench/bench_cycle.py).
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            cmdline = cmdline_file.read()
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and str(vm_dir).encode() in cmdline


def wait_gone(pid: int, vm_dir: Path, seconds: float) -> bool:
    """Wait up to ``seconds`` for the VM process ``pid`` to end; True when it has. Woken by the
    kernel the moment it exits (a pidfd), not by polling: a stop returns as soon as the VM is
    gone. The pid is checked to be the VM's after the pidfd is open, so a recycled pid is never
    waited for."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not alive(pid, vm_dir):
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # Readable once the process has exited (a zombie its parent has not reaped included).
        return bool(poller.poll(max(0, int(seconds * 1000)))) or not alive(pid, vm_dir)
    finally:
        os.close(pidfd)


def running_pid(pid_file: Path, vm_dir: Path) -> int | None:
    try:
        with open(pid_file, "rb") as pid_text:
            pid = int(pid_text.read())
    except (OSError, ValueError):
        return None
    return pid if alive(pid, vm_dir) else None


def launch_detached(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` with its output appended to ``log``, re-parented to the host's init (a
    shell that exits at once starts it), so it is never a child or zombie of the reconciler."""
    launched = subprocess.run(
        ["sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(log), *argv],
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,
        env=env,
    )
    try:
        return int(launched.stdout.strip())
    except ValueError as exc:
        reason = launched.stderr.strip() or "no pid"
        raise VMRuntimeError(f"cannot start {argv[0]}: {reason}") from exc


def ended_status(name: str, log: Path, *, gone: str, need_poweroff: bool) -> VMStatus:
    """The status of a VM whose process is not running, from what its guest reported."""
    markers = read_markers(log)
    exited = last_event(markers, "workload-exited")
    if exited is not None and (not need_poweroff or last_event(markers, "poweroff")):
        code = int(exited["code"])
        state = VMState.STOPPED if code == 0 else VMState.FAILED
        return VMStatus(name, state, None, f"workload exited with code {code}", log)
    if markers:
        return VMStatus(name, VMState.MISSING, None, gone, log)
    return VMStatus(name, VMState.PENDING, None, "never started", log)
