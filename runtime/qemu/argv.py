"""``VMSpec`` -> the ``qemu-system-x86_64 -M microvm`` command line. Pure, golden-tested.

Kept to the microvm defaults that work under TCG (measured: ``pit=off`` hangs the guest,
``rtc=off`` doubles boot time; with ACPI on, the kernel finds the virtio-mmio devices itself).
The driver starts QEMU detached from the reconciler (not ``-daemonize``: the seccomp filter
forbids the fork; see ``confine.py``) so that it outlives it; QEMU writes ``-pidfile``, and
everything about the VM lives in ``spec.vm_dir``: QMP socket, console log and socket, pid file, and
the per-VM initrd (the artifact's initramfs plus the guest init's configuration, written by the
driver; see ``runtime/guest_config.py``), so no per-VM value is on QEMU's command line or the
guest's. ``confine`` is the ``-sandbox`` and privilege-drop options (``confine.py``).

This is the one place that writes a QEMU command line: the KVM canary (``accel.py``) and the
tests' and benchmarks' boots of built artifacts use it too. They reach a guest without a bridge
through ``forward`` (QEMU's user-mode network forwarding one loopback port), which the runtime
never uses: its VMs sit on TAP devices.

``snapshot`` is the one difference between a snapshot template and a VM restored from it
(``snapshot.py``): the same devices in the same order, so QEMU accepts the saved device state;
the template's NIC is backed by a hub port leading nowhere instead of a TAP (it has none, and
the backend is not part of the guest's state), and a restore waits for its memory over QMP
(``-incoming defer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from runtime.guest_config import VM_INITRD
from runtime.protocol import VMSpec

QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"
CONSOLE_SOCKET = "console.sock"
PID_FILE = "qemu.pid"

# QEMU's user-mode network: the guest's address and gateway are fixed by QEMU.
USER_NET_ADDRESS = "10.0.2.15/24"
USER_NET_GATEWAY = "10.0.2.2"


class SnapshotRole(Enum):
    TEMPLATE = "template"  # boots, waits for its configuration and is saved
    RESTORE = "restore"  # starts from a saved template instead of booting


@dataclass(frozen=True)
class PortForward:
    """User-mode networking forwarding ``127.0.0.1:host_port`` to the guest's ``guest_port``."""

    host_port: int
    guest_port: int


def qemu_argv(
    spec: VMSpec,
    *,
    accel: str,
    extra_kernel_args: str = "",
    binary: str = "qemu-system-x86_64",
    confine: Sequence[str] = (),
    forward: PortForward | None = None,
    snapshot: SnapshotRole | None = None,
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
    for volume in spec.volumes:
        # One more virtio-blk disk per volume; the serial is how the init finds it whatever
        # order the disks appear in. "," in a path is QEMU's separator, escaped by doubling.
        path = str(volume.path).replace(",", ",,")
        argv += [
            "-drive",
            f"id=vol-{volume.name},file={path},format=raw,if=none,cache=writeback",
            "-device",
            f"virtio-blk-device,drive=vol-{volume.name},serial={volume.name}",
        ]
    if spec.network is not None:
        # A hub with no other port: the template reaches nothing, and (unlike user-mode
        # networking) the backend adds no state of its own to the snapshot.
        backend = (
            "hubport,id=net0,hubid=0"
            if snapshot is SnapshotRole.TEMPLATE
            else f"tap,id=net0,ifname={spec.network.tap},script=no,downscript=no"
        )
        argv += [
            "-netdev",
            backend,
            "-device",
            f"virtio-net-device,netdev=net0,mac={spec.network.mac}",
        ]
    if forward is not None:
        if spec.network is not None:
            raise ValueError(f"VM {spec.name} has a TAP device; it cannot forward a port too")
        argv += [
            "-netdev",
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{forward.host_port}-:{forward.guest_port}",
            "-device",
            "virtio-net-device,netdev=net0",
        ]
    cmdline = " ".join(part for part in (spec.kernel_cmdline, extra_kernel_args) if part)
    argv += ["-append", cmdline]
    if snapshot is SnapshotRole.RESTORE:
        argv += ["-incoming", "defer"]
    return argv
