"""Refreshing the observed fleet from the runtimes before planning.

The state store says what was started; the runtimes say what still runs. A VM whose QEMU was
killed by hand is recorded as ``missing`` here, and the planner then recreates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from reconciler.errors import NotImplementedFeatureError
from reconciler.execution.vms import runtime_for, spec_of
from reconciler.model import ObservedFleet, RuntimeKind, VMState
from reconciler.state import StateStore
from runtime.protocol import Runtime


def observe(
    store: StateStore, runtimes: Mapping[RuntimeKind, Runtime], state_dir: Path
) -> ObservedFleet:
    before = store.observed()
    changed = False
    for vm in before.vms.values():
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
            store.put_vm(
                replace(
                    vm, state=status.state, pid=status.pid, detail=status.detail, healthy=healthy
                )
            )
            changed = True
    return store.observed() if changed else before
