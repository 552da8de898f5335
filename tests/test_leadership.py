"""Leader election and fencing: the elector in virtual time against an in-memory lease, the file
lease with real flocks across processes, and the state store refusing stale terms."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.fakes import MemoryStateStore, fleet, running, workload

from reconciler.errors import ConfigError, LeadershipError, StaleTermError
from reconciler.leadership import LeaseHolder, LeaseSettings
from reconciler.leadership.elector import Elector
from reconciler.leadership.fence import Fence
from reconciler.leadership.file_lease import FileLease
from reconciler.model import ObservedVM
from reconciler.state import open_state_store

VMS = running(fleet(workload("web", replicas=2))).vms


def vm(name: str, **changes: object) -> ObservedVM:
    from dataclasses import replace

    return replace(VMS[name], **changes)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SharedLeaseTable:
    """One lease row, as a database would hold it, timed by ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.holder = ""
        self.term = 0
        self.expires = 0.0
        self.down = False


class MemoryLease:
    """An in-memory ``Lease`` over a ``SharedLeaseTable``: our own seam, for virtual time."""

    def __init__(self, table: SharedLeaseTable, holder: str, settings: LeaseSettings) -> None:
        self.table, self.holder, self.settings = table, holder, settings

    def _check(self) -> None:
        if self.table.down:
            raise LeadershipError("cannot reach the lease database")

    def try_acquire(self) -> int | None:
        self._check()
        if self.table.expires > self.table.clock() and self.table.holder:
            return None
        self.table.holder = self.holder
        self.table.term += 1
        self.table.expires = self.table.clock() + self.settings.duration
        return self.table.term

    def renew(self, term: int) -> bool:
        self._check()
        table = self.table
        if (table.holder, table.term) != (self.holder, term) or table.expires <= table.clock():
            return False
        table.expires = table.clock() + self.settings.duration
        return True

    def release(self, term: int) -> None:
        if (self.table.holder, self.table.term) == (self.holder, term):
            self.table.holder, self.table.expires = "", 0.0

    def current(self) -> LeaseHolder | None:
        self._check()
        if not self.table.holder or self.table.expires <= self.table.clock():
            return None
        return LeaseHolder(self.table.holder, self.table.term)

    def wait_for_change(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def make_elector(table: SharedLeaseTable, name: str, log: list[str]) -> Elector:
    return Elector(
        MemoryLease(table, name, LeaseSettings()),
        on_elected=lambda fence: log.append(f"{name} elected {fence.term}"),
        on_lost=lambda fence, why: log.append(f"{name} lost {fence.term}"),
        monotonic=table.clock,
    )


def test_lease_settings_must_be_ordered() -> None:
    LeaseSettings().validated()
    with pytest.raises(ConfigError, match=r"lease .* > renew deadline .* > retry"):
        LeaseSettings(duration=10, renew_deadline=10, retry=2).validated()
    with pytest.raises(ConfigError):
        LeaseSettings(duration=15, renew_deadline=1, retry=2).validated()


def test_one_of_two_replicas_leads_and_the_other_takes_over_after_expiry() -> None:
    clock = Clock()
    table = SharedLeaseTable(clock)
    log: list[str] = []
    a, b = make_elector(table, "a", log), make_elector(table, "b", log)
    a.step()
    b.step()
    assert (a.is_leader, b.is_leader) == (True, False)
    assert b.holder == LeaseHolder("a", 1)
    # a is paused (no renewals) for longer than the lease: b takes over with a new term.
    clock.now += 16
    b.step()
    assert b.is_leader
    assert b.fence is not None
    assert b.fence.term == 2
    assert a.fence is not None
    assert not a.fence.valid
    a.step()  # a wakes up: its renewal fails and it steps down
    assert not a.is_leader
    assert log == ["a elected 1", "b elected 2", "a lost 1"]


def test_a_leader_that_cannot_renew_stops_acting_before_the_lease_expires() -> None:
    clock = Clock()
    table = SharedLeaseTable(clock)
    log: list[str] = []
    a = make_elector(table, "a", log)
    a.step()
    fence = a.fence
    assert fence is not None
    table.down = True
    clock.now += 2
    a.step()  # an error, not a loss: still leading within the renew deadline
    assert a.is_leader
    fence.check("a write")
    clock.now += 8.5  # 10.5 s since the last renewal: past the 10 s deadline, before 15 s
    with pytest.raises(StaleTermError, match="not renewed within 10 s"):
        fence.check("a write")
    a.step()
    assert not a.is_leader
    assert log[-1] == "a lost 1"
    assert fence.refused == 1


def test_graceful_resign_lets_a_follower_take_over_at_once() -> None:
    clock = Clock()
    table = SharedLeaseTable(clock)
    log: list[str] = []
    a, b = make_elector(table, "a", log), make_elector(table, "b", log)
    a.step()
    b.step()
    a.resign("shutting down")
    b.step()
    assert b.is_leader
    assert not a.is_leader


def test_the_store_refuses_writes_of_a_stale_term(tmp_path: Path) -> None:
    old_leader = open_state_store(tmp_path)
    new_leader = open_state_store(tmp_path)
    old_fence, new_fence = Fence(1, renew_deadline=10), Fence(2, renew_deadline=10)
    old_leader.claim_term(old_fence)
    old_leader.put_vm(vm("web-0"))
    new_leader.claim_term(new_fence)
    with pytest.raises(StaleTermError, match="term 1 is stale, term 2 leads"):
        old_leader.put_vm(vm("web-0", pid=999))
    with pytest.raises(StaleTermError):
        old_leader.begin_intent("web-1", "create")
    assert old_fence.refused == 2
    assert new_leader.observed().vms["web-0"].pid == vm("web-0").pid
    assert new_leader.open_intents() == []
    # Events are history, never fenced: a stale leader can still say that it stepped down.
    old_leader.record_event("stepped-down", "a", "lost the lease", term=1)
    assert new_leader.events(1)[0].kind == "stepped-down"
    with pytest.raises(StaleTermError):
        old_leader.claim_term(Fence(1, renew_deadline=10))
    new_leader.put_vm(vm("web-1"))
    assert set(new_leader.observed().vms) == {"web-0", "web-1"}


def test_a_fence_past_its_deadline_refuses_writes_locally() -> None:
    clock = Clock()
    store = MemoryStateStore()
    fence = Fence(1, renew_deadline=10, monotonic=clock)
    store.claim_term(fence)
    store.put_vm(vm("web-0"))
    clock.now += 11
    with pytest.raises(StaleTermError):
        store.put_vm(vm("web-1"))
    assert set(store.observed().vms) == {"web-0"}


def test_file_lease_terms_grow_and_a_second_holder_waits(tmp_path: Path) -> None:
    a = FileLease(tmp_path, holder="a")
    b = FileLease(tmp_path, holder="b")
    assert a.try_acquire() == 1
    assert b.try_acquire() is None
    assert b.current() == LeaseHolder("a", 1)
    assert a.renew(1)
    assert not a.renew(2)
    a.release(1)
    assert b.current() is None
    assert b.try_acquire() == 2
    assert not a.renew(1)
    b.close()
    assert a.try_acquire() == 3
    a.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from reconciler.leadership.file_lease import FileLease
    lease = FileLease(Path(sys.argv[1]), holder="child")
    print(lease.try_acquire(), flush=True)
    time.sleep(600)
    """
)


def test_file_lease_is_free_the_moment_its_holder_is_killed(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "1"
        follower = FileLease(tmp_path, holder="follower")
        assert follower.try_acquire() is None
        assert follower.current() == LeaseHolder("child", 1)
        child.kill()
        child.wait()
        started = time.monotonic()
        follower.wait_for_change(timeout=30)
        assert time.monotonic() - started < 25, "wait_for_change did not notice the free lock"
        assert follower.try_acquire() == 2
        follower.close()
