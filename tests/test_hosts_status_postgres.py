"""``reconciler status --store postgresql://...``: the hosts section (state, VMs, allocation,
heartbeat age) and each VM's host, as table and JSON, against a real PostgreSQL store with
hosts registered and VMs reported as the hosts' daemons do; the same state directory on
SQLite, whose status has no host dimension; and two real daemons whose ``/api/status``,
``/api/hosts`` and ``/metrics`` show both hosts.

Every test gets a fresh database (the ``lease_dsn`` fixture) on the server CI starts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from support.daemons import BRIDGE, Daemon, fleet_repo
from support.fakes import fleet, running, workload
from support.process_fleet import remove_deployment
from support.waiting import eventually

from reconciler.cli import main
from reconciler.model import RuntimeKind
from reconciler.state.hosts import HostRegistration
from reconciler.state.postgres import PostgresStateStore

pytestmark = [pytest.mark.postgres]


def _register(dsn: str, name: str, vcpus: int, memory_mib: int) -> PostgresStateStore:
    store = PostgresStateStore(dsn, host=name)
    store.register_host(
        HostRegistration(
            name=name,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=10_000,
            labels={"zone": name[-1]},
            runtimes=frozenset({RuntimeKind.PROCESS}),
        )
    )
    return store


@pytest.fixture
def hosts(lease_dsn: str) -> Iterator[str]:
    """host-a runs web-0 and web-1 (2 vCPUs, 512 MiB each), host-b runs web-2 and went silent
    50 s ago by the database clock, host-c runs nothing and is cordoned."""
    observed = running(fleet(workload("web", replicas=3, vcpus=2, memory_mib=512)))
    stores = [
        _register(lease_dsn, "host-a", 8, 4096),
        _register(lease_dsn, "host-b", 4, 2048),
        _register(lease_dsn, "host-c", 4, 2048),
    ]
    a, b, c = stores
    try:
        for name in ("web-0", "web-1"):
            a.put_vm(replace(observed.vms[name], address=f"10.0.1.{name[-1]}"))
        b.put_vm(observed.vms["web-2"])
        c.set_host_flag("host-c", cordoned=True)
        with psycopg.connect(lease_dsn, autocommit=True) as conn:
            conn.execute("UPDATE hosts SET heartbeat_at = heartbeat_at - 50 WHERE name = 'host-b'")
        yield lease_dsn
    finally:
        for store in stores:
            store.close()


def _status(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> str:
    assert main(["status", "--state-dir", str(state), *argv]) == 0
    return capsys.readouterr().out


def test_status_json_has_the_hosts_and_each_vms_host(
    hosts: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = json.loads(_status(capsys, tmp_path, "--store", hosts, "--format", "json"))
    by_name = {h["name"]: h for h in shown["hosts"]}
    assert [(h["name"], h["state"], h["vms"]) for h in shown["hosts"]] == [
        ("host-a", "ready", 2),
        ("host-b", "lost", 1),
        ("host-c", "cordoned", 0),
    ]
    a = by_name["host-a"]
    assert (a["vcpus_allocated"], a["vcpus"], a["memory_allocated_mib"], a["memory_mib"]) == (
        4,
        8,
        1024,
        4096,
    )
    assert a["heartbeat_age_seconds"] < 5
    assert 50 <= by_name["host-b"]["heartbeat_age_seconds"] < 60
    assert a["labels"] == {"zone": "a"}
    # The lost host's VM is being placed elsewhere: what runs is host-a's.
    assert [(vm["name"], vm["host"], vm["address"]) for vm in shown["vms"]] == [
        ("web-0", "host-a", "10.0.1.0"),
        ("web-1", "host-a", "10.0.1.1"),
    ]
    # A longer grace period keeps host-b a member, and its VM shows again.
    longer = json.loads(
        _status(
            capsys,
            tmp_path,
            "--store",
            hosts,
            "--format",
            "json",
            "--host-grace-seconds",
            "120",
        )
    )
    assert [h["state"] for h in longer["hosts"]] == ["ready", "ready", "cordoned"]
    assert [(vm["name"], vm["host"]) for vm in longer["vms"]][-1] == ("web-2", "host-b")


def test_status_table_has_a_hosts_section_and_a_host_column(
    hosts: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _status(capsys, tmp_path, "--store", hosts)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("HOST "))
    assert lines[header].split() == ["HOST", "STATE", "VMS", "VCPUS", "MEMORY", "HEARTBEAT"]
    assert lines[header + 1].split()[:5] == ["host-a", "ready", "2", "4/8", "1024/4096Mi"]
    assert lines[header + 2].split()[:3] == ["host-b", "lost", "1"]
    assert lines[header + 2].endswith(" ago")
    assert lines[header + 3].split()[:3] == ["host-c", "cordoned", "0"]
    vm_header = next(line for line in lines if line.startswith("NAME "))
    assert vm_header.split()[:3] == ["NAME", "HOST", "STATE"]
    web0 = next(line for line in lines if line.startswith("web-0 "))
    assert web0.split()[:2] == ["web-0", "host-a"]


def test_a_bad_grace_period_is_one_line(
    hosts: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--state-dir", str(tmp_path), "--store", hosts,
                 "--host-grace-seconds", "1"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "--host-grace-seconds must be above the heartbeat interval" in err
    assert "Traceback" not in err


def test_the_sqlite_store_has_no_host_dimension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--state-dir", str(tmp_path), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "hosts" not in shown
    assert all("host" not in vm for vm in shown["vms"])
    table = _status(capsys, tmp_path)
    assert "HOST" not in table


def test_daemons_show_their_hosts_in_the_api_and_the_metrics(
    tmp_path: Path, lease_dsn: str
) -> None:
    repo = fleet_repo(tmp_path / "fleet", {})  # no VM: the host dimension is what is tested
    states = {name: tmp_path / f"state-{name}" for name in ("h1", "h2")}
    shared = ["--store", lease_dsn, "--lease", lease_dsn]
    daemons = [
        Daemon(repo.path, states[name], tmp_path, name, [*shared, "--host", name])
        for name in ("h1", "h2")
    ]
    try:
        leader = eventually(
            lambda: next((d for d in daemons if d.is_leader()), None), 60, "a daemon leads"
        )
        listed = eventually(
            lambda: len(leader.get("/api/hosts")["hosts"]) == 2 and leader.get("/api/hosts"),
            30,
            "both hosts registered",
        )
        assert [(h["name"], h["state"], h["vms"]) for h in listed["hosts"]] == [
            ("h1", "ready", 0),
            ("h2", "ready", 0),
        ]
        assert listed["hosts"][0]["vcpus"] >= 1
        status = leader.status()
        assert [h["name"] for h in status["hosts"]] == ["h1", "h2"]
        assert status["vms"] == []
        for daemon in daemons:  # read at each scrape: a follower shows the hosts too
            for name in ("h1", "h2"):
                assert daemon.metric("reconciler_host_up", f'host="{name}"') == 1.0, name
        page = leader.get("/")
        assert '<tr data-host="h1" data-state="ready">' in page
    finally:
        for daemon in daemons:
            daemon.stop()
        for state in states.values():
            remove_deployment(state, BRIDGE)
