"""``ProcessRuntime``: run a workload's executable on the host, supervised by the guest init.

The same ``reconciler-init`` that is PID 1 inside VMs runs here in host mode as the workload's
supervisor: it starts the executable with its env and args, prints the same console markers,
restarts it per its restart policy and forwards SIGTERM with a grace period. Health and status
therefore work exactly as for VMs. The supervisor is started in a new session, detached from the
reconciler, inside a bubblewrap sandbox when ``bwrap`` is installed (read-only host, private
``/tmp``, its own PID namespace so that nothing outlives the supervisor), and found again from
its pid file, so a restarted reconciler adopts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.errors import VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.console import last_event, read_markers
from runtime.detached import alive, ended_status, launch_detached, running_pid
from runtime.protocol import VMSpec, VMStatus

PID_FILE = "process.pid"
CONSOLE_LOG = "console.log"
CONFIG = "init.conf"


class ProcessRuntime:
    kind = RuntimeKind.PROCESS

    def __init__(self, *, init_binary: Callable[[], Path], sandbox: bool = True) -> None:
        self.init_binary = init_binary  # called when a process starts: it may build the init
        self.sandbox = sandbox and shutil.which("bwrap") is not None

    def _pid(self, spec: VMSpec) -> int | None:
        return running_pid(spec.vm_dir / PID_FILE, spec.vm_dir)

    def _config(self, spec: VMSpec) -> str:
        assert spec.executable is not None
        lines = [f"exec={spec.executable}", f"workdir={spec.vm_dir}", "grace=10"]
        lines += [f"arg={arg}" for arg in spec.args]
        lines += [f"env={key}={value}" for key, value in sorted(spec.env.items())]
        # The restart policy travels on the VM command line as rc.restart=...; keep it.
        for token in spec.kernel_cmdline.split():
            if token.startswith("rc.restart="):
                lines.append(f"restart={token.removeprefix('rc.restart=')}")
        return "\n".join(lines) + "\n"

    def start(self, spec: VMSpec) -> VMStatus:
        current = self.status(spec)
        if current.state is VMState.RUNNING:
            return current  # adopt
        if spec.executable is None:
            raise VMRuntimeError(f"{spec.name}: the process runtime needs an executable artifact")
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        (spec.vm_dir / CONFIG).write_text(self._config(spec))
        log = spec.vm_dir / CONSOLE_LOG
        if log.exists():
            log.replace(spec.vm_dir / f"previous-{CONSOLE_LOG}")
        init = self.init_binary()
        argv = [str(init), "--supervisor", "--config", str(spec.vm_dir / CONFIG)]
        if self.sandbox:
            # The host read-only, a private /tmp, and on top of it what the workload needs
            # wherever it lives (a state directory under /tmp would vanish otherwise).
            argv = [
                "bwrap",
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "--ro-bind",
                str(init),
                str(init),
                "--ro-bind",
                str(spec.executable),
                str(spec.executable),
                "--bind",
                str(spec.vm_dir),
                str(spec.vm_dir),
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-pid",
                "--hostname",
                spec.name,
                "--new-session",
                *argv,
            ]
        # Started through a shell that exits at once: the supervisor is re-parented to the
        # host's init, never a child (or a zombie) of the reconciler.
        launcher = launch_detached(argv, log, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        # bwrap does not pass signals on: the supervisor to signal is its child, the init.
        pid = (self._supervisor_pid(launcher) if self.sandbox else None) or launcher
        (spec.vm_dir / PID_FILE).write_text(f"{pid}\n")
        return self.status(spec)

    @staticmethod
    def _supervisor_pid(parent: int) -> int | None:
        """The init under bwrap, or None when bwrap already ended (its log tells why)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                return None
            if children:
                return int(children[0])
            time.sleep(0.01)
        return None

    def status(self, spec: VMSpec) -> VMStatus:
        log = spec.vm_dir / CONSOLE_LOG
        pid = self._pid(spec)
        if pid is not None:
            error = last_event(read_markers(log), "error")
            return VMStatus(
                spec.name, VMState.RUNNING, pid, str(error.get("message", "")) if error else "", log
            )
        return ended_status(spec.name, log, gone="the supervisor is gone", need_poweroff=False)

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        pid = self._pid(spec)
        if pid is None:
            return self.status(spec)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the init forwards it to the workload
        deadline = time.monotonic() + grace_seconds + 1
        while time.monotonic() < deadline and alive(pid, spec.vm_dir):
            time.sleep(0.05)
        if alive(pid, spec.vm_dir):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return self.status(spec)
