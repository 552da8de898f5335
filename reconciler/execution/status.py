"""The fleet's status as plain data: shared by ``reconciler status`` and the daemon's
``/api/status`` and status page, so both say the same thing.

    StateStore (observed VMs, revisions) ──fleet_status──▶ dict ──▶ table, JSON or HTML
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from reconciler.model import ObservedFleet, VMState
from reconciler.state import FLEET_WIDE, RevisionRecord


def fleet_status(
    observed: ObservedFleet,
    applied: RevisionRecord | None,
    attempted: RevisionRecord | None,
    suspended: Mapping[str, str],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The JSON of ``reconciler status --format json``; ``suspended`` as the store keeps it."""
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
        "last_error": attempted.message if attempted and attempted.outcome == "failed" else None,
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
            }
            for vm in observed.vms.values()
        ],
    }
