"""Pieces shared by the human-readable renderers."""

from __future__ import annotations

from collections import defaultdict

from reconciler.formatting import short_sha
from reconciler.model import ActionType, Plan, VMAction, short_digest

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


def summary_line(plan: Plan) -> str:
    counts = plan.summary()
    return (
        f"Plan: {counts['create']} to create, {counts['update']} to update in place, "
        f"{counts['restart']} to restart, {counts['replace']} to replace, "
        f"{counts['delete']} to delete."
    )


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
