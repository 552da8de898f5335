"""``VMSpec`` -> the ``qemu-system-x86_64 -M microvm`` command line. Pure, golden-tested.

Kept to the microvm defaults that work under TCG (DESIGN §11: ``pit=off`` hangs the guest,
``rtc=off`` doubles boot time; with ACPI on, the kernel finds the virtio-mmio devices itself).
The driver starts QEMU detached from the reconciler (not ``-daemonize``: the seccomp filter
forbids the fork; see ``confine.py``) so that it outlives it; QEMU writes ``-pidfile``, and
everything about the VM lives in ``spec.vm_dir``: QMP socket, console log and socket, pid file, and
the per-VM initrd (the artifact's initramfs plus the guest init's configuration, written by the
driver; see ``runtime/guest_config.py``), so no per-VM value is on QEMU's command line or the
guest's. ``confine`` is the ``-sandbox`` and privilege-drop options (``confine.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from runtime.guest_config import VM_INITRD
from runtime.protocol import VMSpec

QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"
CONSOLE_SOCKET = "console.sock"
PID_FILE = "qemu.pid"


def qemu_argv(
    spec: VMSpec,
    *,
    accel: str,
    extra_kernel_args: str = "",
    binary: str = "qemu-system-x86_64",
    confine: Sequence[str] = (),
) -> list[str]:
    if spec.kernel is None:
        raise ValueError(f"VM {spec.name} has no kernel to boot")
    vm_dir: Path = spec.vm_dir
    argv = [
        binary,
        "-name",
        f"reconciler:{spec.name},process=reconciler-{spec.name}",
        "-M",
        "microvm",
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-smp",
        str(spec.vcpus),
        "-m",
        f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *confine,
        "-pidfile",
        str(vm_dir / PID_FILE),
        "-qmp",
        f"unix:{vm_dir / QMP_SOCKET},server=on,wait=off",
        "-chardev",
        f"socket,id=console,path={vm_dir / CONSOLE_SOCKET},server=on,wait=off,"
        f"logfile={vm_dir / CONSOLE_LOG},logappend=on",
        "-serial",
        "chardev:console",
        "-kernel",
        str(spec.kernel),
    ]
    if spec.initrd is not None:
        argv += ["-initrd", str(vm_dir / VM_INITRD)]
    if spec.rootfs is not None:
        argv += [
            "-drive",
            f"id=root,file={spec.rootfs},format=raw,if=none,cache=writeback",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    if spec.network is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={spec.network.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={spec.network.mac}",
        ]
    cmdline = " ".join(part for part in (spec.kernel_cmdline, extra_kernel_args) if part)
    argv += ["-append", cmdline]
    return argv
