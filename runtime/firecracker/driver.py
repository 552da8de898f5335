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
import subprocess
import time
from pathlib import Path

from reconciler.errors import ToolMissingError, VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.console import last_event, read_markers
from runtime.firecracker.api import FirecrackerAPI
from runtime.firecracker.config import API_SOCKET, firecracker_config
from runtime.protocol import VMSpec, VMStatus

CONFIG_FILE = "firecracker.json"
PID_FILE = "firecracker.pid"
CONSOLE_LOG = "console.log"


def _alive(pid: int, vm_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(vm_dir).encode() in cmdline


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
        try:
            pid = int((spec.vm_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, spec.vm_dir) else None

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
        launched = subprocess.run(
            ["sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(log), *argv],
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
        )
        try:
            pid = int(launched.stdout.strip())
        except ValueError as exc:
            raise VMRuntimeError(f"{spec.name}: cannot start Firecracker") from exc
        (spec.vm_dir / PID_FILE).write_text(f"{pid}\n")
        return self.status(spec)

    def status(self, spec: VMSpec) -> VMStatus:
        log = spec.vm_dir / CONSOLE_LOG
        markers = read_markers(log)
        pid = self._pid(spec)
        if pid is not None:
            state, detail = VMState.RUNNING, ""
            with contextlib.suppress(VMRuntimeError):
                instance = FirecrackerAPI(spec.vm_dir / API_SOCKET).describe_instance()
                if instance.get("state") == "Paused":
                    detail = "paused"
            return VMStatus(spec.name, state, pid, detail, log)
        exited = last_event(markers, "workload-exited")
        if exited is not None and last_event(markers, "poweroff") is not None:
            code = int(exited["code"])
            return VMStatus(
                spec.name,
                VMState.STOPPED if code == 0 else VMState.FAILED,
                None,
                f"workload exited with code {code}",
                log,
            )
        if markers:
            return VMStatus(spec.name, VMState.MISSING, None, "Firecracker is not running", log)
        return VMStatus(spec.name, VMState.PENDING, None, "never started", log)

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        pid = self._pid(spec)
        if pid is None:
            return self.status(spec)
        # Ctrl-Alt-Del reaches the guest init as SIGINT: a graceful stop of the workload.
        with contextlib.suppress(VMRuntimeError):
            FirecrackerAPI(spec.vm_dir / API_SOCKET).send_ctrl_alt_del()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _alive(pid, spec.vm_dir):
            time.sleep(0.1)
        if _alive(pid, spec.vm_dir):
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
