"""Deletion guards: which plans may not run although they are valid.

    diff(desired, observed) ──▶ Plan ──(suspend_plan)──▶ check_deletions ──▶ apply / daemon
                                                               └─▶ diff shows it, exits 1

A one-character mistake in a revision (a misspelt key, a file moved out of the manifest path, a
template that renders one workload instead of ten) turns into a calm ``- delete`` for every VM
it drops. The loader refuses what it can recognise; these guards are the second line: they look
only at how much a plan destroys, whatever the cause. Each guard below says why it exists and
how an operator who means it gets past it. Pure: no I/O.

``check_deletions`` raises ``DeletionGuardError`` carrying the plan (with the refusal added to
its warnings), so ``diff`` can still show what would have happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from reconciler.errors import PlanError
from reconciler.model import ActionType, DesiredFleet, ObservedFleet, Plan, VMAction

DEFAULT_MAX_DELETIONS = 5
"""Deletions always allowed by default: a small fleet removes a typical workload (a few
replicas) without ceremony."""
DEFAULT_MAX_DELETIONS_PERCENT = 25
"""Of the VMs the fleet runs: a larger fleet may scale a workload down, but a revision that
drops most of the fleet (a wrong --path, a deleted directory, a broken template) is stopped."""
PREVENT_DESTROY_SETTING = "deploy.preventDestroy"


@dataclass(frozen=True)
class _Context:
    plan: Plan
    desired: DesiredFleet
    observed: ObservedFleet
    deletions: tuple[VMAction, ...]


@dataclass(frozen=True)
class _Guard:
    name: str
    check: Callable[[_Context], str | None]
    """A one-line refusal (count, guard, how to override), or None when the plan passes."""
    forceable: bool
    """Whether ``--force-deletions`` overrides it."""
    why: str


def _names(actions: Sequence[VMAction], limit: int = 4) -> str:
    names = [a.vm for a in actions]
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _protected(context: _Context) -> str | None:
    protected = []
    for action in context.deletions:
        vm = context.observed.vms.get(action.vm)
        workload = context.desired.workloads.get(action.workload)
        # The VM's recorded settings count even when the revision dropped the workload:
        # deleting the document must not delete the promise with it.
        flagged = vm is not None and vm.settings.get(PREVENT_DESTROY_SETTING) == "true"
        if flagged or (workload is not None and workload.deploy.prevent_destroy):
            protected.append(action)
    if not protected:
        return None
    workloads = sorted({a.workload for a in protected})
    return (
        f"the plan deletes {len(protected)} VM{'s' if len(protected) != 1 else ''} protected "
        f"by deploy.preventDestroy ({_names(protected)}); to delete them, first apply a commit "
        f"that sets preventDestroy: false on {', '.join(repr(w) for w in workloads)}"
    )


def max_deletions(desired: DesiredFleet, fleet_size: int) -> tuple[int, str]:
    """How many deletions the fleet allows, and where that number comes from."""
    setting = desired.fleet.max_deletions
    if setting is None:
        allowed = max(
            DEFAULT_MAX_DELETIONS, math.floor(fleet_size * DEFAULT_MAX_DELETIONS_PERCENT / 100)
        )
        return allowed, (
            f"the default maxDeletions ({DEFAULT_MAX_DELETIONS_PERCENT}% of the fleet's "
            f"{fleet_size} VMs, at least {DEFAULT_MAX_DELETIONS})"
        )
    if isinstance(setting, str):
        percent = int(setting.rstrip("%"))
        allowed = math.floor(fleet_size * percent / 100)
        return allowed, f"the Fleet's spec.maxDeletions ({setting} of {fleet_size} VMs)"
    return setting, f"the Fleet's spec.maxDeletions ({setting})"


def _too_many(context: _Context) -> str | None:
    fleet = context.desired.fleet.name
    size = sum(1 for vm in context.observed.vms.values() if vm.fleet == fleet)
    allowed, source = max_deletions(context.desired, size)
    count = len(context.deletions)
    if count <= allowed:
        return None
    return (
        f"the plan deletes {count} VMs ({_names(context.deletions)}), over {source} of "
        f"{allowed}; raise spec.maxDeletions in a commit, or run with --force-deletions"
    )


GUARDS: tuple[_Guard, ...] = (
    _Guard(
        "preventDestroy",
        _protected,
        forceable=False,
        why="The workload's owners said its VMs hold something a delete loses (data on their "
        "disk, a singleton). Like Terraform's prevent_destroy, only a reviewed commit lifts "
        "it: no flag on a command line does.",
    ),
    _Guard(
        "maxDeletions",
        _too_many,
        forceable=True,
        why="A plan that deletes a large part of the fleet is far more often a mistake (a "
        "typo, a moved file, a wrong --path) than an intent; an intent is one flag or one "
        "reviewed line away.",
    ),
)


class DeletionGuardError(PlanError):
    """A plan deletes more than its guards allow. ``plan`` is the refused plan, its warnings
    saying why, for ``diff`` to show; ``str(err)`` is the one line for the user. The same
    revision against the same fleet is refused again: terminal (``reconciler.errors``)."""

    terminal = True

    def __init__(self, plan: Plan, refusals: Sequence[str]) -> None:
        self.refusals = tuple(refusals)
        self.plan = replace(
            plan,
            warnings=plan.warnings + tuple(f"this plan is refused: {r}" for r in self.refusals),
        )
        super().__init__("refusing the plan: " + "; ".join(self.refusals))


def check_deletions(
    plan: Plan, desired: DesiredFleet, observed: ObservedFleet, *, force_deletions: bool = False
) -> Plan:
    """``plan`` when every guard passes; raises ``DeletionGuardError`` otherwise.

    ``force_deletions`` lifts the guards that a command-line flag may lift (see ``GUARDS``).
    """
    # A surge stand-in's delete gives back temporary capacity: it deletes nothing of the fleet.
    deletions = tuple(
        a for a in plan.actions if a.action is ActionType.DELETE and a.stands_in_for is None
    )
    if not deletions:
        return plan
    context = _Context(plan, desired, observed, deletions)
    refusals = [
        message
        for guard in GUARDS
        if not (guard.forceable and force_deletions)
        for message in [guard.check(context)]
        if message is not None
    ]
    if refusals:
        raise DeletionGuardError(plan, refusals)
    return plan
