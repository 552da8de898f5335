"""``FirecrackerRuntime``: one Firecracker process per VM, configured from a generated
``--config-file``, controlled over its API socket, detached from the reconciler and adopted from
its directory like QEMU VMs. ``drift`` compares ``GET /vm/config`` with the generated config.

Where a ``jailer`` binary exists, Firecracker runs under it: chrooted to a directory under the
VM's own (``jail.py`` prepares it), in a new PID namespace, as the unprivileged ``VM_USER``. The
VM's own initrd (the artifact's initramfs plus the init's per-VM configuration) is written at
every start, so ``boot_args`` carries only what the kernel needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from reconciler.errors import ToolMissingError, VMRuntimeError
from reconciler.model import RuntimeKind, VMState
from runtime.console_log import ConsoleLog
from runtime.detached import alive, ended_status, launch_detached, running_pid
from runtime.firecracker.api import FirecrackerAPI
from runtime.firecracker.config import API_SOCKET, JailerOptions, firecracker_config, jailer_argv
from runtime.firecracker.jail import CONFIG_FILE, JAILER_PID_FILE, prepare_chroot
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec, VMStatus
from runtime.vm_user import ensure_user

PID_FILE = "firecracker.pid"
CONSOLE_LOG = "console.log"
JAIL_DIR = "jail"
JAILER_SECONDS = 5.0


class FirecrackerRuntime:
    kind = RuntimeKind.FIRECRACKER

    def __init__(self, *, binary: str = "firecracker", jailer: str | None = "jailer") -> None:
        self.binary = binary
        self.jailer = jailer  # None: never jail (only where no jailer can be installed)

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

    def jailer_options(self, spec: VMSpec, binary: str) -> JailerOptions | None:
        """How this VM is jailed, or None when no jailer is installed."""
        jailer = shutil.which(self.jailer) if self.jailer else None
        if jailer is None:
            return None
        user = ensure_user()
        return JailerOptions(
            uid=user.pw_uid,
            gid=user.pw_gid,
            chroot_base=spec.vm_dir / JAIL_DIR,
            exec_file=Path(binary),
            jailer=Path(jailer),
        )

    @staticmethod
    def _jail_root(spec: VMSpec) -> Path | None:
        """The chroot of a VM started under the jailer (found from its directory)."""
        roots = sorted((spec.vm_dir / JAIL_DIR).glob(f"*/{spec.name}/root"))
        return roots[0] if roots else None

    def _api_socket(self, spec: VMSpec) -> Path:
        root = self._jail_root(spec)
        return (root if root is not None else spec.vm_dir) / API_SOCKET

    def _alive(self, pid: int, spec: VMSpec) -> bool:
        if alive(pid, spec.vm_dir):
            return True
        # Jailed, Firecracker's command line holds only chroot paths: its root names the VM.
        root = self._jail_root(spec)
        if root is None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            return state != b"Z" and os.readlink(f"/proc/{pid}/root") == str(root)
        except (OSError, IndexError):
            return False

    def _pid(self, spec: VMSpec) -> int | None:
        pid = running_pid(spec.vm_dir / PID_FILE, spec.vm_dir)
        if pid is not None:
            return pid
        try:
            recorded = int((spec.vm_dir / PID_FILE).read_text())
        except (OSError, ValueError):
            return None
        return recorded if self._alive(recorded, spec) else None

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
        log = spec.vm_dir / CONSOLE_LOG
        ConsoleLog(spec.vm_dir).new_boot()  # the last boot's log becomes previous-console.log
        options = self.jailer_options(spec, binary)
        if options is not None:
            root = prepare_chroot(spec, options)
            launch_detached(jailer_argv(spec, options, f"/{CONFIG_FILE}"), log)
            pid = self._jailed_pid(root / JAILER_PID_FILE)
        else:
            (spec.vm_dir / API_SOCKET).unlink(missing_ok=True)
            if spec.initrd is not None:
                write_vm_initrd(spec.initrd, spec.guest, spec.vm_dir / VM_INITRD)
            config_path = spec.vm_dir / CONFIG_FILE
            config_path.write_text(json.dumps(firecracker_config(spec), indent=2) + "\n")
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

    @staticmethod
    def _jailed_pid(pid_file: Path) -> int:
        """Firecracker's pid, which the jailer writes once it has cloned into the new PID
        namespace (as seen from here)."""
        deadline = time.monotonic() + JAILER_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text())
            time.sleep(0.05)
        raise VMRuntimeError(f"the jailer wrote no pid file {pid_file} (see console.log)")

    def status(self, spec: VMSpec) -> VMStatus:
        ConsoleLog(spec.vm_dir).maintain()  # rotated by size, sampled for `logs --since`
        log = spec.vm_dir / CONSOLE_LOG
        pid = self._pid(spec)
        if pid is not None:
            state, detail = VMState.RUNNING, ""
            with contextlib.suppress(VMRuntimeError):
                instance = FirecrackerAPI(self._api_socket(spec)).describe_instance()
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
            FirecrackerAPI(self._api_socket(spec)).send_ctrl_alt_del()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and self._alive(pid, spec):
            time.sleep(0.1)
        if self._alive(pid, spec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.status(spec)

    def drift(self, spec: VMSpec) -> list[str]:
        """Top-level sections where the running VM differs from its generated config."""
        running = FirecrackerAPI(self._api_socket(spec)).get_vm_config()
        wanted = firecracker_config(spec, jailed=self._jail_root(spec) is not None)
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
