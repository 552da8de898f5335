"""Suspension: what a plan becomes when workloads (or the whole fleet) are suspended.

    diff(desired, observed) ──▶ Plan ──suspend_plan(suspended)──▶ Plan the daemon executes

Like Flux's ``spec.suspend``: a suspended workload is left exactly as it runs. Its actions turn
into no-ops that say so, and its builds are dropped, so ``reconciler diff`` and the daemon's
events show why nothing happens to it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from reconciler.model import FLEET_WIDE, ActionType, Disruption, Plan, VMAction


def suspend_plan(plan: Plan, suspended: Mapping[str, str]) -> Plan:
    """``plan`` without the actions and builds of suspended workloads (``*``: all of them)."""
    if not suspended:
        return plan

    def is_suspended(workload: str) -> bool:
        return FLEET_WIDE in suspended or workload in suspended

    kept = tuple(a for a in plan.actions if not is_suspended(a.workload))
    held = tuple(
        VMAction(
            action=ActionType.NOOP,
            vm=a.vm,
            workload=a.workload,
            disruption=Disruption.NONE,
            reason=f"suspended ({_why(suspended, a.workload)}); would {a.action.value}: {a.reason}",
        )
        for a in plan.actions
        if is_suspended(a.workload)
    )
    return replace(
        plan,
        actions=kept,
        noops=(*plan.noops, *held),
        builds=tuple(b for b in plan.builds if not is_suspended(b.workload)),
    )


def _why(suspended: Mapping[str, str], workload: str) -> str:
    reason = suspended.get(workload) or suspended.get(FLEET_WIDE) or ""
    scope = "the fleet is suspended" if FLEET_WIDE in suspended else "workload suspended"
    return f"{scope}: {reason}" if reason else scope
