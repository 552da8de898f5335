"""The daemon's pure parts: suspension of a plan, back-off of failed revisions, trigger
coalescing and settings validation. No processes, no sockets."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.fakes import fleet, running, with_vm, workload

from reconciler.daemon.backoff import Backoff
from reconciler.daemon.settings import (
    ApiSettings,
    DaemonSettings,
    LeaderSettings,
    PollingSettings,
    SourceSettings,
)
from reconciler.daemon.triggers import TriggerQueue
from reconciler.errors import ConfigError
from reconciler.leadership import LeaseSettings
from reconciler.model import ActionType, VMState
from reconciler.planning import diff, suspend_plan


def test_a_suspended_workload_keeps_running_as_it_is() -> None:
    desired = fleet(workload("web", replicas=2), workload("db"))
    observed = with_vm(running(desired), "web-1", state=VMState.MISSING)
    observed = with_vm(observed, "db-0", state=VMState.MISSING)
    plan = diff(desired, observed)
    assert {a.vm for a in plan.actions} == {"web-1", "db-0"}

    held = suspend_plan(plan, {"web": "investigating a leak"})
    assert [a.vm for a in held.actions] == ["db-0"]
    noop = next(n for n in held.noops if n.vm == "web-1")
    assert noop.action is ActionType.NOOP
    assert "suspended" in noop.reason
    assert "investigating a leak" in noop.reason
    assert "would replace" in noop.reason

    everything = suspend_plan(plan, {"*": ""})
    assert not everything.has_changes
    assert suspend_plan(plan, {}) is plan


def test_backoff_grows_per_revision_and_a_new_revision_does_not_wait() -> None:
    backoff = Backoff(base=5, factor=2, maximum=60)
    assert backoff.failed("a" * 40, now=100.0, message="bad") == 5
    assert backoff.retry_at("a" * 40) == 105.0
    assert backoff.failed("a" * 40, now=105.0) == 10
    assert backoff.failed("a" * 40, now=115.0) == 20
    for _ in range(5):
        backoff.failed("a" * 40, now=200.0)
    assert backoff.delay() == 60
    assert backoff.retry_at("b" * 40) == 0.0  # a newer head is tried at once
    assert backoff.failed("b" * 40, now=300.0) == 5  # and starts its own count
    backoff.succeeded()
    assert backoff.retry_at("b" * 40) == 0.0


def test_triggers_coalesce_into_one_cycle() -> None:
    queue = TriggerQueue()
    for reason in ("poll", "webhook", "webhook", "file-watch"):
        queue.request(reason)
    assert queue.take(timeout=0) == ["poll", "webhook", "file-watch"]
    assert queue.take(timeout=0) == []
    waker = threading.Timer(0.05, queue.request, args=["webhook"])
    waker.start()
    assert queue.take(timeout=30) == ["webhook"]
    waker.join()


def settings(**changes: object) -> DaemonSettings:
    base: dict[str, object] = {
        "source": SourceSettings(repo="."),
        "state_dir": Path("state"),
        "cache_dir": Path("cache"),
    }
    return DaemonSettings(**{**base, **changes})  # type: ignore[arg-type]


def test_daemon_settings_are_validated() -> None:
    assert settings().validated().lease.backend == "file"
    settings(lease=LeaderSettings("postgresql://localhost/fleet")).validated()
    settings(lease=LeaderSettings("host=/var/run/postgresql dbname=fleet")).validated()
    with pytest.raises(ConfigError, match="--lease must be"):
        settings(lease=LeaderSettings("etcd")).validated()
    with pytest.raises(ConfigError, match="renew deadline"):
        settings(lease=LeaderSettings(timing=LeaseSettings(5, 10, 2))).validated()
    with pytest.raises(ConfigError, match="--poll-interval"):
        settings(polling=PollingSettings(interval=0.1)).validated()
    with pytest.raises(ConfigError, match="--poll-jitter"):
        settings(polling=PollingSettings(interval=10, jitter=10)).validated()
    with pytest.raises(ConfigError, match="--listen"):
        settings(api=ApiSettings(listen="9180")).validated()
