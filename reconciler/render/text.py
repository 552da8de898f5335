"""The text rendering of a plan, read like ``terraform plan``: one block per VM action with
``+``, ``~``, ``-/+`` or ``-``, the artifacts to build, why unchanged VMs stay as they are, and a
summary line."""

from __future__ import annotations

from reconciler.model import ActionType, Plan, VMAction, short_digest
from reconciler.render.common import (
    SYMBOL,
    VERB,
    artifact_transition,
    grouped_noops,
    revision_line,
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

    if not plan.actions:
        lines.append("No changes. The fleet matches the revision.")
        lines.append("")
    else:
        lines.append("Actions, in the order they run:")
        lines.append("")
        for action in plan.actions:
            lines.extend(_action_block(action))
            lines.append("")

    noops = grouped_noops(plan)
    if noops:
        lines.append("Unchanged:")
        lines.extend(f"  = {vms}: {reason}" for reason, vms in noops)
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines) + "\n"


def _action_block(action: VMAction) -> list[str]:
    symbol = SYMBOL[action.action]
    header = (
        f"  # {action.vm} {VERB[action.action]} ({action.disruption.label}, "
        f"wave {action.wave}): {action.reason}"
    )
    block = [header, f"{symbol:>3} vm {action.vm!r} (workload {action.workload})"]
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
