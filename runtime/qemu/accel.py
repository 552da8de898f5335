"""Choosing the accelerator: KVM only when a canary boot proves it usable, else TCG.

``/dev/kvm`` existing is not enough (on these machines it is nested PVM, where stock kernels
hang or QEMU fails to set up the vCPU). The canary boots the given kernel and initramfs under KVM
with a short deadline and waits for the guest init's "booted" marker; the verdict is cached per
kernel and QEMU version. The canary's initrd carries a ``boot_only`` configuration for the init,
so the artifact's workload never runs in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from reconciler.guest_config import GuestConfig
from reconciler.model import RuntimeKind
from runtime.console import read_markers
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec
from runtime.qemu.argv import CONSOLE_LOG, qemu_argv

CANARY_SECONDS = 15.0
BOOTED = "a canary guest booted under KVM"


def kvm_usable(
    kernel: Path,
    initrd: Path,
    *,
    cache: Path,
    qemu_version: str,
    binary: str = "qemu-system-x86_64",
) -> bool:
    return kvm_probe(kernel, initrd, cache=cache, qemu_version=qemu_version, binary=binary)[0]


def kvm_probe(
    kernel: Path,
    initrd: Path,
    *,
    cache: Path,
    qemu_version: str,
    binary: str = "qemu-system-x86_64",
) -> tuple[bool, str]:
    """``(usable, why)``; the verdict is cached per kernel and QEMU version."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    key = f"{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}:{qemu_version}"
    try:
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            return bool(known["kvm"]), str(known.get("why", ""))
    except (OSError, ValueError, KeyError):
        pass
    verdict, why = _canary(kernel, initrd, binary)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "kvm": verdict, "why": why, "at": time.time()}))
    return verdict, why


def canary_argv(kernel: Path, vm_dir: Path, binary: str = "qemu-system-x86_64") -> list[str]:
    """The canary's command line: the runtime's own (``argv.py``) under KVM, without the
    confinement (the canary boots the operator's kernel and a boot-only init, never a workload).
    Its initrd is ``vm_dir``'s per-VM initrd, as for every VM."""
    spec = VMSpec(
        name="kvm-canary",
        workload="kvm-canary",
        fleet="",
        runtime=RuntimeKind.QEMU,
        vcpus=1,
        memory_mib=128,
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=vm_dir / VM_INITRD,
        kernel_cmdline="console=ttyS0 panic=-1 quiet",
    )
    return qemu_argv(spec, accel="kvm", binary=binary)


def _canary(kernel: Path, initrd: Path, binary: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="reconciler-kvm-canary-") as tmp:
        vm_dir = Path(tmp)
        console = vm_dir / CONSOLE_LOG
        errors = vm_dir / "qemu.err"
        write_vm_initrd(
            initrd, GuestConfig(hostname="kvm-canary", boot_only=True), vm_dir / VM_INITRD
        )
        argv = canary_argv(kernel, vm_dir, binary)
        with errors.open("w") as err:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            deadline = time.monotonic() + CANARY_SECONDS
            while time.monotonic() < deadline and process.poll() is None:
                if any(m["event"] == "booted" for m in read_markers(console)):
                    return True, BOOTED
                time.sleep(0.1)
            if any(m["event"] == "booted" for m in read_markers(console)):
                return True, BOOTED
            if process.poll() is not None:
                lines = errors.read_text(errors="replace").strip().splitlines()
                return False, "QEMU failed under KVM: " + (lines[0] if lines else "no output")
            return False, f"the canary guest did not boot under KVM in {CANARY_SECONDS:g} s"
        finally:
            process.kill()
            process.wait()
