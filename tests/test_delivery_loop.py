"""The delivery loop as an operator meets it: what the daemon records is what the PR plan reads
back (the disruption estimate's measurements), and the operator commands' errors."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from support.fakes import FakeHost, FakeLoader, FakeSource, fleet, workload
from support.receiver import Receiver

from reconciler.cli import main
from reconciler.daemon.cycle import Outcome, ReconcileCycle
from reconciler.daemon.leader_file import LEADER_FILE, write_leader
from reconciler.daemon.loop import Daemon
from reconciler.execution.events import EventKind, ExecutionEvent
from reconciler.execution.status import _boot_markers
from reconciler.execution.vms import vm_dir
from reconciler.leadership.fence import Fence
from reconciler.model import (
    RolloutCommand,
    RolloutOverrides,
    RolloutPhase,
    RolloutState,
    RolloutSwitch,
)
from reconciler.notify import COMMIT_STATUS, Notice, Notifier
from reconciler.planning.disruption import (
    TIMELINE_EVENT,
    start_to_healthy_samples,
    timeline_messages,
)
from reconciler.state import open_state_store
from runtime.console_log import LOG

BOOT = {"web-0": 1.0, "web-1": 2.0, "api-0": 4.0}


class PhaseHost(FakeHost):
    """The fake host, reporting per VM the phases a real one reports while it starts VMs."""

    def converge(self, plan, desired, checkout, cache_dir, **kwargs):  # type: ignore[no-untyped-def]
        on_event = kwargs["on_event"]
        for action in plan.actions:
            boot = BOOT[action.vm]
            phases = (("stop", 0.5), ("vmm-start", 0.25), ("boot", boot), ("probe", 0.25))
            for phase, seconds in phases:
                on_event(ExecutionEvent(EventKind.PHASE, action.vm, phase=phase, seconds=seconds))
        return super().converge(plan, desired, checkout, cache_dir, **kwargs)


def test_the_daemon_records_the_start_to_healthy_times_the_plan_estimates_from() -> None:
    source = FakeSource()
    host = PhaseHost()
    events: list[tuple[str, str, str]] = []
    cycle = ReconcileCycle(
        FakeLoader(source),
        host,
        cache_dir=source.repo_path,
        event=lambda kind, subject, message: events.append((kind, subject, message)),
    )
    fence = Fence(1, renew_deadline=3600)
    host.store.claim_term(fence)
    source.commit(fleet(workload("web", replicas=2), workload("api", replicas=1)))
    assert cycle.reconcile(fence, ["poll"]).outcome is Outcome.APPLIED

    recorded = [(subject, message) for kind, subject, message in events if kind == TIMELINE_EVENT]
    assert sorted(subject for subject, _ in recorded) == ["api", "web"]  # one per workload
    # Newest first, as the store lists them; per workload the slowest VM, the stop excluded.
    samples = start_to_healthy_samples((TIMELINE_EVENT, m) for _, m in reversed(recorded))
    assert samples == {"web": [2.5], "api": [4.5]}


def test_only_healthy_vms_with_a_known_workload_are_measured() -> None:
    samples = [
        ("vmm-start", "web-0", 0.5),
        ("boot", "web-0", 1.0),
        ("probe", "web-0", 0.5),
        ("vmm-start", "web-1", 0.5),  # never got healthy: no probe phase
        ("boot", "web-1", 9.0),
        ("probe", "gone-0", 0.1),  # no longer recorded in the store
        ("build", None, 3.0),  # not a VM's phase
    ]
    messages = timeline_messages(samples, {"web-0": "web", "web-1": "web"})
    assert list(messages) == ["web"]
    assert start_to_healthy_samples([(TIMELINE_EVENT, messages["web"])]) == {"web": [2.0]}


def recheck(cycle: ReconcileCycle) -> float | None:
    """Read afresh each time (mypy would keep an earlier assertion's narrowing)."""
    return cycle.recheck_at


def test_a_canary_rollout_asks_for_a_cycle_when_its_soak_ends_not_at_the_next_poll() -> None:
    source, host = FakeSource(), FakeHost()
    now = [1000.0]
    cycle = ReconcileCycle(
        FakeLoader(source), host, cache_dir=source.repo_path, clock=lambda: now[0]
    )
    fence = Fence(1, renew_deadline=3600)
    host.store.claim_term(fence)
    canary = RolloutOverrides(canary=1, soak_seconds=10)
    source.commit(fleet(workload("web", replicas=3, env={"V": "1"}, rollout=canary)))
    cycle.reconcile(fence)
    assert recheck(cycle) is None  # nothing rolling out

    source.commit(fleet(workload("web", replicas=3, env={"V": "2"}, rollout=canary)))
    assert cycle.reconcile(fence).rollouts == ("web: canary web-0 starting",)
    assert recheck(cycle) == now[0] + 1  # soon: to note the canary healthy, not in 30 s
    now[0] += 1
    assert cycle.reconcile(fence).rollouts == ("web: canary web-0 healthy, soak 10 s left",)
    assert recheck(cycle) == now[0] + 10  # when the soak ends

    waits = RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False)
    source.commit(fleet(workload("web", replicas=3, env={"V": "3"}, rollout=waits)))
    cycle.reconcile(fence)
    now[0] += 1
    cycle.reconcile(fence)
    now[0] += 11
    assert cycle.reconcile(fence).rollouts[0].endswith("waiting for `reconciler promote web`")
    assert recheck(cycle) is None  # only the operator moves it on


def test_promote_and_abort_nudge_the_running_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("RECONCILER_API_TOKEN", "t0ken")
    with open_state_store(state) as store:
        store.put_rollout(RolloutState("web", "v2", "a" * 40, RolloutPhase.CANARY, started_at=1.0))
    with Receiver(statuses=(202,)) as daemon:
        write_leader(state, {"holder": "d", "term": 1, "url": daemon.url(""), "pid": os.getpid()})
        assert main(["promote", "web", "--state-dir", str(state)]) == 0
        assert main(["abort", "web", "--state-dir", str(state)]) == 0
        bodies = [(r.method, r.path, r.header("Authorization"), r.json()) for r in daemon.requests]
    assert bodies == [
        ("POST", "/api/reconcile", "Bearer t0ken", {"reason": "reconciler promote web"}),
        ("POST", "/api/reconcile", "Bearer t0ken", {"reason": "reconciler abort web"}),
    ]
    # No daemon: the switch is stored, the next daemon acts on it, nothing to complain about.
    (state / LEADER_FILE).unlink()
    with open_state_store(state) as store:
        store.put_rollout(RolloutState("web", "v3", "a" * 40, RolloutPhase.CANARY, started_at=1.0))
    assert main(["abort", "web", "--state-dir", str(state)]) == 0
    assert capsys.readouterr().err == ""


def test_describe_puts_a_process_vms_boot_markers_at_host_times(tmp_path: Path) -> None:
    # The init of a process VM stamps markers with the host's CLOCK_MONOTONIC (seconds since
    # the host booted), not with seconds since a guest kernel started.
    directory = vm_dir(tmp_path, "echo-0")
    directory.mkdir(parents=True)
    t = round(time.monotonic() - 5.0, 3)
    (directory / LOG).write_text(
        f'@@reconciler {{"event":"booted","t":{t}}}\n'
        f'@@reconciler {{"event":"workload-started","t":{t + 0.25}}}\n'
    )
    booted, started = _boot_markers(tmp_path, "echo-0", host_clock=True)
    assert booted["event"] == "booted"
    assert booted["at"] is not None
    assert abs(booted["at"] - (time.time() - 5.0)) < 1.0
    # Shown as seconds since the init began, not as the host's uptime.
    assert (booted["guest_seconds"], started["guest_seconds"]) == (0.0, pytest.approx(0.25))


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_a_bad_history_limit_is_one_line(
    limit: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "--limit", limit, "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--limit" in err
    assert len(err.strip().splitlines()) == 1


def test_a_fork_of_the_daemon_ended_with_sigterm_just_ends() -> None:
    # pyroute2 forks a helper per network namespace and ends it with SIGTERM: the handler it
    # inherits must not log "finishing the cycle in flight" for it (nor keep it alive).
    class Parent:
        _pid = os.getpid()

        def stop(self) -> None:
            os._exit(3)  # what the daemon itself would do: never reached in a fork

    child = os.fork()
    if child == 0:  # pragma: no cover (the fork)
        try:
            Daemon._on_signal(Parent(), signal.SIGTERM, None)  # type: ignore[arg-type]
        finally:
            os._exit(4)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGTERM


def test_an_aborted_rollout_fails_its_commit_status_instead_of_leaving_it_pending() -> None:
    source, host = FakeSource(), FakeHost()
    notices: list[Notice] = []
    cycle = ReconcileCycle(
        FakeLoader(source), host, cache_dir=source.repo_path, notify=notices.append
    )
    fence = Fence(1, renew_deadline=3600)
    host.store.claim_term(fence)
    waits = RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False)
    source.commit(fleet(workload("web", replicas=3, env={"V": "1"}, rollout=waits)))
    cycle.reconcile(fence)
    head = source.commit(fleet(workload("web", replicas=3, env={"V": "2"}, rollout=waits)))
    cycle.reconcile(fence)
    version = host.store.rollouts()["web"].version
    host.store.switch_rollout(RolloutSwitch("web", RolloutCommand.ABORT, version, time.time()))
    notices.clear()
    cycle.reconcile(fence)

    (rolled_back,) = [n for n in notices if n.key.startswith("rollout-rolled-back:")]
    assert (rolled_back.revision, rolled_back.status) == (head, "failure")
    outbox = Notifier(lambda: host.store, commit_statuses=True)
    (status,) = [m for m in outbox.messages(rolled_back, None) if m.destination == COMMIT_STATUS]
    assert json.loads(status.body) == {
        "sha": head,
        "state": "failure",
        "description": "web: aborted by the operator; held on the previous version",
    }


def test_a_revision_rolled_out_in_several_cycles_is_not_said_to_need_no_changes() -> None:
    source, host = FakeSource(), FakeHost()
    now = [1000.0]
    notices: list[Notice] = []
    cycle = ReconcileCycle(
        FakeLoader(source),
        host,
        cache_dir=source.repo_path,
        clock=lambda: now[0],
        notify=notices.append,
    )
    fence = Fence(1, renew_deadline=3600)
    host.store.claim_term(fence)
    canary = RolloutOverrides(canary=1, soak_seconds=10)
    source.commit(fleet(workload("web", replicas=3, env={"V": "1"}, rollout=canary)))
    cycle.reconcile(fence)
    head = source.commit(fleet(workload("web", replicas=3, env={"V": "2"}, rollout=canary)))
    for step in (0, 1, 11, 1):  # canary, soak begins, promoted, done
        now[0] += step
        cycle.reconcile(fence)
    (applied,) = [n for n in notices if n.key == f"revision-applied:{head}"]
    assert (applied.message, applied.status) == ("rolled out, healthy", "success")
