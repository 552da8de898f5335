"""Per-host subnets carved from the fleet's network pool (multi-host mode): pure arithmetic.

    host registry: host -> subnet slot (the lowest free slot at its first registration,
                   kept for the host's life: ``PostgresStateStore.register_host``)
    Fleet spec.network (cidr, hostPrefixLength) + slot ──host_subnet──▶ the host's subnet:
        its bridge address and its VMs' addresses (``Network(subnet=...)``)
    every registered host ──host_peers──▶ HostPeer(name, underlay, subnet)
        ──▶ ``routes.sync_host_routes``: "subnet via underlay" for every other host

The registry records a slot number, not a subnet: a host registers before it has read any
revision, and the pool is the fleet repository's. The same (pool, slot) always gives the same
subnet, so every host computes every other host's subnet alike, with no coordination beyond
the registry. No I/O here; ``NetworkError`` says what does not fit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from reconciler.errors import NetworkError
from reconciler.model import NetworkPool

MAX_HOST_PREFIX = 30
"""A /30 holds the bridge's address and one VM; anything smaller holds no VM."""


def default_host_prefix(pool_prefix: int) -> int:
    """Half the pool's host bits number the hosts, half the VMs of a host (rounded in the
    VMs' favour): how many hosts a fleet will have and how many VMs each will run are both
    unknown when the pool is chosen, and a square split lets both grow alike. /16: 256 hosts
    of /24 (253 VMs each); /20: 64 of /26 (61); /24, the default pool: 16 of /28 (13)."""
    return min(MAX_HOST_PREFIX, pool_prefix + (32 - pool_prefix) // 2)


def _pool(pool: NetworkPool) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(pool.cidr)
    except ValueError as exc:
        raise NetworkError(f"invalid network pool {pool.cidr!r}: {exc}") from exc


def host_prefix(pool: NetworkPool) -> int:
    """The prefix length of one host's subnet: the fleet's ``hostPrefixLength`` or the
    default for the pool's size."""
    network = _pool(pool)
    prefix = pool.host_prefix_length
    if prefix is None:
        return default_host_prefix(network.prefixlen)
    if not network.prefixlen <= prefix <= MAX_HOST_PREFIX:
        raise NetworkError(
            f"spec.network.hostPrefixLength /{prefix} does not fit the pool {network}: use "
            f"/{network.prefixlen} to /{MAX_HOST_PREFIX}"
        )
    return prefix


def slot_count(pool: NetworkPool) -> int:
    """How many hosts the pool has room for."""
    return 1 << (host_prefix(pool) - _pool(pool).prefixlen)


def host_subnet(pool: NetworkPool, slot: int, host: str = "") -> ipaddress.IPv4Network:
    """The subnet of the host in ``slot`` (0 is the pool's first); a slot beyond the pool is
    a fleet with more hosts than the pool holds, said in one line."""
    network = _pool(pool)
    prefix = host_prefix(pool)
    slots = 1 << (prefix - network.prefixlen)
    if not 0 <= slot < slots:
        who = f"host {host} has" if host else "this host has"
        raise NetworkError(
            f"{who} subnet slot {slot}, but the fleet's network {network} has room for "
            f"{slots} hosts of /{prefix}: enlarge spec.network.cidr or raise "
            "spec.network.hostPrefixLength"
        )
    size = 1 << (32 - prefix)
    return ipaddress.IPv4Network((int(network.network_address) + slot * size, prefix))


def lowest_free_slot(taken: Iterable[int]) -> int:
    """The slot a newly registering host gets: the lowest not held by another host (the
    registry does this in SQL; this is the same rule for tests and fakes)."""
    held = set(taken)
    slot = 0
    while slot in held:
        slot += 1
    return slot


class SlottedHost(Protocol):
    """What ``host_peers`` reads of a registry record (``reconciler.state.hosts.HostRecord``)."""

    @property
    def name(self) -> str: ...

    @property
    def subnet_slot(self) -> int | None: ...

    @property
    def underlay_address(self) -> str | None: ...


@dataclass(frozen=True)
class HostPeer:
    """Another host as routing needs it: its VMs' subnet is reached via its underlay address."""

    name: str
    underlay: str
    subnet: str  # "10.88.0.16/28"


def host_peers(pool: NetworkPool, hosts: Iterable[SlottedHost], *, own: str) -> list[HostPeer]:
    """Every host but ``own`` that can be routed to, by name. A host without a slot or an
    underlay address (registered by an older daemon), or whose slot is beyond the pool, runs
    no VMs of this fleet (its own daemon refuses, ``host_subnet``), so it gets no route: one
    host too many must not stop the others from routing to each other."""
    peers = []
    for host in hosts:
        if host.name == own or host.subnet_slot is None or not host.underlay_address:
            continue
        try:
            subnet = host_subnet(pool, host.subnet_slot, host.name)
        except NetworkError:
            continue
        peers.append(HostPeer(host.name, host.underlay_address, str(subnet)))
    return sorted(peers, key=lambda peer: peer.name)


__all__ = [
    "MAX_HOST_PREFIX",
    "HostPeer",
    "SlottedHost",
    "default_host_prefix",
    "host_peers",
    "host_prefix",
    "host_subnet",
    "lowest_free_slot",
    "slot_count",
]
