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

VMs that must leave the host they run on (it is draining, or they no longer fit or match it)
move even when the revision changes nothing: ``with_moves`` adds each move to the cycle's plan
as a restart on its new host, in the workload's rollout waves (``placement.move_plan``), so
``maxSurge`` starts a stand-in there, healthy, before the VM leaves, and ``maxUnavailable``
bounds how many are down at once.

Which revision defines a VM is read from the store, never from this leader's memory alone: a
replica a rollout holds back on the previous version is assigned the revision that its
workload's replicas running that version were assigned (``_revision_for``), so a new leader
elected mid-rollout puts it where the old one would have.

Ending a lost host's epoch is told once (``on_host_lost``: the daemon's cycle sends the
``notify.host_lost`` notice, keyed by the epoch).

A wave whose VMs do not get healthy is rolled back as ``LocalHost`` rolls one back: each of its
VMs that ran healthy before goes back to its previous assignment (host and revision), and later
waves do not run; the rollouts' abort then holds the workload on its previous version.
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
from reconciler.planning.placement import HostFacts, Placement, demands_of, move_plan, place
from reconciler.planning.rollout import observed_version, stands_in_for, version_of
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
    on_host_lost: Callable[[str, int, Sequence[str], str], None] = lambda *lost: None
    """Told once per ended epoch: (host, epoch, the VMs it held, why); the daemon's cycle turns
    it into a ``notify.host_lost`` notice."""
    _revision_of: dict[tuple[str, str], str] = field(default_factory=dict)
    """(VM, artifact digest) -> the revision that defined it, as assigned by this leader: the
    last resort of ``_revision_for``, after what the store says."""

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
        self._end_lost_epochs(records, facts, assignments, fence)
        pins = self.store.pins()
        report = ApplyReport()
        for wave in sorted({a.wave for a in plan.actions}):
            if superseded():
                report.superseded = "a newer revision waits"
                break
            actions = [a for a in plan.actions if a.wave == wave]
            prior = self.store.assignments()
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
                # Later waves would spread a change that does not work; the VMs of this wave
                # go back to what they ran, where they ran, and the untouched ones keep serving.
                report.rolled_back = self._roll_back(sorted(unhealthy), prior, fence, on_event)
                break
        if report.ok and report.superseded is None:
            self._forget_undesired(desired, fence)
        if record_revision and plan.head is not None and report.superseded is None:
            if report.ok:
                self.store.record_revision(plan.head, outcome="applied")
            else:
                self.store.record_revision(plan.head, outcome="failed", message=report.problems())
        return report

    def _end_lost_epochs(
        self,
        records: Sequence[HostRecord],
        facts: Sequence[HostFacts],
        assignments: Mapping[str, Assignment],
        fence: Fence | None,
    ) -> None:
        """End the epoch of every lost host that still holds assignments, and tell of it: the
        store ends an epoch once, so the notice is sent once per epoch (and its key makes a
        second leader's attempt a no-op too)."""
        lost = {h.name for h in facts if h.lost}
        for record in records:
            held = sorted(vm for vm, a in assignments.items() if a.host == record.name)
            if record.name not in lost or not held or record.ended:
                continue
            _check(fence, f"ending the epoch of lost host {record.name}")
            if self.store.end_epoch(record.name, record.epoch):
                log.warning(
                    "host %s is lost (epoch %d ended); its VMs are placed elsewhere",
                    record.name,
                    record.epoch,
                    extra={"event": "host-lost"},
                )
                detail = f"no heartbeat for {record.heartbeat_age:.0f} s"
                self.on_host_lost(record.name, record.epoch, held, detail)

    def with_moves(self, plan: Plan, desired: DesiredFleet, observed: ObservedFleet) -> Plan:
        """``plan`` with the moves of VMs running on a host they must leave (draining, or
        they no longer fit or match it), as ``placement.move_plan`` waves them; ``observed``
        is this cycle's ``refresh``. A plan that does not fit is left as it is: ``converge``
        refuses it with its one line."""
        _, facts = self._live()
        current = {vm: a.host for vm, a in self.store.assignments().items()}
        placement = place(demands_of(desired), facts, current)
        if placement.refusal() is not None:
            return plan
        # Only a VM seen running on the host it leaves moves; a lost host's are re-created.
        moves = [m for m in placement.moves if self.where.get(m.vm) == m.source]
        return move_plan(plan, moves, desired, observed.vms)

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
        assignments = self.store.assignments()
        for action in actions:
            _check(fence, f"assigning {action.vm}")
            on_event(
                ExecutionEvent(
                    EventKind.ACTION, action.vm, action=action.action.value, detail=action.reason
                )
            )
            if action.action is ActionType.DELETE:
                self.store.unassign(action.vm)
                # Where it runs: as observed, or (started by an earlier wave of this plan,
                # a surge stand-in) where it was assigned.
                assigned = assignments.get(action.vm)
                runs_on = self.where.get(action.vm) or (assigned.host if assigned else "")
                waiting[action.vm] = _Waiting(runs_on, None, None)
                continue
            slot = action.stands_in_for or action.vm
            wanted = desired.vms[slot]
            if action.stands_in_for is not None:
                wanted = replace(wanted, name=action.vm)  # a surge stand-in runs its slot's
            host = placement.assignments.get(slot) or self.where.get(action.vm, "")
            revision = self._revision_for(wanted, desired, pins, assignments)
            self.store.assign(action.vm, host, revision)
            self._revision_of[(action.vm, wanted.artifact.input_digest)] = revision
            waiting[action.vm] = _Waiting(host, wanted, self._seen.get(action.vm))
            log.info("%s %s on %s", action.action.value, action.vm, host, extra={"vm": action.vm})
        return waiting

    def _revision_for(
        self,
        wanted: DesiredVM,
        desired: DesiredFleet,
        pins: Mapping[str, Pin],
        assignments: Mapping[str, Assignment],
    ) -> str:
        """Which revision defines ``wanted``: a pinned workload's pin; the revision being
        converged when it is that revision's version; else (a replica a rollout holds back,
        or puts back, on the previous version) the revision assigned to a VM that runs that
        version, read from the store so that a new leader knows it too; else the revision this
        leader assigned it before, the applied one, or the revision being converged."""
        pin = pins.get(wanted.workload)
        if pin is not None:
            return pin.revision
        if not self._held_back(wanted, desired):
            return desired.revision or ""
        version = version_of(wanted)
        for name, vm in sorted(self._seen.items()):
            assigned = assignments.get(name)
            if (
                vm.workload == wanted.workload
                and observed_version(vm) == version
                and assigned is not None
                and assigned.revision
            ):
                return assigned.revision
        known = self._revision_of.get((wanted.name, wanted.artifact.input_digest))
        if known is not None:
            return known
        applied = self.store.applied_revision()
        return applied.revision if applied is not None else desired.revision or ""

    def _held_back(self, wanted: DesiredVM, desired: DesiredFleet) -> bool:
        """Whether ``wanted`` is not the converged revision's own version of the VM: its
        artifact is not the revision's, or the workload's rollout (stored, so any leader
        reads it) rolls out another version than this one."""
        own = desired.artifacts.get((wanted.workload, wanted.target))
        if own is not None and own.input_digest != wanted.artifact.input_digest:
            return True
        rollout = self.store.rollouts().get(wanted.workload)
        return (
            rollout is not None
            and rollout.revision == desired.revision
            and rollout.version != version_of(wanted)
        )

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

    def _roll_back(
        self,
        names: Sequence[str],
        prior: Mapping[str, Assignment],
        fence: Fence | None,
        on_event: Reporter,
    ) -> list[str]:
        """Put the unhealthy VMs of a failed wave back on what they ran, healthy, before it:
        their previous assignment (host and revision) again, as ``Executor._roll_back`` does
        on one host; returns the VMs reported healthy on it again. A VM that is new, was not
        healthy, or ran unassigned has nothing to go back to and stays failed."""
        back: dict[str, tuple[str, ObservedVM]] = {}
        for name in names:
            was, before = prior.get(name), self._seen.get(name)
            if was is None or not was.revision or before is None:
                continue
            if before.state is not VMState.RUNNING or not before.healthy:
                continue
            _check(fence, f"rolling back {name}")
            on_event(ExecutionEvent(EventKind.ROLLBACK, name, artifact=before.artifact_digest))
            self.store.assign(name, was.host, was.revision)
            self._revision_of[(name, before.artifact_digest)] = was.revision
            back[name] = (was.host, before)
        deadline = self.clock() + self.boot_allowance + DEFAULT_START_SECONDS
        done: list[str] = []
        while back:
            _check(fence, "waiting for the hosts to roll back")
            reported = self.store.fleet_observed()
            for name, (host, before) in list(back.items()):
                fleet = reported.get(host)
                vm = fleet.vms.get(name) if fleet is not None else None
                if (
                    vm is not None
                    and vm.artifact_digest == before.artifact_digest
                    and dict(vm.settings) == dict(before.settings)
                    and vm.state is VMState.RUNNING
                    and vm.healthy
                ):
                    done.append(name)
                    del back[name]
            if not back or self.clock() >= deadline:
                break
            self.sleep(self.poll_interval)
        for name in back:
            log.warning("%s was not reported healthy on its previous version", name)
        return sorted(done)

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
