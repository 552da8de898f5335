"""VM networking: the address pool (no privileges), and bridges, TAP devices and a real VM on
its own address inside a network namespace (root; CI runs as root)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.qemu import artifact_spec

from reconciler.errors import NetworkError
from reconciler.guest_config import GuestConfig
from reconciler.model import NetworkPool, VMState
from runtime.network import AddressAllocator, Links, Network, tap_name
from runtime.network.firewall import firewall_rules, load_rules
from runtime.qemu.driver import QemuRuntime


def test_addresses_are_stable_unique_and_persisted(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    pool = AddressAllocator(db, "10.88.0.0/29")
    web0 = pool.allocate("web-0", "web")
    assert web0.gateway == "10.88.0.1"
    assert web0.address == "10.88.0.2/29"
    assert pool.allocate("web-0", "web") == web0
    web1 = pool.allocate("web-1", "web")
    assert web1.address != web0.address
    assert web1.mac != web0.mac
    pool.close()
    again = AddressAllocator(db, "10.88.0.0/29")
    assert again.allocate("web-1", "web") == web1  # survives a restart
    for n in range(2, 5):
        again.allocate(f"web-{n}", "web")
    with pytest.raises(NetworkError, match="exhausted"):
        again.allocate("web-9", "web")
    again.release("web-0")
    assert again.allocate("web-9", "web").address == "10.88.0.2/29"


def test_tap_names_fit_the_kernel_limit_and_are_stable() -> None:
    assert tap_name("web-0") == "rc-web-0"
    assert tap_name("web-0", "ab12") == "rcab12-web-0"
    assert len(tap_name("report-worker-10", "ab12")) <= 15
    long = tap_name("a-very-long-workload-name-12")
    assert len(long) <= 15
    assert long == tap_name("a-very-long-workload-name-12")
    assert long != tap_name("a-very-long-workload-name-13")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"rc-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.root
def test_attach_is_idempotent_and_detach_removes_everything(netns: str, tmp_path: Path) -> None:
    network = Network(
        NetworkPool(cidr="10.99.0.0/24", bridge="rcbr-test"), tmp_path / "s.db", netns=netns
    )
    first = network.attach("web-0", "web")
    assert network.attach("web-0", "web") == first
    links = Links(netns)
    assert links.master_of(first.tap) == "rcbr-test"
    shown = subprocess.run(
        ["ip", "-n", netns, "-br", "addr", "show", "rcbr-test"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "10.99.0.1/24" in shown
    network.attach("web-1", "web")
    network.detach("web-0")
    assert links.names() == [tap_name("web-1")]
    assert [lease.vm for lease in network.allocator.leases()] == ["web-1"]
    # A TAP left behind by a crash is removed when no known VM owns it.
    links.ensure_tap(tap_name("ghost-0"), "rcbr-test")
    assert network.cleanup_orphans({"web-1"}) == [tap_name("ghost-0")]
    assert links.names() == [tap_name("web-1")]
    network.close()


@pytest.mark.root
@pytest.mark.qemu
def test_vm_answers_on_its_own_address_over_its_tap(
    netns: str, tmp_path: Path, echo_unikernel: Path
) -> None:
    network = Network(
        NetworkPool(cidr="10.99.1.0/24", bridge="rcbr-test"), tmp_path / "s.db", netns=netns
    )
    attachment = network.attach("echo-0", "echo")
    address = attachment.address.split("/")[0]
    guest = GuestConfig(hostname="echo-0", address=attachment.address, gateway=attachment.gateway)
    spec = artifact_spec(
        echo_unikernel, tmp_path / "echo-0", "echo-0", network=attachment, guest=guest
    )
    runtime = QemuRuntime(state_dir=tmp_path, accel="tcg", netns=netns)
    assert runtime.start(spec).state is VMState.RUNNING
    try:
        deadline = time.monotonic() + 120
        reply = ""
        while time.monotonic() < deadline and reply != "hello":
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    "bash",
                    "-c",
                    f"exec 3<>/dev/tcp/{address}/7007 && echo hello >&3 && head -c5 <&3",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            reply = probe.stdout.strip()
            if reply != "hello":
                time.sleep(1)
        assert reply == "hello", (spec.vm_dir / "console.log").read_text()
    finally:
        runtime.stop(spec, grace_seconds=1)
        network.detach("echo-0")
        network.close()


def test_firewall_rules_text() -> None:
    rules = firewall_rules(
        "rcab12-",
        "10.88.0.0/24",
        {"web": ["10.88.0.3", "10.88.0.2"], "db": ["10.88.0.4"]},
        {"web": ["db"]},
        nat=True,
    )
    assert 'iifname != "rcab12-*" accept' in rules
    assert "ether type != { ip, arp } drop" in rules  # no IPv6 around the IPv4 rules
    assert "table bridge reconciler {" in rules
    assert "ip saddr { 10.88.0.2, 10.88.0.3 } ip daddr { 10.88.0.4 } accept" in rules
    assert rules.index("ip saddr 10.88.0.0/24 ip daddr 10.88.0.0/24 drop") > rules.index(
        "ip daddr { 10.88.0.4 } accept"
    )
    assert "ip saddr 10.88.0.0/24 ip daddr != 10.88.0.0/24 masquerade" in rules
    assert "masquerade" not in firewall_rules("rc-", "10.88.0.0/24", {}, {}, nat=False)


@pytest.mark.root
def test_vms_of_different_workloads_only_talk_when_declared(netns: str) -> None:
    """Three "VMs" (network namespaces on veth pairs, whose host ends are bridge ports named like
    TAP devices): web depends on db; other depends on nothing."""
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
    run("ip", "-n", netns, "link", "add", "rcbr-fw", "type", "bridge")
    run("ip", "-n", netns, "addr", "add", "10.99.2.1/24", "dev", "rcbr-fw")
    run("ip", "-n", netns, "link", "set", "rcbr-fw", "up")
    vms = {"web": "10.99.2.2", "db": "10.99.2.3", "other": "10.99.2.4"}
    guests = []
    try:
        for name, address in vms.items():
            guest = f"{netns}-{name}"
            guests.append(guest)
            run("ip", "netns", "add", guest)
            run(
                "ip",
                "-n",
                netns,
                "link",
                "add",
                f"rcfw-{name}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                guest,
            )
            run("ip", "-n", netns, "link", "set", f"rcfw-{name}", "master", "rcbr-fw", "up")
            run("ip", "-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", guest, "link", "set", "eth0", "up")

        def reaches(source: str, target: str) -> bool:
            ping = subprocess.run(
                ["ip", "netns", "exec", f"{netns}-{source}", "ping", "-c1", "-W1", vms[target]],
                capture_output=True,
                check=False,
            )
            return ping.returncode == 0

        def link_local(name: str) -> str:
            # An IPv6 link-local address, usable once duplicate address detection is over.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                shown = subprocess.run(
                    ["ip", "-n", f"{netns}-{name}", "-6", "-o", "addr", "show", "eth0"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                if "fe80::" in shown and "tentative" not in shown:
                    return shown.split("inet6 ")[1].split("/")[0]
                time.sleep(0.2)
            raise AssertionError(f"no link-local address on {name}")

        def reaches6(source: str, target: str) -> bool:
            address = f"{link_local(target)}%eth0"
            # Neighbour discovery on a busy host can take more than one ping's wait.
            ping = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    f"{netns}-{source}",
                    "ping",
                    "-6",
                    "-c1",
                    "-w4",
                    address,
                ],
                capture_output=True,
                check=False,
            )
            return ping.returncode == 0

        assert reaches("web", "other")  # no rules yet: a plain bridge
        assert reaches6("web", "other")
        load_rules(
            firewall_rules(
                "rcfw-",
                "10.99.2.0/24",
                {k: [v] for k, v in vms.items()},
                {"web": ["db"]},
                nat=False,
            ),
            netns=netns,
        )
        assert reaches("web", "db")
        assert not reaches("web", "other")
        assert not reaches("other", "db")
        # IPv6 link-local addresses (every guest kernel has them) do not walk around the rules.
        assert not reaches6("web", "other")
        host = subprocess.run(
            ["ip", "netns", "exec", netns, "ping", "-c1", "-W1", vms["other"]],
            capture_output=True,
            check=False,
        )
        assert host.returncode == 0  # the host still reaches every VM
    finally:
        for guest in guests:
            subprocess.run(["ip", "netns", "del", guest], check=False)


def _netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


@pytest.mark.root
def test_host_process_gets_its_own_namespace_on_a_veth(netns: str, tmp_path: Path) -> None:
    """A host-process VM's port: a named namespace holding its pool address, joined to the fleet
    bridge by a veth whose host end is named like a TAP; re-attaching changes nothing, switching
    runtime swaps TAP and veth, and detach or orphan cleanup leave nothing behind."""
    scope = uuid.uuid4().hex[:4]
    network = Network(
        NetworkPool(cidr="10.99.3.0/24", bridge="rcbr-test"),
        tmp_path / "s.db",
        netns=netns,
        scope=scope,
    )
    links = Links(netns)
    try:
        first = network.attach("web-0", "web", namespace=True)
        assert network.attach("web-0", "web", namespace=True) == first
        assert first.tap in _netns_names()
        assert links.kind_of(first.tap) == "veth"
        assert links.master_of(first.tap) == "rcbr-test"
        inside = subprocess.run(
            ["ip", "-n", first.tap, "-4", "-o", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "10.99.3.2/24" in inside
        shown = subprocess.run(
            ["ip", "-n", first.tap, "link", "show", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert first.mac in shown
        route = subprocess.run(
            ["ip", "-n", first.tap, "route", "show", "default"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "via 10.99.3.1 dev eth0" in route
        ping = subprocess.run(
            ["ip", "netns", "exec", first.tap, "ping", "-c1", "-W2", "10.99.3.1"],
            capture_output=True,
            check=False,
        )
        assert ping.returncode == 0  # the bridge (the host side) answers from the namespace
        lo = subprocess.run(
            ["ip", "-n", first.tap, "-o", "link", "show", "lo"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "UP" in lo

        # The same VM moved to QEMU: a TAP, no namespace; and back.
        network.attach("web-0", "web")
        assert links.kind_of(first.tap) == "tun"
        assert first.tap not in _netns_names()
        network.attach("web-0", "web", namespace=True)
        assert links.kind_of(first.tap) == "veth"

        # A namespace left by a killed reconciler, and one whose veth was lost.
        ghost = network.attach("ghost-0", "ghost", namespace=True)
        subprocess.run(["ip", "-n", netns, "link", "del", first.tap], check=True)
        network.attach("web-0", "web", namespace=True)  # repaired
        assert links.kind_of(first.tap) == "veth"
        assert sorted(network.cleanup_orphans({"web-0"})) == [ghost.tap]
        assert ghost.tap not in _netns_names()
        assert links.names(f"rc{scope}-") == [first.tap]

        network.detach("web-0")
        assert first.tap not in _netns_names()
        assert links.names(f"rc{scope}-") == []
        assert network.allocator.leases() == []
    finally:
        for name in _netns_names():
            if name.startswith(f"rc{scope}-"):
                subprocess.run(["ip", "netns", "del", name], check=False)
        network.close()


def test_namespace_names_cannot_leave_the_namespace_directory() -> None:
    from runtime.network.netns import namespace_path

    assert str(namespace_path("rcab12-web-0")) == "/run/netns/rcab12-web-0"
    for bad in ("../etc", "a/b", ".hidden", "", "x" * 16):
        with pytest.raises(NetworkError, match="invalid network namespace name"):
            namespace_path(bad)
