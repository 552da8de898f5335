"""What runs now: the state store's records refreshed from the runtimes (a value, not a write).

The state store says what was started; the runtimes say what still runs. :func:`observe` reads
both and returns the fleet as it is (a VM whose QEMU was killed by hand comes back ``missing``,
and the planner then recreates it) without writing anything, so read-only commands (``diff``,
``plan``, ``status``) stay read-only even while a daemon leads. Only the acting reconciler (the
daemon's leader, or ``apply``) records an observation, with :func:`record_observation`, under its
fence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from reconciler.errors import NotImplementedFeatureError
from reconciler.execution.vms import runtime_for, spec_of
from reconciler.model import ObservedFleet, ObservedVM, RuntimeKind, VMState
from reconciler.state import StateStore
from runtime.protocol import Runtime


def observe(
    store: StateStore, runtimes: Mapping[RuntimeKind, Runtime], state_dir: Path
) -> ObservedFleet:
    """The recorded fleet with each running VM's state taken from its runtime. Writes nothing:
    the result keeps the store's version, so a plan made from it names the state it saw."""
    recorded = store.observed()
    refreshed: dict[str, ObservedVM] = {}
    for vm in recorded.vms.values():
        if vm.state not in (VMState.RUNNING, VMState.PENDING):
            continue
        try:
            runtime = runtime_for(runtimes, vm.runtime)
        except NotImplementedFeatureError:
            continue  # recorded by a newer reconciler; leave it as recorded
        status = runtime.status(spec_of(vm, state_dir))
        if status.state is VMState.PENDING:
            # Recorded but never started: the reconciler that recorded it stopped before the
            # VMM ran (one acts at a time), so the VM must be started again.
            status = replace(status, state=VMState.MISSING, detail="its start never completed")
        if (status.state, status.pid) != (vm.state, vm.pid):
            # A job that exited 0 is done, and that is healthy; anything else that ended is not.
            healthy = (
                vm.healthy if status.state is VMState.RUNNING else (status.state is VMState.STOPPED)
            )
            refreshed[vm.name] = replace(
                vm, state=status.state, pid=status.pid, detail=status.detail, healthy=healthy
            )
    if not refreshed:
        return recorded
    return replace(recorded, vms={**recorded.vms, **refreshed})


def record_observation(store: StateStore, observed: ObservedFleet) -> ObservedFleet:
    """Write what ``observed`` found that the store does not say yet; the acting reconciler's
    step (the store's fence refuses it from a stale leader). Returns the fleet as now stored."""
    recorded = store.observed()
    changed = [
        vm for name, vm in observed.vms.items() if name in recorded.vms and recorded.vms[name] != vm
    ]
    for vm in changed:
        store.put_vm(vm)
    return store.observed() if changed else recorded
