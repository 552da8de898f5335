"""Networking across hosts with real packets (root): three "hosts" (network namespaces joined
by an underlay, ``support.multihost_net``), each with its own subnet of the fleet's pool on its
bridge. A VM-like namespace on host A reaches one on host C only through the routes
``sync_host_routes`` sets, the routes are reconciler's alone and follow the peers, and the
fleet's firewall keeps a workload that declared no dependency out across hosts too."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.multihost_net import MultiHostNet

from reconciler.model import NetworkPool
from runtime.network import Network
from runtime.network.carving import HostPeer, host_peers, host_subnet
from runtime.network.routes import (
    ROUTE_PROTOCOL,
    host_routes,
    sync_host_routes,
    underlay_address_towards,
)

pytestmark = [pytest.mark.root]

POOL = NetworkPool(cidr="10.97.0.0/24", bridge="rcbr-mh")  # hosts get /28s by default


@dataclass(frozen=True)
class Registered:
    """A registry record as ``host_peers`` reads it."""

    name: str
    subnet_slot: int | None
    underlay_address: str | None


@pytest.fixture
def net() -> Iterator[MultiHostNet]:
    with MultiHostNet() as built:
        yield built


def reaches(vm_netns: str, address: str) -> bool:
    ping = subprocess.run(
        ["ip", "netns", "exec", vm_netns, "ping", "-c1", "-W2", address],
        capture_output=True,
        check=False,
    )
    return ping.returncode == 0


def test_vms_reach_other_hosts_through_the_routes_and_isolation_holds_across_hosts(
    net: MultiHostNet, tmp_path: Path
) -> None:
    registry = [
        Registered(host.name, slot, host.underlay_address)
        for slot, host in enumerate(net.hosts.values())
    ]
    placed = {"a": ("web-0", "web"), "b": ("other-0", "other"), "c": ("db-0", "db")}
    networks = {
        name: Network(
            POOL,
            tmp_path / f"{name}.db",
            netns=host.netns,
            scope=host.scope,
            subnet=str(host_subnet(POOL, slot)),
        )
        for slot, (name, host) in enumerate(net.hosts.items())
    }
    try:
        ports = {
            workload: networks[host].attach(vm, workload, namespace=True)
            for host, (vm, workload) in placed.items()
        }
        address = {w: port.address.split("/")[0] for w, port in ports.items()}
        # Each host's VM has an address of its host's own subnet.
        assert ports["web"].address == "10.97.0.2/28"
        assert ports["other"].address == "10.97.0.18/28"
        assert (ports["db"].address, ports["db"].gateway) == ("10.97.0.34/28", "10.97.0.33")

        assert not reaches(ports["web"].tap, address["db"])  # no routes yet
        for name, host in net.hosts.items():
            peers = host_peers(POOL, registry, own=name)
            changes = sync_host_routes(peers, fleet_cidr=POOL.cidr, netns=host.netns)
            assert sorted(changes.added) == sorted(p.subnet for p in peers)
            assert len(changes.added) == 2
        assert reaches(ports["web"].tap, address["db"])  # a -> c, and back
        assert reaches(ports["other"].tap, address["db"])  # no firewall yet: open

        # The rules of every host know the whole fleet's VMs, wherever they run.
        fleet = {workload: [a] for workload, a in address.items()}
        for network in networks.values():
            network.sync_firewall(fleet, {"web": ["db"]})
        assert reaches(ports["web"].tap, address["db"])  # declared: across hosts
        assert not reaches(ports["other"].tap, address["db"])  # not declared
        assert not reaches(ports["db"].tap, address["other"])
        assert not reaches(ports["other"].tap, address["web"])
        # The underlay itself is not the fleet's: hosts still reach each other.
        assert net.run_in(net.hosts["b"].netns, "ping", "-c1", "-W2",
                          net.hosts["c"].underlay_address).returncode == 0  # fmt: skip
    finally:
        for host, (vm, _) in placed.items():
            networks[host].detach(vm)
            networks[host].close()


def test_routes_are_ours_alone_idempotent_and_follow_the_peers(net: MultiHostNet) -> None:
    a, b, c = net.hosts["a"], net.hosts["b"], net.hosts["c"]

    def table() -> str:
        return net.run_in(a.netns, "ip", "-4", "route", "show").stdout

    # The operator's own route inside the pool, and one holding what will be a peer's subnet.
    for subnet in ("10.97.0.128/28", "10.97.0.64/28"):
        shown = net.run_in(a.netns, "ip", "route", "add", subnet, "via", b.underlay_address)
        assert shown.returncode == 0, shown.stderr
    peers = [
        HostPeer("b", b.underlay_address, "10.97.0.16/28"),
        HostPeer("c", c.underlay_address, "10.97.0.32/28"),
    ]
    first = sync_host_routes(peers, fleet_cidr=POOL.cidr, netns=a.netns)
    assert first.added == ("10.97.0.16/28", "10.97.0.32/28")
    assert host_routes(POOL.cidr, netns=a.netns) == {
        "10.97.0.16/28": b.underlay_address,
        "10.97.0.32/28": c.underlay_address,
    }
    assert f"10.97.0.32/28 via {c.underlay_address} dev ul0 proto {ROUTE_PROTOCOL}" in table()
    sysctl = net.run_in(a.netns, "sysctl", "-n", "net.ipv4.ip_forward")
    assert sysctl.stdout.strip() == "1"  # a host gateway forwards

    assert not sync_host_routes(peers, fleet_cidr=POOL.cidr, netns=a.netns).changed

    # c left the fleet; b came back on another underlay address.
    moved = [HostPeer("b", c.underlay_address, "10.97.0.16/28")]
    changes = sync_host_routes(moved, fleet_cidr=POOL.cidr, netns=a.netns)
    assert (changes.added, changes.removed) == (("10.97.0.16/28",), ("10.97.0.32/28",))
    assert host_routes(POOL.cidr, netns=a.netns) == {"10.97.0.16/28": c.underlay_address}

    # A peer whose subnet the operator already routes: reported, the operator's route kept.
    clash = [*moved, HostPeer("d", c.underlay_address, "10.97.0.64/28")]
    changes = sync_host_routes(clash, fleet_cidr=POOL.cidr, netns=a.netns)
    assert changes.conflicts == ("10.97.0.64/28",)
    assert f"10.97.0.64/28 via {b.underlay_address}" in table()
    assert f"10.97.0.128/28 via {b.underlay_address}" in table()  # never touched

    assert not sync_host_routes([], fleet_cidr=POOL.cidr, netns=a.netns).conflicts
    assert host_routes(POOL.cidr, netns=a.netns) == {}
    assert "10.97.0.128/28" in table()
    assert "10.97.0.64/28" in table()


def test_the_underlay_address_is_the_source_towards_the_database(net: MultiHostNet) -> None:
    host = net.hosts["b"]
    assert underlay_address_towards(net.gateway, netns=host.netns) == host.underlay_address
