"""Several "hosts" on one machine, for multi-host networking and daemon tests (root).

    root namespace: bridge <tag>ul (the underlay switch), address .1 of the underlay network
        ├── veth <tag>a ──▶ namespace rcmh<tag>-a: "ul0" at .11, lo up   (host "a")
        ├── veth <tag>b ──▶ namespace rcmh<tag>-b: "ul0" at .12          (host "b")
        └── veth <tag>c ──▶ namespace rcmh<tag>-c: "ul0" at .13          (host "c")

Each host namespace is what one machine of a fleet would be: the fleet's bridge and its VMs'
ports go inside it (``Network(netns=host.netns, scope=host.scope)``, or a daemon started with
``ip netns exec host.netns``), and it reaches the other hosts over the underlay only. The root
namespace holds the underlay's address ``.1`` (``MultiHostNet.gateway``), so a daemon inside a
host namespace can reach services of the root namespace there (PostgreSQL listening on it).

The underlay network is a free /24 of 192.168.200-249 (checked against the root namespace's
routes, so two test runs side by side take different ones); names carry a random tag. Closing
removes every namespace the hosts' VMs got (``rc<scope>-*``), the host namespaces (their veth
pairs go with them) and the underlay bridge, whatever failed before.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from dataclasses import dataclass, field
from types import TracebackType

import pyroute2.netns


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _networks(word: str) -> list[ipaddress.IPv4Network]:
    try:
        return [ipaddress.IPv4Network(word, strict=False)]
    except ValueError:
        return []


def _free_underlay() -> ipaddress.IPv4Network:
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    taken = [net for word in routes.split() for net in _networks(word) if net.prefixlen > 0]
    start = uuid.uuid4().int % 50
    for offset in range(50):
        candidate = ipaddress.IPv4Network(f"192.168.{200 + (start + offset) % 50}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError("no free /24 in 192.168.200-249 for the test underlay")


@dataclass(frozen=True)
class FakeHost:
    name: str
    netns: str
    underlay_address: str
    scope: str
    """The 4-character tag of the host's deployment: its VMs' ports are ``rc<scope>-<vm>``."""


@dataclass
class MultiHostNet:
    names: tuple[str, ...] = ("a", "b", "c")
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    hosts: dict[str, FakeHost] = field(default_factory=dict)
    underlay: ipaddress.IPv4Network = field(init=False)

    @property
    def bridge(self) -> str:
        return f"rcmh{self.tag}ul"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the underlay."""
        return str(self.underlay.network_address + 1)

    def __enter__(self) -> MultiHostNet:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.underlay = _free_underlay()
        prefix = self.underlay.prefixlen
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            netns = f"rcmh{self.tag}-{name}"
            address = str(self.underlay.network_address + 11 + index)
            root_end = f"rcmh{self.tag}{name}"
            # Registered before it exists, so a failure half way still removes it.
            self.hosts[name] = FakeHost(name, netns, address, f"{self.tag[:3]}{index}")
            _run("ip", "netns", "add", netns)
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            _run("ip", "link", "add", root_end, "type", "veth", "peer", "name", "ul0",
                 "netns", netns)  # fmt: skip
            _run("ip", "link", "set", root_end, "master", self.bridge, "up")
            _run("ip", "-n", netns, "addr", "add", f"{address}/{prefix}", "dev", "ul0")
            _run("ip", "-n", netns, "link", "set", "ul0", "up")

    def run_in(
        self, netns: str, *argv: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``netns``; never raises on a non-zero exit."""
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def close(self) -> None:
        listed = set(pyroute2.netns.listnetns())
        for host in self.hosts.values():
            for name in sorted(listed):
                if name.startswith(f"rc{host.scope}-"):
                    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "del", host.netns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["FakeHost", "MultiHostNet"]
