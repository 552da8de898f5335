"""Booting built artifacts under QEMU ``-M microvm`` for the tests (TCG here, see DESIGN §11).

A test-side helper, not the runtime: it starts one VM in the foreground, collects the console and
the init's markers, and forwards one guest TCP port to the host with user networking. Per-VM
data reaches the init as the runtimes give it: a ``GuestConfig`` in a per-VM initrd.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from reconciler.guest_config import GuestConfig
from runtime.guest_config import write_vm_initrd
from runtime.qemu.machine import tcg_kernel_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BootedVM:
    process: subprocess.Popen[str]
    console: Path
    host_port: int | None = None
    markers: list[dict[str, object]] = field(default_factory=list)

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def read_markers(self) -> list[dict[str, object]]:
        self.markers = [
            json.loads(line.split(" ", 1)[1])
            for line in self.text().splitlines()
            if line.startswith("@@reconciler ")
        ]
        return self.markers

    def wait_for(self, event: str, timeout: float = 120) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for marker in self.read_markers():
                if marker["event"] == event:
                    return marker
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        errors = (self.console.parent / "qemu.err").read_text(errors="replace")
        raise AssertionError(f"no {event!r} marker; console:\n{self.text()}\nqemu: {errors}")

    def wait_exit(self, timeout: float = 120) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def boot(
    artifact: Path,
    work: Path,
    *,
    append: str = "",
    guest_port: int | None = None,
    memory_mib: int = 512,
    guest: GuestConfig | None = None,
) -> BootedVM:
    """Start the unikernel or microvm artifact in ``artifact``; its console goes to a file.
    ``append`` goes on the kernel command line, ``guest`` to the init."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
    console = work / "console.log"
    cmdline = (artifact / "cmdline").read_text().strip()
    argv = [
        qemu,
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(artifact / "kernel"),
    ]
    if (artifact / "rootfs.ext4").exists():
        disk = work / "rootfs.ext4"
        shutil.copyfile(artifact / "rootfs.ext4", disk)  # the VM writes to its own copy
        argv += [
            "-drive",
            f"id=root,file={disk},format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    host_port = None
    if guest_port is not None:
        host_port = free_port()
        argv += [
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}",
            "-device",
            "virtio-net-device,netdev=n0",
        ]
        # Without a GuestConfig the init's own default applies: the VM ends with its workload.
        guest = replace(guest or GuestConfig(restart="never"), address="10.0.2.15/24")
        guest = replace(guest, gateway="10.0.2.2")
    initrd = artifact / "initramfs.cpio.gz"
    if guest is not None:
        initrd = write_vm_initrd(initrd, guest, work / "initrd.img")
    argv += ["-initrd", str(initrd)]
    # loglevel=6 after the artifact's "quiet": a test that fails shows where the guest stopped.
    argv += ["-append", f"{cmdline} loglevel=6 {tcg_kernel_args()} {append}".strip()]
    with (work / "qemu.err").open("w") as errors:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, text=True
        )
    return BootedVM(process, console, host_port)
