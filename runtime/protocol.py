"""The ``Runtime`` Protocol: how the execution layer starts, stops and inspects one VM.

Data flow: the executor turns a plan action plus a built artifact into a ``VMSpec`` and hands it
to the runtime named by the VM's ``runtime`` setting (qemu, firecracker, process). Runtimes keep
everything about a VM in its own directory (pid file, control socket, console log), so a
restarted daemon can adopt VMs that outlived it instead of killing or duplicating them. Per-VM
data for the guest init travels as ``VMSpec.guest`` and each runtime hands it to the init in its
own way (an initramfs segment, a file), never on the kernel command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reconciler.guest_config import GuestConfig
from reconciler.model import RuntimeKind, VMState


@dataclass(frozen=True)
class NetworkAttachment:
    """One VM's place on the fleet network, prepared by ``runtime.network`` before start."""

    tap: str  # host TAP device name, e.g. "rc-web-0"
    mac: str  # guest MAC address, "52:54:00:xx:xx:xx"
    address: str  # guest address with prefix, "10.88.0.5/24"
    gateway: str  # the bridge address, "10.88.0.1"


@dataclass(frozen=True)
class VolumeAttachment:
    """One volume of a VM, prepared by the executor (``runtime.volumes``) before start."""

    name: str  # also the disk's virtio serial and ext4 label
    path: Path  # the ext4 image (VM runtimes) or the directory (process runtime)
    mount_path: str  # where the guest, or the process sandbox, sees it
    directory: bool = False


@dataclass(frozen=True)
class VMSpec:
    """Everything a runtime needs to start one VM; built by the executor, never by a runtime."""

    name: str
    workload: str
    fleet: str
    runtime: RuntimeKind
    vcpus: int
    memory_mib: int
    vm_dir: Path  # private directory of this VM: pid file, sockets, console log
    kernel: Path | None = None  # bzImage (qemu) or ELF vmlinux (firecracker)
    initrd: Path | None = None
    rootfs: Path | None = None  # ext4 image, attached read-write as the first virtio-blk disk
    executable: Path | None = None  # the process runtime runs this
    kernel_cmdline: str = ""  # what the kernel needs; never per-VM data (see ``guest``)
    guest: GuestConfig = field(default_factory=GuestConfig)  # the init's per-VM configuration
    network: NetworkAttachment | None = None
    volumes: tuple[VolumeAttachment, ...] = ()  # extra disks (or bind mounts), in order


@dataclass(frozen=True)
class VMStatus:
    name: str
    state: VMState
    pid: int | None = None
    detail: str = ""  # "exited with code 3", "guest panicked", ...
    console_log: Path | None = None


class Runtime(Protocol):
    kind: RuntimeKind

    def start(self, spec: VMSpec) -> VMStatus:
        """Start the VM detached from the calling process (it must outlive the daemon)."""
        ...

    def stop(self, spec: VMSpec, *, grace_seconds: float = 10.0) -> VMStatus:
        """Graceful shutdown, then harder ways after ``grace_seconds``. Stopping a VM that is
        not running is not an error."""
        ...

    def status(self, spec: VMSpec) -> VMStatus:
        """What the VM is doing now, read from its directory and process (adoption uses it)."""
        ...
