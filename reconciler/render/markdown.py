"""The Markdown rendering of a plan: a pull-request comment with a summary table, the actions
table, the artifacts to build, then the per-VM changes folded in ``<details>``."""

from __future__ import annotations

from reconciler.model import Plan, short_digest
from reconciler.render.common import SYMBOL, grouped_noops, revision_line, summary_line


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(plan: Plan) -> str:
    counts = plan.summary()
    out = [f"### reconciler plan: {_cell(revision_line(plan))}", ""]
    for warning in plan.warnings:
        out.append(f"> **Warning:** {_cell(warning)}")
    if plan.warnings:
        out.append("")
    out += [
        "| create | update | restart | replace | delete |",
        "|---:|---:|---:|---:|---:|",
        f"| {counts['create']} | {counts['update']} | {counts['restart']} | "
        f"{counts['replace']} | {counts['delete']} |",
        "",
    ]
    if not plan.actions:
        out += ["**No changes.** The fleet matches the revision.", ""]
    else:
        out += [
            "| | action | VM | workload | disruption | wave | reason |",
            "|---|---|---|---|---|---:|---|",
        ]
        for a in plan.actions:
            out.append(
                f"| `{SYMBOL[a.action]}` | {a.action.value} | `{a.vm}` | {a.workload} | "
                f"{a.disruption.label} | {a.wave} | {_cell(a.reason)} |"
            )
        out.append("")
    if plan.builds:
        out += [
            "#### Artifacts to build",
            "",
            "| workload | target | before | after | inputs changed |",
            "|---|---|---|---|---|",
        ]
        for b in plan.builds:
            out.append(
                f"| {b.workload} | {b.target.value} | `{short_digest(b.digest_before)}` | "
                f"`{short_digest(b.digest_after)}` | {', '.join(b.changed_inputs)} |"
            )
        out.append("")
    detailed = [a for a in plan.actions if a.changes]
    if detailed:
        out += ["<details><summary>Changes per VM</summary>", "", "```diff"]
        for a in detailed:
            out.append(f"# {a.vm} ({a.action.value}: {a.reason})")
            for c in a.changes:
                if c.before is not None:
                    out.append(f"- {c.key} = {c.before}")
                if c.after is not None:
                    out.append(f"+ {c.key} = {c.after}")
        out += ["```", "", "</details>", ""]
    noops = grouped_noops(plan)
    if noops:
        out += ["<details><summary>Unchanged VMs</summary>", ""]
        out += [f"- {_cell(vms)}: {_cell(reason)}" for reason, vms in noops]
        out += ["", "</details>", ""]
    out.append(f"_{summary_line(plan)}_")
    return "\n".join(out) + "\n"
