"""What a host's agent does for the network across hosts on each pass, with the kernel's side
(routes, nftables) recorded instead of applied: it routes every live peer's subnet via the
peer's underlay address and none of a lost one, gives its own VMs its own subnet, reloads the
firewall from every host's VMs when they change, and says a route conflict once. The real
packets are ``test_multihost_routing.py``'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest
from support.fakes import fleet, running, workload

from reconciler.daemon import agent as agent_module
from reconciler.daemon.agent import HostAgent
from reconciler.model import NetworkPool, ObservedFleet, RuntimeKind
from reconciler.state.hosts import Assignment, HostRecord, HostRegistration
from runtime.network.carving import HostPeer
from runtime.network.routes import RouteChanges

POOL = NetworkPool(cidr="10.97.0.0/24", bridge="rcbr-t")  # /28 per host
REVISION = "1" * 40
DESIRED = fleet(
    workload("web", replicas=2, runtime=RuntimeKind.PROCESS),
    workload("client", runtime=RuntimeKind.PROCESS, depends_on=["web"]),
    revision=REVISION,
    network=POOL,
)
VMS = running(DESIRED)


def host(name: str, slot: int, underlay: str, *, age: float = 0.5) -> HostRecord:
    return HostRecord(
        registration=HostRegistration(
            name=name, vcpus=4, memory_mib=4096, disk_mib=10_000, underlay_address=underlay
        ),
        epoch=1,
        cordoned=False,
        draining=False,
        registered_at=0.0,
        heartbeat_at=0.0,
        heartbeat_age=age,
        vms=0,
        subnet_slot=slot,
    )


def at(name: str, address: str) -> ObservedFleet:
    return replace(VMS, vms={name: replace(VMS.vms[name], address=address)})


@dataclass
class Store:
    """The agent's store: the registry, the assignments and every host's VMs."""

    records: list[HostRecord]
    per_host: dict[str, ObservedFleet]
    epoch_fence: Any = None

    def hosts(self) -> list[HostRecord]:
        return self.records

    def assignments(self) -> dict[str, Assignment]:
        return {
            vm: Assignment(host, REVISION, 1)
            for host, observed in self.per_host.items()
            for vm in observed.vms
        }

    def observed(self) -> ObservedFleet:
        return self.per_host["host-a"]

    def fleet_observed(self) -> dict[str, ObservedFleet]:
        return self.per_host


@dataclass
class Local:
    store: Store
    loaded: list[tuple[dict[str, list[str]], dict[str, list[str]]]] = field(default_factory=list)

    def sync_firewall(self, pool: NetworkPool, addresses: Any, depends_on: Any) -> None:
        assert pool == POOL
        self.loaded.append((dict(addresses), dict(depends_on)))


class Loader:
    def load(self, revision: str) -> Any:
        assert revision == REVISION
        return DESIRED


class Heartbeat:
    pass


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[list[HostPeer]]:
    """The peers each ``sync_host_routes`` was given (the table starts empty)."""
    calls: list[list[HostPeer]] = []

    def sync(peers: list[HostPeer], *, fleet_cidr: str) -> RouteChanges:
        assert fleet_cidr == POOL.cidr
        calls.append(list(peers))
        return RouteChanges(added=tuple(p.subnet for p in peers), conflicts=("10.97.0.16/28",))

    monkeypatch.setattr(agent_module, "sync_host_routes", sync)
    monkeypatch.setattr(agent_module, "host_routes", lambda cidr: {})
    return calls


def new_agent(store: Store) -> tuple[HostAgent, Local]:
    local = Local(store)
    agent = HostAgent(
        "host-a",
        local=cast(Any, local),
        store=cast(Any, store),
        loader=cast(Any, Loader()),
        heartbeat=cast(Any, Heartbeat()),
        cache_dir=cast(Any, None),
        grace=6.0,
    )
    return agent, local


def test_each_pass_routes_the_live_peers_and_reloads_the_firewall_on_change(
    routed: list[list[HostPeer]], caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(
        records=[
            host("host-a", 2, "192.0.2.11"),
            host("host-b", 1, "192.0.2.12"),
            host("host-c", 0, "192.0.2.13", age=60.0),  # lost: silent past the grace period
        ],
        per_host={"host-a": at("client-0", "10.97.0.34"), "host-b": at("web-0", "10.97.0.18")},
    )
    agent, local = new_agent(store)
    with caplog.at_level(logging.WARNING, logger="reconciler.daemon"):
        agent.sync_network()
        agent.sync_network()
    assert routed == [[HostPeer("host-b", "192.0.2.12", "10.97.0.16/28")]] * 2
    # Its own VMs and bridge take the subnet of its slot.
    assert cast(Any, local).subnet_for(POOL) == "10.97.0.32/28"
    # The rules hold both hosts' VMs, loaded once while nothing changed.
    assert local.loaded == [
        (
            {"client": ["10.97.0.34"], "web": ["10.97.0.18"]},
            {"client": ["web"], "web": []},
        )
    ]
    # A conflict is said once, not on every pass.
    assert [r.getMessage() for r in caplog.records] == [
        "host host-a does not route 10.97.0.16/28 to its peer(s): a route that is not "
        "reconciler's holds it; remove it to let the hosts' VMs reach each other"
    ]
    store.per_host["host-b"] = at("web-1", "10.97.0.19")  # web moved on host b
    agent.sync_network()
    assert local.loaded[-1][0] == {"client": ["10.97.0.34"], "web": ["10.97.0.19"]}
