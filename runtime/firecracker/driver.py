"""``FirecrackerRuntime``: one Firecracker process per VM, configured from a generated
``--config-file``, controlled over its API socket, detached from the reconciler and adopted from
its directory like QEMU VMs. ``drift`` compares ``GET /vm/config`` with the generated config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time

from reconciler.errors import ToolMissingError, VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.detached import alive, ended_status, launch_detached, running_pid
from runtime.firecracker.api import FirecrackerAPI
from runtime.firecracker.config import API_SOCKET, firecracker_config
from runtime.protocol import VMSpec, VMStatus

CONFIG_FILE = "firecracker.json"
PID_FILE = "firecracker.pid"
CONSOLE_LOG = "console.log"


class FirecrackerRuntime:
    kind = RuntimeKind.FIRECRACKER

    def __init__(self, *, binary: str = "firecracker") -> None:
        self.binary = binary

    def _binary(self) -> str:
        found = shutil.which(self.binary)
        if found is None:
            raise ToolMissingError(
                "firecracker",
                "install the firecracker release binary on PATH (it is not packaged in Debian)",
            )
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise VMRuntimeError("Firecracker needs KVM, and /dev/kvm is not usable here")
        return found

    def _pid(self, spec: VMSpec) -> int | None:
        return running_pid(spec.vm_dir / PID_FILE, spec.vm_dir)

    def start(self, spec: VMSpec) -> VMStatus:
        current = self.status(spec)
        if current.state is VMState.RUNNING:
            return current  # adopt
        binary = self._binary()
        if spec.kernel is None or spec.kernel.read_bytes()[:4] != b"\x7fELF":
            raise VMRuntimeError(
                f"{spec.name}: Firecracker boots an uncompressed ELF vmlinux, not "
                f"{spec.kernel}; register one with `reconciler kernel import PATH`"
            )
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        (spec.vm_dir / API_SOCKET).unlink(missing_ok=True)
        config_path = spec.vm_dir / CONFIG_FILE
        config_path.write_text(json.dumps(firecracker_config(spec), indent=2) + "\n")
        log = spec.vm_dir / CONSOLE_LOG
        if log.exists():
            log.replace(spec.vm_dir / f"previous-{CONSOLE_LOG}")
        argv = [
            binary,
            "--api-sock",
            str(spec.vm_dir / API_SOCKET),
            "--config-file",
            str(config_path),
        ]
        pid = launch_detached(argv, log)
        (spec.vm_dir / PID_FILE).write_text(f"{pid}\n")
        return self.status(spec)

    def status(self, spec: VMSpec) -> VMStatus:
        log = spec.vm_dir / CONSOLE_LOG
        pid = self._pid(spec)
        if pid is not None:
            state, detail = VMState.RUNNING, ""
            with contextlib.suppress(VMRuntimeError):
                instance = FirecrackerAPI(spec.vm_dir / API_SOCKET).describe_instance()
                if instance.get("state") == "Paused":
                    detail = "paused"
            return VMStatus(spec.name, state, pid, detail, log)
        return ended_status(spec.name, log, gone="Firecracker is not running", need_poweroff=True)

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        pid = self._pid(spec)
        if pid is None:
            return self.status(spec)
        # Ctrl-Alt-Del reaches the guest init as SIGINT: a graceful stop of the workload.
        with contextlib.suppress(VMRuntimeError):
            FirecrackerAPI(spec.vm_dir / API_SOCKET).send_ctrl_alt_del()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and alive(pid, spec.vm_dir):
            time.sleep(0.1)
        if alive(pid, spec.vm_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.status(spec)

    def drift(self, spec: VMSpec) -> list[str]:
        """Top-level sections where the running VM differs from its generated config."""
        running = FirecrackerAPI(spec.vm_dir / API_SOCKET).get_vm_config()
        wanted = firecracker_config(spec)
        return sorted(key for key in wanted if not _covers(running.get(key), wanted[key]))


def _covers(running: object, wanted: object) -> bool:
    """True when ``running`` holds every value of ``wanted``; Firecracker reports defaults
    (``track_dirty_pages``, rate limiters ...) that the generated config leaves out."""
    if isinstance(wanted, dict):
        return isinstance(running, dict) and all(
            _covers(running.get(k), v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(running, list)
            and len(running) == len(wanted)
            and all(_covers(r, w) for r, w in zip(running, wanted, strict=True))
        )
    return running == wanted
