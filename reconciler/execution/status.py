"""The fleet's status as plain data: shared by ``reconciler status`` and the daemon's
``/api/status`` and status page, so both say the same thing.

    StateStore (observed VMs, revisions) ──fleet_status──▶ FleetStatus ──▶ table, JSON or HTML
    console logs (``console_logs.last_lines``) ─┘ the last lines of each VM that is not healthy
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from reconciler.execution.console_logs import last_lines
from reconciler.model import ObservedFleet, RevisionOutcome, VMState
from reconciler.state import FLEET_WIDE, RevisionRecord


class SuspendedStatus(TypedDict):
    fleet: bool  # the whole fleet is suspended
    workloads: list[str]  # the suspended workloads, by name


class VMStatus(TypedDict):
    name: str
    workload: str
    state: str  # a ``VMState`` value
    healthy: bool
    address: str | None
    pid: int | None
    artifact: str  # the artifact's input digest
    runtime: str  # a ``RuntimeKind`` value
    detail: str  # the last health verdict, or why the VM is not running
    uptime_seconds: float | None  # None unless running
    restarts: int
    console_tail: list[str]  # the last console lines of a VM that is not healthy


class FleetStatus(TypedDict):
    """``reconciler status --format json``; the daemon's ``/api/status`` adds to it."""

    suspended: SuspendedStatus
    applied_revision: str | None
    attempted_revision: str | None
    attempted_outcome: str | None
    attempted_at: float | None
    last_error: str | None  # the attempted revision's failure, when it failed
    vms: list[VMStatus]


def fleet_status(
    observed: ObservedFleet,
    applied: RevisionRecord | None,
    attempted: RevisionRecord | None,
    suspended: Mapping[str, str],
    *,
    now: float | None = None,
    state_dir: Path | None = None,
) -> FleetStatus:
    """The JSON of ``reconciler status --format json``; ``suspended`` as the store keeps it.
    With ``state_dir``, a VM that is not healthy carries its last console lines
    (``console_tail``: why it is not, in one place); a healthy one an empty list."""
    now = time.time() if now is None else now
    return {
        "suspended": {
            "fleet": FLEET_WIDE in suspended,
            "workloads": sorted(w for w in suspended if w != FLEET_WIDE),
        },
        "applied_revision": applied.revision if applied else None,
        "attempted_revision": attempted.revision if attempted else None,
        "attempted_outcome": attempted.outcome if attempted else None,
        "attempted_at": attempted.at if attempted else None,
        "last_error": attempted.message
        if attempted and attempted.outcome == RevisionOutcome.FAILED
        else None,
        "vms": [
            {
                "name": vm.name,
                "workload": vm.workload,
                "state": vm.state.value,
                "healthy": bool(vm.healthy),
                "address": vm.address,
                "pid": vm.pid,
                "artifact": vm.artifact_digest,
                "runtime": vm.runtime.value,
                "detail": vm.detail,
                "uptime_seconds": round(now - vm.started_at, 1)
                if vm.started_at and vm.state is VMState.RUNNING
                else None,
                "restarts": vm.restarts,
                "console_tail": last_lines(state_dir, vm.name)
                if state_dir is not None and not vm.healthy
                else [],
            }
            for vm in observed.vms.values()
        ],
    }
