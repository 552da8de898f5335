"""The text rendering of a plan, read like ``terraform plan``: one block per VM action with
``+``, ``~``, ``-/+`` or ``-``, the artifacts to build, why unchanged VMs stay as they are, and a
summary line. A placed plan (multi-host store) also names each acting VM's host and has a
placement section: ``+ web-2 on host-b`` for a VM placed for the first time, ``> web-1 moves
host-a -> host-b (host-a is draining)`` for a move, ``- old-0 leaves host-a``, and the room each
host keeps."""

from __future__ import annotations

from reconciler.model import ActionType, Plan, PlanPlacement, VMAction, short_digest
from reconciler.render.common import (
    MOVE_SYMBOL,
    SYMBOL,
    VERB,
    artifact_transition,
    grouped_noops,
    placement_heading,
    revision_line,
    room_line,
    staying,
    summary_line,
)


def render_text(plan: Plan) -> str:
    lines = [f"reconciler plan for {revision_line(plan)}", ""]
    for warning in plan.warnings:
        lines.append(f"Warning: {warning}")
    if plan.warnings:
        lines.append("")

    if plan.builds:
        lines.append("Artifacts to build:")
        for build in plan.builds:
            lines.append(
                f"  * {build.workload}/{build.target.value}: "
                f"{short_digest(build.digest_before)} -> {short_digest(build.digest_after)} "
                f"({build.reason})"
            )
        lines.append("")

    if not plan.actions and plan.placement is not None and plan.placement.moves:
        lines.append("No VM changes; VMs move between hosts (below).")
    elif not plan.actions:
        lines.append("No changes. The fleet matches the revision.")
        lines.append("")
    else:
        lines.append("Actions, in the order they run:")
        lines.append("")
        for action in plan.actions:
            lines.extend(_action_block(action, _host_of(plan, action)))
            lines.append("")

    if plan.placement is not None:
        lines.extend(_placement_block(plan.placement))
        lines.append("")

    noops = grouped_noops(plan)
    if noops:
        lines.append("Unchanged:")
        lines.extend(f"  = {vms}: {reason}" for reason, vms in noops)
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines) + "\n"


def _host_of(plan: Plan, action: VMAction) -> str:
    """`` on host-b`` for an acting VM of a placed plan (a deleted one: the host it leaves)."""
    if plan.placement is None:
        return ""
    host = plan.placement.host_of(action.vm) or dict(plan.placement.released).get(action.vm)
    return f" on {host}" if host else ""


def _placement_block(placement: PlanPlacement) -> list[str]:
    lines = [f"{placement_heading(placement)}:"]
    new = set(placement.new)
    lines.extend(f"  + {vm} on {host}" for vm, host in placement.assignments if vm in new)
    lines.extend(
        f"  {MOVE_SYMBOL} {m.vm} moves {m.source} -> {m.destination} ({m.reason})"
        for m in placement.moves
    )
    lines.extend(f"  - {vm} leaves {host}" for vm, host in placement.released)
    stay = staying(placement)
    if stay is not None:
        lines.append(f"  = {stay}")
    lines.append(f"  {room_line(placement)}")
    return lines


def _action_block(action: VMAction, where: str = "") -> list[str]:
    symbol = SYMBOL[action.action]
    header = (
        f"  # {action.vm} {VERB[action.action]} ({action.disruption.label}, "
        f"wave {action.wave}): {action.reason}"
    )
    block = [header, f"{symbol:>3} vm {action.vm!r} (workload {action.workload}){where}"]
    # A changed artifact is shown once, shortened; a new VM lists it with its other settings.
    transition = "" if action.action is ActionType.CREATE else artifact_transition(action)
    if transition:
        block.append(f"      ~ artifact: {transition}")
    for change in action.changes:
        if change.key == "artifact" and transition:
            continue
        if change.before is None:
            block.append(f"      + {change.key} = {change.after}")
        elif change.after is None:
            block.append(f"      - {change.key} = {change.before}")
        else:
            block.append(f"      ~ {change.key} = {change.before} -> {change.after}")
    return block
