"""Where a VM lives on this host and how it is described to its runtime.

Every VM has a private directory ``<state dir>/vms/<name>/``: its runtime's pid file, sockets
and console log, its per-VM configuration for the guest init (written by the runtime from
``VMSpec.guest``) and (microvm target) its own copy of the root disk. Its volumes live apart,
under ``<state dir>/volumes/<name>/`` (``execution/volumes.py``), so that removing or replacing
the VM's directory never touches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from reconciler.errors import NotImplementedFeatureError
from reconciler.execution.launch import LaunchConfig, guest_config, kernel_cmdline
from reconciler.model import ObservedVM, RuntimeKind, SensitiveValues
from runtime.protocol import NetworkAttachment, Runtime, VMSpec, VolumeAttachment


def vm_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "vms" / name


def runtime_for(runtimes: Mapping[RuntimeKind, Runtime], kind: RuntimeKind) -> Runtime:
    runtime = runtimes.get(kind)
    if runtime is None:
        raise NotImplementedFeatureError(f"the {kind.value} runtime")
    return runtime


def vm_spec(
    *,
    name: str,
    workload: str,
    fleet: str,
    runtime: RuntimeKind,
    directory: Path,
    config: LaunchConfig | None = None,
    artifact: Path | None = None,
    network: NetworkAttachment | None = None,
    volumes: tuple[VolumeAttachment, ...] = (),
    sensitive: SensitiveValues | None = None,
) -> VMSpec:
    """A ``VMSpec``; without ``config``/``artifact`` it is enough to query or stop the VM."""
    if config is None or artifact is None:
        return VMSpec(
            name=name,
            workload=workload,
            fleet=fleet,
            runtime=runtime,
            vcpus=1,
            memory_mib=128,
            vm_dir=directory,
        )
    base = (artifact / "cmdline").read_text().strip() if (artifact / "cmdline").exists() else ""
    address, gateway = (network.address, network.gateway) if network else (None, None)
    rootfs = directory / "rootfs.ext4" if (artifact / "rootfs.ext4").exists() else None
    return VMSpec(
        name=name,
        workload=workload,
        fleet=fleet,
        runtime=runtime,
        vcpus=config.vcpus,
        memory_mib=config.memory_mib,
        vm_dir=directory,
        kernel=artifact / "kernel" if (artifact / "kernel").exists() else None,
        initrd=artifact / "initramfs.cpio.gz"
        if (artifact / "initramfs.cpio.gz").exists()
        else None,
        rootfs=rootfs,
        executable=artifact / "workload" if (artifact / "workload").exists() else None,
        kernel_cmdline=kernel_cmdline(base, config),
        guest=guest_config(
            config, hostname=name, address=address, gateway=gateway, sensitive=sensitive
        ),
        network=network,
        volumes=volumes,
    )


def spec_of(vm: ObservedVM, state_dir: Path) -> VMSpec:
    return vm_spec(
        name=vm.name,
        workload=vm.workload,
        fleet=vm.fleet,
        runtime=vm.runtime,
        directory=vm_dir(state_dir, vm.name),
    )
