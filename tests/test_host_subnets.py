"""Per-host subnets of the fleet's pool: the carving (pure: defaults by pool size, determinism,
a fleet with more hosts than slots refused in one line, the peers a host routes to), the
Fleet's ``hostPrefixLength`` setting, and the slots the PostgreSQL registry hands out (the
lowest free one at first registration, kept when a host registers again)."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from reconciler.errors import ConfigError, ManifestError, NetworkError
from reconciler.manifests import load_fleet
from reconciler.model import NetworkPool, RuntimeKind
from reconciler.state.hosts import HostRegistration
from reconciler.state.postgres import PostgresStateStore
from runtime.network import Network
from runtime.network.carving import (
    HostPeer,
    host_peers,
    host_prefix,
    host_subnet,
    lowest_free_slot,
    slot_count,
)
from runtime.network.routes import desired_routes


@pytest.mark.parametrize(
    ("cidr", "prefix", "hosts", "vms_per_host"),
    [
        ("10.88.0.0/16", 24, 256, 253),
        ("10.88.0.0/20", 26, 64, 61),
        ("10.88.0.0/24", 28, 16, 13),  # the default pool
        ("10.88.0.0/29", 30, 2, 1),
    ],
)
def test_default_split_gives_hosts_and_vms_alike(
    cidr: str, prefix: int, hosts: int, vms_per_host: int
) -> None:
    pool = NetworkPool(cidr=cidr)
    assert host_prefix(pool) == prefix
    assert slot_count(pool) == hosts
    last = host_subnet(pool, hosts - 1)
    assert last.num_addresses - 3 == vms_per_host  # less network, gateway, broadcast
    assert last.broadcast_address == ipaddress.IPv4Network(cidr).broadcast_address  # no waste


def test_subnets_are_deterministic_disjoint_and_inside_the_pool() -> None:
    pool = NetworkPool(cidr="10.88.0.0/24", host_prefix_length=26)
    subnets = [str(host_subnet(pool, slot)) for slot in range(4)]
    assert subnets == ["10.88.0.0/26", "10.88.0.64/26", "10.88.0.128/26", "10.88.0.192/26"]
    assert [str(host_subnet(pool, slot)) for slot in range(4)] == subnets  # same inputs


def test_more_hosts_than_slots_is_one_line() -> None:
    pool = NetworkPool(cidr="10.88.0.0/24", host_prefix_length=26)
    with pytest.raises(NetworkError) as refused:
        host_subnet(pool, 4, "host-e")
    message = str(refused.value)
    assert "\n" not in message
    assert "host host-e has subnet slot 4" in message
    assert "room for 4 hosts of /26" in message
    assert "spec.network.cidr" in message
    with pytest.raises(NetworkError, match=r"hostPrefixLength /20 does not fit"):
        host_prefix(NetworkPool(cidr="10.88.0.0/24", host_prefix_length=20))


def test_lowest_free_slot_fills_gaps_first() -> None:
    assert lowest_free_slot([]) == 0
    assert lowest_free_slot([0, 1, 3]) == 2
    assert lowest_free_slot([1, 2]) == 0


@dataclass(frozen=True)
class Registered:
    name: str
    subnet_slot: int | None
    underlay_address: str | None


def test_peers_are_every_other_routable_host() -> None:
    pool = NetworkPool(cidr="10.88.0.0/24", host_prefix_length=26)
    hosts = [
        Registered("c", 2, "192.0.2.13"),
        Registered("a", 0, "192.0.2.11"),
        Registered("b", 1, "192.0.2.12"),
        Registered("old", None, "192.0.2.14"),  # registered before hosts had subnets
        Registered("mute", 3, None),  # no underlay address: nobody can route to it
        Registered("extra", 9, "192.0.2.15"),  # beyond the pool: its own daemon refuses
    ]
    assert host_peers(pool, hosts, own="a") == [
        HostPeer("b", "192.0.2.12", "10.88.0.64/26"),
        HostPeer("c", "192.0.2.13", "10.88.0.128/26"),
    ]
    routes = desired_routes(host_peers(pool, hosts, own="b"), pool.cidr)
    assert routes == {"10.88.0.0/26": "192.0.2.11", "10.88.0.128/26": "192.0.2.13"}


def test_routes_refuse_a_subnet_claimed_twice_or_outside_the_pool() -> None:
    twice = [HostPeer("a", "192.0.2.1", "10.88.0.0/26"), HostPeer("b", "192.0.2.2", "10.88.0.0/26")]
    with pytest.raises(NetworkError, match=r"two hosts claim the subnet 10\.88\.0\.0/26"):
        desired_routes(twice, "10.88.0.0/24")
    with pytest.raises(NetworkError, match="not inside the pool"):
        desired_routes([HostPeer("a", "192.0.2.1", "10.89.0.0/26")], "10.88.0.0/24")
    with pytest.raises(NetworkError, match="not an IPv4 address"):
        desired_routes([HostPeer("a", "host-a.lan", "10.88.0.0/26")], "10.88.0.0/24")


FLEET = """\
apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {{name: demo}}
spec:
  network: {{cidr: 10.88.0.0/24, hostPrefixLength: {prefix}}}
"""


def test_the_fleet_sets_the_host_prefix_and_a_larger_one_than_the_pool_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET.format(prefix=26))
    assert load_fleet(tmp_path).fleet.network.host_prefix_length == 26
    (tmp_path / "fleet.yaml").write_text(FLEET.format(prefix=20))
    with pytest.raises(ManifestError) as refused:
        load_fleet(tmp_path)
    assert "a host's subnet (/20) cannot be larger than the pool 10.88.0.0/24" in str(
        refused.value.problems[0]
    )


# -- slots in the PostgreSQL registry -----------------------------------------------------------


def facts(name: str, underlay: str | None = None) -> HostRegistration:
    return HostRegistration(
        name=name,
        vcpus=2,
        memory_mib=4096,
        disk_mib=10_000,
        runtimes=frozenset({RuntimeKind.PROCESS}),
        underlay_address=underlay,
    )


@pytest.fixture
def store(lease_dsn: str) -> Iterator[PostgresStateStore]:
    opened = PostgresStateStore(lease_dsn, host="host-a")
    yield opened
    opened.close()


@pytest.mark.postgres
def test_a_host_keeps_its_slot_and_new_hosts_take_the_lowest_free(
    store: PostgresStateStore, lease_dsn: str
) -> None:
    for name in ("a", "b", "c"):
        store.register_host(facts(name, f"192.0.2.{ord(name)}"))
    store.register_host(facts("a", "192.0.2.200"))  # a restart, on a new address
    slots = {h.name: (h.subnet_slot, h.underlay_address) for h in store.hosts()}
    assert slots == {"a": (0, "192.0.2.200"), "b": (1, "192.0.2.98"), "c": (2, "192.0.2.99")}
    # A slot whose host was removed from the registry is the next new host's.
    with psycopg.connect(lease_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM hosts WHERE name = 'b'")
    store.register_host(facts("d"))
    assert {h.name: h.subnet_slot for h in store.hosts()} == {"a": 0, "c": 2, "d": 1}


@pytest.mark.postgres
def test_hosts_registering_together_never_share_a_slot(lease_dsn: str) -> None:
    errors: list[BaseException] = []

    def register(name: str) -> None:
        try:
            with PostgresStateStore(lease_dsn, host=name) as handle:
                handle.register_host(facts(name))
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(f"h{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with PostgresStateStore(lease_dsn, host="reader") as reader:
        assert sorted(h.subnet_slot for h in reader.hosts()) == list(range(8))


def test_an_underlay_address_must_be_ipv4() -> None:
    with pytest.raises(ConfigError, match="underlay address must be an IPv4 address"):
        facts("a", "not-an-address")


def test_a_host_subnet_outside_the_pool_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match=r"subnet 10\.89\.0\.0/28 is not inside the pool"):
        Network(NetworkPool(cidr="10.88.0.0/24"), tmp_path / "s.db", subnet="10.89.0.0/28")
