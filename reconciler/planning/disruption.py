"""The expected disruption of a plan, per workload: how many of its VMs are down at once and
for how long, from the rollout waves and the measured start-to-healthy times (pure).

    Plan (waves cut by maxUnavailable) ──┐
    vm.timeline events (state store) ────┴─▶ estimate_disruption ─▶ DisruptionEstimate
                                                     ──▶ render.markdown (through its Protocol)

A restart or replace takes a VM out of service until its new instance is healthy; the planner
has already cut those into waves of at most ``maxUnavailable``, run one after another. So a
workload runs below its full count for about *waves x start-to-healthy time*, with *at most
``at_once``* VMs missing. The time is the median of the newest measurements the daemon
recorded for that workload (``timeline_messages``: one ``vm.timeline`` event per workload and
cycle that started VMs of it, with its slowest VM's time from the VMM's start to the first
passing probe, the phases of the cycle's timeline); with none,
the estimate says "not measured yet" rather than inventing a figure. Above the budget (seconds
below full capacity per workload) the plan warns; a wave that takes down every running VM of a
workload is an outage and always warns.

Events come from the state store, which a fleet revision cannot write, but a malformed message
(an older daemon, a hand-edited store) is skipped, never trusted into a number.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from reconciler.model import ActionType, Plan

TIMELINE_EVENT = "vm.timeline"
# A VM's timeline phases from its VMM's start to its first passing probe (daemon.timeline).
START_TO_HEALTHY_PHASES = ("vmm-start", "boot", "workload", "probe")
RECENT_SAMPLES = 20  # per workload: recent enough to follow a faster kernel, enough for a median
DEFAULT_BUDGET_SECONDS = 120.0
_DISRUPTIVE = (ActionType.RESTART, ActionType.REPLACE)


@dataclass(frozen=True)
class WorkloadDisruption:
    workload: str
    disrupted: int
    """VMs restarted or replaced."""
    running: int
    """VMs of the workload that run before the plan (all but its creates)."""
    at_once: int
    """The most of them unavailable in one wave."""
    waves: int
    median_seconds: float | None
    """Median start-to-healthy time of the workload's newest measurements; None: none yet."""
    samples: int

    @property
    def degraded_seconds(self) -> float | None:
        """About how long the workload runs below its full count; None when not measured."""
        if self.median_seconds is None:
            return None
        return self.waves * self.median_seconds

    @property
    def outage(self) -> bool:
        """Every running VM of the workload is down at once."""
        return self.running > 0 and self.at_once >= self.running


@dataclass(frozen=True)
class DisruptionEstimate:
    workloads: tuple[WorkloadDisruption, ...]
    budget_seconds: float

    def warnings(self) -> list[str]:
        out = []
        for w in self.workloads:
            degraded = w.degraded_seconds
            if w.outage:
                during = f" for about {_seconds(degraded)}" if degraded is not None else ""
                out.append(
                    f"{w.workload}: all {w.running} running VMs are unavailable at once"
                    f"{during}: the service is down (lower maxUnavailable or add replicas)"
                )
            if degraded is not None and degraded > self.budget_seconds:
                out.append(
                    f"{w.workload}: about {_seconds(degraded)} below full capacity "
                    f"({w.waves} wave{'s' if w.waves != 1 else ''} of "
                    f"{_seconds(w.median_seconds or 0.0)}"
                    f"), over the disruption budget of {_seconds(self.budget_seconds)}"
                )
        return out


def estimate_disruption(
    plan: Plan,
    measured: Mapping[str, Sequence[float]],
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
) -> DisruptionEstimate:
    """The disruption of every workload that ``plan`` restarts or replaces VMs of, with the
    start-to-healthy samples in ``measured`` (workload -> seconds, newest first)."""
    running: dict[str, int] = {}
    waves: dict[str, dict[int, int]] = {}
    for action in (*plan.actions, *plan.noops):
        if action.action is not ActionType.CREATE:
            running[action.workload] = running.get(action.workload, 0) + 1
        if action.action in _DISRUPTIVE:
            per_wave = waves.setdefault(action.workload, {})
            per_wave[action.wave] = per_wave.get(action.wave, 0) + 1
    workloads = []
    for workload in sorted(waves):
        per_wave = waves[workload]
        samples = list(measured.get(workload, ()))[:RECENT_SAMPLES]
        workloads.append(
            WorkloadDisruption(
                workload=workload,
                disrupted=sum(per_wave.values()),
                running=running.get(workload, 0),
                at_once=max(per_wave.values()),
                waves=len(per_wave),
                median_seconds=statistics.median(samples) if samples else None,
                samples=len(samples),
            )
        )
    return DisruptionEstimate(tuple(workloads), budget_seconds)


def start_to_healthy_samples(events: Iterable[tuple[str, str]]) -> dict[str, list[float]]:
    """Workload -> start-to-healthy seconds, newest first, from ``(kind, message)`` pairs of
    the state store's events (newest first). Messages that are not the documented JSON object
    (``{"workload": str, "start_to_healthy": seconds, ...}``) are skipped."""
    samples: dict[str, list[float]] = {}
    for kind, message in events:
        if kind != TIMELINE_EVENT:
            continue
        try:
            data = json.loads(message)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        workload, seconds = data.get("workload"), data.get("start_to_healthy")
        if not isinstance(workload, str) or not workload:
            continue
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            continue
        if not math.isfinite(seconds) or seconds < 0:
            continue
        samples.setdefault(workload, []).append(float(seconds))
    return samples


def timeline_messages(
    samples: Iterable[tuple[str, str | None, float]], workload_of: Mapping[str, str]
) -> dict[str, str]:
    """Workload -> the ``vm.timeline`` message to record for one cycle, from its timeline's
    ``(phase, vm, seconds)`` samples and each VM's workload: the slowest start-to-healthy time
    (``START_TO_HEALTHY_PHASES`` summed per VM) among the VMs that got healthy (a ``probe``
    sample), as ``start_to_healthy_samples`` reads it back."""
    per_vm: dict[str, float] = {}
    healthy: set[str] = set()
    for phase, vm, seconds in samples:
        if vm is None or phase not in START_TO_HEALTHY_PHASES:
            continue
        per_vm[vm] = per_vm.get(vm, 0.0) + seconds
        if phase == "probe":
            healthy.add(vm)
    slowest: dict[str, list[float]] = {}
    for vm in sorted(healthy):
        workload = workload_of.get(vm)
        if workload is not None:
            slowest.setdefault(workload, []).append(per_vm[vm])
    return {
        workload: json.dumps(
            {"workload": workload, "start_to_healthy": round(max(times), 3), "vms": len(times)},
            sort_keys=True,
        )
        for workload, times in sorted(slowest.items())
    }


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
