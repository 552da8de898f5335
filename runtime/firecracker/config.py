"""``VMSpec`` -> Firecracker's ``--config-file`` (the ``FullVmConfiguration`` of its OpenAPI
spec) and the jailer command line. Pure, golden-tested, and validated in tests against the spec
with unknown keys rejected, as Firecracker itself rejects them.

The initrd is the VM's own (the artifact's initramfs plus the guest init's per-VM configuration,
written by the driver, see ``runtime/guest_config.py``), so ``boot_args`` carries only what the
kernel needs. Under the jailer every path is the one inside its chroot (``jail.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.guest_config import VM_INITRD
from runtime.protocol import VMSpec

API_SOCKET = "firecracker.sock"
JAIL_KERNEL = "vmlinux"
JAIL_ROOTFS = "rootfs.ext4"


def firecracker_config(
    spec: VMSpec, *, extra_kernel_args: str = "", jailed: bool = False
) -> dict[str, Any]:
    """The config file; with ``jailed``, paths are those inside the jailer's chroot."""
    if spec.kernel is None:
        raise ValueError(f"VM {spec.name} has no kernel to boot")
    boot: dict[str, Any] = {
        "kernel_image_path": f"/{JAIL_KERNEL}" if jailed else str(spec.kernel),
        "boot_args": " ".join(p for p in (spec.kernel_cmdline, extra_kernel_args) if p),
    }
    if spec.initrd is not None:
        boot["initrd_path"] = f"/{VM_INITRD}" if jailed else str(spec.vm_dir / VM_INITRD)
    config: dict[str, Any] = {
        "boot-source": boot,
        "drives": [],
        "machine-config": {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.memory_mib,
            "smt": False,
        },
        "network-interfaces": [],
    }
    if spec.rootfs is not None:
        config["drives"].append(
            {
                "drive_id": "root",
                "path_on_host": f"/{JAIL_ROOTFS}" if jailed else str(spec.rootfs),
                "is_root_device": False,  # the initramfs mounts /dev/vda itself
                "is_read_only": False,
                "cache_type": "Writeback",
            }
        )
    for volume in spec.volumes:
        # Firecracker sets no virtio serial: the init finds a volume by its ext4 label instead.
        config["drives"].append(
            {
                "drive_id": f"vol-{volume.name}",
                "path_on_host": f"/{jail_volume(volume.name)}" if jailed else str(volume.path),
                "is_root_device": False,
                "is_read_only": False,
                "cache_type": "Writeback",
            }
        )
    if spec.network is not None:
        config["network-interfaces"].append(
            {
                "iface_id": "eth0",
                "host_dev_name": spec.network.tap,
                "guest_mac": spec.network.mac,
            }
        )
    return config


def jail_volume(name: str) -> str:
    """A volume's file name inside the jailer's chroot."""
    return f"volume-{name}.ext4"


@dataclass(frozen=True)
class JailerOptions:
    """Where and as whom the jailer confines Firecracker."""

    uid: int
    gid: int
    chroot_base: Path = Path("/srv/jailer")
    exec_file: Path = Path("/usr/local/bin/firecracker")
    jailer: Path = Path("/usr/local/bin/jailer")

    def chroot(self, vm: str) -> Path:
        """Where the jailer puts the VM's root: ``<base>/<exec file name>/<id>/root``."""
        return self.chroot_base / self.exec_file.name / vm / "root"


def jailer_argv(spec: VMSpec, options: JailerOptions, config_file: str) -> list[str]:
    """The jailer command line; paths in ``config_file`` are relative to the chroot."""
    return [
        str(options.jailer),
        "--id",
        spec.name,
        "--exec-file",
        str(options.exec_file),
        "--uid",
        str(options.uid),
        "--gid",
        str(options.gid),
        "--chroot-base-dir",
        str(options.chroot_base),
        "--new-pid-ns",
        "--",
        "--api-sock",
        f"/{API_SOCKET}",
        "--config-file",
        config_file,
    ]
