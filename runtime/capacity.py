"""What this machine offers the fleet: its capacity and the runtimes usable here, as a daemon on
a shared PostgreSQL store registers them (``reconciler.state.hosts``). Only reads the host.

    os.cpu_count, /proc/meminfo, the state directory's free space,
    qemu-system-x86_64 / firecracker / bwrap on PATH, the KVM canary's verdict ──▶ MachineFacts

KVM counts only when ``/dev/kvm`` is usable *and* the QEMU runtime's canary boot said so (its
verdict cached in the state directory, ``runtime.qemu.accel``): a ``/dev/kvm`` that exists is
not enough (nested virtualisation where guests hang), and booting a canary here would need a
kernel the daemon may not have built yet. A host that has not run its canary registers without
KVM; it registers anew (with the verdict) when its daemon restarts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from reconciler.model import RuntimeKind

KVM_VERDICT = "kvm-probe.json"  # the QEMU runtime's cached canary verdict, in the state dir
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MachineFacts:
    vcpus: int
    memory_mib: int
    disk_mib: int
    runtimes: frozenset[RuntimeKind]
    kvm: bool


def memory_mib(meminfo: Path = MEMINFO) -> int:
    """``MemTotal`` in MiB; 0 when the kernel does not say (placement then puts nothing here)."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                return int(value.split()[0]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def disk_mib(state_dir: Path) -> int:
    """Free space for artifacts and volumes: the state directory's file system (its nearest
    existing ancestor before the daemon created it)."""
    path = state_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free // (1024 * 1024)
    except OSError:
        return 0


def kvm_verdict(state_dir: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        return bool(json.loads((state_dir / KVM_VERDICT).read_text()).get("kvm"))
    except (OSError, ValueError, AttributeError):
        return False  # no canary has run here yet


def usable_runtimes() -> frozenset[RuntimeKind]:
    """The runtimes whose binaries are here: QEMU, Firecracker (which also needs KVM, as
    placement knows), and host processes, which always run in bubblewrap."""
    binaries = {
        RuntimeKind.QEMU: "qemu-system-x86_64",
        RuntimeKind.FIRECRACKER: "firecracker",
        RuntimeKind.PROCESS: "bwrap",
    }
    return frozenset(kind for kind, binary in binaries.items() if shutil.which(binary))


def probe_machine(state_dir: Path) -> MachineFacts:
    return MachineFacts(
        vcpus=os.cpu_count() or 1,
        memory_mib=memory_mib(),
        disk_mib=disk_mib(state_dir),
        runtimes=usable_runtimes(),
        kvm=kvm_verdict(state_dir),
    )


__all__ = ["KVM_VERDICT", "MachineFacts", "probe_machine"]
