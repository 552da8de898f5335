"""The ``StateStore`` contract: the same cases against every implementation.

Each backend gives an opener: every call opens another handle on *the same* store (another
replica's connection), which is how fencing between replicas and persistence across a reopen
are checked. The in-memory fake is held to the contract too, so a test that uses it proves what
it would prove against SQLite. A new backend (PostgreSQL) is one more entry in ``BACKENDS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import MemoryStateStore, fleet, running, workload

from reconciler.errors import StaleTermError
from reconciler.leadership.fence import Fence
from reconciler.model import ObservedVM, VMState
from reconciler.state import StateStore, StoreLocation, open_state_store
from reconciler.state.protocol import VM_HISTORY_KEPT, OutboxMessage, OutboxState

Opener = Callable[[], StateStore]


def _memory(tmp_path: Path) -> Opener:
    first = MemoryStateStore()
    handed = [False]

    def open_handle() -> StateStore:
        if not handed[0]:
            handed[0] = True
            return first
        return first.handle()

    return open_handle


def _sqlite(tmp_path: Path) -> Opener:
    return lambda: open_state_store(tmp_path / "state")


def _postgresql(tmp_path: Path, dsn: str = "") -> Opener:
    # A fresh database per test (the lease_dsn fixture), every handle one host's connection.
    return lambda: open_state_store(StoreLocation(tmp_path / "state", url=dsn, host="host-a"))


BACKENDS: dict[str, Callable[..., Opener]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgresql": _postgresql,
}
# Backends that need a server, the marker that says so, and the fixture giving its database.
NEEDS = {"postgresql": (pytest.mark.postgres, "lease_dsn")}


@pytest.fixture(
    params=[pytest.param(name, marks=NEEDS[name][0] if name in NEEDS else ()) for name in BACKENDS]
)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    handles: list[StateStore] = []
    needs = NEEDS.get(request.param)
    extra = (request.getfixturevalue(needs[1]),) if needs else ()
    make = BACKENDS[request.param](tmp_path, *extra)

    def open_handle() -> StateStore:
        handles.append(make())
        return handles[-1]

    yield open_handle
    for handle in handles:
        handle.close()


@pytest.fixture
def store(opener: Opener) -> StateStore:
    return opener()


VMS = running(fleet(workload("web", replicas=2), workload("db"))).vms


def vm(name: str = "web-0", **changes: object) -> ObservedVM:
    return replace(VMS[name], **changes)  # type: ignore[arg-type]


def test_a_new_store_is_empty(store: StateStore) -> None:
    observed = store.observed()
    assert (observed.vms, observed.applied_revision) == ({}, None)
    assert observed.version == store.version()
    assert store.applied_revision() is None
    assert store.attempted_revision() is None
    assert store.open_intents() == []
    assert store.events() == []
    assert store.suspensions() == {}


def test_every_write_of_fleet_state_moves_the_version(store: StateStore) -> None:
    writes: list[Callable[[], object]] = [
        lambda: store.put_vm(vm("web-0")),
        lambda: store.put_vm(vm("web-0", state=VMState.MISSING)),
        lambda: store.remove_vm("web-0"),
        lambda: store.remove_vm("never-there"),  # not an error, still a write
        lambda: store.record_revision("a" * 40, outcome="applied"),
        lambda: store.begin_intent("web-1", "create"),
        lambda: store.complete_intent(store.open_intents()[0].id),
    ]
    for write in writes:
        before = store.version()
        write()
        assert store.version() > before
        assert store.observed().version == store.version()


def test_events_and_suspensions_do_not_move_the_version(store: StateStore) -> None:
    before = store.version()
    store.record_event("elected", "replica-a", "leads with term 1", term=1)
    store.suspend("web", "investigating")
    store.resume("web")
    assert store.version() == before


def test_vms_are_stored_as_given(store: StateStore) -> None:
    for name in VMS:
        store.put_vm(vm(name, pid=4242, address="10.0.0.2", detail="booted", restarts=2))
    store.put_vm(vm("db-0", state=VMState.MISSING, healthy=None, pid=None))
    observed = store.observed()
    assert list(observed.vms) == sorted(VMS)
    assert observed.vms["web-1"] == vm(
        "web-1", pid=4242, address="10.0.0.2", detail="booted", restarts=2
    )
    assert observed.vms["db-0"] == vm("db-0", state=VMState.MISSING, healthy=None, pid=None)
    store.remove_vm("web-1")
    assert "web-1" not in store.observed().vms


def test_the_applied_revision_is_the_last_applied_one_the_attempted_the_last(
    store: StateStore,
) -> None:
    good, bad = "a" * 40, "b" * 40
    store.record_revision(good, outcome="applied")
    store.record_revision(bad, outcome="failed", message="invalid manifests")
    applied, attempted = store.applied_revision(), store.attempted_revision()
    assert applied is not None
    assert attempted is not None
    assert (applied.revision, applied.outcome) == (good, "applied")
    assert (attempted.revision, attempted.outcome, attempted.message) == (
        bad,
        "failed",
        "invalid manifests",
    )
    assert store.observed().applied_revision == good
    with pytest.raises(ValueError, match="outcome must be"):
        store.record_revision(bad, outcome="maybe")


def test_intents_stay_open_until_completed(store: StateStore) -> None:
    create = store.begin_intent("web-0", "create")
    delete = store.begin_intent("db-0", "delete")
    assert create != delete
    store.complete_intent(create)
    assert [(i.id, i.vm, i.action) for i in store.open_intents()] == [(delete, "db-0", "delete")]
    store.complete_intent(delete, "interrupted")
    assert store.open_intents() == []


def test_events_are_newest_first_with_their_term(store: StateStore) -> None:
    for n in range(5):
        store.record_event("cycle", f"rev{n}", f"applying {n}", term=n or None)
    events = store.events(3)
    assert [e.subject for e in events] == ["rev4", "rev3", "rev2"]
    assert [e.term for e in events] == [4, 3, 2]
    assert store.events()[-1].term is None


def test_credentials_are_never_stored(store: StateStore) -> None:
    url = "https://operator:s3cr3t-t0ken@git.example.com/fleet.git"
    store.record_event("revision-failed", "abc", f"cannot fetch {url}")
    store.record_revision("a" * 40, outcome="failed", message=f"cannot fetch {url}")
    attempted = store.attempted_revision()
    assert attempted is not None
    for text in (store.events(1)[0].message, attempted.message):
        assert "s3cr3t-t0ken" not in text
        assert "git.example.com/fleet.git" in text


def test_suspensions_are_switches_with_history(store: StateStore) -> None:
    store.suspend("web", "investigating a leak")
    store.suspend(None)
    assert store.suspensions() == {"web": "investigating a leak", "*": ""}
    assert store.resume("web") is True
    assert store.resume("web") is False
    assert store.suspensions() == {"*": ""}
    history = [(e.kind, e.subject) for e in reversed(store.events())]
    assert history == [("suspended", "web"), ("suspended", "fleet"), ("resumed", "web")]


def test_a_newer_term_fences_the_writes_of_an_older_one(opener: Opener) -> None:
    old_leader, new_leader = opener(), opener()
    old_fence, new_fence = Fence(1, renew_deadline=60), Fence(2, renew_deadline=60)
    old_leader.claim_term(old_fence)
    old_leader.put_vm(vm("web-0"))
    new_leader.claim_term(new_fence)
    version = new_leader.version()
    # Refused inside the write: the old leader's own fence is still valid by its clock.
    assert old_fence.valid
    with pytest.raises(StaleTermError, match="term 1 is stale, term 2 leads"):
        old_leader.put_vm(vm("web-0", pid=999))
    for write in (
        lambda: old_leader.remove_vm("web-0"),
        lambda: old_leader.record_revision("a" * 40, outcome="applied"),
        lambda: old_leader.begin_intent("web-1", "create"),
    ):
        with pytest.raises(StaleTermError):
            write()
    assert old_fence.refused == 4
    assert new_leader.version() == version
    assert new_leader.observed().vms["web-0"] == vm("web-0")
    assert new_leader.applied_revision() is None
    assert new_leader.open_intents() == []
    # Events and suspensions are the operator's history and switches, never fenced.
    old_leader.record_event("stepped-down", "a", "lost the lease", term=1)
    old_leader.suspend("web")
    assert new_leader.events(1)[0].kind == "suspended"
    assert new_leader.suspensions() == {"web": ""}
    new_leader.put_vm(vm("web-0", pid=1000))  # the new leader writes
    # An older term cannot claim the store back.
    with pytest.raises(StaleTermError, match="term 2 already leads"):
        opener().claim_term(Fence(1, renew_deadline=60))


def test_a_fence_past_its_renew_deadline_refuses_writes(store: StateStore) -> None:
    now = [0.0]
    fence = Fence(1, renew_deadline=10, monotonic=lambda: now[0])
    store.claim_term(fence)
    store.put_vm(vm("web-0"))
    now[0] = 10.0
    with pytest.raises(StaleTermError, match="not renewed within 10 s"):
        store.put_vm(vm("web-1"))
    assert list(store.observed().vms) == ["web-0"]


def test_a_released_fence_no_longer_guards_writes(opener: Opener) -> None:
    stepped_down, leader = opener(), opener()
    fence = Fence(1, renew_deadline=60)
    stepped_down.claim_term(fence)
    fence.revoke("the lease was lost")
    with pytest.raises(StaleTermError):
        stepped_down.put_vm(vm("web-0"))
    stepped_down.release_fence()
    stepped_down.put_vm(vm("web-0"))  # an unfenced write, as the CLI's are
    assert "web-0" in leader.observed().vms


def test_everything_survives_a_reopen(opener: Opener) -> None:
    first = opener()
    first.claim_term(Fence(3, renew_deadline=60))
    first.put_vm(vm("web-0"))
    first.record_revision("a" * 40, outcome="applied")
    intent = first.begin_intent("web-1", "create")
    first.record_event("elected", "a", "leads with term 3", term=3)
    first.suspend("db", "maintenance")
    version = first.version()
    first.close()

    again = opener()
    assert again.version() == version
    assert again.observed().vms == {"web-0": vm("web-0")}
    applied = again.applied_revision()
    assert applied is not None
    assert applied.revision == "a" * 40
    assert [i.id for i in again.open_intents()] == [intent]
    assert [e.kind for e in again.events()] == ["suspended", "elected"]
    assert again.suspensions() == {"db": "maintenance"}
    with pytest.raises(StaleTermError, match="term 3 already leads"):
        again.claim_term(Fence(2, renew_deadline=60))


def test_a_store_is_a_context_manager_whose_writes_outlive_it(opener: Opener) -> None:
    with opener() as first:
        first.put_vm(vm("web-0"))
        version = first.version()
    with opener() as second:
        assert set(second.observed().vms) == {"web-0"}
        assert second.version() == version


# -- the notification outbox -----------------------------------------------------------------


def message(key: str, destination: str = "ops") -> OutboxMessage:
    return OutboxMessage(key, destination, "revision-failed", f'{{"key": "{key}"}}')


def test_the_outbox_holds_one_message_per_key_across_replicas(opener: Opener) -> None:
    first, second = opener(), opener()
    version = first.version()
    assert first.enqueue([message("a"), message("b"), message("a")]) == 2
    # Another replica (a new leader re-evaluating the same revision) enqueues the same keys.
    assert second.enqueue([message("a"), message("c")]) == 1
    assert [e.message.key for e in reversed(second.outbox())] == ["a", "b", "c"]
    entry = second.outbox()[-1]
    assert (entry.message, entry.state, entry.attempts) == (message("a"), OutboxState.PENDING, 0)
    assert first.version() == version  # not fleet state
    # Delivered or abandoned, a key still counts: nothing is sent twice.
    first.settle_message(entry.id, delivered=True)
    assert second.enqueue([message("a")]) == 0


def test_each_destination_gets_its_messages_in_order(store: StateStore) -> None:
    store.enqueue([message("a1", "a"), message("a2", "a"), message("b1", "b")])
    now = time.time() + 1
    assert [e.message.key for e in store.due_messages(now)] == ["a1", "b1"]
    assert store.due_messages(now, limit=1)[0].message.key == "a1"
    first = store.due_messages(now)[0]
    store.settle_message(first.id, delivered=True)
    assert [e.message.key for e in store.due_messages(now)] == ["a2", "b1"]
    assert store.outbox()[-1].state is OutboxState.DELIVERED
    store.settle_message(first.id, delivered=False, retry_at=now)  # settled: no change
    assert store.outbox()[-1].state is OutboxState.DELIVERED


def test_a_failed_attempt_waits_for_its_retry_or_is_abandoned(store: StateStore) -> None:
    store.enqueue([message("a1", "a"), message("a2", "a")])
    now = time.time() + 1
    first = store.due_messages(now)[0]
    store.settle_message(
        first.id,
        delivered=False,
        error="https://bot:s3cr3t@hooks.example/x: 503",
        retry_at=now + 60,
    )
    # Not due yet, and the destination's later message waits behind it.
    assert store.due_messages(now) == []
    (again,) = store.due_messages(now + 60)
    assert (again.id, again.attempts, again.next_attempt_at) == (first.id, 1, now + 60)
    assert "s3cr3t" not in again.last_error
    assert again.last_error.endswith("hooks.example/x: 503")
    store.settle_message(first.id, delivered=False, error="gave up", retry_at=None)
    abandoned = store.outbox()[-1]
    assert (abandoned.state, abandoned.attempts) == (OutboxState.ABANDONED, 2)
    assert [e.message.key for e in store.due_messages(now)] == ["a2"]


def test_outbox_writes_are_fenced(opener: Opener) -> None:
    old_leader, new_leader = opener(), opener()
    old_leader.claim_term(Fence(1, renew_deadline=60))
    old_leader.enqueue([message("a")])
    entry = old_leader.outbox()[0].id
    new_leader.claim_term(Fence(2, renew_deadline=60))
    with pytest.raises(StaleTermError):
        old_leader.enqueue([message("b")])
    with pytest.raises(StaleTermError):
        old_leader.settle_message(entry, delivered=True)
    assert [(e.message.key, e.state) for e in new_leader.outbox()] == [("a", OutboxState.PENDING)]
    # Reading what is due is not a write: a follower may look, only the leader settles.
    assert [e.id for e in old_leader.due_messages(time.time() + 1)] == [entry]
    new_leader.settle_message(entry, delivered=True)


def test_rollouts_are_fenced_state_that_does_not_move_the_version(opener: Opener) -> None:
    from reconciler.model import RolloutPhase, RolloutState, VersionSnapshot

    leader, other = opener(), opener()
    leader.claim_term(Fence(1, renew_deadline=60))
    before = vm("web-0")
    state = RolloutState(
        workload="web",
        version="v2",
        revision="b" * 40,
        phase=RolloutPhase.CANARY,
        started_at=100.0,
        previous=VersionSnapshot(
            before.runtime,
            before.target,
            before.artifact_digest,
            before.artifact_inputs,
            before.settings,
        ),
        canaries_healthy_since=110.5,
        deadline_from=100.0,
    )
    version = leader.version()
    leader.put_rollout(state)
    assert leader.version() == version
    # Survives a new handle (a restart) and a leader change.
    assert other.rollouts() == {"web": state}
    other.claim_term(Fence(2, renew_deadline=60))
    with pytest.raises(StaleTermError):
        leader.put_rollout(replace(state, phase=RolloutPhase.PROMOTED))
    other.put_rollout(replace(state, phase=RolloutPhase.COMPLETE))
    assert leader.rollouts()["web"].phase is RolloutPhase.COMPLETE


def test_rollout_switches_are_unfenced_operator_intent_with_history(opener: Opener) -> None:
    from reconciler.model import RolloutCommand, RolloutSwitch

    leader, operator = opener(), opener()
    leader.claim_term(Fence(3, renew_deadline=60))
    version = leader.version()
    operator.switch_rollout(RolloutSwitch("web", RolloutCommand.PROMOTE, "v2", 100.0))
    operator.switch_rollout(RolloutSwitch("web", RolloutCommand.ABORT, "v2", 101.0))
    assert leader.rollout_switches() == {
        "web": RolloutSwitch("web", RolloutCommand.ABORT, "v2", 101.0)
    }
    assert leader.version() == version
    history = [(e.kind, e.subject) for e in reversed(leader.events())]
    assert history == [("rollout-promote", "web"), ("rollout-abort", "web")]


def test_history_keeps_every_attempt_and_the_artifacts_applied(opener: Opener) -> None:
    leader, reader = opener(), opener()
    leader.claim_term(Fence(1, renew_deadline=60))
    first, second = "a" * 40, "b" * 40
    leader.record_revision(first, outcome="applied")
    leader.record_artifacts(first, {"web": ["d1", "d1", "d0"], "api": ["d2"]})
    leader.record_revision(second, outcome="failed", message="bad manifests")
    version = reader.version()
    leader.record_artifacts(first, {"web": ["d3"]})  # replaces web's, keeps api's
    assert reader.version() == version  # history, not fleet state
    assert [(r.revision, r.outcome) for r in reader.revisions()] == [
        (second, "failed"),
        (first, "applied"),
    ]
    assert reader.revisions(1)[0].message == "bad manifests"
    assert reader.revision_artifacts(first) == {"web": ("d3",), "api": ("d2",)}
    assert reader.revision_artifacts(second) == {}
    # Fenced like the fleet's state: a stale leader records no artifacts.
    opener().claim_term(Fence(2, renew_deadline=60))
    with pytest.raises(StaleTermError):
        leader.record_artifacts(second, {"web": ["d4"]})
    assert reader.revision_artifacts(second) == {}


def test_pins_are_unfenced_operator_switches_with_history(opener: Opener) -> None:
    leader, operator = opener(), opener()
    leader.claim_term(Fence(1, renew_deadline=60))
    opener().claim_term(Fence(2, renew_deadline=60))  # the operator's handle is never fenced
    version = leader.version()
    operator.pin(None, "a" * 40, "bad release")
    operator.pin("web", "b" * 40)
    operator.pin("web", "c" * 40)  # replaces web's pin
    pins = leader.pins()
    assert sorted(pins) == ["*", "web"]
    assert (pins["*"].revision, pins["*"].reason) == ("a" * 40, "bad release")
    assert pins["web"].revision == "c" * 40
    assert pins["web"].at > 0
    assert leader.version() == version
    assert operator.unpin("web") is True
    assert operator.unpin("web") is False
    assert list(leader.pins()) == ["*"]
    history = [(e.kind, e.subject, e.message) for e in reversed(leader.events())]
    assert history == [
        ("pinned", "fleet", "at aaaaaaaaaaaa: bad release"),
        ("pinned", "web", "at bbbbbbbbbbbb: by the operator"),
        ("pinned", "web", "at cccccccccccc: by the operator"),
        ("unpinned", "web", "by the operator"),
    ]


def test_each_vm_keeps_its_newest_history_unfenced(opener: Opener) -> None:
    store, reader = opener(), opener()
    store.claim_term(Fence(1, renew_deadline=60))
    opener().claim_term(Fence(2, renew_deadline=60))  # history is never fenced
    version = reader.version()
    store.record_vm_history("web-0", "action", "create web-0: not running", term=1)
    for n in range(VM_HISTORY_KEPT + 4):
        store.record_vm_history("web-0", "health", f"probe {n}", healthy=n % 2 == 0, term=1)
    store.record_vm_history("api-0", "rollback", "back to artifact d0", term=2)
    assert reader.version() == version
    history = reader.vm_history("web-0")
    assert len(history) == VM_HISTORY_KEPT
    newest = history[0]
    assert (newest.kind, newest.detail, newest.healthy, newest.term) == (
        "health",
        f"probe {VM_HISTORY_KEPT + 3}",
        False,
        1,
    )
    assert newest.at > 0
    assert history[-1].detail == "probe 4"  # the action and the oldest probes are gone
    (api,) = reader.vm_history("api-0")
    assert (api.kind, api.healthy, api.term) == ("rollback", None, 2)
    assert [e.detail for e in reader.vm_history("web-0", limit=2)] == [
        f"probe {VM_HISTORY_KEPT + 3}",
        f"probe {VM_HISTORY_KEPT + 2}",
    ]
    assert reader.vm_history("gone") == []
