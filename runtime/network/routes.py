"""Routes between hosts (multi-host mode, the host-gateway model), with pyroute2.

    registry ──carving.host_peers──▶ [HostPeer(name, underlay, subnet)]
             ──sync_host_routes──▶ "subnet via underlay" for every other host, in the main
                                   table, marked with ROUTE_PROTOCOL; IPv4 forwarding on

Each host's VMs sit on its own bridge, in its own subnet of the fleet's pool; a packet for
another host's subnet leaves through the host's underlay (the network the hosts share) to that
host, which forwards it onto its bridge. No overlay, no encapsulation: the hosts must reach
each other's underlay addresses directly (one L2 segment, or routers that let them through).

Ours are the routes carrying ``ROUTE_PROTOCOL`` whose destination lies inside the fleet's pool;
nothing else is ever changed or removed, so an operator's routes (``proto static``, ``boot``,
a routing daemon's) stay as they are, even one for a peer's subnet (reported as a conflict,
left in place). Every call makes the table match ``peers`` and is idempotent: a reconciler
resuming after a crash repeats it, and a peer that left loses its route on the next call.
pyroute2's ``NetlinkError`` becomes a one-line ``NetworkError``.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import NetworkError
from runtime.network.carving import HostPeer
from runtime.network.links import netlink

ROUTE_PROTOCOL = 114
"""``ip route ... proto 114`` marks reconciler's host routes (ASCII "r"). The kernel keeps the
number with the route and never interprets it; it is none of iproute2's registered protocols
(``/etc/iproute2/rt_protos``: kernel, boot, static, dhcp, bird, bgp, ospf...), so no routing
daemon or operator command makes routes that look like ours."""

_MAIN_TABLE = 254
_AF_INET = 2
_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass(frozen=True)
class RouteChanges:
    """What one ``sync_host_routes`` did: subnets routed anew or to a new peer address,
    subnets whose route was removed, and subnets left alone because a route that is not ours
    already holds them."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def _ipr(netns: str | None) -> AbstractContextManager[Any]:
    return netlink(netns, create=False)  # a host's namespace is never made here


def _main_routes(ipr: Any) -> list[tuple[str, str | None, int]]:
    """(destination "a.b.c.d/n", gateway, protocol) of the main table's IPv4 unicast routes."""
    found = []
    for route in ipr.get_routes(family=_AF_INET, table=_MAIN_TABLE):
        if route.get_attr("RTA_TABLE", route["table"]) != _MAIN_TABLE or route["type"] != 1:
            continue
        dst = route.get_attr("RTA_DST") or "0.0.0.0"
        gateway = route.get_attr("RTA_GATEWAY")
        found.append((f"{dst}/{route['dst_len']}", gateway, int(route["proto"])))
    return found


def desired_routes(peers: Sequence[HostPeer], fleet_cidr: str) -> dict[str, str]:
    """subnet -> the peer's underlay address; refuses a subnet outside the pool or claimed
    twice, which would route one host's VMs to another host."""
    pool = ipaddress.IPv4Network(fleet_cidr)
    wanted: dict[str, str] = {}
    for peer in peers:
        subnet = ipaddress.IPv4Network(peer.subnet)
        if not subnet.subnet_of(pool):
            raise NetworkError(f"host {peer.name}'s subnet {subnet} is not inside the pool {pool}")
        if str(subnet) in wanted:
            raise NetworkError(f"two hosts claim the subnet {subnet}; the registry is corrupt")
        try:
            ipaddress.IPv4Address(peer.underlay)
        except ValueError as exc:
            raise NetworkError(
                f"host {peer.name}'s underlay address {peer.underlay!r} is not an IPv4 address"
            ) from exc
        wanted[str(subnet)] = peer.underlay
    return wanted


def sync_host_routes(
    peers: Sequence[HostPeer], *, fleet_cidr: str, netns: str | None = None
) -> RouteChanges:
    """Make this host route every peer's subnet via the peer's underlay address, and remove
    the routes of ours toward subnets no peer holds any more (a peer that left, or moved to a
    new underlay address); turns IPv4 forwarding on, which a host gateway needs. ``peers``
    excludes this host (``carving.host_peers``). ``netns``: the named namespace the host is
    (tests); None for the calling process's own."""
    wanted = desired_routes(peers, fleet_cidr)
    pool = ipaddress.IPv4Network(fleet_cidr)
    ensure_forwarding(netns)
    added: list[str] = []
    removed: list[str] = []
    conflicts: list[str] = []
    with _ipr(netns) as ipr:
        current = _main_routes(ipr)
        ours = {
            dst: gateway
            for dst, gateway, proto in current
            if proto == ROUTE_PROTOCOL and ipaddress.IPv4Network(dst).subnet_of(pool)
        }
        theirs = {dst for dst, _, proto in current if proto != ROUTE_PROTOCOL}
        for dst in sorted(ours):
            if wanted.get(dst) != ours[dst]:
                ipr.route("del", dst=dst, gateway=ours[dst], proto=ROUTE_PROTOCOL)
                if dst not in wanted:
                    removed.append(dst)
        for dst, gateway in sorted(wanted.items()):
            if ours.get(dst) == gateway:
                continue
            if dst in theirs:
                conflicts.append(dst)  # the operator's, or a connected route: never ours
                continue
            ipr.route("add", dst=dst, gateway=gateway, proto=ROUTE_PROTOCOL)
            added.append(dst)
    return RouteChanges(tuple(added), tuple(removed), tuple(conflicts))


def host_routes(fleet_cidr: str, *, netns: str | None = None) -> dict[str, str]:
    """The routes of ours now in the table: subnet -> gateway (for status and tests)."""
    pool = ipaddress.IPv4Network(fleet_cidr)
    with _ipr(netns) as ipr:
        return {
            dst: str(gateway)
            for dst, gateway, proto in _main_routes(ipr)
            if proto == ROUTE_PROTOCOL and ipaddress.IPv4Network(dst).subnet_of(pool)
        }


def ensure_forwarding(netns: str | None = None) -> None:
    """IPv4 forwarding on in the host's namespace: without it the host drops what its VMs
    send to other hosts, and what other hosts send to its VMs."""
    if netns is None:
        try:
            if _FORWARDING.read_text().strip() != "1":
                _FORWARDING.write_text("1\n")
        except OSError as exc:
            raise NetworkError(f"cannot turn IPv4 forwarding on: {exc}") from exc
        return
    # /proc/sys/net belongs to the namespace of the process that reads it: ask from inside.
    argv = ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise NetworkError(f"cannot turn IPv4 forwarding on in {netns}: {reason}")


def underlay_address_towards(destination: str, *, netns: str | None = None) -> str:
    """The address this host uses to reach ``destination`` (an IPv4 address, such as the
    state database's): the kernel's source address for that route. Hosts that share a
    database usually share that network too, so this is the default underlay address."""
    try:
        ipaddress.IPv4Address(destination)
    except ValueError as exc:
        raise NetworkError(
            f"cannot find an underlay address towards {destination!r}: not an IPv4 address; "
            "give the host's address with --underlay-address"
        ) from exc
    with _ipr(netns) as ipr:
        routes = ipr.route("get", dst=destination)
    source = routes[0].get_attr("RTA_PREFSRC") if routes else None
    if not source or ipaddress.IPv4Address(source).is_loopback:
        raise NetworkError(
            f"no underlay address towards {destination} (it is this host); "
            "give the host's address with --underlay-address"
        )
    return str(source)


__all__ = [
    "ROUTE_PROTOCOL",
    "RouteChanges",
    "desired_routes",
    "ensure_forwarding",
    "host_routes",
    "sync_host_routes",
    "underlay_address_towards",
]
