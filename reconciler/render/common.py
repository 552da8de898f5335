"""Pieces shared by the human-readable renderers."""

from __future__ import annotations

from collections import defaultdict

from reconciler.formatting import short_sha
from reconciler.model import ActionType, Plan, PlanPlacement, VMAction, short_digest

SYMBOL = {
    ActionType.CREATE: "+",
    ActionType.UPDATE: "~",
    ActionType.RESTART: "~",
    ActionType.REPLACE: "-/+",
    ActionType.DELETE: "-",
}

VERB = {
    ActionType.CREATE: "will be created",
    ActionType.UPDATE: "will be updated in place",
    ActionType.RESTART: "will be restarted",
    ActionType.REPLACE: "must be replaced",
    ActionType.DELETE: "will be deleted",
}


MOVE_SYMBOL = ">"  # a VM that leaves one host for another


def summary_line(plan: Plan) -> str:
    counts = plan.summary()
    # A placed plan also counts its moves; an unplaced one reads exactly as it always did.
    moves = (
        f", {len(plan.placement.moves)} to move between hosts" if plan.placement is not None else ""
    )
    return (
        f"Plan: {counts['create']} to create, {counts['update']} to update in place, "
        f"{counts['restart']} to restart, {counts['replace']} to replace, "
        f"{counts['delete']} to delete{moves}."
    )


def placement_heading(placement: PlanPlacement) -> str:
    return f"Placement on the live hosts ({placement.hosts})"


def staying(placement: PlanPlacement, limit: int = 8) -> str | None:
    """``web-0, db-0 stay on their hosts``: the placed VMs that neither arrive nor move."""
    moved = {m.vm for m in placement.moves}
    vms = [vm for vm, _ in placement.assignments if vm not in moved and vm not in placement.new]
    if not vms:
        return None
    shown = ", ".join(vms[:limit])
    if len(vms) > limit:
        shown += f" and {len(vms) - limit} more"
    return f"{shown} {'stays on its host' if len(vms) == 1 else 'stay on their hosts'}"


def room_line(placement: PlanPlacement) -> str:
    """``Room left: host-a 3 vCPU / 1792 MiB, host-b ...``: each host's room after the plan."""
    rooms = ", ".join(
        f"{r.host} {r.vcpus} vCPU / {r.memory_mib} MiB"
        + ("" if r.state == "ready" else f" ({r.state}: takes no new VM)")
        for r in placement.free
    )
    return f"Room left: {rooms or 'none'}"


def revision_line(plan: Plan) -> str:
    base = short_sha(plan.base) if plan.base else "nothing applied"
    head = short_sha(plan.head) if plan.head else "working tree"
    return f"fleet {plan.fleet!r}: {base} -> {head}"


def grouped_noops(plan: Plan, limit: int = 8) -> list[tuple[str, str]]:
    """``(reason, "vm-a, vm-b and 3 more")`` for every distinct no-op reason."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for action in plan.noops:
        by_reason[action.reason].append(action.vm)
    result = []
    for reason, vms in sorted(by_reason.items()):
        shown = ", ".join(vms[:limit])
        if len(vms) > limit:
            shown += f" and {len(vms) - limit} more"
        result.append((reason, shown))
    return result


def artifact_transition(action: VMAction) -> str:
    if action.artifact_before == action.artifact_after or action.artifact_after is None:
        return ""
    return f"{short_digest(action.artifact_before)} -> {short_digest(action.artifact_after)}"
