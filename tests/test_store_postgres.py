"""The PostgreSQL state store beyond the contract suite (``test_store_contract.py``): its
migrations, the lease row checked inside fenced writes, data kept per host, the password kept
out of every message, and ``apply``, ``status`` and the daemon on ``--store`` end to end.

Every test gets a fresh database (the ``lease_dsn`` fixture) on the server CI starts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from support.daemons import Daemon, healthy_names
from support.fakes import fleet, running, workload
from support.process_fleet import (
    echo,
    echo_repo,
    echo_workload,
    fleet_document,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.waiting import eventually, free_port

from reconciler.cli import main
from reconciler.errors import ConfigError, StaleTermError, StateError
from reconciler.leadership.fence import Fence
from reconciler.leadership.postgres_lease import PostgresLease
from reconciler.model import ObservedVM
from reconciler.state import LeaseBinding, StoreLocation, open_state_store
from reconciler.state.hosts import Assignment, HostRegistration
from reconciler.state.postgres import SCHEMA_VERSION, PostgresStateStore

pytestmark = [pytest.mark.postgres]

VMS = running(fleet(workload("web", replicas=2))).vms


def facts(name: str) -> HostRegistration:
    return HostRegistration(name=name, vcpus=4, memory_mib=4096, disk_mib=10_000)


def vm(name: str = "web-0", **changes: object) -> ObservedVM:
    return replace(VMS[name], **changes)  # type: ignore[arg-type]


@pytest.fixture
def stores(lease_dsn: str) -> Iterator[list[PostgresStateStore]]:
    opened: list[PostgresStateStore] = []
    yield opened
    for store in opened:
        store.close()


def open_store(
    opened: list[PostgresStateStore], dsn: str, host: str = "host-a", **kwargs: object
) -> PostgresStateStore:
    opened.append(PostgresStateStore(dsn, host=host, **kwargs))  # type: ignore[arg-type]
    return opened[-1]


def sql(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query)  # type: ignore[call-overload]
        return list(cursor.fetchall()) if cursor.description else []


# -- migrations -------------------------------------------------------------------------------


def test_daemons_starting_together_migrate_once(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    errors: list[BaseException] = []

    def start(n: int) -> None:
        try:
            open_store(stores, lease_dsn, host=f"host-{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = sql(lease_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert applied == [(n,) for n in range(1, SCHEMA_VERSION + 1)]  # each once


def test_a_database_migrated_by_a_newer_reconciler_is_refused(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    open_store(stores, lease_dsn)
    sql(lease_dsn, "INSERT INTO schema_migrations (version, name) VALUES (99, 'from the future')")
    with pytest.raises(StateError, match=rf"newer reconciler \(schema 99 > {SCHEMA_VERSION}\)"):
        open_store(stores, lease_dsn)


# -- fencing by the lease row -----------------------------------------------------------------


def test_fenced_writes_check_the_lease_row_in_the_same_database(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    lease = PostgresLease(lease_dsn, holder="replica-a")
    other = PostgresLease(lease_dsn, holder="replica-b")
    try:
        term = lease.try_acquire()
        assert term is not None
        store = open_store(stores, lease_dsn, lease=LeaseBinding(lease_dsn, holder="replica-a"))
        fence = Fence(term, renew_deadline=60)
        store.claim_term(fence)
        store.put_vm(vm("web-0"))
        # The lease expires by the database clock; the leader's own clock still trusts it.
        sql(lease_dsn, "UPDATE reconciler_leases SET expires_at = clock_timestamp()")
        assert fence.valid
        with pytest.raises(StaleTermError, match="expired by the database clock"):
            store.put_vm(vm("web-1"))
        # Somebody else takes it (term + 1) before claiming the store: still refused.
        assert other.try_acquire() == term + 1
        with pytest.raises(StaleTermError, match="held by replica-b with term"):
            store.begin_intent("web-1", "create")
        with pytest.raises(StaleTermError):
            store.assign("web-1", "host-b")
        assert list(store.observed().vms) == ["web-0"]
        assert store.open_intents() == []
        store.record_event("stepped-down", "replica-a", "never fenced", term=term)
    finally:
        lease.close()
        other.close()


def test_a_lease_in_another_database_leaves_the_term_alone_to_fence(
    lease_dsn: str, admin_dsn: str, stores: list[PostgresStateStore]
) -> None:
    # The lease elsewhere (the server's admin database): the store cannot read its row.
    store = open_store(stores, lease_dsn, lease=LeaseBinding(admin_dsn, holder="replica-a"))
    store.claim_term(Fence(7, renew_deadline=60))
    store.put_vm(vm("web-0"))
    assert list(store.observed().vms) == ["web-0"]


def test_a_claim_waits_for_a_write_already_past_its_check(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    old, new = open_store(stores, lease_dsn), open_store(stores, lease_dsn)
    old.claim_term(Fence(1, renew_deadline=60))
    claimed = threading.Event()
    with old._write() as conn:  # the old leader is between its check and its commit
        conn.execute("DELETE FROM vms")
        thread = threading.Thread(
            target=lambda: (new.claim_term(Fence(2, renew_deadline=60)), claimed.set())
        )
        thread.start()
        assert not claimed.wait(1.0), "the claim must wait for the write in flight"
    thread.join(10)
    assert claimed.is_set()
    with pytest.raises(StaleTermError, match="term 1 is stale, term 2 leads"):
        old.put_vm(vm("web-0"))


# -- hosts ------------------------------------------------------------------------------------


def test_observed_vms_intents_and_versions_are_per_host_revisions_the_fleets(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    a = open_store(stores, lease_dsn, host="host-a")
    b = open_store(stores, lease_dsn, host="host-b")
    a.put_vm(vm("web-0"))
    b.put_vm(vm("web-1"))
    b.put_vm(vm("web-0", pid=77))  # the same name on another host is another row
    a_intent = a.begin_intent("web-0", "create")
    b.record_revision("a" * 40, outcome="applied")
    assert list(a.observed().vms) == ["web-0"]
    assert a.observed().vms["web-0"] == vm("web-0")
    assert sorted(b.observed().vms) == ["web-0", "web-1"]
    assert [i.id for i in a.open_intents()] == [a_intent]
    assert b.open_intents() == []
    b.complete_intent(a_intent)  # not b's: nothing happens
    assert [i.id for i in a.open_intents()] == [a_intent]
    assert (a.version(), b.version()) == (2, 4)  # b: two VMs, a revision, a completion
    assert a.observed().applied_revision == "a" * 40


def test_assignments_carry_the_term_that_placed_them(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    leader, successor = open_store(stores, lease_dsn), open_store(stores, lease_dsn)
    leader.claim_term(Fence(4, renew_deadline=60))
    leader.assign("web-0", "host-a", "a" * 40)
    leader.assign("web-1", "host-b")
    successor.claim_term(Fence(5, renew_deadline=60))
    with pytest.raises(StaleTermError):
        leader.assign("web-0", "host-c")
    successor.assign("web-1", "host-c", "b" * 40)
    assert successor.assignments() == {
        "web-0": Assignment("host-a", "a" * 40, 4),
        "web-1": Assignment("host-c", "b" * 40, 5),
    }
    assert successor.placement_terms() == (5, 0)  # nothing confirmed by term 5 yet
    # The new leader confirms what it keeps, with its term, in one write.
    successor.confirm_assignments({"web-0": ("host-a", "a" * 40)})
    assert successor.assignments()["web-0"] == Assignment("host-a", "a" * 40, 5)
    assert leader.placement_terms() == (5, 5)
    successor.unassign("web-0")
    assert list(leader.assignments()) == ["web-1"]


def test_a_hosts_writes_are_fenced_by_its_registration_epoch(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    """The agent's handle writes VMs only while its epoch is the host's and not ended: the
    leader's ``end_epoch`` (fenced by its term) refuses the lost host's next write and its next
    heartbeat, and a new registration lifts the refusal for the new epoch only."""
    leader, agent = open_store(stores, lease_dsn, "host-l"), open_store(stores, lease_dsn)
    epoch = agent.register_host(facts("host-a"))
    agent.claim_epoch(Fence(epoch, renew_deadline=60))
    agent.put_vm(vm("web-0"))
    leader.claim_term(Fence(3, renew_deadline=60))
    (record,) = [h for h in leader.hosts() if h.name == "host-a"]
    assert not record.ended
    assert leader.end_epoch("host-a", epoch)
    assert not leader.end_epoch("host-a", epoch)  # once
    (record,) = leader.hosts()
    assert record.ended
    assert record.lost(grace=3600)  # ended is lost, however fresh its heartbeat
    with pytest.raises(StaleTermError, match="was ended by the leader"):
        agent.put_vm(vm("web-1"))
    assert not agent.heartbeat("host-a", epoch)
    assert leader.fleet_observed()["host-a"].vms.keys() == {"web-0"}
    # Unfenced, the host removes its own stale record; then it registers anew.
    agent.release_epoch()
    agent.remove_vm("web-0")
    again = agent.register_host(facts("host-a"))
    assert again == epoch + 1
    assert not leader.hosts()[0].ended
    agent.claim_epoch(Fence(epoch, renew_deadline=60))  # the old epoch's fence: refused
    with pytest.raises(StaleTermError, match=f"epoch {again} is on"):
        agent.put_vm(vm("web-1"))
    agent.claim_epoch(Fence(again, renew_deadline=60))
    agent.put_vm(vm("web-1"))
    assert agent.heartbeat("host-a", again)
    assert {h: set(f.vms) for h, f in leader.fleet_observed().items()} == {"host-a": {"web-1"}}
    # The leader's end_epoch is fenced by its term like every placement write.
    leader.fence = Fence(2, renew_deadline=60)
    with pytest.raises(StaleTermError):
        leader.end_epoch("host-a", again)


# -- the password -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://reconciler:hunter2-secret@127.0.0.1:1/fleet",
        "host=127.0.0.1 port=1 user=reconciler password=hunter2-secret dbname=fleet",
    ],
)
def test_the_password_never_shows_in_a_refusal(dsn: str, tmp_path: Path) -> None:
    with pytest.raises(StateError) as caught:
        open_state_store(StoreLocation(tmp_path, url=dsn))
    message = str(caught.value)
    assert "hunter2-secret" not in message
    assert "host=127.0.0.1 port=1 dbname=fleet user=reconciler" in message
    assert "\n" not in message
    assert "hunter2-secret" not in repr(StoreLocation(tmp_path, url=dsn))


def test_a_malformed_store_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--store must be 'sqlite' or a postgresql:// URL"):
        open_state_store(StoreLocation(tmp_path, url="mysql:/nope"))
    with pytest.raises(ConfigError, match="not a valid postgresql:// URL") as caught:
        open_state_store(StoreLocation(tmp_path, url="password='hunter2-secret"))
    assert "hunter2-secret" not in str(caught.value)


# -- end to end -------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.root
@pytest.mark.slow
def test_apply_status_and_the_daemon_on_postgresql(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lease_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = {"alpha": free_port(), "beta": free_port()}
    bridge, cidr = new_pool()
    head = fleet_document("pg-fleet", network_yaml(bridge, cidr))
    repo = echo_repo(tmp_path / "fleet", head + echo_workload("alpha", ports["alpha"]))
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    daemon: Daemon | None = None
    try:
        code, out = cli(capsys, "apply", *common, "--store", lease_dsn)
        assert code == 0, out
        # The store is PostgreSQL's: this host's rows there.
        rows = sql(lease_dsn, "SELECT host, name, state FROM vms")
        assert rows == [(socket.gethostname(), "alpha-0", "running")]
        # $RECONCILER_STORE selects it just as well.
        monkeypatch.setenv("RECONCILER_STORE", lease_dsn)
        code, out = cli(capsys, "status", "--state-dir", str(state), "--format", "json")
        assert code == 0, out
        status = json.loads(out)
        assert [(v["name"], v["healthy"]) for v in status["vms"]] == [("alpha-0", True)]
        monkeypatch.delenv("RECONCILER_STORE")

        # The daemon, with its lease in the same database, converges a new commit.
        repo.write(
            "fleet.yaml",
            head + echo_workload("alpha", ports["alpha"]) + echo_workload("beta", ports["beta"]),
        )
        repo.commit("beta")
        daemon = Daemon(
            repo.path,
            state,
            tmp_path,
            "pg",
            [
                "--store",
                lease_dsn,
                "--lease",
                lease_dsn,
                "--poll-interval",
                "2",
                "--poll-jitter",
                "0",
            ],
        )
        running_daemon = daemon
        eventually(
            lambda: healthy_names(running_daemon.status()) == {"alpha-0", "beta-0"},
            120,
            "the daemon converges on PostgreSQL",
        )
        address = {v["name"]: v["address"] for v in daemon.status()["vms"]}
        assert echo(ports["beta"], str(address["beta-0"])) == b"ping\n"
        code, out = cli(capsys, "status", *common[2:], "--store", lease_dsn, "--format", "json")
        assert code == 0, out
        names = {v["name"] for v in json.loads(out)["vms"]}
        assert names == {"alpha-0", "beta-0"}
        # Its writes were fenced by the lease row: the term it claimed is the lease's.
        (lease_term,) = sql(lease_dsn, "SELECT term FROM reconciler_leases")[0]
        assert sql(lease_dsn, "SELECT term FROM fleet_term") == [(lease_term,)]
        # The leader records the revision once the host reported its VMs healthy, which the
        # host's own status may show a moment before.
        eventually(
            lambda: (
                (lease_term,)
                in sql(lease_dsn, "SELECT term FROM revisions WHERE outcome = 'applied'")
            ),
            30,
            "the leader records the revision applied, with its term",
        )
        # The state directory's SQLite store (which holds the host's address leases) was never
        # the fleet's.
        with open_state_store(state) as embedded:
            assert embedded.observed().vms == {}
    finally:
        if daemon is not None:
            daemon.stop()
        time.sleep(0.2)
        remove_deployment(state, bridge)
