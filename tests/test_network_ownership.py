"""The fleet's network is the fleet's own: the address pool is never materialised, and an
existing interface that reconciler did not create is never touched (a bridge name comes from an
untrusted revision)."""

from __future__ import annotations

import ipaddress
import subprocess
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import NetworkError
from reconciler.model import NetworkPool
from runtime.network import AddressAllocator, Network
from runtime.network.links import OWNER_ALIAS


def test_the_allocator_allocates_from_a_16_without_materialising_it(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        allocator = AddressAllocator(tmp_path / "s.db", "10.64.0.0/16")
        leases = [allocator.allocate(f"web-{i}", "web") for i in range(50)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 65,534 IPv4Address objects would take several MiB; what runs costs what its VMs cost.
    assert peak < 1 << 20, peak
    assert allocator.gateway == "10.64.0.1"
    assert [lease.address for lease in leases[:2]] == ["10.64.0.2/16", "10.64.0.3/16"]
    # A released address is the lowest free one, and is handed out again.
    allocator.release("web-0")
    assert allocator.allocate("db-0", "db").address == "10.64.0.2/16"
    allocator.close()


def test_an_exhausted_pool_says_so(tmp_path: Path) -> None:
    allocator = AddressAllocator(tmp_path / "s.db", "10.64.0.0/29")
    assert [allocator.allocate(f"w-{i}", "w").address for i in range(5)][-1] == "10.64.0.6/29"
    with pytest.raises(NetworkError, match="exhausted"):
        allocator.allocate("w-5", "w")
    allocator.close()
    # Even a pool no manifest may declare is never walked address by address.
    huge = AddressAllocator(tmp_path / "h.db", "0.0.0.0/0")
    assert ipaddress.IPv4Interface(huge.allocate("a-0", "a").address).ip == ipaddress.IPv4Address(
        "0.0.0.2"
    )
    huge.close()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"rc-own-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.root
def test_an_existing_bridge_named_like_ours_but_not_ours_is_refused(
    netns: str, tmp_path: Path
) -> None:
    _ip(netns, "link", "add", "rcbr-taken", "type", "bridge")
    network = Network(
        NetworkPool(cidr="10.99.2.0/24", bridge="rcbr-taken"), tmp_path / "s.db", netns=netns
    )
    with pytest.raises(NetworkError, match="rcbr-taken exists but reconciler did not create it"):
        network.attach("web-0", "web")
    # Nothing was done to it: no address, no port.
    assert "10.99.2.1" not in _ip(netns, "-br", "addr", "show", "rcbr-taken")
    assert _ip(netns, "-br", "link", "show", "master", "rcbr-taken").strip() == ""

    # A bridge reconciler created carries its mark, and is reused.
    mine = Network(
        NetworkPool(cidr="10.99.3.0/24", bridge="rcbr-mine"), tmp_path / "m.db", netns=netns
    )
    mine.attach("web-0", "web")
    assert f"alias {OWNER_ALIAS}" in _ip(netns, "link", "show", "rcbr-mine")
    mine.attach("web-1", "web")
    network.close()
    mine.close()
