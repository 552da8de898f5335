"""One reconcile cycle of the daemon: the same pipeline as ``reconciler apply``, plus the rules
that keep a fleet running when a revision is bad. Shaped like Flux's controllers: an ordered
list of steps, a typed result, and one place that records it.

    fetch ─▶ resolve ─▶ gate (back-off, signature, descent) ─▶ load ─▶ plan (diff, suspend,
          deletion guards, moves off draining hosts) ─▶ converge (build, waves, health) ─▶
          settle (health nobody judged)
                │ a step refuses the head (``ReconcilerError``, or anything else that went wrong
                │ with it, bugs included)
                └─▶ recorded as attempted and failed; load ─▶ plan ─▶ converge ─▶ settle run on
                    the last applied revision instead, which heals drift and keeps it running

    CycleResult (outcome, reason, refusal ...) ──record──▶ event, metric, log line, notice
    Timeline (trigger, fetch, load, plan, and per VM build ... probe) ──record──▶ a "timeline"
        event when VMs were started, the phase histogram, the log line (``timeline.py``)

Rules (Flux and Argo CD behave the same way):
- the *attempted* revision is the head; the *applied* one is the last that converged healthy;
- a head that failed transiently (a build, a VMM, a rollout that did not get healthy) is retried
  with exponential back-off; one that failed terminally (``ReconcilerError.terminal``: invalid
  manifests, a bad signature, not a descendant, over the deletion guards) is parked until the
  head moves; a newer head is tried at once;
- every cycle heals drift (a dead VM, a VM changed by hand) against the newest revision that is
  allowed to run;
- suspended workloads (or a suspended fleet) are left as they run;
- a fleet the operator pinned (``reconciler rollback``) converges onto the pinned revision, not
  the head, and is healed there until unpinned; a pinned workload is the pinned revision's
  within the head's fleet (``pipeline.pin_workloads``);
- a revision is untrusted input: whatever it makes go wrong (an unexpected exception, a
  ``RecursionError``, a ``MemoryError``) refuses that revision, with the traceback in the log,
  and the daemon goes on serving the last good one. Only a fencing error (``LeadershipError``)
  stops the cycle: it propagates out of ``run``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from reconciler.daemon.backoff import Backoff
from reconciler.daemon.timeline import Timeline
from reconciler.errors import (
    BuildError,
    LeadershipError,
    ManifestError,
    NetworkError,
    NotDescendantError,
    NotImplementedFeatureError,
    ReconcilerError,
    SignatureError,
    SourceError,
    StateError,
    VMRuntimeError,
)
from reconciler.execution.events import EventKind, ExecutionEvent
from reconciler.execution.fleet_host import FleetHost
from reconciler.execution.health import describe_problems
from reconciler.execution.protocol import Host
from reconciler.execution.status import describe_rollout, rollout_status
from reconciler.formatting import short_sha
from reconciler.leadership.fence import Fence
from reconciler.log_context import current_fields, log_fields
from reconciler.model import (
    FLEET_WIDE,
    DesiredFleet,
    ObservedFleet,
    Plan,
)
from reconciler.notify import (
    Notice,
    host_lost,
    revision_applied,
    revision_attempted,
    revision_failed,
    revision_rolled_back,
    rollback,
    rollout_rolled_back,
)
from reconciler.pipeline import PinnedWorkload, pin_workloads
from reconciler.planning import DeletionGuardError, check_deletions, diff, suspend_plan
from reconciler.planning.disruption import TIMELINE_EVENT, timeline_messages
from reconciler.planning.rollout import Gated, abort_for_unhealthy, gate
from reconciler.source import Source
from reconciler.source.history import require_descendant
from reconciler.state import Pin

log = logging.getLogger("reconciler.daemon")


class Step(StrEnum):
    """The steps of a cycle, in the order they run; the head's refusal names the one that
    refused it."""

    FETCH = "fetch"  # bring a remote's mirror up to date; failing, the last fetch serves
    RESOLVE = "resolve"  # the head: the followed ref's commit
    GATE = "gate"  # back-off or parked; the signature; descent from the applied revision
    LOAD = "load"  # the desired fleet of the revision (manifests, templates)
    PLAN = "plan"  # observe, diff, suspensions, deletion guards
    CONVERGE = "converge"  # builds, waves, health of what the plan starts
    SETTLE = "settle"  # health of running VMs nobody has judged yet


class Outcome(StrEnum):
    """What a cycle did; the ``outcome`` label of the cycle metrics."""

    APPLIED = "applied"  # the head's changes were made and it is healthy
    NO_CHANGES = "no_changes"  # what runs is what the revision wants
    FAILED = "failed"  # the head, or the healing, failed (``reason`` says how)
    SKIPPED = "skipped"  # no revision can run yet
    SUPERSEDED = "superseded"  # a rollout stopped waiting for health: a newer head arrived


class Reason(StrEnum):
    """Why a cycle ended as it did: one value per way, for logs, the API and tests."""

    CONVERGED = "converged"
    UP_TO_DATE = "up_to_date"
    NO_REVISION = "no_revision"
    SUPERSEDED = "superseded"
    ROLLING_OUT = "rolling_out"  # converged onto, with a progressive rollout under way
    BACKING_OFF = "backing_off"  # the head failed transiently and waits for its next try
    PARKED = "parked"  # the head failed terminally and waits for the head to move
    INVALID_MANIFESTS = "invalid_manifests"
    UNTRUSTED_SIGNATURE = "untrusted_signature"
    NOT_DESCENDANT = "not_descendant"
    DELETION_GUARD = "deletion_guard"
    NOT_IMPLEMENTED = "not_implemented"
    SOURCE_FAILED = "source_failed"
    BUILD_FAILED = "build_failed"
    RUNTIME_FAILED = "runtime_failed"
    NETWORK_FAILED = "network_failed"
    STATE_FAILED = "state_failed"
    UNHEALTHY = "unhealthy"
    FENCED = "fenced"
    FAILED = "failed"  # any other expected error
    INTERNAL_ERROR = "internal_error"  # an exception nobody expected: a bug, or hostile input


# Which reason an error gives; the first row that matches wins (subclasses first).
_REASONS: tuple[tuple[type[BaseException], Reason], ...] = (
    (ManifestError, Reason.INVALID_MANIFESTS),
    (SignatureError, Reason.UNTRUSTED_SIGNATURE),
    (NotDescendantError, Reason.NOT_DESCENDANT),
    (DeletionGuardError, Reason.DELETION_GUARD),
    (NotImplementedFeatureError, Reason.NOT_IMPLEMENTED),
    (SourceError, Reason.SOURCE_FAILED),
    (BuildError, Reason.BUILD_FAILED),
    (VMRuntimeError, Reason.RUNTIME_FAILED),
    (NetworkError, Reason.NETWORK_FAILED),
    (StateError, Reason.STATE_FAILED),
    (LeadershipError, Reason.FENCED),
    (ReconcilerError, Reason.FAILED),
)


def reason_of(error: BaseException) -> Reason:
    return next((r for kind, r in _REASONS if isinstance(error, kind)), Reason.INTERNAL_ERROR)


def is_terminal(error: BaseException) -> bool:
    """Whether ``error`` will recur on the same revision (``ReconcilerError.terminal``); an
    unexpected exception is not known to, so it is retried with back-off."""
    return isinstance(error, ReconcilerError) and error.terminal


class CommitVerifier(Protocol):
    def __call__(self, sha: str) -> str:
        """A one-line description of the good signature of ``sha``; ``SignatureError`` if
        not."""
        ...


class Loader(Protocol):
    """What the cycle reads of a ``pipeline.RevisionLoader``."""

    @property
    def source(self) -> Source: ...

    def resolve(self, rev: str | None) -> str: ...

    def load(self, rev: str | None) -> DesiredFleet: ...


class CycleMetrics(Protocol):
    """What the cycle records in ``daemon.metrics.DaemonMetrics``."""

    def observe_cycle(self, seconds: float, outcome: str) -> None: ...

    def count_builds(self, built: int, cached: int, failed: int) -> None: ...

    def observe_phase(self, phase: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Refusal:
    """The head was refused this cycle, at ``step``; ``retry_in`` is ``None`` when it is
    parked."""

    revision: str
    step: Step
    reason: Reason
    message: str
    retry_in: float | None

    def when(self) -> str:
        if self.retry_in is None:
            return "not retried until the head moves"
        return f"retry in {self.retry_in:.0f} s"


@dataclass(frozen=True)
class CycleResult:
    outcome: Outcome
    reason: Reason
    head: str | None
    converged_to: str | None  # the revision the fleet was converged onto this cycle
    error: str | None = None
    actions: int = 0
    builds: Mapping[str, int] = field(default_factory=dict)
    refused: Refusal | None = None  # the head, refused this cycle
    newly_applied: bool = False  # the head became the applied revision this cycle
    superseded: str | None = None  # why the head's rollout stopped waiting
    rollouts: tuple[str, ...] = ()
    """One line per workload whose progressive rollout (``planning.rollout``) is under way or
    was rolled back this cycle; while one is under way the head is not applied yet."""


def failed_cycle(error: BaseException) -> CycleResult:
    """The result of a cycle that stopped with ``error`` (fenced, or a bug outside a revision)."""
    message = str(error) if isinstance(error, ReconcilerError) else f"internal error: {error!r}"
    return CycleResult(Outcome.FAILED, reason_of(error), None, None, error=message)


@dataclass
class _Run:
    """What the steps of one cycle learn as they go."""

    fence: Fence
    head: str | None = None
    problem: str | None = None  # what is wrong this cycle, shown with the result
    reason: Reason | None = None  # why the head does not run, when it does not
    refused: Refusal | None = None
    step: Step = Step.FETCH
    gated: Gated | None = None  # the rollouts' view of the revision being converged


@dataclass
class ReconcileCycle:
    """Runs cycles for one fleet on one host; keeps what must survive between cycles."""

    loader: Loader
    host: Host
    cache_dir: Path
    verify: CommitVerifier | None = None
    newer_than: Callable[[str], bool] = lambda revision: False
    """Whether a revision newer than the given one waits: a rollout stops waiting for health."""
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.time
    event: Callable[[str, str, str], None] = lambda kind, subject, message: None
    metrics: CycleMetrics | None = None
    loaded: Callable[[DesiredFleet], None] = lambda desired: None
    """Told of every revision loaded, before it runs: the daemon learns its secret values."""
    fleet_name: str | None = None  # of the revision converged last, for status pages
    force_deletions: bool = False
    """Lift the Fleet's maxDeletions guard (``planning.guard``); never preventDestroy."""
    allow_non_descendant: bool = False
    """Apply a head that does not descend from the applied revision (``source.history``)."""
    notify: Callable[[Notice], None] = lambda notice: None
    """Told what people may want to hear of (``reconciler.notify``), where it is recorded."""
    _desired: dict[str, DesiredFleet] = field(default_factory=dict)
    _pins: dict[str, Pin] = field(default_factory=dict)
    """The operator's pins, read once per cycle (``rollback``): the fleet's, or workloads'."""
    last_loaded: tuple[str, DesiredFleet] | None = None  # the last revision loaded, pins composed
    _term: int | None = None  # the term of the cycle in flight
    _timeline: Timeline = field(default_factory=lambda: Timeline(started=time.time()))
    """The phases of the cycle in flight (one at a time: the daemon has one worker)."""
    _rolled_out: str | None = None  # the revision rolled out progressively last
    recheck_at: float | None = None
    """When a rollout wants another cycle (wall clock): a canary's soak ends, or its health
    is to be noted; the daemon runs one then instead of waiting for the next poll."""

    def __post_init__(self) -> None:
        if isinstance(self.host, FleetHost):
            # A lost host is told of as the cycle's own notices are (once per epoch).
            self.host.on_host_lost = lambda host, epoch, vms, detail: self.notify(
                host_lost(host, epoch, vms, detail)
            )

    # -- the cycle ----------------------------------------------------------------------------

    def reconcile(
        self, fence: Fence, trigger: Sequence[str] = (), triggered_at: float | None = None
    ) -> CycleResult:
        """One cycle as the daemon runs it: never raises (a fenced or crashed cycle is a failed
        result), and the result is recorded (``record``). ``triggered_at`` (wall clock) is when
        the trigger happened: the start of the commit → healthy timeline."""
        started, cpu = time.monotonic(), time.process_time()
        self._timeline = Timeline(started=self.clock(), triggered_at=triggered_at, clock=self.clock)
        self.recheck_at = None
        try:
            result = self.run(fence)
        except ReconcilerError as err:  # a refused (stale-term) write among them
            result = failed_cycle(err)
        except Exception as exc:  # the daemon outlives any one bug; the operator sees it
            log.exception("reconcile cycle crashed")
            result = failed_cycle(exc)
        self.record(
            result,
            seconds=time.monotonic() - started,
            cpu_seconds=time.process_time() - cpu,
            trigger=trigger,
            term=fence.term,
        )
        return result

    def run(self, fence: Fence) -> CycleResult:
        """fetch, resolve, then the head's steps; the last applied revision's when the head is
        refused or waits. ``LeadershipError`` propagates: a fenced replica stops acting."""
        run = _Run(fence)
        with self._timeline.phase("fetch"):
            self._fetch(run)
            self._resolve(run)
        self._pins, self._term = self.host.store.pins(), fence.term
        fleet_pin = self._pins.get(FLEET_WIDE)
        if fleet_pin is not None:
            return self._converge_pinned(run, fleet_pin.revision)
        if run.head is not None and not self._waits(run, run.head):
            try:
                with log_fields(revision=short_sha(run.head)):
                    return self._record_artifacts(self._converge_head(run, run.head))
            except LeadershipError:
                raise  # fenced: this replica must stop acting, not heal
            except Exception as exc:  # a revision must never stop the daemon
                self._refuse(run, run.head, exc)
        return self._heal(run)

    def _converge_head(self, run: _Run, head: str) -> CycleResult:
        self.notify(revision_attempted(head))  # the commit's status: pending
        run.step = Step.GATE
        self._gate(head)
        run.step = Step.LOAD
        desired = self._load(head)
        return self._converge_onto(run, head, desired)

    def _heal(self, run: _Run) -> CycleResult:
        """Converge onto the last applied revision: the head is refused, waits or is unknown."""
        reason = run.reason or Reason.NO_REVISION
        applied = self.host.store.applied_revision()
        if applied is None or applied.revision == run.head:
            outcome = Outcome.FAILED if run.problem else Outcome.SKIPPED
            error = run.problem or "no revision to apply yet"
            return CycleResult(outcome, reason, run.head, None, error=error, refused=run.refused)
        try:
            with log_fields(revision=short_sha(applied.revision)):
                desired = self._load(applied.revision)
                result = self._converge_onto(run, applied.revision, desired)
        except LeadershipError:
            raise
        except ReconcilerError as err:  # anything else is a bug: the daemon logs it as a crash
            what = "healing refused" if isinstance(err, DeletionGuardError) else "healing failed"
            error = f"{run.problem}; {what}: {_one_line(applied.revision, err)}"
            return CycleResult(
                Outcome.FAILED, reason, run.head, None, error=error, refused=run.refused
            )
        if run.problem is not None:
            result = replace(result, outcome=Outcome.FAILED, reason=reason)
        return result

    def _converge_onto(self, run: _Run, target: str, desired: DesiredFleet) -> CycleResult:
        """plan, converge and settle ``target`` (the head, or the last applied revision)."""
        is_head = target == run.head
        self.fleet_name = desired.fleet.name
        run.step = Step.PLAN
        observed, plan = self._plan(run, desired, track=is_head)
        rolling = self._rollouts(run)
        desired = run.gated.desired if run.gated is not None else desired
        if rolling:
            is_head = False  # converged onto, not applied until every rollout is done
            self._rolled_out = target
        if not plan.has_changes:
            run.step = Step.SETTLE
            unsettled = self._settle(run, target, observed)
            if unsettled:
                return replace(self._unsettled(run, target, unsettled), rollouts=rolling)
            newly = False
            if is_head:
                applied = self.host.store.applied_revision()
                if applied is None or applied.revision != target:
                    self.host.store.record_revision(target, outcome="applied")
                    newly = True
                self.backoff.succeeded()
            return CycleResult(
                Outcome.NO_CHANGES,
                Reason.ROLLING_OUT if rolling else Reason.UP_TO_DATE,
                run.head,
                target,
                error=run.problem,
                refused=run.refused,
                newly_applied=newly,
                rollouts=rolling,
            )
        run.step = Step.CONVERGE
        summary = ", ".join(f"{n} {kind}" for kind, n in plan.summary().items() if n)
        what = (
            "rolling out"
            if rolling
            else "applying"
            if is_head
            else "healing drift on the last applied revision"
        )
        log.info("%s %s: %s", what, short_sha(target), summary)
        self.event("cycle", short_sha(target), f"{what}: {summary}")
        report = self.host.converge(
            plan,
            desired,
            self.loader.source.checkout(target),
            self.cache_dir,
            fence=run.fence,
            on_event=self._on_event,
            record_revision=is_head,
            superseded=(lambda: self.newer_than(target)) if is_head else (lambda: False),
        )
        actions, builds = len(report.applied), dict(report.builds)
        if report.superseded is not None:
            return CycleResult(
                Outcome.SUPERSEDED,
                Reason.SUPERSEDED,
                run.head,
                None,
                actions=actions,
                superseded=report.superseded,
            )
        if not report.ok:
            self._abort_failed_rollouts(desired, report.unhealthy, target)
            unhealthy = report.problems()
            refused = run.refused
            if is_head or rolling:
                delay = self.backoff.failed(target, self.clock(), unhealthy)
                refused = Refusal(target, Step.CONVERGE, Reason.UNHEALTHY, unhealthy, delay)
            return CycleResult(
                Outcome.FAILED,
                Reason.UNHEALTHY,
                run.head,
                target,
                error=_joined(run.problem, unhealthy),
                actions=actions,
                builds=builds,
                refused=refused,
                rollouts=rolling,
            )
        run.step = Step.SETTLE
        # VMs updated in place, or left by a superseded rollout, may not be judged yet.
        unsettled = self._settle(run, target, self.host.store.observed())
        if unsettled:
            return replace(
                self._unsettled(run, target, unsettled),
                actions=actions,
                builds=builds,
                rollouts=rolling,
            )
        if is_head:
            self.backoff.succeeded()
        return CycleResult(
            Outcome.APPLIED,
            Reason.ROLLING_OUT if rolling else Reason.CONVERGED,
            run.head,
            target,
            error=run.problem,
            actions=actions,
            builds=builds,
            refused=run.refused,
            newly_applied=is_head,
            rollouts=rolling,
        )

    # -- the steps ----------------------------------------------------------------------------

    def _fetch(self, run: _Run) -> None:
        try:
            self.loader.source.fetch()
        except SourceError as err:
            run.problem = str(err)  # the last fetch still serves: keep healing on it

    def _resolve(self, run: _Run) -> None:
        run.step = Step.RESOLVE
        try:
            run.head = self.loader.resolve(None)
        except SourceError as err:
            run.head, run.problem, run.reason = None, str(err), Reason.SOURCE_FAILED

    def _waits(self, run: _Run, head: str) -> bool:
        """The head failed before and its time has not come (back-off), or never will (parked)."""
        waiting = self.backoff.waits(head, self.clock())
        if waiting is None:
            return False
        run.problem = waiting
        run.reason = Reason.PARKED if self.backoff.parked else Reason.BACKING_OFF
        return True

    def _gate(self, head: str) -> None:
        """Whether the head may run at all: its signature, and its descent from the applied
        revision (no rollback to an old signed commit)."""
        if self.verify is not None:
            self.verify(head)
        applied = self.host.store.applied_revision()
        require_descendant(
            self.loader.source,
            applied.revision if applied else None,
            head,
            allow=self.allow_non_descendant,
        )

    def _load(self, revision: str) -> DesiredFleet:
        """The desired fleet of ``revision``, with the workloads the operator pinned at theirs
        (``pipeline.pin_workloads``)."""
        with self._timeline.phase("load"):
            desired = self._load_revision(revision)
            pinned = {
                workload: PinnedWorkload(
                    workload,
                    self._load_revision(pin.revision),
                    self.loader.source.checkout(pin.revision),
                )
                for workload, pin in self._pins.items()
                if workload != FLEET_WIDE
            }
            desired = pin_workloads(desired, pinned)
        self.last_loaded = (revision, desired)
        return desired

    def _load_revision(self, revision: str) -> DesiredFleet:
        cached = self._desired.get(revision)
        if cached is None:
            cached = self.loader.load(revision)
            self.loaded(cached)
            # A revision's desired fleet never changes; keep the head, the last good one and
            # a workload's pinned one.
            self._desired = dict(list(self._desired.items())[-2:])
            self._desired[revision] = cached
        return cached

    def _plan(
        self, run: _Run, desired: DesiredFleet, *, track: bool = True
    ) -> tuple[ObservedFleet, Plan]:
        with self._timeline.phase("plan"):
            run.fence.check("observing the fleet")
            observed = self.host.refresh()
            store = self.host.store
            # Which version each replica runs now (canaries, promotion, abort, deadline).
            run.gated = gate(
                desired,
                observed,
                store.rollouts(),
                store.rollout_switches(),
                self.clock(),
                track=track,
            )
            desired = run.gated.desired
            plan = diff(desired, observed)
            if isinstance(self.host, FleetHost):
                # A fleet of hosts: VMs leave a draining host even when nothing else changes.
                plan = self.host.with_moves(plan, desired, observed)
            plan = suspend_plan(plan, self.host.store.suspensions())
            plan = check_deletions(plan, desired, observed, force_deletions=self.force_deletions)
        return observed, plan

    def _rollouts(self, run: _Run) -> tuple[str, ...]:
        """Store what the rollouts' gate decided (fenced), tell of it, and return one line per
        workload still rolling out or rolled back this cycle."""
        gated = run.gated
        if gated is None:
            return ()
        for state in gated.changed:
            self.host.store.put_rollout(state)
        for event in gated.events:
            self.event(event.kind, event.workload, event.message)
            log.info("%s %s: %s", event.kind, event.workload, event.message)
        for state in gated.aborted:
            self._notify_rolled_back(state.workload, state.message, state.revision)
        now = self.clock()
        lines = [
            describe_rollout(rollout_status(gated.progress[w].state, now))
            for w in gated.in_progress
        ]
        # A rollout moves on only when a cycle looks: at its soak's end, or (canaries started
        # or promoted) at once, to note their health. At least a second apart, never a spin.
        due = [
            now + (progress.soak_remaining or 0.0)
            for w in gated.in_progress
            if not (progress := gated.progress[w]).waiting_for_promote
        ]
        self.recheck_at = max(now + 1.0, min(due)) if due else None
        lines += [f"{s.workload}: rolled back: {s.message}" for s in gated.aborted]
        return tuple(lines)

    def _abort_failed_rollouts(
        self, desired: DesiredFleet, unhealthy: Mapping[str, str], target: str
    ) -> None:
        """A VM a rollout started failed its health check (the executor put it back): the
        rollout is aborted, so the workload stays on its previous version."""
        workloads = {name: vm.workload for name, vm in desired.vms.items()}
        store = self.host.store
        for state in abort_for_unhealthy(store.rollouts(), unhealthy, workloads):
            store.put_rollout(state)
            self.event("rollout-aborted", state.workload, state.message)
            self._notify_rolled_back(state.workload, state.message, target)

    def _notify_rolled_back(self, workload: str, message: str, revision: str | None) -> None:
        log.warning("rollout of %s rolled back: %s", workload, message)
        self.notify(rollout_rolled_back(workload, revision, message))

    def _settle(self, run: _Run, target: str, observed: ObservedFleet) -> dict[str, str]:
        return self.host.settle_health(
            observed, run.fence, on_event=self._on_event, superseded=lambda: self.newer_than(target)
        )

    def _unsettled(self, run: _Run, target: str, unsettled: dict[str, str]) -> CycleResult:
        return CycleResult(
            Outcome.FAILED,
            Reason.UNHEALTHY,
            run.head,
            target,
            error=_joined(run.problem, describe_problems(unsettled)),
            refused=run.refused,
        )

    def _refuse(self, run: _Run, revision: str, error: Exception) -> None:
        """Record ``revision`` as attempted and failed (once per message) and hold it back: with
        back-off when ``error`` may pass, parked when it cannot."""
        if isinstance(error, ReconcilerError):
            message = _one_line(revision, error)
        else:
            message = _crashed(revision, run.step, error)
        store = self.host.store
        attempted = store.attempted_revision()
        if attempted is None or (attempted.revision, attempted.message) != (revision, message):
            store.record_revision(revision, outcome="failed", message=message)
        reason = reason_of(error)
        if is_terminal(error):
            self.backoff.park(revision, self.clock(), message)
            run.refused = Refusal(revision, run.step, reason, message, None)
        else:
            delay = self.backoff.failed(revision, self.clock(), message)
            run.refused = Refusal(revision, run.step, reason, message, delay)
        run.problem, run.reason = message, reason

    # -- the one place a result is recorded ---------------------------------------------------

    def record(
        self,
        result: CycleResult,
        *,
        seconds: float,
        cpu_seconds: float,
        trigger: Sequence[str],
        term: int,
    ) -> None:
        """The events, the metrics and the log line of one cycle's result."""
        refused = result.refused
        if refused is not None:
            self.event(
                "revision-failed",
                short_sha(refused.revision),
                f"{refused.message}; {refused.when()}",
            )
            self.notify(revision_failed(refused.revision, refused.message))
            log.warning(
                "revision %s failed: %s; %s",
                short_sha(refused.revision),
                refused.message,
                refused.when(),
                extra={
                    "revision": short_sha(refused.revision),
                    "step": str(refused.step),
                    "reason": str(refused.reason),
                },
            )
        if result.newly_applied and result.converged_to is not None:
            done = (
                f"{result.actions} action(s), healthy"
                if result.actions
                # Its VMs changed in the rollout's earlier cycles; this one only saw it done.
                else "rolled out, healthy"
                if result.converged_to == self._rolled_out
                else "no changes were needed"
            )
            self.event("revision-applied", short_sha(result.converged_to), done)
            self.notify(revision_applied(result.converged_to, done))
        if result.superseded is not None and result.head is not None:
            self.event("revision-superseded", short_sha(result.head), result.superseded)
            log.info("rollout of %s superseded: %s", short_sha(result.head), result.superseded)
        timeline = self._timeline
        if timeline.started_vms:
            subject = short_sha(result.converged_to or result.head or "")
            self.event("timeline", subject or "-", timeline.summary())
            # Per workload, what `diff --format markdown` estimates a rollout's disruption from.
            vms = self.host.store.observed().vms
            measured = timeline_messages(
                ((s.phase, s.vm, s.seconds) for s in timeline.samples),
                {name: vm.workload for name, vm in vms.items()},
            )
            for workload, message in measured.items():
                self.event(TIMELINE_EVENT, workload, message)
        if self.metrics is not None:
            for sample in timeline.samples:
                self.metrics.observe_phase(sample.phase, sample.seconds)
            self.metrics.observe_cycle(seconds, str(result.outcome))
            self.metrics.count_builds(
                result.builds.get("built", 0),
                result.builds.get("cached", 0),
                result.builds.get("failed", 0),
            )
        log.log(
            logging.WARNING if result.outcome is Outcome.FAILED else logging.INFO,
            "cycle %s%s",
            result.outcome,
            f": {result.error}" if result.error else "",
            extra={
                "trigger": ",".join(trigger),
                "outcome": str(result.outcome),
                "reason": str(result.reason),
                "head": (result.head or "")[:12],
                "converged_to": (result.converged_to or "")[:12],
                "duration_s": round(seconds, 3),
                "cpu_s": round(cpu_seconds, 3),
                "term": term,
                "timeline": {k: round(v, 3) for k, v in timeline.slowest().items()},
            },
        )

    def _on_event(self, event: ExecutionEvent) -> None:
        """What the host reports, as log lines with the event's fields (``vm``, ``event``);
        its phase timings also go to the cycle's timeline, and a rollback is a notice."""
        self._timeline.on_event(event)
        log.log(
            logging.DEBUG if event.kind is EventKind.PHASE else logging.INFO,
            "%s",
            event.text(),
            extra=event.fields(),
        )
        if event.kind is EventKind.ROLLBACK and event.vm is not None:
            revision = str(current_fields().get("revision", "-"))
            self.notify(rollback(event.vm, event.artifact, revision))
        # What ``describe`` shows of a VM: what acted on it, under which term, and its
        # probe history (the health verdicts).
        if event.vm is not None and event.kind in _VM_HISTORY:
            self.host.store.record_vm_history(
                event.vm,
                str(event.kind),
                event.text(),
                healthy=event.healthy if event.kind is EventKind.HEALTH else None,
                term=self._term,
            )

    # -- the operator's pins ------------------------------------------------------------------

    def _converge_pinned(self, run: _Run, pin: str) -> CycleResult:
        """The operator pinned the fleet at ``pin``, an earlier applied revision (``reconciler
        rollback``): converge onto it whatever the head is, so new commits do not move the
        fleet and drift is healed at the pinned version. Its signature is checked as the
        head's is; its descent is not (going back is the point). Failing, nothing else runs:
        the operator asked for this revision."""
        with log_fields(revision=short_sha(pin)):
            try:
                run.step = Step.GATE
                if self.verify is not None:
                    self.verify(pin)
                run.step = Step.LOAD
                result = self._converge_onto(run, pin, self._load(pin))
            except LeadershipError:
                raise
            except ReconcilerError as err:
                error = f"pinned at {short_sha(pin)}: {_one_line(pin, err)}"
                return CycleResult(Outcome.FAILED, reason_of(err), run.head, None, error=error)
            if result.converged_to != pin or result.outcome not in (
                Outcome.APPLIED,
                Outcome.NO_CHANGES,
            ):
                return result
            store = self.host.store
            applied = store.applied_revision()
            if applied is None or applied.revision != pin:
                # The rollback is done: the pinned revision is the applied one again, which
                # the history shows and ``rollback`` (no --to) steps back from.
                store.record_revision(pin, outcome="applied", message="rollback: pinned")
                self.event("rollback", short_sha(pin), f"the fleet runs {short_sha(pin)} again")
                self.notify(revision_rolled_back(pin, applied.revision if applied else None))
                self._record_artifacts(replace(result, newly_applied=True))
            return replace(result, newly_applied=False)

    def _record_artifacts(self, result: CycleResult) -> CycleResult:
        """The history's artifacts of a revision that was just applied: each workload's."""
        loaded = self.last_loaded
        if result.newly_applied and loaded is not None and loaded[0] == result.converged_to:
            artifacts: dict[str, list[str]] = {}
            for vm in loaded[1].vms.values():
                artifacts.setdefault(vm.workload, []).append(vm.artifact.input_digest)
            self.host.store.record_artifacts(loaded[0], artifacts)
        return result


# The executor's events that make a VM's history (``describe``).
_VM_HISTORY = frozenset({EventKind.ACTION, EventKind.ROLLBACK, EventKind.HEALTH})


def _joined(problem: str | None, more: str) -> str:
    return more if problem is None else f"{problem}; {more}"


def _crashed(revision: str, step: Step, exc: BaseException) -> str:
    """The one line of a failure nobody expected; its traceback goes to the log."""
    doing = "loading" if step in (Step.GATE, Step.LOAD) else "applying"
    log.error("%s revision %s failed unexpectedly", doing, short_sha(revision), exc_info=exc)
    kind = (
        "nested too deeply"
        if isinstance(exc, RecursionError)
        else "ran out of memory"
        if isinstance(exc, MemoryError)
        else "internal error"
    )
    verb = "loaded" if doing == "loading" else "applied"
    what = f"{kind} ({type(exc).__name__}: {exc})"
    return f"{short_sha(revision)} could not be {verb}: {what}; see the log"


def _one_line(revision: str, err: ReconcilerError) -> str:
    if isinstance(err, ManifestError):
        shown = "; ".join(str(p) for p in err.problems[:3])
        more = f" (and {len(err.problems) - 3} more)" if len(err.problems) > 3 else ""
        return f"{short_sha(revision)} has invalid manifests: {shown}{more}"
    if isinstance(err, DeletionGuardError):
        return f"{short_sha(revision)}: {err}"
    return str(err)
