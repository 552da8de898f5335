"""The daemon's policy as a table: what one reconcile cycle does with a head that is good, bad
in a way that will not change (terminal: parked until the head moves), bad in a way that may
pass (transient: back-off), superseded, suspended or crashing, and what it records.

Every row starts from a fleet whose good revision is applied, then arranges one situation and
runs ``ReconcileCycle.reconcile`` against the fakes of the project's own seams (``FakeHost``,
``FakeSource``, ``FakeLoader``): no root, no git, no runtime, milliseconds per row. The real
cycle against a real repository, store and runtimes is ``test_daemon.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from support.fakes import FakeHost, FakeLoader, FakeSource, fleet, workload

from reconciler.daemon.backoff import Backoff
from reconciler.daemon.cycle import CycleResult, Outcome, Reason, ReconcileCycle, Step
from reconciler.errors import (
    BuildError,
    ManifestError,
    NotImplementedFeatureError,
    Problem,
    SignatureError,
    VMRuntimeError,
)
from reconciler.leadership.fence import Fence
from reconciler.model import DesiredFleet, VMState

GOOD = fleet(workload("web", replicas=2), max_deletions=0)
THREE = fleet(workload("web", replicas=3), max_deletions=0)
INVALID = ManifestError([Problem("fleet.yaml", 3, "$.spec.replicas", "must be an integer")])


@dataclass
class Metrics:
    cycles: list[str] = field(default_factory=list)
    builds: list[tuple[int, int, int]] = field(default_factory=list)

    def observe_cycle(self, seconds: float, outcome: str) -> None:
        self.cycles.append(outcome)

    def count_builds(self, built: int, cached: int, failed: int) -> None:
        self.builds.append((built, cached, failed))

    def observe_phase(self, phase: str, seconds: float) -> None:
        pass


@dataclass
class World:
    """A fleet with ``good`` applied, and the cycle that runs it."""

    source: FakeSource
    host: FakeHost
    cycle: ReconcileCycle
    fence: Fence
    good: str
    events: list[tuple[str, str, str]]
    metrics: Metrics
    gated: list[str]  # every head that reached the gate (its signature was checked)
    untrusted: set[str] = field(default_factory=set)
    now: float = 1000.0

    def reconcile(self) -> CycleResult:
        return self.cycle.reconcile(self.fence, ["test"])

    def commit(self, content: DesiredFleet | BaseException, *, orphan: bool = False) -> str:
        return self.source.commit(content, orphan=orphan)

    def kill(self, name: str) -> None:
        vm = self.host.store.observed().vms[name]
        self.host.store.put_vm(replace(vm, state=VMState.MISSING, pid=None))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def _world() -> World:
    source = FakeSource()
    host = FakeHost()
    gated: list[str] = []
    world = World(
        source=source,
        host=host,
        cycle=None,  # type: ignore[arg-type]  # set below: its callbacks close over the world
        fence=Fence(1, renew_deadline=3600),
        good="",
        events=[],
        metrics=Metrics(),
        gated=gated,
    )

    def verify(sha: str) -> str:
        gated.append(sha)
        if sha in world.untrusted:
            raise SignatureError(f"commit {sha[:12]} is not signed by a trusted key")
        return "good signature"

    world.cycle = ReconcileCycle(
        FakeLoader(source),
        host,
        cache_dir=source.repo_path,
        verify=verify,
        backoff=Backoff(),
        clock=lambda: world.now,
        event=lambda kind, subject, message: world.events.append((kind, subject, message)),
        metrics=world.metrics,
    )
    host.store.claim_term(world.fence)
    world.good = world.commit(GOOD)
    first = world.reconcile()
    assert (first.outcome, first.reason, first.converged_to) == (
        Outcome.APPLIED,
        Reason.CONVERGED,
        world.good,
    )
    world.events.clear()
    world.gated.clear()
    world.metrics.cycles.clear()
    return world


def _supersede(world: World) -> None:
    world.host.supersede = lambda: "a newer revision arrived"
    world.commit(THREE)


def _suspend(workload: str | None) -> Callable[[World], None]:
    def arrange(world: World) -> None:
        world.host.store.suspend(workload, "investigating")
        world.commit(THREE)

    return arrange


def _fail_converge(error: Exception) -> Callable[[World], None]:
    def arrange(world: World) -> None:
        world.host.converge_error = error
        world.commit(THREE)

    return arrange


def _untrusted(world: World) -> None:
    world.untrusted.add(world.commit(THREE))


def _invalid_and_drift(world: World) -> None:
    world.kill("web-1")
    world.commit(INVALID)


def _unhealthy(world: World) -> None:
    world.host.unhealthy = {"web-2": "no answer on port 8080"}
    world.commit(THREE)


def _unreachable(world: World) -> None:
    world.source.fetch_error = "cannot fetch the remote: connection refused"


def _unknown_head(world: World) -> None:
    world.source.resolve_error = "unknown revision 'main' in the fake repository"


@dataclass(frozen=True)
class Row:
    """One situation: what the cycle must end with, onto which revision, and when the head is
    tried again (``parked``: only once the head moves; ``backoff``: after its delay)."""

    arrange: Callable[[World], object]
    outcome: Outcome
    reason: Reason
    converged_to: str | None  # "good", "head" or None
    retry: str | None = None  # "parked" | "backoff" | None
    event: str | None = None  # the result's event kind
    said: str = ""  # in the result's error
    check: Callable[[World], bool] = lambda world: True  # what else must hold afterwards


SCENARIOS: dict[str, Row] = {
    "a new head is applied": Row(
        lambda w: w.commit(THREE),
        Outcome.APPLIED,
        Reason.CONVERGED,
        "head",
        event="revision-applied",
    ),
    "a head that changes nothing is recorded as applied": Row(
        lambda w: w.commit(GOOD),
        Outcome.NO_CHANGES,
        Reason.UP_TO_DATE,
        "head",
        event="revision-applied",
    ),
    "drift is healed on the head": Row(
        lambda w: w.kill("web-0"),
        Outcome.APPLIED,
        Reason.CONVERGED,
        "head",
        event="revision-applied",
    ),
    "an invalid head is refused and parked; drift healed on the last good": Row(
        _invalid_and_drift,
        Outcome.FAILED,
        Reason.INVALID_MANIFESTS,
        "good",
        retry="parked",
        event="revision-failed",
        said="has invalid manifests: fleet.yaml:3: $.spec.replicas: must be an integer",
        check=lambda w: (
            w.host.store.observed().vms["web-1"].state is VMState.RUNNING
            and w.host.converged[-1][0] == w.good
        ),
    ),
    "an unsigned head is refused and parked": Row(
        _untrusted,
        Outcome.FAILED,
        Reason.UNTRUSTED_SIGNATURE,
        "good",
        retry="parked",
        event="revision-failed",
        said="not signed by a trusted key",
    ),
    "a head that does not descend from the applied one is refused and parked": Row(
        lambda w: w.commit(THREE, orphan=True),
        Outcome.FAILED,
        Reason.NOT_DESCENDANT,
        "good",
        retry="parked",
        event="revision-failed",
        said="does not descend from the applied revision",
    ),
    "a head over the deletion guards is refused and parked": Row(
        lambda w: w.commit(fleet(workload("web", replicas=1), max_deletions=0)),
        Outcome.FAILED,
        Reason.DELETION_GUARD,
        "good",
        retry="parked",
        event="revision-failed",
        said="over the Fleet's spec.maxDeletions (0)",
    ),
    "a head asking for what is not built yet is parked": Row(
        _fail_converge(NotImplementedFeatureError("the firecracker runtime")),
        Outcome.FAILED,
        Reason.NOT_IMPLEMENTED,
        "good",
        retry="parked",
        event="revision-failed",
    ),
    "a failed build backs off and keeps the last good": Row(
        _fail_converge(BuildError("cc: exit 1")),
        Outcome.FAILED,
        Reason.BUILD_FAILED,
        "good",
        retry="backoff",
        event="revision-failed",
        said="cc: exit 1",
    ),
    "a VMM that failed to start backs off": Row(
        _fail_converge(VMRuntimeError("qemu exited with 1")),
        Outcome.FAILED,
        Reason.RUNTIME_FAILED,
        "good",
        retry="backoff",
        event="revision-failed",
    ),
    "a rollout that does not get healthy backs off": Row(
        _unhealthy,
        Outcome.FAILED,
        Reason.UNHEALTHY,
        "head",
        retry="backoff",
        event="revision-failed",
        said="no answer on port 8080",
    ),
    "an unexpected exception refuses the head and backs off": Row(
        lambda w: w.commit(KeyError("spec")),
        Outcome.FAILED,
        Reason.INTERNAL_ERROR,
        "good",
        retry="backoff",
        event="revision-failed",
        said="could not be loaded: internal error (KeyError: 'spec'); see the log",
    ),
    "a revision nested too deeply is refused": Row(
        lambda w: w.commit(RecursionError("maximum recursion depth exceeded")),
        Outcome.FAILED,
        Reason.INTERNAL_ERROR,
        "good",
        retry="backoff",
        event="revision-failed",
        said="nested too deeply",
    ),
    "a superseded rollout stops and records it": Row(
        _supersede,
        Outcome.SUPERSEDED,
        Reason.SUPERSEDED,
        None,
        event="revision-superseded",
    ),
    "a suspended workload is left as it runs": Row(
        _suspend("web"),
        Outcome.NO_CHANGES,
        Reason.UP_TO_DATE,
        "head",
        event="revision-applied",
        check=lambda w: len(w.host.store.observed().vms) == 2 and len(w.host.converged) == 1,
    ),
    "a suspended fleet is left as it runs": Row(
        _suspend(None),
        Outcome.NO_CHANGES,
        Reason.UP_TO_DATE,
        "head",
        event="revision-applied",
        check=lambda w: len(w.host.store.observed().vms) == 2 and len(w.host.converged) == 1,
    ),
    "an unreachable remote serves the last fetch": Row(
        _unreachable,
        Outcome.NO_CHANGES,
        Reason.UP_TO_DATE,
        "head",
        said="connection refused",
    ),
    "an unknown head heals on the last good": Row(
        _unknown_head, Outcome.FAILED, Reason.SOURCE_FAILED, "good", said="unknown revision"
    ),
    "a fenced replica stops acting": Row(
        lambda w: w.fence.revoke("the lease was lost"),
        Outcome.FAILED,
        Reason.FENCED,
        None,
        said="leadership of term 1 ended",
    ),
}


# The step that refuses a head, by why it is refused.
REFUSED_AT = {
    Reason.UNTRUSTED_SIGNATURE: Step.GATE,
    Reason.NOT_DESCENDANT: Step.GATE,
    Reason.INVALID_MANIFESTS: Step.LOAD,
    Reason.INTERNAL_ERROR: Step.LOAD,
    Reason.DELETION_GUARD: Step.PLAN,
    Reason.NOT_IMPLEMENTED: Step.CONVERGE,
    Reason.BUILD_FAILED: Step.CONVERGE,
    Reason.RUNTIME_FAILED: Step.CONVERGE,
    Reason.UNHEALTHY: Step.CONVERGE,
}


@pytest.mark.parametrize("row", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_cycle_scenario(row: Row, caplog: pytest.LogCaptureFixture) -> None:
    world = _world()
    row.arrange(world)
    head = world.source.head
    with caplog.at_level(logging.INFO, logger="reconciler.daemon"):
        result = world.reconcile()

    assert (result.outcome, result.reason) == (row.outcome, row.reason), result.error
    expected = {"good": world.good, "head": head, None: None}[row.converged_to]
    assert result.converged_to == expected
    if row.said:
        assert result.error is not None
        assert row.said in result.error
    if result.error is not None:
        assert "\n" not in result.error
    kinds = [k for k in world.kinds() if k != "cycle"]  # "cycle": a rollout's progress note
    assert kinds == ([row.event] if row.event else [])
    # One place records every result: the metric and the log line, with the typed reason.
    assert world.metrics.cycles == [str(row.outcome)]
    line = next(r for r in caplog.records if r.getMessage().startswith("cycle "))
    assert line.__dict__["reason"] == str(row.reason)
    assert line.levelno == (logging.WARNING if row.outcome is Outcome.FAILED else logging.INFO)
    assert row.check(world)
    if row.retry is not None:
        assert result.refused is not None
        assert (result.refused.reason, result.refused.step) == (row.reason, REFUSED_AT[row.reason])
        assert (result.refused.retry_in is None) == (row.retry == "parked")
    else:
        assert result.refused is None

    applied = world.host.store.applied_revision()
    assert applied is not None
    if row.retry is not None:
        assert applied.revision == world.good  # the last good one is still the applied one
        attempted = world.host.store.attempted_revision()
        assert attempted is not None
        assert (attempted.revision, attempted.outcome) == (head, "failed")
    if row.retry == "parked":
        assert world.events[-1][2].endswith("not retried until the head moves")
        world.now += 3600  # longer than any back-off
        tried = len(world.gated)
        again = world.reconcile()
        assert (again.outcome, again.reason, again.converged_to) == (
            Outcome.FAILED,
            Reason.PARKED,
            world.good,
        )
        assert len(world.gated) == tried  # not even its signature was checked again
        assert world.cycle.backoff.retry_at(head or "") == 0.0  # no timed retry either
        world.host.converge_error, world.untrusted = None, set()
        world.source.head = world.good  # the branch is reset onto the good revision
        fixed = world.commit(THREE)  # and the head moves: tried at once
        assert (world.reconcile().outcome, world.gated[-1]) == (Outcome.APPLIED, fixed)
    elif row.retry == "backoff":
        assert world.events[-1][2].endswith("retry in 5 s")
        waiting = world.reconcile()
        assert waiting.reason is Reason.BACKING_OFF, waiting
        assert waiting.error is not None
        assert "next try in 5 s" in waiting.error
        world.now += 5
        tried = len(world.gated)
        assert world.reconcile().reason is row.reason  # tried again, and fails again
        assert len(world.gated) == tried + 1
        assert world.cycle.backoff.delay() == 10  # the delay doubles


def test_the_first_revision_refused_leaves_nothing_to_heal_on() -> None:
    source, host = FakeSource(), FakeHost()
    cycle = ReconcileCycle(FakeLoader(source), host, cache_dir=source.repo_path)
    fence = Fence(1, renew_deadline=60)
    host.store.claim_term(fence)
    head = source.commit(INVALID)
    result = cycle.reconcile(fence)
    assert (result.outcome, result.reason, result.converged_to) == (
        Outcome.FAILED,
        Reason.INVALID_MANIFESTS,
        None,
    )
    assert host.converged == []
    assert host.store.applied_revision() is None
    attempted = host.store.attempted_revision()
    assert attempted is not None
    assert attempted.revision == head


def test_an_unexpected_failure_logs_its_traceback_and_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = _world()
    world.commit(KeyError("spec"))
    with caplog.at_level(logging.ERROR, logger="reconciler.daemon"):
        result = world.reconcile()
    assert result.reason is Reason.INTERNAL_ERROR
    assert any(r.exc_info for r in caplog.records)


def test_a_fenced_cycle_propagates_out_of_run() -> None:
    world = _world()
    world.fence.revoke("the lease was lost")
    with pytest.raises(Exception, match="leadership of term 1 ended") as caught:
        world.cycle.run(world.fence)
    assert type(caught.value).__name__ == "StaleTermError"


def test_backoff_parks_a_terminal_failure_until_another_revision() -> None:
    backoff = Backoff()
    backoff.park("a" * 40, now=100.0, message="invalid")
    assert backoff.waits("a" * 40, now=10_000.0) == (
        f"{'a' * 12} failed (invalid); not retried until the head moves"
    )
    assert backoff.retry_at("a" * 40) == 0.0
    assert backoff.waits("b" * 40, now=100.0) is None
    assert backoff.failed("b" * 40, now=100.0) == 5  # a transient failure of another head
    assert backoff.waits("b" * 40, now=104.0) is not None
    assert backoff.waits("b" * 40, now=105.0) is None
