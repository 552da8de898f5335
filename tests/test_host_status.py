"""The host dimension of the operator's view, against in-memory seams: per-host state, VMs,
allocation and heartbeat age (``execution.host_status``); the per-host metrics and their label
set; ``GET /api/hosts`` and the status page's hosts table (escaped) on a real
``OperatorServer``; and a SQLite-shaped store, which keeps its status as it was.

``reconciler status --store`` against a real PostgreSQL is in ``test_hosts_status_postgres``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from support.fakes import MemoryStateStore, fleet, running, workload

from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.metrics import DaemonMetrics, HostGauges
from reconciler.daemon.redaction import Redactor
from reconciler.daemon.status_page import render_page
from reconciler.daemon.view_impl import judge, read_fleet_hosts, refresh_host_metrics
from reconciler.execution.host_status import fleet_hosts, registry_of, vm_statuses
from reconciler.model import ObservedFleet, VMState
from reconciler.state.hosts import HostRecord, HostRegistration

GRACE = 30.0


def record(
    name: str,
    *,
    age: float = 1.0,
    vcpus: int = 8,
    memory_mib: int = 4096,
    assigned: int = 0,
    cordoned: bool = False,
    ended: bool = False,
    labels: dict[str, str] | None = None,
) -> HostRecord:
    return HostRecord(
        registration=HostRegistration(
            name=name, vcpus=vcpus, memory_mib=memory_mib, disk_mib=1000, labels=labels or {}
        ),
        epoch=3,
        cordoned=cordoned,
        draining=False,
        registered_at=1_700_000_000.0,
        heartbeat_at=1_700_000_000.0,
        heartbeat_age=age,
        vms=assigned,
        ended=ended,
    )


def vms(*names: str, vcpus: int = 2, memory_mib: int = 512, secret: str = "") -> ObservedFleet:
    """Observed VMs named ``names`` (workload ``web``), each given ``vcpus`` and memory."""
    env = {"TOKEN": secret} if secret else None
    observed = running(
        fleet(workload("web", replicas=10, vcpus=vcpus, memory_mib=memory_mib, env=env))
    )
    return replace(
        observed, vms={n: replace(observed.vms[f"web-{i}"], name=n) for i, n in enumerate(names)}
    )


class Registry(MemoryStateStore):
    """A store that keeps a host registry, as the PostgreSQL store does."""

    def __init__(self, records: list[HostRecord], per_host: dict[str, ObservedFleet]) -> None:
        super().__init__()
        self.records, self.per_host = records, per_host

    def hosts(self) -> list[HostRecord]:
        return self.records

    def fleet_observed(self) -> dict[str, ObservedFleet]:
        return self.per_host


@pytest.fixture
def registry() -> Registry:
    return Registry(
        [
            record("host-a", assigned=2, labels={"zone": "a"}),
            record("host-b", age=45.0, assigned=1),  # silent past the grace period: lost
            record("host-c", cordoned=True),
        ],
        {
            "host-a": vms("web-0", "web-1"),
            "host-b": vms("web-2"),
            "host-c": ObservedFleet(version=1, vms={}),
        },
    )


# -- the host dimension, pure ------------------------------------------------------------------


def test_each_host_has_its_state_vms_allocation_and_heartbeat_age(registry: Registry) -> None:
    hosts = fleet_hosts(registry, judge(GRACE)).hosts
    assert [(h["name"], h["state"], h["vms"], h["assigned"]) for h in hosts] == [
        ("host-a", "ready", 2, 2),
        ("host-b", "lost", 1, 1),
        ("host-c", "cordoned", 0, 0),
    ]
    a = hosts[0]
    assert (a["vcpus_allocated"], a["vcpus"]) == (4, 8)
    assert (a["memory_allocated_mib"], a["memory_mib"]) == (1024, 4096)
    assert a["heartbeat_age_seconds"] == 1.0
    assert a["labels"] == {"zone": "a"}
    # The judge is the caller's: a longer grace period keeps host-b a member.
    assert [h["state"] for h in fleet_hosts(registry, judge(60.0)).hosts][1] == "ready"


def test_a_stopped_vm_holds_no_allocation(registry: Registry) -> None:
    stopped = vms("web-0", "web-1")
    stopped = replace(
        stopped, vms={**stopped.vms, "web-1": replace(stopped.vms["web-1"], state=VMState.STOPPED)}
    )
    registry.per_host["host-a"] = stopped
    a = fleet_hosts(registry, judge(GRACE)).hosts[0]
    assert (a["vms"], a["vcpus_allocated"], a["memory_allocated_mib"]) == (2, 2, 512)


def test_vms_carry_their_host_and_a_lost_hosts_vms_are_left_out(registry: Registry) -> None:
    found = fleet_hosts(registry, judge(GRACE))
    assert [(host, vm.name) for host, vm in found.vms] == [("host-a", "web-0"), ("host-a", "web-1")]
    rows = vm_statuses(found, now=0.0)
    assert [(row["name"], row.get("host")) for row in rows] == [
        ("web-0", "host-a"),
        ("web-1", "host-a"),
    ]


def test_a_vm_two_live_hosts_report_is_shown_on_both(registry: Registry) -> None:
    # host-c woke up still running its stale copy of web-0: both copies run, both are shown.
    registry.per_host["host-c"] = vms("web-0")
    found = fleet_hosts(registry, judge(GRACE))
    assert [(host, vm.name) for host, vm in found.vms if vm.name == "web-0"] == [
        ("host-a", "web-0"),
        ("host-c", "web-0"),
    ]


def test_this_hosts_own_observation_replaces_its_row(registry: Registry) -> None:
    gone = ObservedFleet(version=9, vms={})
    found = fleet_hosts(registry, judge(GRACE), local=("host-a", gone))
    assert found.hosts[0]["vms"] == 0
    assert [vm.name for _, vm in found.vms] == []


def test_a_store_without_a_registry_has_no_host_dimension() -> None:
    store = MemoryStateStore()
    assert registry_of(store) is None
    assert read_fleet_hosts(store, GRACE, Redactor()) is None
    metrics = DaemonMetrics()
    refresh_host_metrics(metrics, store, GRACE, Redactor())
    assert "reconciler_host_up{" not in metrics.render()[0].decode()


def test_reading_the_hosts_teaches_the_redactor_every_hosts_secrets(registry: Registry) -> None:
    registry.per_host["host-a"] = vms("web-0", secret="hunter2-on-another-host")
    redactor = Redactor()
    read_fleet_hosts(registry, GRACE, redactor)
    assert "hunter2-on-another-host" not in redactor.text("leaked hunter2-on-another-host")


# -- metrics -----------------------------------------------------------------------------------


def test_host_metrics_per_host_and_a_host_that_left_is_dropped(registry: Registry) -> None:
    metrics = DaemonMetrics()
    refresh_host_metrics(metrics, registry, GRACE, Redactor())
    lines = set(metrics.render()[0].decode().splitlines())
    expected = [
        'reconciler_host_up{host="host-a"} 1.0',
        'reconciler_host_up{host="host-b"} 0.0',
        'reconciler_host_up{host="host-c"} 1.0',
        'reconciler_host_vms{host="host-a"} 2.0',
        'reconciler_host_heartbeat_age_seconds{host="host-b"} 45.0',
        'reconciler_host_allocated_vcpus{host="host-a"} 4.0',
        'reconciler_host_capacity_vcpus{host="host-a"} 8.0',
        'reconciler_host_allocated_memory_mib{host="host-a"} 1024.0',
        'reconciler_host_capacity_memory_mib{host="host-a"} 4096.0',
    ]
    assert [line for line in expected if line not in lines] == []
    registry.records = registry.records[:1]  # host-b and host-c left the registry
    refresh_host_metrics(metrics, registry, GRACE, Redactor())
    text = metrics.render()[0].decode()
    assert 'host="host-a"' in text
    assert 'host="host-b"' not in text
    assert 'host="host-c"' not in text


def test_set_hosts_takes_plain_values() -> None:
    metrics = DaemonMetrics()
    metrics.set_hosts([HostGauges("h", False, 0, 99.5, 0, 4, 0, 1024)])
    text = metrics.render()[0].decode()
    assert 'reconciler_host_up{host="h"} 0.0' in text
    assert 'reconciler_host_heartbeat_age_seconds{host="h"} 99.5' in text
    metrics.set_hosts([])
    assert 'host="h"' not in metrics.render()[0].decode()


# -- the JSON API and the page -----------------------------------------------------------------

HOSTILE = '<img src=x onerror="alert(1)">'


def _status(hosts: list[dict[str, Any]] | None) -> dict[str, Any]:
    vm = {
        "name": "web-0",
        "workload": "web",
        "state": "running",
        "healthy": True,
        "address": "10.0.0.2",
        "pid": 12,
        "artifact": "sha256:abc",
        "runtime": "process",
        "detail": "http 200",
        "uptime_seconds": 5.0,
        "restarts": 0,
        "console_tail": [],
    }
    status: dict[str, Any] = {
        "fleet": "demo",
        "vms": [vm],
        "leader": {"is_leader": True, "term": 3, "holder": "d0"},
        "daemon": {"id": "d0"},
        "suspended": {"fleet": False, "workloads": []},
    }
    if hosts is not None:
        vm["host"] = hosts[0]["name"] if hosts else "-"
        status["hosts"] = hosts
    return status


def _host(name: str, state: str = "ready", **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "epoch": 1,
        "vms": 1,
        "assigned": 1,
        "vcpus_allocated": 2,
        "vcpus": 8,
        "memory_allocated_mib": 512,
        "memory_mib": 4096,
        "heartbeat_age_seconds": 3.2,
        "labels": labels,
    }


class View:
    """An in-memory ``DaemonView``; ``answer`` is what ``hosts()`` returns."""

    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer = answer

    def status(self) -> dict[str, Any]:
        return _status(self.answer["hosts"] if self.answer is not None else None)

    def hosts(self) -> dict[str, Any] | None:
        return self.answer

    def events(self, limit: int) -> list[dict[str, Any]]:
        return []

    def ready(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.fixture(scope="module")
def server() -> Iterator[OperatorServer]:
    served = OperatorServer(
        View(None), DaemonMetrics(), listen="127.0.0.1:0", token=None, webhook_secret=None
    )
    served.start()
    yield served
    served.close()


def _get(server: OperatorServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def test_api_hosts_lists_the_hosts(server: OperatorServer) -> None:
    server.view = View({"grace_seconds": 30.0, "hosts": [_host("host-a"), _host("host-b", "lost")]})
    status, body = _get(server, "/api/hosts")
    assert status == 200
    answer = json.loads(body)
    assert answer["grace_seconds"] == 30.0
    assert [(h["name"], h["state"]) for h in answer["hosts"]] == [
        ("host-a", "ready"),
        ("host-b", "lost"),
    ]
    status, body = _get(server, "/api/status")
    assert [h["name"] for h in json.loads(body)["hosts"]] == ["host-a", "host-b"]


def test_api_hosts_on_a_store_without_a_registry_is_one_line(server: OperatorServer) -> None:
    server.view = View(None)
    status, body = _get(server, "/api/hosts")
    assert status == 404
    error = json.loads(body)["error"]
    assert "SQLite" in error
    assert "PostgreSQL" in error
    assert "\n" not in error


def test_the_page_shows_a_hosts_table_and_each_vms_host(server: OperatorServer) -> None:
    server.view = View(
        {"grace_seconds": 30.0, "hosts": [_host("host-a", zone="a"), _host("host-b", "lost")]}
    )
    status, body = _get(server, "/")
    html = body.decode()
    assert status == 200
    assert '<table id="hosts">' in html
    assert '<tr data-host="host-a" data-state="ready">' in html
    assert '<tr data-host="host-b" data-state="lost">' in html
    assert 'data-lost="1"' in html
    assert '<td class="num" data-field="vcpus">2 / 8</td>' in html
    assert '<td class="num" data-field="memory">512 / 4096 MiB</td>' in html
    assert "zone=a" in html
    assert 'data-vm="web-0" data-host="host-a"' in html


def test_host_names_and_labels_are_escaped_on_the_page() -> None:
    html = render_page(_status([_host(HOSTILE, rack=HOSTILE)]), [])
    assert HOSTILE not in html
    assert "<img" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_a_single_host_page_has_no_hosts_table() -> None:
    html = render_page(_status(None), [])
    assert 'id="hosts"' not in html
    assert "<th>Host</th>" not in html
    assert '<tr data-vm="web-0" data-workload="web"' in html
