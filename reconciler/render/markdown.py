"""The Markdown rendering of a plan: a pull-request comment with a summary table, the actions
table, the placement on the live hosts (a placed plan only: VMs placed for the first time, moves
between hosts, hosts freed, the room each keeps), the expected disruption per workload (when an
estimate is given: ``diff`` gives one), the artifacts to build, then the per-VM changes folded
in ``<details>``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from reconciler.model import Plan, PlanPlacement, short_digest
from reconciler.render.common import (
    MOVE_SYMBOL,
    SYMBOL,
    grouped_noops,
    placement_heading,
    revision_line,
    room_line,
    staying,
    summary_line,
)


class WorkloadDisruption(Protocol):
    """One workload's row of the expected disruption (``planning.disruption`` makes them;
    render and planning are independent layers, so this is what render reads of one)."""

    @property
    def workload(self) -> str: ...
    @property
    def disrupted(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def at_once(self) -> int: ...
    @property
    def waves(self) -> int: ...
    @property
    def median_seconds(self) -> float | None: ...
    @property
    def samples(self) -> int: ...
    @property
    def degraded_seconds(self) -> float | None: ...


class DisruptionEstimate(Protocol):
    @property
    def workloads(self) -> Sequence[WorkloadDisruption]: ...
    @property
    def budget_seconds(self) -> float: ...
    def warnings(self) -> list[str]: ...


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(plan: Plan, disruption: DisruptionEstimate | None = None) -> str:
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
    if not plan.actions and plan.placement is not None and plan.placement.moves:
        out += ["**No VM changes;** VMs move between hosts (below).", ""]
    elif not plan.actions:
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
    if plan.placement is not None:
        out += _placement_section(plan.placement)
    if disruption is not None and disruption.workloads:
        out += _disruption_section(disruption)
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


def _placement_section(placement: PlanPlacement) -> list[str]:
    out = [f"#### {_cell(placement_heading(placement))}", ""]
    new = set(placement.new)
    rows = [f"| `+` | `{vm}` | {host} | new |" for vm, host in placement.assignments if vm in new]
    rows += [
        f"| `{MOVE_SYMBOL}` | `{m.vm}` | {m.destination} | moves from {m.source}: "
        f"{_cell(m.reason)} |"
        for m in placement.moves
    ]
    rows += [f"| `-` | `{vm}` | {host} | leaves it |" for vm, host in placement.released]
    if rows:
        out += ["| | VM | host | |", "|---|---|---|---|", *rows, ""]
    stay = staying(placement)
    if stay is not None:
        out += [f"{_cell(stay)}.", ""]
    out += [f"_{_cell(room_line(placement))}_", ""]
    return out


def _disruption_section(estimate: DisruptionEstimate) -> list[str]:
    out = ["#### Expected disruption", ""]
    out += [f"> **Warning:** {_cell(w)}" for w in estimate.warnings()]
    if estimate.warnings():
        out.append("")
    out += [
        "| workload | restarted or replaced | unavailable at once | waves "
        "| start-to-healthy (median) | below full capacity for |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    out += [_disruption_row(w) for w in estimate.workloads]
    out += [
        "",
        f"_Waves follow the rollout policy (maxUnavailable); times are the median of the "
        f"newest start-to-healthy measurements of each workload; budget "
        f"{estimate.budget_seconds:g} s below full capacity per workload._",
        "",
    ]
    return out


def _disruption_row(w: WorkloadDisruption) -> str:
    if w.median_seconds is None:
        time_cell = degraded_cell = "not measured yet"
    else:
        runs = f"{w.samples} run{'s' if w.samples != 1 else ''}"
        time_cell = f"{w.median_seconds:.1f} s ({runs})"
        degraded_cell = f"~{w.degraded_seconds or 0:.1f} s"
    return (
        f"| {_cell(w.workload)} | {w.disrupted} | {w.at_once} of {w.running} | {w.waves} "
        f"| {time_cell} | {degraded_cell} |"
    )
