"""``FleetHost``: the leader's ``Host`` when the fleet spans hosts (a PostgreSQL store).

    ReconcileCycle (leader) ──Host──▶ FleetHost.observe ◀── fleet_observed(): every live host's VMs
                                      FleetHost.converge(plan) per wave:
                                        place (capacity, labels, spread, stability) ──require_fit
                                        end_epoch(lost hosts that still hold VMs)
                                        assign / unassign (fenced by the term) ──▶ assignments
                                        wait: each host's agent (``daemon.agent``) converges its
                                        share and reports it in the store ──▶ ApplyReport

The cycle's policies (waves, rollouts, canaries, deletion guards, back-off) stay where they
are: the plan comes to this host as it would to ``LocalHost``, and only its execution differs.
Instead of running VMs, the leader writes *where* each VM of a wave runs and *which revision*
defines it, and waits until the hosts say they run it, healthy, or that it is unhealthy, or the
wave's time is up. Nothing here touches a runtime: each host's agent is the only thing that
touches its machine.

A lost host's VMs are absent from ``observe``, so the plan starts them again and placement puts
them elsewhere; the lost host's epoch is ended first, so that when it comes back it stops its
stale copies before it does anything else. A new leader confirms every kept assignment with its
term (``confirm_assignments``) when it first refreshes; until then agents leave what they run
as it runs. VMs that run but were never assigned (a fleet converged before hosts existed) are
adopted where they run, so an upgrade moves nothing.

Not done here (yet): a failed wave is reported unhealthy and not rolled back to the previous
version (the rollouts' abort puts a workload back on its previous version on the next cycle),
and the VMs of a draining host move only when a plan changes something.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from reconciler.execution.events import EventKind, ExecutionEvent, Reporter, print_event
from reconciler.execution.executor import ApplyReport
from reconciler.execution.health import DEFAULT_START_SECONDS
from reconciler.leadership.fence import Fence
from reconciler.lifetimes import ClosedOnExit
from reconciler.model import (
    ActionType,
    DesiredFleet,
    DesiredVM,
    ObservedFleet,
    ObservedVM,
    Plan,
    VMAction,
    VMState,
)
from reconciler.planning.placement import HostFacts, Placement, demands_of, place
from reconciler.planning.rollout import stands_in_for
from reconciler.state import Pin, StateStore
from reconciler.state.hosts import Assignment, HostRecord

log = logging.getLogger(__name__)

BOOT_ALLOWANCE_SECONDS = 60.0
"""Added to a workload's health timeout when the leader waits for a wave: the host's agent
notices the assignment (within a second), builds the artifact if its cache lacks it, and boots
the VM before its health can be judged at all."""


class FleetStore(Protocol):
    """What the leader needs of the fleet's PostgreSQL store (``PostgresStateStore``)."""

    fence: Fence | None
    """The leader's fence, once it claimed the store (``claim_term``)."""

    def hosts(self) -> list[HostRecord]: ...

    def assignments(self) -> dict[str, Assignment]: ...

    def fleet_observed(self) -> dict[str, ObservedFleet]: ...

    def assign(self, vm: str, host: str, revision: str = "") -> None: ...

    def unassign(self, vm: str) -> None: ...

    def confirm_assignments(self, kept: Mapping[str, tuple[str, str]]) -> None: ...

    def end_epoch(self, host: str, epoch: int) -> bool: ...


class LeaderStore(StateStore, FleetStore, Protocol):
    """The leader's handle: the ``StateStore`` the cycle uses and the fleet's placement."""


@dataclass
class FleetHost(ClosedOnExit):
    """The hosts of the fleet, seen from the leader; implements ``execution.protocol.Host``."""

    store: LeaderStore
    host_facts: Callable[[Sequence[HostRecord]], list[HostFacts]]
    """Registry records as placement's input, lost after the daemon's grace period
    (``fleet_hosts.placement_hosts``)."""
    boot_allowance: float = BOOT_ALLOWANCE_SECONDS
    poll_interval: float = 0.5
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    where: dict[str, str] = field(default_factory=dict)
    """VM -> the host reporting it, as last observed."""
    _seen: dict[str, ObservedVM] = field(default_factory=dict)
    """The VMs as last observed: a wave waits for a fresh report of a VM it restarts."""
    _confirmed_term: int | None = None
    _revision_of: dict[tuple[str, str], str] = field(default_factory=dict)
    """(VM, artifact digest) -> the revision that defined it, as assigned by this leader: a
    VM put back on an earlier version is assigned the revision it came from."""

    # -- observing --------------------------------------------------------------------------

    def _live(self) -> tuple[list[HostRecord], list[HostFacts]]:
        records = self.store.hosts()
        return records, self.host_facts(records)

    def observe(self) -> ObservedFleet:
        """Every VM the live hosts report; a lost host's VMs are absent (the plan starts them
        again elsewhere). A VM reported by two hosts (one that came back and has not yet
        stopped its stale copy) counts where it is assigned."""
        _, facts = self._live()
        live = {h.name for h in facts if not h.lost}
        per_host = self.store.fleet_observed()
        assignments = self.store.assignments()
        vms: dict[str, ObservedVM] = {}
        where: dict[str, str] = {}
        version = 0
        applied: str | None = None
        for host, fleet in sorted(per_host.items()):
            version += fleet.version
            applied = applied or fleet.applied_revision
            if host not in live:
                continue
            for name, vm in fleet.vms.items():
                assigned = assignments.get(name)
                if name in vms and (assigned is None or assigned.host != host):
                    continue
                vms[name] = vm
                where[name] = host
        self.where, self._seen = where, vms
        if applied is None:
            applied_record = self.store.applied_revision()
            applied = applied_record.revision if applied_record else None
        return ObservedFleet(version=version, vms=vms, applied_revision=applied)

    def host_lost(self) -> bool:
        """Whether a host turned lost while it still holds assignments: its VMs wait for a
        cycle to place them elsewhere (the daemon runs one at once, not at the next poll)."""
        records, facts = self._live()
        lost = {h.name for h in facts if h.lost}
        ended = {r.name for r in records if r.ended}
        holding = {a.host for a in self.store.assignments().values()}
        return bool((lost - ended) & holding)

    def refresh(self) -> ObservedFleet:
        """Observe; the first time under a term, confirm every assignment with it (adopting
        VMs that run unassigned where they run), which is what lets the agents act on it."""
        observed = self.observe()
        term = self.store.fence.term if self.store.fence is not None else None
        if term is not None and term != self._confirmed_term:
            kept = {vm: (a.host, a.revision) for vm, a in self.store.assignments().items()}
            for name, host in self.where.items():
                if name not in kept:
                    kept[name] = (host, observed.applied_revision or "")
            self.store.confirm_assignments(kept)
            self._confirmed_term = term
            log.info("term %d confirmed %d assignment(s)", term, len(kept))
        return observed

    # -- converging -------------------------------------------------------------------------

    def converge(
        self,
        plan: Plan,
        desired: DesiredFleet,
        checkout: Path,
        cache_dir: Path,
        *,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        record_revision: bool = True,
        superseded: Callable[[], bool] = lambda: False,
    ) -> ApplyReport:
        """Place the plan's VMs and hand them to their hosts, wave by wave; each wave waits
        until its hosts report it. Nothing is built here: each host builds what it runs."""
        self.refresh()  # a leader acts on assignments it confirmed
        records, facts = self._live()
        assignments = self.store.assignments()
        current = {vm: a.host for vm, a in assignments.items()}
        # A plan that does not fit is refused before anything changes.
        placement = place(demands_of(desired), facts, current).require_fit()
        lost = {h.name for h in facts if h.lost}
        for record in records:
            holds = any(a.host == record.name for a in assignments.values())
            if record.name in lost and holds and not record.ended:
                _check(fence, f"ending the epoch of lost host {record.name}")
                if self.store.end_epoch(record.name, record.epoch):
                    log.warning(
                        "host %s is lost (epoch %d ended); its VMs are placed elsewhere",
                        record.name,
                        record.epoch,
                        extra={"event": "host-lost"},
                    )
        pins = self.store.pins()
        report = ApplyReport()
        for wave in sorted({a.wave for a in plan.actions}):
            if superseded():
                report.superseded = "a newer revision waits"
                break
            actions = [a for a in plan.actions if a.wave == wave]
            waiting = self._hand_out(
                actions, desired, placement, pins=pins, fence=fence, on_event=on_event
            )
            report.applied += actions
            unhealthy = self._wait(waiting, desired, fence, on_event, superseded)
            if unhealthy is None:
                report.superseded = "a newer revision waits"
                break
            report.unhealthy.update(unhealthy)
            if unhealthy:
                break  # later waves would spread a change that does not work
        if report.ok and report.superseded is None:
            self._forget_undesired(desired, fence)
        if record_revision and plan.head is not None and report.superseded is None:
            if report.ok:
                self.store.record_revision(plan.head, outcome="applied")
            else:
                self.store.record_revision(plan.head, outcome="failed", message=report.problems())
        return report

    def _forget_undesired(self, desired: DesiredFleet, fence: Fence | None) -> None:
        """Drop the assignments of VMs no longer desired that no live host runs (they ran on
        a lost host): left, they would start again where that host comes back."""
        for vm, assigned in self.store.assignments().items():
            # A surge stand-in is never desired by name; its plan removes it.
            if vm not in desired.vms and vm not in self.where and stands_in_for(vm) is None:
                _check(fence, f"unassigning {vm}")
                self.store.unassign(vm)
                log.info("%s is no longer desired: unassigned from %s", vm, assigned.host)

    def _hand_out(
        self,
        actions: Sequence[VMAction],
        desired: DesiredFleet,
        placement: Placement,
        *,
        pins: Mapping[str, Pin],
        fence: Fence | None,
        on_event: Reporter,
    ) -> dict[str, _Waiting]:
        """Write the assignments of one wave; returns what each of its VMs waits for."""
        waiting: dict[str, _Waiting] = {}
        for action in actions:
            _check(fence, f"assigning {action.vm}")
            on_event(
                ExecutionEvent(
                    EventKind.ACTION, action.vm, action=action.action.value, detail=action.reason
                )
            )
            if action.action is ActionType.DELETE:
                self.store.unassign(action.vm)
                waiting[action.vm] = _Waiting(self.where.get(action.vm, ""), None, None)
                continue
            slot = action.stands_in_for or action.vm
            wanted = desired.vms[slot]
            if action.stands_in_for is not None:
                wanted = replace(wanted, name=action.vm)  # a surge stand-in runs its slot's
            host = placement.assignments.get(slot) or self.where.get(action.vm, "")
            revision = self._revision_for(wanted, desired, pins)
            self.store.assign(action.vm, host, revision)
            self._revision_of[(action.vm, wanted.artifact.input_digest)] = revision
            waiting[action.vm] = _Waiting(host, wanted, self._seen.get(action.vm))
            log.info("%s %s on %s", action.action.value, action.vm, host, extra={"vm": action.vm})
        return waiting

    def _revision_for(
        self, wanted: DesiredVM, desired: DesiredFleet, pins: Mapping[str, Pin]
    ) -> str:
        """Which revision defines ``wanted``: a pinned workload's pin, a VM put back on the
        version this leader assigned it before, else the revision being converged."""
        pin = pins.get(wanted.workload)
        if pin is not None:
            return pin.revision
        known = self._revision_of.get((wanted.name, wanted.artifact.input_digest))
        own = desired.artifacts.get((wanted.workload, wanted.target))
        if known is not None and (own is None or own.input_digest != wanted.artifact.input_digest):
            return known
        return desired.revision or ""

    def _wait(
        self,
        waiting: Mapping[str, _Waiting],
        desired: DesiredFleet,
        fence: Fence | None,
        on_event: Reporter,
        superseded: Callable[[], bool],
    ) -> dict[str, str] | None:
        """Until every VM of the wave is reported as wanted (healthy, or gone), or unhealthy,
        or the wave's time is up; returns the unhealthy VMs with why, None when superseded."""
        timeout = self.boot_allowance + max(
            (_health_seconds(desired, w.wanted.workload) for w in waiting.values() if w.wanted),
            default=0.0,
        )
        deadline = self.clock() + timeout
        pending = dict(waiting)
        unhealthy: dict[str, str] = {}
        while pending:
            _check(fence, "waiting for the hosts")
            reported = self.store.fleet_observed()
            for name, waits in list(pending.items()):
                verdict = _verdict(name, waits, reported)
                if verdict is None:
                    continue
                del pending[name]
                if verdict:
                    unhealthy[name] = verdict
                if waits.wanted is not None:
                    detail = verdict or waits.host
                    on_event(
                        ExecutionEvent(EventKind.HEALTH, name, healthy=not verdict, detail=detail)
                    )
            if not pending:
                break
            if superseded():
                return None
            if self.clock() >= deadline:
                for name, waits in pending.items():
                    what = "running" if waits.wanted is not None else "gone"
                    unhealthy[name] = (
                        f"not reported {what} by host {waits.host} within {timeout:.0f} s"
                    )
                break
            self.sleep(self.poll_interval)
        return unhealthy

    # -- health -----------------------------------------------------------------------------

    def settle_health(
        self,
        observed: ObservedFleet,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        superseded: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        """The VMs the hosts report unhealthy (each host's agent judges its own)."""
        current = self.observe()
        return {
            name: vm.detail or f"unhealthy on host {self.where.get(name, '?')}"
            for name, vm in current.vms.items()
            if vm.healthy is False and vm.state is not VMState.STOPPED
        }

    def close(self) -> None:
        self.store.close()


@dataclass(frozen=True)
class _Waiting:
    """What a VM of a wave waits for: ``wanted`` reported by ``host`` (None: gone from it);
    ``before`` is how it was observed when it was handed out."""

    host: str
    wanted: DesiredVM | None
    before: ObservedVM | None


def _verdict(name: str, waits: _Waiting, reported: Mapping[str, ObservedFleet]) -> str | None:
    """None while undecided; "" when ``name`` is as wanted; else why it is unhealthy."""
    fleet = reported.get(waits.host)
    vm = fleet.vms.get(name) if fleet is not None else None
    wanted, before = waits.wanted, waits.before
    if wanted is None:  # a deletion: gone from the host that ran it
        return "" if vm is None else None
    if vm is None or vm.artifact_digest != wanted.artifact.input_digest:
        return None
    if dict(vm.settings) != dict(wanted.settings):
        return None
    if (
        before is not None
        and vm.started_at == before.started_at
        and not (before.state is VMState.RUNNING and before.healthy)
    ):
        return None  # the report from before its host started it again
    if vm.state is VMState.RUNNING and vm.healthy:
        return ""
    if vm.healthy is False or vm.state is VMState.FAILED:
        return vm.detail or f"unhealthy on host {waits.host}"
    return None


def _health_seconds(desired: DesiredFleet, workload: str) -> float:
    """How long a host may take to judge the workload's health (``execution.health``'s
    patience, which is never below its default start period)."""
    spec = desired.workloads.get(workload)
    health = spec.deploy.health if spec is not None else None
    if health is None:
        return DEFAULT_START_SECONDS
    return max(health.start_period_seconds, DEFAULT_START_SECONDS) + health.timeout_seconds


def _check(fence: Fence | None, what: str) -> None:
    if fence is not None:
        fence.check(what)


__all__ = ["BOOT_ALLOWANCE_SECONDS", "FleetHost", "FleetStore", "LeaderStore"]
