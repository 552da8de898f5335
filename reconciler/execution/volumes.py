"""Volumes of the VMs on this host: prepared before a start, reclaimed at a prune, and the
operations behind ``reconciler volumes ls|rm|snapshot|restore``.

    settings (deploy.volumes.*) ──prepare──▶ runtime.volumes (create once / grow offline)
                                          ──▶ VMSpec.volumes ──▶ the runtime attaches them
    delete action ──reclaim──▶ removes only volumes whose reclaimPolicy is ``delete``

Where the data lives and how it is copied is ``runtime/volumes.py``; this module adds what only
the control plane knows: which VM a volume belongs to, whether that VM runs (and on which
runtime, to pause it), and its reclaim policy. A snapshot of a running VM is taken while the VM
is paused (QEMU: QMP ``stop``, which flushes its disks; a process VM: every process stopped), so
it is crash-consistent: what the guest had written to its disk at that instant, journal
included, as after a power cut. A restore needs the VM stopped; it stops a running one and
leaves it for the next ``apply`` (or the daemon) to start again on the restored data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.errors import ConfigError, VMRuntimeError
from reconciler.execution.events import EventKind, ExecutionEvent, Reporter, print_event
from reconciler.execution.vms import runtime_for, spec_of, vm_dir
from reconciler.model import ObservedVM, RuntimeKind, VMState, volumes_of
from reconciler.state import StateStore
from runtime import volumes as disks
from runtime.protocol import Runtime, VolumeAttachment
from runtime.qemu.argv import QMP_SOCKET


def prepare(
    state_dir: Path, vm: ObservedVM, *, on_event: Reporter = print_event
) -> tuple[VolumeAttachment, ...]:
    """Create or grow every volume ``vm`` declares; its VM is stopped (a grow is offline)."""
    attached = []
    for volume in volumes_of(vm.settings):
        if vm.runtime is RuntimeKind.PROCESS:
            path = disks.directory_path(state_dir, vm.name, volume.name)
            done = disks.ensure_directory(path)
        else:
            path = disks.disk_path(state_dir, vm.name, volume.name)
            done = disks.ensure_disk(path, volume.size_mib, volume.name)
        if done in ("grown", "larger"):
            kind = EventKind.VOLUME_GROWN if done == "grown" else EventKind.VOLUME_LARGER
            on_event(ExecutionEvent(kind, vm.name, volume=volume.name, size_mib=volume.size_mib))
        attached.append(
            VolumeAttachment(
                name=volume.name,
                path=path,
                mount_path=volume.mount_path,
                directory=vm.runtime is RuntimeKind.PROCESS,
            )
        )
    return tuple(attached)


def reclaim(state_dir: Path, vm: ObservedVM, *, on_event: Reporter = print_event) -> None:
    """After ``vm`` was deleted: remove the volumes whose policy is ``delete``, keep the rest."""
    for volume in volumes_of(vm.settings):
        if volume.reclaim_policy == "delete":
            if disks.remove_volume(state_dir, vm.name, volume.name):
                on_event(ExecutionEvent(EventKind.VOLUME_DELETED, vm.name, volume=volume.name))
        else:
            on_event(ExecutionEvent(EventKind.VOLUME_RETAINED, vm.name, volume=volume.name))


# ------------------------------------------------------------------- the CLI's operations --


@dataclass(frozen=True)
class VolumeRow:
    """One volume for ``volumes ls``: the file's facts and what the state store says."""

    info: disks.VolumeInfo
    attached: bool  # its VM is recorded and declares it
    reclaim_policy: str | None  # from the VM's settings; None when it declares it no more
    vm_state: str | None


def parse_ref(text: str) -> tuple[str, str]:
    vm, slash, name = text.partition("/")
    if not slash or not vm or not name:
        raise ConfigError(f"{text!r}: name a volume as VM/NAME, e.g. web-0/data")
    return vm, name


def rows(state_dir: Path, store: StateStore) -> list[VolumeRow]:
    vms = store.observed().vms
    found = []
    for info in disks.list_volumes(state_dir):
        vm = vms.get(info.vm)
        declared = {v.name: v for v in volumes_of(vm.settings)} if vm else {}
        volume = declared.get(info.name)
        found.append(
            VolumeRow(
                info=info,
                attached=volume is not None,
                reclaim_policy=volume.reclaim_policy if volume else None,
                vm_state=vm.state.value if vm else None,
            )
        )
    return found


def remove(state_dir: Path, store: StateStore, ref: str) -> list[Path]:
    """``volumes rm``: only a volume no recorded VM uses (its VM deleted, or the volume
    removed from its manifest); the data of a VM that runs is never pulled from under it."""
    vm_name, name = parse_ref(ref)
    disks.find_volume(state_dir, vm_name, name)
    vm = store.observed().vms.get(vm_name)
    if vm is not None and any(v.name == name for v in volumes_of(vm.settings)):
        raise VMRuntimeError(
            f"volume {ref} belongs to VM {vm_name}, which still declares it; remove it from the "
            "manifest (or delete the VM) and apply first"
        )
    return disks.remove_volume(state_dir, vm_name, name)


@contextlib.contextmanager
def _quiesced(
    state_dir: Path, vm: ObservedVM | None, runtimes: Mapping[RuntimeKind, Runtime]
) -> Iterator[str]:
    """The VM of a volume paused for the duration (or nothing to do: it is not running);
    yields how it was made quiet, for the message."""
    if vm is None:
        yield "no VM"
        return
    spec = spec_of(vm, state_dir)
    status = runtime_for(runtimes, vm.runtime).status(spec)
    if status.state is not VMState.RUNNING or status.pid is None:
        yield "VM not running"
        return
    if vm.runtime is RuntimeKind.QEMU:
        with disks.qemu_paused(vm_dir(state_dir, vm.name) / QMP_SOCKET):
            yield "VM paused"
    elif vm.runtime is RuntimeKind.PROCESS:
        with disks.processes_paused(status.pid):
            yield "VM paused"
    else:
        raise VMRuntimeError(
            f"VM {vm.name} runs on {vm.runtime.value}, which reconciler cannot pause for a "
            "snapshot yet; stop it first"
        )


def snapshot(
    state_dir: Path, store: StateStore, runtimes: Mapping[RuntimeKind, Runtime], ref: str
) -> tuple[disks.SnapshotInfo, str]:
    vm_name, name = parse_ref(ref)
    info = disks.find_volume(state_dir, vm_name, name)
    with _quiesced(state_dir, store.observed().vms.get(vm_name), runtimes) as how:
        taken = disks.snapshot(state_dir, info)
    return taken, how


def restore(
    state_dir: Path,
    store: StateStore,
    runtimes: Mapping[RuntimeKind, Runtime],
    ref: str,
    stamp: str | None,
    *,
    on_event: Reporter = print_event,
) -> disks.SnapshotInfo:
    vm_name, name = parse_ref(ref)
    info = disks.find_volume(state_dir, vm_name, name)
    vm = store.observed().vms.get(vm_name)
    if vm is not None:
        runtime = runtime_for(runtimes, vm.runtime)
        spec = spec_of(vm, state_dir)
        if runtime.status(spec).state is VMState.RUNNING:
            on_event(ExecutionEvent(EventKind.VM_STOPPED_FOR_RESTORE, vm_name))
            runtime.stop(spec)
            stopped = runtime.status(spec)
            # Recorded as it now is, so that the next apply starts it on the restored data.
            store.put_vm(replace(vm, state=stopped.state, pid=None, detail="volume restored"))
    return disks.restore(state_dir, info, stamp)
