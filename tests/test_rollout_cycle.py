"""Progressive rollouts through the daemon's cycle, against the fakes of the project's seams
(``FakeHost``, ``FakeSource``, ``FakeLoader``, ``MemoryStateStore``), in virtual time.

What a row shows: which VMs a cycle moves, what the cycle result says, which events and
notices it records, and that the rollout's state lives in the store (a new cycle object, or a
new leader on another handle, continues it). The same in real VMs: ``test_rollout_vms.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.fakes import FakeHost, FakeLoader, FakeSource, MemoryStateStore, fleet, workload

from reconciler.daemon.backoff import Backoff
from reconciler.daemon.cycle import CycleResult, Outcome, Reason, ReconcileCycle
from reconciler.leadership.fence import Fence
from reconciler.model import (
    DesiredFleet,
    RolloutCommand,
    RolloutOverrides,
    RolloutPhase,
    RolloutState,
    RolloutSwitch,
)
from reconciler.notify import Notice

CANARY = RolloutOverrides(canary=1, soak_seconds=10)


def web(greeting: str, rollout: RolloutOverrides | None = CANARY) -> DesiredFleet:
    return fleet(workload("web", replicas=3, env={"GREETING": greeting}, rollout=rollout))


@dataclass
class World:
    source: FakeSource
    host: FakeHost
    fence: Fence
    now: float = 1000.0
    events: list[tuple[str, str, str]] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    cycle: ReconcileCycle | None = None

    def new_cycle(self, store: MemoryStateStore | None = None) -> ReconcileCycle:
        """A daemon (re)started: nothing but the store carries over."""
        if store is not None:
            self.host = FakeHost(store=store)
        self.cycle = ReconcileCycle(
            FakeLoader(self.source),
            self.host,
            cache_dir=self.source.repo_path,
            backoff=Backoff(),
            clock=lambda: self.now,
            event=lambda kind, subject, message: self.events.append((kind, subject, message)),
            notify=self.notices.append,
        )
        return self.cycle

    def reconcile(self) -> CycleResult:
        assert self.cycle is not None
        return self.cycle.reconcile(self.fence, ["test"])

    def moved(self) -> list[str]:
        """The VMs the last converge started or removed."""
        _, plan = self.host.converged[-1]
        return [f"{a.action.value} {a.vm}" for a in plan.actions]

    def greeting(self, vm: str) -> str:
        return self.host.store.observed().vms[vm].settings["deploy.env.GREETING"]

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events if kind.startswith("rollout")]


def _world(rollout: RolloutOverrides | None = CANARY) -> World:
    world = World(FakeSource(), FakeHost(), Fence(1, renew_deadline=3600))
    world.new_cycle()
    world.host.store.claim_term(world.fence)
    world.source.commit(web("v1", rollout))
    first = world.reconcile()
    assert first.outcome is Outcome.APPLIED
    world.events.clear()
    return world


def test_canary_first_then_soak_then_the_rest() -> None:
    world = _world()
    head = world.source.commit(web("v2"))
    result = world.reconcile()
    assert world.moved() == ["restart web-0"]
    assert (result.reason, result.newly_applied) == (Reason.ROLLING_OUT, False)
    assert result.rollouts == ("web: canary web-0 starting",)
    assert [world.greeting(f"web-{i}") for i in range(3)] == ['"v2"', '"v1"', '"v1"']
    assert world.host.store.applied_revision().revision != head  # type: ignore[union-attr]

    world.now += 1  # the canary is healthy: the soak begins
    result = world.reconcile()
    assert (result.outcome, result.rollouts) == (
        Outcome.NO_CHANGES,
        ("web: canary web-0 healthy, soak 10 s left",),
    )
    world.now += 4
    assert world.reconcile().rollouts == ("web: canary web-0 healthy, soak 6 s left",)

    world.now += 6  # soaked: the others follow, one at a time (maxUnavailable 1)
    result = world.reconcile()
    assert world.moved() == ["restart web-1", "restart web-2"]
    assert result.rollouts == ("web: promoted, rolling out to every replica",)
    world.now += 1
    result = world.reconcile()
    assert (result.reason, result.newly_applied, result.rollouts) == (
        Reason.UP_TO_DATE,
        True,
        (),
    )
    assert world.host.store.applied_revision().revision == head  # type: ignore[union-attr]
    assert world.kinds() == ["rollout-started", "rollout-promoted", "rollout-complete"]


def test_a_broken_canary_rolls_back_and_the_workload_stays_on_the_old_version() -> None:
    world = _world()
    world.host.unhealthy = {"web-0": "health check failed: connection refused"}
    head = world.source.commit(web("broken"))
    result = world.reconcile()
    assert world.moved() == ["restart web-0"]  # never web-1 or web-2
    assert result.outcome is Outcome.FAILED
    assert [world.greeting(f"web-{i}") for i in range(3)] == ['"v1"'] * 3
    state = world.host.store.rollouts()["web"]
    assert state.phase is RolloutPhase.ABORTED
    assert "web-0 failed its health check" in state.message
    assert [n.title for n in world.notices if n.key.startswith("rollout")] == [
        "rollout of web rolled back"
    ]
    # Retried after its back-off, the head changes nothing: web is held on the old version.
    world.host.unhealthy = {}
    world.now += 3600
    converges = len(world.host.converged)
    retried = world.reconcile()
    assert len(world.host.converged) == converges  # nothing to do
    assert (retried.reason, retried.converged_to) == (Reason.UP_TO_DATE, head)
    assert [world.greeting(f"web-{i}") for i in range(3)] == ['"v1"'] * 3
    # A new revision starts a new rollout.
    world.source.commit(web("fixed"))
    world.reconcile()
    assert world.moved() == ["restart web-0"]
    assert world.host.store.rollouts()["web"].phase is RolloutPhase.CANARY


def test_auto_promote_off_waits_for_promote_and_survives_a_leader_change() -> None:
    world = _world(RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False))
    world.source.commit(web("v2", RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False)))
    world.reconcile()
    world.now += 1
    world.reconcile()
    world.now += 60
    result = world.reconcile()
    assert result.rollouts == ("web: canary web-0 soaked; waiting for `reconciler promote web`",)

    # Another replica takes over (a new term, its own handle on the same store) ...
    store = world.host.store.handle()
    world.fence = Fence(2, renew_deadline=3600)
    store.claim_term(world.fence)
    world.new_cycle(store)
    assert world.reconcile().rollouts == result.rollouts
    # ... and the operator promotes (unfenced, from the CLI's own handle).
    version = store.rollouts()["web"].version
    store.handle().switch_rollout(RolloutSwitch("web", RolloutCommand.PROMOTE, version, world.now))
    world.reconcile()
    assert world.moved() == ["restart web-1", "restart web-2"]
    assert ("rollout-promote", "web", "by the operator") in [
        (e.kind, e.subject, e.message) for e in store.events()
    ]


def test_abort_rolls_the_canary_back() -> None:
    world = _world()
    world.source.commit(web("v2"))
    world.reconcile()
    version = world.host.store.rollouts()["web"].version
    world.host.store.switch_rollout(RolloutSwitch("web", RolloutCommand.ABORT, version, world.now))
    world.now += 1
    result = world.reconcile()
    assert world.moved() == ["restart web-0"]
    assert [world.greeting(f"web-{i}") for i in range(3)] == ['"v1"'] * 3
    assert result.rollouts == (
        "web: rolled back: aborted by the operator; held on the previous version",
    )
    assert world.kinds() == ["rollout-started", "rollout-aborted"]


def test_progress_deadline_rolls_back_and_reports() -> None:
    deadline = RolloutOverrides(canary=1, soak_seconds=10, progress_deadline_seconds=30)
    world = _world(deadline)
    world.host.unsettled = {"web-0": "not healthy yet"}
    world.source.commit(web("slow", deadline))
    world.reconcile()
    world.now += 31
    result = world.reconcile()
    assert "progressDeadlineSeconds (30 s)" in result.rollouts[0]
    assert world.moved() == ["restart web-0"]
    assert [world.greeting(f"web-{i}") for i in range(3)] == ['"v1"'] * 3
    assert any(n.key.startswith("rollout-rolled-back:web:") for n in world.notices)


def test_surge_keeps_capacity_and_leaves_no_stand_in() -> None:
    surge = RolloutOverrides(max_unavailable=0, max_surge=1)
    world = _world(surge)
    world.source.commit(web("v2", surge))
    result = world.reconcile()
    assert result.outcome is Outcome.APPLIED
    assert world.moved() == [
        "create web-0-surge",
        "restart web-0",
        "delete web-0-surge",
        "create web-1-surge",
        "restart web-1",
        "delete web-1-surge",
        "create web-2-surge",
        "restart web-2",
        "delete web-2-surge",
    ]
    assert sorted(world.host.store.observed().vms) == ["web-0", "web-1", "web-2"]


def test_status_and_the_page_show_the_rollout() -> None:
    from reconciler.daemon.status_page import render_page
    from reconciler.execution.status import fleet_status

    world = _world(RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False))
    world.source.commit(web("v2", RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False)))
    world.reconcile()
    world.now += 1
    world.reconcile()
    store = world.host.store

    def status(now: float) -> dict[str, object]:
        shown = fleet_status(store.observed(), None, None, {}, now=now, rollouts=store.rollouts())
        return dict(shown)

    (rollout,) = status(world.now + 4)["rollouts"]  # type: ignore[misc]
    assert rollout["canaries"] == ["web-0"]
    assert rollout["soak_remaining_seconds"] == 6.0
    assert rollout["summary"] == "web: canary web-0 healthy, soak 6 s left"
    world.now += 11
    world.reconcile()
    (rollout,) = status(world.now)["rollouts"]  # type: ignore[misc]
    assert rollout["waiting_for_promote"] is True
    page = render_page(status(world.now), [])
    assert "waiting for `reconciler promote web`" in page
    assert 'data-phase="canary"' in page


def test_promote_and_abort_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reconciler.cli import main
    from reconciler.state import open_state_store

    state_dir = ["--state-dir", str(tmp_path / "state")]
    assert main(["promote", "web", *state_dir]) == 1
    assert "no reconciler has run with this state directory" in capsys.readouterr().err
    open_state_store(tmp_path / "state").close()
    assert main(["promote", "web", *state_dir]) == 1
    assert "web has no rollout in progress" in capsys.readouterr().err
    with open_state_store(tmp_path / "state") as store:
        store.put_rollout(RolloutState("web", "v2", "a" * 40, RolloutPhase.CANARY, started_at=1.0))
    assert main(["promote", "web", *state_dir]) == 0
    assert "web: rollout promoted" in capsys.readouterr().out
    assert main(["abort", "web", *state_dir]) == 0
    with open_state_store(tmp_path / "state") as store:
        assert store.rollout_switches()["web"].command is RolloutCommand.ABORT
        assert store.rollout_switches()["web"].version == "v2"
        assert [e.kind for e in store.events()][:2] == ["rollout-abort", "rollout-promote"]
        store.put_rollout(RolloutState("web", "v2", "a" * 40, RolloutPhase.ABORTED, started_at=1.0))
    assert main(["abort", "web", *state_dir]) == 1
    assert "no rollout in progress (its last one is aborted)" in capsys.readouterr().err
