"""Notifications from real ``reconciler daemon`` processes to a local receiver: a failing
revision is reported exactly once, even when two daemons run and the leader is killed between
enqueueing and delivering, and a daemon restarted before delivery still delivers.

The fleet runs no VMs (a revision that fails validation is a failing revision), so the tests
need neither root nor a bridge; the receiver is the standard library's HTTP server.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from support.daemons import Daemon
from support.receiver import Receiver
from support.repo import FleetRepo
from support.waiting import eventually

from reconciler.state import open_state_store
from reconciler.state.protocol import OutboxEntry, OutboxState

pytestmark = [pytest.mark.slow]

FLEET = """\
apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {name: notify-test}
spec:
  allowEmpty: true
  notifications:
    - {name: ops, format: generic, events: [revision-failed], url: {env: OPS}}
"""
BROKEN = """\
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {name: broken}
spec: {sorce: {path: src}}
"""


def _outbox(state: Path) -> list[OutboxEntry]:
    with closing(open_state_store(state)) as store:
        return store.outbox()


def _applied(state: Path) -> str | None:
    with closing(open_state_store(state)) as store:
        applied = store.applied_revision()
    return applied.revision if applied else None


@contextmanager
def _running(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for daemon in daemons:
            daemon.stop()


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FleetRepo, Path, Receiver]:
    receiver = Receiver()  # its port is known, nothing listens on it yet: the endpoint is down
    monkeypatch.setenv("RECONCILER_NOTIFY_OPS", receiver.url("/hook"))
    # A variable a hostile commit would like to name: never a notification URL.
    monkeypatch.setenv("RECONCILER_GIT_CREDENTIAL", "git-s3cr3t")
    repo = FleetRepo.create(tmp_path / "fleet", {"fleet.yaml": FLEET})
    return repo, tmp_path / "state", receiver


def _break(repo: FleetRepo, state: Path) -> str:
    """Commit a revision that fails validation; returns it once a delivery has failed."""
    repo.write("broken.yaml", BROKEN)
    bad = repo.commit("broken")
    eventually(
        lambda: any(e.attempts >= 1 for e in _outbox(state)),
        60,
        "a failed delivery of the revision's failure",
    )
    return bad


def test_a_failing_revision_is_notified_once_across_a_leader_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, state, receiver = _setup(tmp_path, monkeypatch)
    head = repo.git("rev-parse", "HEAD")
    daemons = [Daemon(repo.path, state, tmp_path, f"d{i}") for i in range(2)]
    with _running(*daemons), closing_receiver(receiver):
        eventually(lambda: _applied(state) == head, 60, "the first revision applied")
        bad = _break(repo, state)
        leader = eventually(
            lambda: next((d for d in daemons if d.is_leader()), None), 30, "a leader"
        )
        follower = next(d for d in daemons if d is not leader)
        # Killed between enqueueing and delivering: the message is the store's, not its.
        leader.signal(signal.SIGKILL)
        leader.process.wait()
        receiver.start()
        eventually(lambda: receiver.count("/hook") >= 1, 60, "the notification")
        eventually(follower.is_leader, 30, "the follower leading")

        def refused_again() -> bool:
            with closing(open_state_store(state)) as store:
                events = store.events(200)
            elected = next(e for e in events if e.kind == "elected" and e.subject == follower.name)
            return any(e.kind == "revision-failed" and e.id > elected.id for e in events)

        # The new leader re-evaluates the failing revision (back-off is per replica) ...
        eventually(refused_again, 60, "the new leader refusing the revision again")
        time.sleep(3)  # ... and its sender has had rounds to send a second one: it has none
        assert receiver.count() == 1
        (request,) = receiver.requests
        body = request.json()
        assert (body["event"], body["revision"], body["fleet"]) == (
            "revision-failed",
            bad,
            "notify-test",
        )
        assert "broken.yaml" in body["message"]
        assert request.header("X-Reconciler-Delivery") == f"revision-failed:{bad}|ops"
        assert [(e.message.key, e.state) for e in _outbox(state)] == [
            (f"revision-failed:{bad}|ops", OutboxState.DELIVERED)
        ]


def test_a_daemon_restarted_before_delivery_still_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, state, receiver = _setup(tmp_path, monkeypatch)
    head = repo.git("rev-parse", "HEAD")
    first = Daemon(repo.path, state, tmp_path, "first")
    with _running(first), closing_receiver(receiver):
        eventually(lambda: _applied(state) == head, 60, "the first revision applied")
        bad = _break(repo, state)
        first.stop()
        receiver.start()
        second = Daemon(repo.path, state, tmp_path, "second")
        with _running(second):
            eventually(lambda: receiver.count("/hook") >= 1, 60, "the notification")
            eventually(
                lambda: _outbox(state)[0].state is OutboxState.DELIVERED, 30, "marked delivered"
            )
        assert receiver.count() == 1
        assert receiver.requests[0].json()["revision"] == bad
        assert "git-s3cr3t" not in receiver.requests[0].body.decode()


@contextmanager
def closing_receiver(receiver: Receiver) -> Iterator[None]:
    try:
        yield
    finally:
        receiver.stop()
