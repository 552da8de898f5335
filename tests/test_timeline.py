"""The commit → healthy timeline: its pure parts (the Timeline, the trigger queue's times, the
health wait's markers and backoff) with fakes, and the cycle recording it once per cycle."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
from support.fakes import FakeHost, FakeLoader, FakeSource, fleet, workload

from reconciler.daemon.cycle import Outcome, ReconcileCycle
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.timeline import PHASES, Timeline
from reconciler.daemon.triggers import TriggerQueue, changed_at
from reconciler.execution.events import EventKind, ExecutionEvent, print_event
from reconciler.execution.health import Backoff, wait_healthy
from reconciler.leadership.fence import Fence
from reconciler.model import HealthCheck, HealthKind


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_the_timeline_measures_from_the_trigger_and_keeps_the_slowest_vm() -> None:
    clock = Clock(100.0)
    timeline = Timeline(started=100.0, triggered_at=99.75, clock=clock)
    with timeline.phase("fetch"):
        clock.at += 0.01
    for vm, boot in (("web-0", 1.5), ("web-1", 2.0)):
        timeline.on_event(ExecutionEvent(EventKind.PHASE, vm, phase="boot", seconds=boot))
    timeline.on_event(ExecutionEvent(EventKind.HEALTH, "web-0", healthy=True))  # not a phase
    clock.at += 2.5
    assert dict(timeline.slowest()) == {"trigger": 0.25, "fetch": pytest.approx(0.01), "boot": 2.0}
    assert list(timeline.slowest()) == [p for p in PHASES if p in ("trigger", "fetch", "boot")]
    assert timeline.total() == pytest.approx(2.76)
    assert timeline.summary() == (
        "trigger 0.250 s, fetch 0.010 s, boot 2.000 s; trigger → done 2.760 s"
    )
    assert not timeline.started_vms


def test_a_trigger_from_the_future_is_no_negative_latency() -> None:
    timeline = Timeline(started=10.0, triggered_at=12.0, clock=Clock(10.0))
    assert timeline.slowest() == {"trigger": 0.0}


def test_a_phase_is_timed_even_when_its_step_fails_and_unknown_phases_are_refused() -> None:
    clock = Clock(0.0)
    timeline = Timeline(started=0.0, clock=clock)

    def load() -> None:
        with timeline.phase("load"):
            clock.at = 0.5
            raise RuntimeError("invalid manifests")

    with pytest.raises(RuntimeError):
        load()
    assert timeline.slowest() == {"load": 0.5}
    with pytest.raises(ValueError, match="unknown timeline phase"):
        timeline.add("coffee", 1.0)
    assert "cycle start → done" in timeline.summary()


def test_phase_events_read_as_one_line_and_stay_out_of_applys_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = ExecutionEvent(
        EventKind.PHASE, "web-0", phase="boot", seconds=1.25, detail="guest clock 0.9 s"
    )
    assert event.text() == "phase    web-0: boot 1.250 s (guest clock 0.9 s)"
    assert event.fields() == {"event": "phase", "vm": "web-0", "phase": "boot", "seconds": 1.25}
    print_event(event)
    assert capsys.readouterr().out == ""


def test_the_queue_keeps_when_the_earliest_trigger_happened() -> None:
    queue = TriggerQueue()
    queue.request("poll", at=50.0)
    queue.request("file-watch", at=40.0)
    queue.request("webhook", at=45.0)
    assert queue.take(timeout=0) == ["poll", "file-watch", "webhook"]
    assert queue.taken_at == 40.0
    assert queue.take(timeout=0) == []
    assert queue.taken_at is None


def test_a_file_watch_trigger_happened_when_git_wrote_the_ref(tmp_path: Path) -> None:
    ref = tmp_path / "main"
    ref.write_text("0" * 40 + "\n")
    os.utime(ref, (1000.0, 1000.0))
    assert changed_at([str(ref), str(tmp_path / "deleted")]) == 1000.0
    assert changed_at([str(tmp_path / "deleted")]) > 1000.0  # none left: now


def test_backoff_starts_at_once_and_doubles_up_to_the_interval() -> None:
    waits = Backoff(0.005, 0.1)
    assert [waits.next() for _ in range(7)] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


def _console(path: Path, *events: dict[str, object]) -> Path:
    path.write_text("".join(f"@@reconciler {json.dumps(e)}\n" for e in events))
    return path


def test_the_first_probe_fires_when_the_workload_started_not_an_interval_later(
    tmp_path: Path,
) -> None:
    """The console says "workload started" at the third look; the server listens only after
    the first probe failed. The health wait must look again within milliseconds, not after the
    check's 30 s interval, and report each marker once, in order."""
    log = _console(tmp_path / "console.log", {"event": "booted", "t": 0.5})
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sleeps: list[float] = []
    seen: list[str] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            _console(
                log,
                {"event": "booted", "t": 0.5},
                {"event": "workload-started", "pid": 7, "t": 0.6},
            )
        if len(sleeps) == 3:
            server.listen()

    check = HealthCheck(HealthKind.TCP, port=port, interval_seconds=30, timeout_seconds=1)
    try:
        healthy, why = wait_healthy(
            log,
            check,
            "127.0.0.1",
            alive=lambda: True,
            sleep=sleep,
            on_marker=lambda name, marker: seen.append(name),
        )
    finally:
        server.close()
    assert healthy, why
    assert sleeps == [0.005, 0.01, 0.005]  # console twice, then one failed probe
    assert seen == ["booted", "workload-started", "healthy"]


def test_the_metric_has_a_phase_label() -> None:
    metrics = DaemonMetrics()
    metrics.observe_phase("probe", 0.004)
    metrics.observe_phase("boot", 2.2)
    text = metrics.render()[0].decode()
    assert 'reconciler_phase_duration_seconds_count{phase="probe"} 1.0' in text
    assert 'reconciler_phase_duration_seconds_bucket{le="2.5",phase="boot"} 1.0' in text


def test_taking_the_queue_from_another_thread_sees_the_time() -> None:
    queue = TriggerQueue()
    worker = threading.Thread(target=lambda: queue.request("webhook", at=7.0))
    worker.start()
    worker.join()
    assert queue.take(timeout=1) == ["webhook"]
    assert queue.taken_at == 7.0


class PhaseHost(FakeHost):
    """The fake host, reporting the phases a real one reports while it starts VMs."""

    def converge(self, plan, desired, checkout, cache_dir, **kwargs):  # type: ignore[no-untyped-def]
        on_event = kwargs["on_event"]
        on_event(ExecutionEvent(EventKind.PHASE, None, phase="build", seconds=0.002))
        for action in plan.actions:
            for phase, seconds in (("vmm-start", 0.05), ("boot", 1.5), ("probe", 0.01)):
                on_event(ExecutionEvent(EventKind.PHASE, action.vm, phase=phase, seconds=seconds))
        return super().converge(plan, desired, checkout, cache_dir, **kwargs)


def test_a_cycle_that_starts_vms_records_its_timeline_once_as_an_event_and_a_metric() -> None:
    source = FakeSource()
    host = PhaseHost()
    events: list[tuple[str, str, str]] = []
    metrics = DaemonMetrics()
    clock = Clock(1000.0)
    cycle = ReconcileCycle(
        FakeLoader(source),
        host,
        cache_dir=source.repo_path,
        clock=clock,
        event=lambda kind, subject, message: events.append((kind, subject, message)),
        metrics=metrics,
    )
    fence = Fence(1, renew_deadline=3600)
    host.store.claim_term(fence)
    source.commit(fleet(workload("web", replicas=2)))
    result = cycle.reconcile(fence, ["file-watch"], triggered_at=999.5)
    assert result.outcome is Outcome.APPLIED
    timelines = [message for kind, _, message in events if kind == "timeline"]
    assert timelines == [
        "trigger 0.500 s, fetch 0.000 s, load 0.000 s, plan 0.000 s, build 0.002 s, "
        "vmm-start 0.050 s, boot 1.500 s, probe 0.010 s; trigger → done 0.500 s"
    ]
    text = metrics.render()[0].decode()
    assert 'reconciler_phase_duration_seconds_count{phase="boot"} 2.0' in text  # one per VM
    assert 'reconciler_phase_duration_seconds_count{phase="trigger"} 1.0' in text

    # Nothing to start: no timeline event (a poll every 30 s would flood the history), but
    # the phases still reach the metric.
    events.clear()
    assert cycle.reconcile(fence, ["poll"]).outcome is Outcome.NO_CHANGES
    assert [kind for kind, _, _ in events if kind == "timeline"] == []
    text = metrics.render()[0].decode()
    assert 'reconciler_phase_duration_seconds_count{phase="plan"} 2.0' in text
