"""``ProcessRuntime``: run a workload's executable on the host, supervised by the guest init.

The same ``reconciler-init`` that is PID 1 inside VMs runs here in host mode as the workload's
supervisor: it starts the executable with its env and args, prints the same console markers,
restarts it per its restart policy and forwards SIGTERM with a grace period. Health and status
therefore work exactly as for VMs.

The fleet repository is untrusted and this runs as root, so the supervisor and the workload run
in a sandbox (``sandbox.py``): their own user namespace as an unprivileged uid with no
capability, a read-only minimal view of the host whose only writable host path is
``<vm dir>/work``, private ``/tmp``, their own PID namespace (nothing outlives the supervisor),
and their own network namespace on the fleet bridge with the VM's pool address
(``runtime.network.netns``, prepared by the executor through ``Network.attach``). A missing
sandbox tool is an error, never a bare process.

The sandbox is started detached from the reconciler; the pid file names its PID namespace's
first process, so a restarted reconciler adopts it, and killing that process ends everything in
the namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.errors import VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.console import last_event, read_markers
from runtime.console_log import ConsoleLog
from runtime.detached import ended_status, launch_detached, running_pid, wait_gone
from runtime.guest_config import write_config_file
from runtime.network.netns import namespace_path
from runtime.process.sandbox import (
    WORKDIR,
    HostLayout,
    sandbox_argv,
    sandbox_tools,
    sandbox_uid,
)
from runtime.protocol import VMSpec, VMStatus

PID_FILE = "process.pid"
CONSOLE_LOG = "console.log"
CONFIG = "init.conf"
VM_CONFIG = "vm.conf"


class ProcessRuntime:
    kind = RuntimeKind.PROCESS

    def __init__(self, *, init_binary: Callable[[], Path]) -> None:
        self.init_binary = init_binary  # called when a process starts: it may build the init

    def _pid(self, spec: VMSpec) -> int | None:
        return running_pid(spec.vm_dir / PID_FILE, spec.vm_dir)

    def _config(self, spec: VMSpec) -> str:
        assert spec.executable is not None
        lines = [f"exec={spec.executable}", f"workdir={spec.vm_dir / WORKDIR}", "grace=10"]
        # Env, args and restart policy: the length-prefixed per-VM file (``--vm-config``).
        return "\n".join(lines) + "\n"

    def start(self, spec: VMSpec) -> VMStatus:
        current = self.status(spec)
        if current.state is VMState.RUNNING:
            return current  # adopt
        if spec.executable is None:
            raise VMRuntimeError(f"{spec.name}: the process runtime needs an executable artifact")
        tools = sandbox_tools()  # before anything is written: no sandbox, no start
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        (spec.vm_dir / CONFIG).write_text(self._config(spec))
        log = spec.vm_dir / CONSOLE_LOG
        ConsoleLog(spec.vm_dir).new_boot()  # the last boot's log becomes previous-console.log
        init = self.init_binary()
        vm_config = write_config_file(spec.guest, spec.vm_dir / VM_CONFIG)
        argv = [str(init), "--supervisor", "--config", str(spec.vm_dir / CONFIG)]
        argv += ["--vm-config", str(vm_config)]
        uid = sandbox_uid(spec.name)
        workdir = spec.vm_dir / WORKDIR
        workdir.mkdir(mode=0o700, exist_ok=True)
        os.chown(workdir, uid, uid, follow_symlinks=False)
        for volume in spec.volumes:
            # A directory bind-mounted at its mountPath; its top belongs to the VM's uid (the
            # workload made the rest, as itself).
            if not volume.directory:
                raise VMRuntimeError(f"{spec.name}: volume {volume.name} is not a directory")
            os.chown(volume.path, uid, uid, follow_symlinks=False)
        # Every file the init is told to read, readable by the VM's uid and shown read-only.
        configs = [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a.endswith("config")]
        for config in configs:
            os.chown(config, uid, uid, follow_symlinks=False)
            os.chmod(config, 0o400)
        argv = sandbox_argv(
            name=spec.name,
            command=argv,
            read_only=[init, spec.executable, *configs],
            workdir=workdir,
            uid=uid,
            netns=namespace_path(spec.network.tap) if spec.network is not None else None,
            tools=tools,
            layout=HostLayout.probe(),
            volumes=[(v.path, v.mount_path) for v in spec.volumes],
            secret_files=bool(spec.guest.secret_files),
        )
        # Started through a shell that exits at once: the sandbox is re-parented to the host's
        # init, never a child (or a zombie) of the reconciler.
        launcher = launch_detached(argv, log, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        # The pid file names the PID namespace's first process (the outer bwrap's child): its
        # death ends the namespace, and ``stop`` finds the supervisor below it.
        pid = self._supervisor_pid(launcher) or launcher
        (spec.vm_dir / PID_FILE).write_text(f"{pid}\n")
        return self.status(spec)

    @staticmethod
    def _supervisor_pid(parent: int) -> int | None:
        """The first process of the sandbox's PID namespace (the outer bwrap's child), or None
        when bwrap already ended (its log tells why)."""
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
        ConsoleLog(spec.vm_dir).maintain()  # rotated by size, sampled for `logs --since`
        log = spec.vm_dir / CONSOLE_LOG
        pid = self._pid(spec)
        if pid is not None:
            markers = read_markers(log)
            if last_event(markers, "booted") is not None:
                # The init read its per-VM configuration (secrets included) into memory before
                # it said "booted": no copy of it stays on the host's disk.
                (spec.vm_dir / VM_CONFIG).unlink(missing_ok=True)
            error = last_event(markers, "error")
            return VMStatus(
                spec.name, VMState.RUNNING, pid, str(error.get("message", "")) if error else "", log
            )
        return ended_status(spec.name, log, gone="the supervisor is gone", need_poweroff=False)

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        pid = self._pid(spec)
        if pid is None:
            return self.status(spec)
        # The namespace's first process ignores SIGTERM (bwrap, as an init, installs no handler):
        # the init below it gets it and forwards it to the workload.
        supervisor = _supervisor_below(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor or pid, signal.SIGTERM)
        # The init stops its workload (SIGTERM, SIGKILL after its grace period) and exits, and
        # the namespace ends with it: the wait returns the moment it does.
        if not wait_gone(pid, spec.vm_dir, grace_seconds + 1):
            # The namespace's first process: every process of the sandbox dies with it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, spec.vm_dir, 5.0)
        return self.status(spec)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _supervisor_below(pid: int) -> int | None:
    """The guest init under the sandbox's first process ``pid`` (the nearest process that is
    not bwrap and runs ``--supervisor``), or None. The workload could dress a process up as
    one; that only costs the grace period before ``stop`` kills the whole namespace."""
    level = _children(pid)
    for _depth in range(4):
        found = []
        for child in level:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--supervisor" in argv and Path(argv[0].decode(errors="replace")).name != "bwrap":
                return child
            found += _children(child)
        level = found
    return None
