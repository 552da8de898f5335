"""Booting built artifacts under QEMU ``-M microvm`` for the tests and benchmarks (TCG here).

Not the runtime: one VM in the foreground of the caller, no confinement, no QMP dialogue. But
the command line is the runtime's own (``runtime.qemu.argv``), with the loopback forward of
QEMU's user-mode network where a test reaches the guest, and the guest's markers are read as the
health check reads them (``runtime.console``). Per-VM data reaches the init as the runtimes give
it: a ``GuestConfig`` in a per-VM initrd.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.guest_config import GuestConfig
from reconciler.model import RuntimeKind
from runtime.console import read_markers
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec
from runtime.qemu.argv import (
    CONSOLE_LOG,
    USER_NET_ADDRESS,
    USER_NET_GATEWAY,
    PortForward,
    qemu_argv,
)
from runtime.qemu.machine import tcg_kernel_args
from support.waiting import free_port

ERRORS = "qemu.err"


def artifact_spec(artifact: Path, vm_dir: Path, name: str, **settings: Any) -> VMSpec:
    """The ``VMSpec`` of a QEMU VM named ``name`` booting the unikernel or microvm ``artifact``
    (its kernel, initramfs and command line) from ``vm_dir``; ``settings`` are more ``VMSpec``
    fields. A root disk is copied into ``vm_dir``, as the executor does: the VM writes to it."""
    vm_dir.mkdir(parents=True, exist_ok=True)
    rootfs = None
    if (artifact / "rootfs.ext4").exists():
        rootfs = vm_dir / "rootfs.ext4"
        shutil.copyfile(artifact / "rootfs.ext4", rootfs)
    defaults: dict[str, Any] = {
        "workload": name.rsplit("-", 1)[0],
        "fleet": "example",
        "runtime": RuntimeKind.QEMU,
        "vcpus": 1,
        "memory_mib": 128,
        "kernel": artifact / "kernel",
        "initrd": artifact / "initramfs.cpio.gz",
        "rootfs": rootfs,
        "kernel_cmdline": (artifact / "cmdline").read_text().strip(),
    }
    return VMSpec(name=name, vm_dir=vm_dir, **(defaults | settings))


def wait_for_event(
    console: Path,
    event: str,
    timeout: float = 180,
    *,
    running: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """The first ``event`` marker of the console log ``console``, read every 10 ms; fails when
    ``timeout`` passes or the VM stops ``running`` without it."""
    deadline = time.monotonic() + timeout
    while True:
        alive = running()  # before reading: a marker written just before the VM ended counts
        for marker in read_markers(console):
            if marker["event"] == event:
                return marker
        if not alive:
            raise AssertionError(f"the VM ended without a {event!r} marker in {console}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} marker in {console} within {timeout:g} s")
        time.sleep(0.01)


@dataclass
class BootedVM:
    process: subprocess.Popen[str]
    console: Path
    started: float  # ``time.perf_counter()`` when QEMU was started
    host_port: int | None = None
    markers: list[dict[str, Any]] = field(default_factory=list)

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def read_markers(self) -> list[dict[str, Any]]:
        self.markers = read_markers(self.console)
        return self.markers

    def wait_for(self, event: str, timeout: float = 120) -> dict[str, Any]:
        try:
            marker = wait_for_event(
                self.console, event, timeout, running=lambda: self.process.poll() is None
            )
        except AssertionError as exc:
            errors = (self.console.parent / ERRORS).read_text(errors="replace")
            raise AssertionError(f"{exc}; console:\n{self.text()}\nqemu: {errors}") from None
        self.read_markers()
        return marker

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
    kernel_log: bool = True,
) -> BootedVM:
    """Start the unikernel or microvm ``artifact`` with ``work`` as the VM's directory (its
    console log is ``work/console.log``). ``append`` goes on the kernel command line, ``guest``
    to the init; ``guest_port`` is forwarded from a free loopback port (``BootedVM.host_port``).
    ``kernel_log`` raises the kernel's log level over the artifact's ``quiet``: a test that fails
    shows where the guest stopped (a benchmark turns it off to time the artifact as built)."""
    assert shutil.which("qemu-system-x86_64"), (
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
    )
    spec = artifact_spec(artifact, work, "test-0", memory_mib=memory_mib)
    forward = None
    if guest_port is not None:
        forward = PortForward(free_port(), guest_port)
        # Without a GuestConfig the init's own default applies: the VM ends with its workload.
        guest = replace(
            guest or GuestConfig(restart="never"),
            address=USER_NET_ADDRESS,
            gateway=USER_NET_GATEWAY,
        )
    if guest is not None:
        write_vm_initrd(artifact / "initramfs.cpio.gz", guest, work / VM_INITRD)
    else:
        # The artifact's initramfs as it is: the init finds no configuration segment.
        shutil.copyfile(artifact / "initramfs.cpio.gz", work / VM_INITRD)
    kernel_args = " ".join(
        part for part in ("loglevel=6" if kernel_log else "", tcg_kernel_args(), append) if part
    )
    argv = qemu_argv(spec, accel="tcg", extra_kernel_args=kernel_args, forward=forward)
    (work / CONSOLE_LOG).unlink(missing_ok=True)  # a VM booted again in ``work`` starts afresh
    with (work / ERRORS).open("w") as errors:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, text=True
        )
    return BootedVM(process, work / CONSOLE_LOG, started, forward.host_port if forward else None)
