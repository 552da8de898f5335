"""Where one cycle's time goes, from the trigger to the last VM healthy: the commit → healthy
timeline.

    TriggerQueue (when the trigger happened) ──▶ ReconcileCycle.reconcile
        cycle steps (fetch, load, plan) ──────────────┐
        executor and health: PHASE ExecutionEvents ───┴─▶ Timeline ──▶ one "timeline" event,
            (build, stop, network, vmm-start, boot,                   the phase histogram,
             workload, probe; per VM)                                 the cycle's log line

Pure: the clock is injected and nothing here does I/O. Per-VM phases are kept per VM; the
summary shows, for each phase, the slowest VM's, since the VMs of a wave start one after the
other and are waited for together, and the slowest one is what "healthy" waits for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from reconciler.execution.events import EventKind, ExecutionEvent

# Every phase, in the order a commit goes through them.
PHASES = (
    "trigger",  # the commit (a ref file's change, a webhook, a poll) until the cycle starts
    "fetch",  # bringing a remote's mirror up to date and resolving the head
    "load",  # manifests and templates of the revision (a cache hit when seen before)
    "plan",  # observing the fleet, diff, suspensions, deletion guards
    "build",  # the artifacts the plan starts (mostly cache hits)
    "stop",  # stopping the VM a restart or replace replaces
    "network",  # the VM's TAP, or its network namespace and veth (kept across restarts)
    "vmm-start",  # the VMM (or the process sandbox) until it runs
    "boot",  # the VMM running until the guest init reports "booted" (kernel boot to init)
    "workload",  # "booted" until "workload started"
    "probe",  # "workload started" until the first passing health probe
)


@dataclass(frozen=True)
class PhaseSample:
    phase: str
    seconds: float
    vm: str | None = None


@dataclass
class Timeline:
    """The phases of one cycle. ``clock`` is wall-clock time (``time.time``): a trigger's time
    comes from another process (the mtime git gave a ref file)."""

    started: float
    triggered_at: float | None = None
    clock: Callable[[], float] = time.time
    samples: list[PhaseSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.triggered_at is not None:
            # A clock that moved backwards, or a ref file touched by hand long ago, is no
            # latency of ours; it is clamped to 0, never negative.
            self.add("trigger", self.started - self.triggered_at)

    def add(self, phase: str, seconds: float, vm: str | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown timeline phase {phase!r}")
        self.samples.append(PhaseSample(phase, max(0.0, seconds), vm))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as phase ``name`` (also when it raises)."""
        began = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - began)

    def on_event(self, event: ExecutionEvent) -> None:
        """A reporter (``execution.events.Reporter``): keeps the PHASE events."""
        if event.kind is EventKind.PHASE and event.phase is not None and event.seconds is not None:
            self.add(event.phase, event.seconds, event.vm)

    def slowest(self) -> Mapping[str, float]:
        """Each phase that happened, in ``PHASES`` order: the longest sample (the slowest VM)."""
        found: dict[str, float] = {}
        for sample in self.samples:
            found[sample.phase] = max(found.get(sample.phase, 0.0), sample.seconds)
        return {phase: found[phase] for phase in PHASES if phase in found}

    def total(self) -> float:
        """From the trigger (else the cycle's start) until now."""
        began = self.triggered_at if self.triggered_at is not None else self.started
        return max(0.0, self.clock() - began)

    def summary(self) -> str:
        """``trigger 0.012 s, fetch 0.003 s, ..., probe 0.004 s; trigger → done 0.310 s``."""
        phases = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.slowest().items())
        since = "trigger" if self.triggered_at is not None else "cycle start"
        return f"{phases or 'no phases'}; {since} → done {self.total():.3f} s"

    @property
    def started_vms(self) -> bool:
        """Whether a VM was started this cycle (the timeline is a commit → healthy one)."""
        return any(sample.phase == "vmm-start" for sample in self.samples)
