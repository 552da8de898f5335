"""One reconcile cycle of the daemon: the same pipeline as ``reconciler apply``, plus the rules
that keep a fleet running when a revision is bad.

    fetch ─▶ resolve head ─▶ verify signature? ─▶ descends from the applied revision?
          ─▶ load desired ─▶ observe ─▶ diff ─▶ suspend
          ─▶ deletion guards ─▶ converge (build, waves, health)
                    │ the head is refused (unsigned, invalid, too destructive, failed to build or
                    │ to get healthy, or anything else that went wrong with it, bugs included)
                    └─▶ recorded as attempted and failed; the cycle converges onto the last
                        applied revision instead, which heals drift and keeps it running

Rules (Flux and Argo CD behave the same way):
- the *attempted* revision is the head; the *applied* one is the last that converged healthy;
- a head that failed is retried with exponential back-off; a newer head is tried at once;
- every cycle heals drift (a dead VM, a VM changed by hand) against the newest revision that is
  allowed to run;
- suspended workloads (or a suspended fleet) are left as they run;
- a revision is untrusted input: whatever it makes go wrong (an unexpected exception, a
  ``RecursionError``, a ``MemoryError``) refuses that revision, with the traceback in the log,
  and the daemon goes on serving the last good one. Only a fencing error stops the cycle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reconciler.daemon.backoff import Backoff
from reconciler.errors import (
    BuildError,
    LeadershipError,
    ManifestError,
    NotImplementedFeatureError,
    SourceError,
    VMRuntimeError,
)
from reconciler.execution.health import describe_problems
from reconciler.execution.host import Host
from reconciler.leadership.fence import Fence
from reconciler.model import DesiredFleet
from reconciler.pipeline import RevisionLoader
from reconciler.planning import DeletionGuardError, check_deletions, diff, suspend_plan
from reconciler.source.history import require_descendant

log = logging.getLogger("reconciler.daemon")

_EXECUTION_ERRORS = (BuildError, VMRuntimeError, NotImplementedFeatureError, SourceError)


class CommitVerifier(Protocol):
    def __call__(self, sha: str) -> str:
        """A one-line description of the good signature of ``sha``; ``SourceError`` if not."""
        ...


@dataclass
class CycleResult:
    outcome: str  # "applied" | "no_changes" | "failed" | "skipped" | "superseded"
    head: str | None
    converged_to: str | None  # the revision the fleet was converged onto this cycle
    error: str | None = None
    actions: int = 0
    builds: dict[str, int] = field(default_factory=dict)


@dataclass
class ReconcileCycle:
    """Runs cycles for one fleet on one host; keeps what must survive between cycles."""

    loader: RevisionLoader
    host: Host
    cache_dir: Path
    verify: CommitVerifier | None = None
    newer_than: Callable[[str], bool] = lambda revision: False
    """Whether a revision newer than the given one waits: a rollout stops waiting for health."""
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.time
    event: Callable[[str, str, str], None] = lambda kind, subject, message: None
    loaded: Callable[[DesiredFleet], None] = lambda desired: None
    """Told of every revision loaded, before it runs: the daemon learns its secret values."""
    fleet_name: str | None = None  # of the revision converged last, for status pages
    force_deletions: bool = False
    """Lift the Fleet's maxDeletions guard (``planning.guard``); never preventDestroy."""
    allow_non_descendant: bool = False
    """Apply a head that does not descend from the applied revision (``source.history``)."""
    _desired: dict[str, DesiredFleet] = field(default_factory=dict)

    def run(self, fence: Fence) -> CycleResult:
        problem: str | None = None
        try:
            self.loader.source.fetch()
        except SourceError as err:
            problem = str(err)  # the last fetch still serves: keep healing on it
        try:
            head: str | None = self.loader.resolve(None)
        except SourceError as err:
            head, problem = None, str(err)
        if head is not None:
            retry_at = self.backoff.retry_at(head)
            if retry_at > self.clock():
                problem = (
                    f"{head[:12]} failed ({self.backoff.message}); "
                    f"next try in {retry_at - self.clock():.0f} s"
                )
            else:
                try:
                    if self.verify is not None:
                        self.verify(head)
                    applied = self.host.store.applied_revision()
                    require_descendant(
                        self.loader.source,
                        applied.revision if applied else None,
                        head,
                        allow=self.allow_non_descendant,
                    )
                    desired = self._load(head)
                except (SourceError, ManifestError) as err:
                    problem = self._refuse(head, _one_line(head, err))
                except Exception as exc:  # a revision must never stop the daemon
                    problem = self._refuse(head, _crashed(head, "loading", exc))
                else:
                    try:
                        return self._converge(fence, head, head, desired, problem)
                    except LeadershipError:
                        raise  # fenced: this replica must stop acting, not heal
                    except Exception as exc:  # as above
                        problem = self._refuse(head, _crashed(head, "applying", exc))
        return self._heal(fence, head, problem)

    def _load(self, revision: str) -> DesiredFleet:
        cached = self._desired.get(revision)
        if cached is None:
            cached = self.loader.load(revision)
            self.loaded(cached)
            # A revision's desired fleet never changes; keep the head and the last good one.
            self._desired = dict(list(self._desired.items())[-1:])
            self._desired[revision] = cached
        return cached

    def _refuse(self, revision: str, message: str) -> str:
        """Record ``revision`` as attempted and failed (once per message) and back off."""
        store = self.host.store
        attempted = store.attempted_revision()
        if attempted is None or (attempted.revision, attempted.message) != (revision, message):
            store.record_revision(revision, outcome="failed", message=message)
        delay = self.backoff.failed(revision, self.clock(), message)
        self.event("revision-failed", revision[:12], f"{message}; retry in {delay:.0f} s")
        log.warning("revision %s failed: %s; retry in %.0f s", revision[:12], message, delay)
        return message

    def _heal(self, fence: Fence, head: str | None, problem: str | None) -> CycleResult:
        """Converge onto the last applied revision: the head is refused or unknown."""
        applied = self.host.store.applied_revision()
        if applied is None or applied.revision == head:
            outcome = "failed" if problem else "skipped"
            return CycleResult(outcome, head, None, error=problem or "no revision to apply yet")
        try:
            desired = self._load(applied.revision)
        except (SourceError, ManifestError) as err:
            return CycleResult("failed", head, None, error=f"{problem}; {_one_line(head, err)}")
        result = self._converge(fence, head, applied.revision, desired, problem)
        if problem is not None:
            result.outcome = "failed"
        return result

    def _converge(
        self,
        fence: Fence,
        head: str | None,
        target: str,
        desired: DesiredFleet,
        problem: str | None,
    ) -> CycleResult:
        store = self.host.store
        is_head = target == head
        self.fleet_name = desired.fleet.name
        fence.check("observing the fleet")
        observed = self.host.refresh()
        plan = suspend_plan(diff(desired, observed), store.suspensions())
        try:
            plan = check_deletions(plan, desired, observed, force_deletions=self.force_deletions)
        except DeletionGuardError as err:
            if is_head:
                return self._heal(fence, head, self._refuse(target, f"{target[:12]}: {err}"))
            return CycleResult("failed", head, None, error=f"{problem}; healing refused: {err}")
        if not plan.has_changes:
            unsettled = self.host.settle_health(
                observed, fence, say=self._say, superseded=lambda: self.newer_than(target)
            )
            if unsettled:
                return CycleResult("failed", head, target, error=describe_problems(unsettled))
            if is_head:
                applied = store.applied_revision()
                if applied is None or applied.revision != target:
                    store.record_revision(target, outcome="applied")
                    self.event("revision-applied", target[:12], "no changes were needed")
                self.backoff.succeeded()
            return CycleResult("no_changes", head, target, error=problem)
        summary = ", ".join(f"{n} {kind}" for kind, n in plan.summary().items() if n)
        what = "applying" if is_head else "healing drift on the last applied revision"
        log.info("%s %s: %s", what, target[:12], summary)
        self.event("cycle", target[:12], f"{what}: {summary}")
        try:
            report = self.host.converge(
                plan,
                desired,
                self.loader.source.checkout(target),
                self.cache_dir,
                fence=fence,
                say=self._say,
                record_revision=is_head,
                superseded=(lambda: self.newer_than(target)) if is_head else (lambda: False),
            )
        except _EXECUTION_ERRORS as err:
            if is_head:
                # Nothing was changed (builds fail before any VM is touched): heal instead.
                return self._heal(fence, head, self._refuse(target, str(err)))
            return CycleResult("failed", head, None, error=f"{problem}; healing failed: {err}")
        if report.superseded is not None:
            self.event("revision-superseded", target[:12], report.superseded)
            log.info("rollout of %s superseded: %s", target[:12], report.superseded)
            return CycleResult("superseded", head, None, error=None, actions=len(report.applied))
        result = CycleResult(
            "applied" if report.ok else "failed",
            head,
            target,
            error=problem,
            actions=len(report.applied),
            builds=dict(report.builds),
        )
        if not report.ok:
            unhealthy = report.problems()
            result.error = unhealthy if problem is None else f"{problem}; {unhealthy}"
            if is_head:
                delay = self.backoff.failed(target, self.clock(), unhealthy)
                self.event("revision-failed", target[:12], f"{unhealthy}; retry in {delay:.0f} s")
            return result
        # VMs updated in place, or left by a superseded rollout, may not be judged yet.
        unsettled = self.host.settle_health(
            store.observed(), fence, say=self._say, superseded=lambda: self.newer_than(target)
        )
        if unsettled:
            result.outcome = "failed"
            result.error = describe_problems(unsettled)
        elif is_head:
            self.backoff.succeeded()
            self.event("revision-applied", target[:12], f"{len(report.applied)} action(s), healthy")
        return result

    @staticmethod
    def _say(line: str) -> None:
        log.info("%s", line)


def _crashed(revision: str, doing: str, exc: BaseException) -> str:
    """The one line of a failure nobody expected; its traceback goes to the log."""
    log.error("%s revision %s failed unexpectedly", doing, revision[:12], exc_info=exc)
    kind = (
        "nested too deeply"
        if isinstance(exc, RecursionError)
        else "ran out of memory"
        if isinstance(exc, MemoryError)
        else "internal error"
    )
    verb = "loaded" if doing == "loading" else "applied"
    return f"{revision[:12]} could not be {verb}: {kind} ({type(exc).__name__}: {exc}); see the log"


def _one_line(revision: str | None, err: SourceError | ManifestError) -> str:
    if isinstance(err, ManifestError):
        shown = "; ".join(str(p) for p in err.problems[:3])
        more = f" (and {len(err.problems) - 3} more)" if len(err.problems) > 3 else ""
        return f"{(revision or '')[:12]} has invalid manifests: {shown}{more}"
    return str(err)
