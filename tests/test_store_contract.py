"""The ``StateStore`` contract: the same cases against every implementation.

Each backend gives an opener: every call opens another handle on *the same* store (another
replica's connection), which is how fencing between replicas and persistence across a reopen
are checked. The in-memory fake is held to the contract too, so a test that uses it proves what
it would prove against SQLite. A new backend (PostgreSQL) is one more entry in ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import MemoryStateStore, fleet, running, workload

from reconciler.errors import StaleTermError
from reconciler.leadership.fence import Fence
from reconciler.model import ObservedVM, VMState
from reconciler.state import StateStore, open_state_store

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


BACKENDS: dict[str, Callable[[Path], Opener]] = {"memory": _memory, "sqlite": _sqlite}


@pytest.fixture(params=BACKENDS.keys())
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    handles: list[StateStore] = []
    make = BACKENDS[request.param](tmp_path)

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
