"""The host registry of the PostgreSQL store, the daemon's registration and heartbeat, and
``reconciler hosts``: epochs that grow, heartbeat ages by the database clock, an ended epoch
reported, the operator's cordon/uncordon/drain, refusals in one line, and a real daemon that
shows up, then turns lost once killed.

Every test gets a fresh database (the ``lease_dsn`` fixture) on the server CI starts."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.daemons import BRIDGE, Daemon, fleet_repo
from support.process_fleet import remove_deployment
from support.waiting import eventually

from reconciler.cli import main
from reconciler.daemon.heartbeat import HostHeartbeat
from reconciler.errors import ConfigError
from reconciler.fleet_hosts import placement_hosts
from reconciler.leadership.fence import Fence
from reconciler.model import RuntimeKind
from reconciler.state import StoreLocation
from reconciler.state.hosts import HostRegistration
from reconciler.state.location import open_host_registry
from reconciler.state.postgres import PostgresStateStore
from runtime.capacity import disk_mib, memory_mib, probe_machine

pytestmark = [pytest.mark.postgres]


def facts(name: str = "host-a", **labels: str) -> HostRegistration:
    return HostRegistration(
        name=name,
        vcpus=8,
        memory_mib=16_384,
        disk_mib=100_000,
        labels=labels,
        runtimes=frozenset({RuntimeKind.PROCESS, RuntimeKind.QEMU}),
        kvm=False,
    )


@pytest.fixture
def store(lease_dsn: str) -> Iterator[PostgresStateStore]:
    opened = PostgresStateStore(lease_dsn, host="host-a")
    yield opened
    opened.close()


def sql(dsn: str, statement: str, *params: object) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the registry in the store ----------------------------------------------------------------


def test_each_registration_of_a_host_has_a_newer_epoch(store: PostgresStateStore) -> None:
    assert store.register_host(facts(zone="a")) == 1
    assert store.register_host(facts(zone="b")) == 2
    assert store.register_host(facts("host-b")) == 1
    (a, b) = store.hosts()
    assert (a.name, a.epoch, dict(a.registration.labels)) == ("host-a", 2, {"zone": "b"})
    assert a.registration == facts(zone="b")  # every fact round-trips
    assert (b.name, b.epoch) == ("host-b", 1)
    assert [e.kind for e in store.events()] == ["host-registered"] * 3


def test_a_heartbeat_of_an_ended_epoch_is_refused(store: PostgresStateStore) -> None:
    first = store.register_host(facts())
    assert store.heartbeat("host-a", first)
    second = store.register_host(facts())  # the daemon restarted (or another took the name)
    assert not store.heartbeat("host-a", first)  # the old registration learns it ended
    assert store.heartbeat("host-a", second)
    assert not store.heartbeat("nobody", 1)


def test_heartbeat_age_is_measured_by_the_database_clock(
    store: PostgresStateStore, lease_dsn: str
) -> None:
    epoch = store.register_host(facts())
    assert store.hosts()[0].heartbeat_age < 1.0
    # The last heartbeat 50 s ago, by the database's clock: whatever this machine's says.
    sql(lease_dsn, "UPDATE hosts SET heartbeat_at = heartbeat_at - 50")
    (record,) = store.hosts()
    assert 50.0 <= record.heartbeat_age < 52.0
    assert record.lost()
    assert not record.lost(grace=60)
    assert [h.lost for h in placement_hosts(store.hosts())] == [True]  # default grace 30 s
    assert store.heartbeat("host-a", epoch)
    assert store.hosts()[0].heartbeat_age < 1.0
    assert [h.state for h in placement_hosts(store.hosts())] == ["ready"]


def test_flags_survive_a_new_registration_and_an_unknown_host_is_one_line(
    store: PostgresStateStore,
) -> None:
    store.register_host(facts())
    store.set_host_flag("host-a", cordoned=True)
    store.register_host(facts())  # a restart does not uncordon
    (record,) = store.hosts()
    assert (record.cordoned, record.draining, record.epoch) == (True, False, 2)
    store.set_host_flag("host-a", draining=True)
    assert [h.state for h in placement_hosts(store.hosts())] == ["draining"]
    with pytest.raises(ConfigError, match=r"no host 'ghost' in the registry"):
        store.set_host_flag("ghost", cordoned=True)


def test_hosts_count_the_vms_assigned_to_them(store: PostgresStateStore) -> None:
    store.register_host(facts("host-a"))
    store.register_host(facts("host-b"))
    store.claim_term(Fence(1, renew_deadline=60))  # placement is the leader's, fenced
    for vm, host in (("web-0", "host-a"), ("web-1", "host-b"), ("web-2", "host-a")):
        store.assign(vm, host)
    assert [(h.name, h.vms) for h in store.hosts()] == [("host-a", 2), ("host-b", 1)]


def test_two_handles_register_as_different_hosts(lease_dsn: str) -> None:
    location = StoreLocation(Path("/nonexistent"), url=lease_dsn)
    with (
        open_host_registry(location) as a,
        open_host_registry(location) as b,
    ):
        epoch_a = a.register_host(facts("alpha", zone="a"))
        epoch_b = b.register_host(facts("beta", zone="b"))
        assert a.heartbeat("alpha", epoch_a)
        assert b.heartbeat("beta", epoch_b)
        assert [(h.name, h.registration.labels["zone"]) for h in b.hosts()] == [
            ("alpha", "a"),
            ("beta", "b"),
        ]


def test_the_sqlite_store_has_no_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pass --store postgresql://"):
        open_host_registry(StoreLocation(tmp_path))


def test_a_heartbeat_whose_epoch_ended_registers_anew(
    store: PostgresStateStore, lease_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = PostgresStateStore(lease_dsn, host="host-a")
    beat = HostHeartbeat(lambda: registry, lambda: facts(zone="a"), interval=60)
    try:
        beat.beat()
        assert beat.epoch == 1
        beat.beat()  # a heartbeat, not a registration
        assert beat.epoch == 1
        store.register_host(facts())  # another process took the name: epoch 2
        beat.beat()
        assert beat.epoch == 3
        assert "registration epoch 1 ended" in caplog.text
        assert [(h.epoch, dict(h.registration.labels)) for h in store.hosts()] == [
            (3, {"zone": "a"})
        ]
    finally:
        beat.stop()


def test_a_heartbeat_held_by_an_agent_waits_for_its_stale_vms_to_stop(
    store: PostgresStateStore, lease_dsn: str
) -> None:
    """With a host agent attached, an epoch the leader ended is handed to the agent (which
    stops the stale VMs first) and the host registers anew only when the agent says so."""
    registry = PostgresStateStore(lease_dsn, host="host-a")
    beat = HostHeartbeat(lambda: registry, facts, interval=60)
    told: list[str] = []
    beat.hold_ended = True
    beat.on_ended = lambda epoch: told.append(f"ended {epoch}")
    beat.on_alive = lambda epoch, sent_at: told.append(f"alive {epoch}")
    try:
        beat.beat()
        store.claim_term(Fence(1, renew_deadline=60))
        assert store.end_epoch("host-a", 1)
        beat.beat()
        beat.beat()  # still held: no new registration behind the agent's back
        assert (beat.epoch, beat.ended_epoch) == (1, 1)
        assert [h.epoch for h in store.hosts()] == [1]
        beat.register_again()
        assert (beat.epoch, beat.ended_epoch) == (2, None)
        assert told == ["alive 1", "ended 1", "alive 2"]
        assert not store.hosts()[0].ended
    finally:
        beat.stop()


# -- reconciler hosts -------------------------------------------------------------------------


def test_hosts_lists_cordons_and_drains(
    store: PostgresStateStore, lease_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "hosts", "--store", lease_dsn)
    assert (code, out.strip()) == (
        0,
        "no host registered: start `reconciler daemon --store postgresql://... --host NAME`",
    )
    store.register_host(facts("alpha", zone="a"))
    store.register_host(facts("beta", zone="b"))
    store.claim_term(Fence(1, renew_deadline=60))
    store.assign("web-0", "beta")
    sql(lease_dsn, "UPDATE hosts SET heartbeat_at = heartbeat_at - 100 WHERE name = 'beta'")

    code, out, _ = cli(capsys, "hosts", "--store", lease_dsn)
    assert code == 0
    header, alpha, beta = out.splitlines()
    assert header.split() == [
        "NAME", "STATE", "EPOCH", "VCPUS", "MEMORY", "DISK", "RUNTIMES", "LABELS", "HEARTBEAT",
        "VMS",
    ]  # fmt: skip
    assert alpha.split() == [
        "alpha", "ready", "1", "8", "16384Mi", "100000Mi", "process,qemu", "zone=a", "0m00s",
        "ago", "0",
    ]  # fmt: skip
    assert beta.split()[:2] == ["beta", "lost"]
    assert beta.split()[-3:] == ["1m40s", "ago", "1"]

    code, out, err = cli(capsys, "hosts", "cordon", "alpha", "--store", lease_dsn)
    assert (code, out.strip(), err) == (
        0,
        "alpha cordoned: it takes no new VM; the VMs it runs stay",
        "",
    )
    code, out, err = cli(capsys, "hosts", "drain", "beta", "--store", lease_dsn)
    assert (code, err) == (0, "")
    assert out.strip() == (
        "beta marked draining: it takes no new VM, and the leader moves its VMs to other "
        "hosts, wave by wave as each workload's rollout policy allows"
    )
    # A longer grace: beta is no longer lost, and its draining shows.
    code, out, _ = cli(
        capsys, "hosts", "--store", lease_dsn, "--format", "json", "--host-grace-seconds", "600"
    )
    assert code == 0
    listed = json.loads(out)
    assert listed["grace_seconds"] == 600
    assert [(h["name"], h["state"], h["cordoned"], h["draining"]) for h in listed["hosts"]] == [
        ("alpha", "cordoned", True, False),
        ("beta", "draining", False, True),
    ]
    first = listed["hosts"][0]
    assert (first["labels"], first["runtimes"], first["kvm"], first["vms"]) == (
        {"zone": "a"},
        ["process", "qemu"],
        False,
        0,
    )
    assert 100 <= listed["hosts"][1]["heartbeat_age_seconds"] < 102

    code, out, _ = cli(capsys, "hosts", "uncordon", "beta", "--store", lease_dsn)
    assert (code, out.strip()) == (0, "beta uncordoned: it takes VMs again")
    states = {h.name: (h.cordoned, h.draining) for h in store.hosts()}
    assert states == {"alpha": (True, False), "beta": (False, False)}
    kinds = [(e.kind, e.subject, e.message) for e in store.events(3)]
    assert kinds[0] == ("host-flags", "beta", "cordoned=false, draining=false by the operator")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hosts", "cordon", "ghost"], "error: no host 'ghost' in the registry at "),
        (["hosts", "drain"], "error: hosts drain needs the host's NAME"),
        (["hosts", "--host-grace-seconds", "1"], "error: --host-grace-seconds must be above"),
    ],
)
def test_hosts_refusals_are_one_line(
    store: PostgresStateStore,
    lease_dsn: str,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code, out, err = cli(capsys, *argv, "--store", lease_dsn)
    assert code == 1
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(message)


@pytest.mark.parametrize(
    "argv",
    [["hosts"], ["hosts", "cordon", "h1"], ["hosts", "uncordon", "h1"], ["hosts", "drain", "h1"]],
)
def test_hosts_on_the_sqlite_store_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    monkeypatch.delenv("RECONCILER_STORE", raising=False)
    code, out, err = cli(capsys, *argv, "--state-dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: hosts are registered in a shared PostgreSQL store: pass --store "
        "postgresql://... (or set $RECONCILER_STORE); the SQLite store is one host"
    ]


def test_the_daemon_refuses_host_options_on_the_sqlite_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECONCILER_STORE", raising=False)
    argv = ["daemon", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    code, _, err = cli(capsys, *argv, "--label", "zone=a")
    assert code == 1
    assert err.startswith("error: --host and --label register this host in the fleet's shared")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "zone"], "error: --label must be KEY=VALUE, not 'zone'"),
        (["--label", "zone=a b"], "error: --label: label value 'a b' of 'zone'"),
        (["--label=-x=a"], "error: --label: label key '-x'"),
        (["--label", "a=1", "--label", "a=2"], "error: --label a is given twice"),
        (["--host", "bad/name"], "error: --host must be a host name"),
    ],
)
def test_the_daemon_checks_its_host_options(
    tmp_path: Path,
    lease_dsn: str,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["daemon", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    code, _, err = cli(capsys, *argv, "--store", lease_dsn, *extra)
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith(message)


# -- a real daemon ----------------------------------------------------------------------------


def test_daemons_register_heartbeat_and_a_killed_one_turns_lost(
    tmp_path: Path, lease_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two daemons on one store and one PostgreSQL lease: the leader and the follower both
    register and heartbeat; the killed one ages past the grace period and turns lost, the other
    stays ready; restarted, it registers with a newer epoch."""
    repo = fleet_repo(tmp_path / "fleet", {})  # no VM: the registry is what is tested
    states = {name: tmp_path / f"state-{name}" for name in ("h1", "h2")}
    shared = ["--store", lease_dsn, "--lease", lease_dsn]
    started: list[Daemon] = []

    def start(name: str, *extra: str, log_name: str | None = None) -> Daemon:
        argv = [*shared, "--host", name, *extra]
        started.append(Daemon(repo.path, states[name], tmp_path, log_name or name, argv))
        return started[-1]

    grace = 4.0

    def listed() -> dict[str, dict[str, Any]]:
        code, out, err = cli(
            capsys, "hosts", "--store", lease_dsn, "--format", "json",
            "--host-grace-seconds", str(grace),
        )  # fmt: skip
        assert code == 0, err
        return {h["name"]: h for h in json.loads(out)["hosts"]}

    try:
        h1 = start("h1", "--label", "zone=a", "--label", "disk=ssd")
        start("h2", "--label", "zone=b")
        hosts = eventually(lambda: len(listed()) == 2 and listed(), 30, "both daemons register")
        assert {name: h["labels"] for name, h in hosts.items()} == {
            "h1": {"disk": "ssd", "zone": "a"},
            "h2": {"zone": "b"},
        }
        for host in hosts.values():
            assert (host["state"], host["epoch"]) == ("ready", 1)
            assert "process" in host["runtimes"]  # bubblewrap is a prerequisite of the project
            assert host["vcpus"] >= 1
            assert host["memory_mib"] > 0
            assert host["disk_mib"] > 0
        # A few seconds on, both are fresh: the follower heartbeats as the leader does.
        time.sleep(5)
        assert sorted(d.is_leader() for d in started) == [False, True]
        fresh = listed()
        for name, host in fresh.items():
            assert host["heartbeat_age_seconds"] < 3.5, name
            assert host["heartbeat_at"] > hosts[name]["heartbeat_at"], name
        assert {h["state"] for h in fresh.values()} == {"ready"}

        h1.signal(signal.SIGKILL)
        h1.process.wait(timeout=10)
        time.sleep(2)
        assert listed()["h1"]["heartbeat_age_seconds"] >= 2
        lost = eventually(
            lambda: listed()["h1"]["state"] == "lost" and listed(),
            15,
            "the killed host turns lost after the grace period",
        )
        assert lost["h1"]["heartbeat_age_seconds"] > grace
        assert (lost["h2"]["state"], lost["h2"]["heartbeat_age_seconds"] < 3.5) == ("ready", True)

        # Restarted, it registers anew: a newer epoch, ready again, with the labels it has now.
        start("h1", log_name="h1-again")
        back = eventually(
            lambda: listed()["h1"]["epoch"] == 2 and listed()["h1"],
            30,
            "the restarted daemon registers anew",
        )
        assert (back["state"], back["labels"]) == ("ready", {})
    finally:
        for daemon in started:
            daemon.stop()
        for state in states.values():
            remove_deployment(state, BRIDGE)


def test_the_machine_probe_reads_meminfo_and_the_state_directorys_file_system(
    tmp_path: Path,
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    assert memory_mib(meminfo) == 16_000
    meminfo.write_text("garbage\n")
    assert memory_mib(meminfo) == 0  # placement then puts nothing here
    # A state directory the daemon has not made yet: its nearest existing ancestor's space.
    assert disk_mib(tmp_path / "not" / "yet") == disk_mib(tmp_path) > 0
    machine = probe_machine(tmp_path)
    assert machine.vcpus >= 1
    assert machine.kvm is False  # no canary verdict in this state directory
