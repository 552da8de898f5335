"""Deployments of host-process VMs in tests: each gets a bridge and an address pool of its own
(so that tests running at once, or a demo on the same host, never share addresses), and
everything it made on the host is removed afterwards: the sandboxes, their network namespaces
and veths, the bridge and the deployment's nftables tables."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from pathlib import Path

from runtime.network import scope_for


def new_pool() -> tuple[str, str]:
    """A fresh ``(bridge, cidr)`` for one deployment."""
    tag = uuid.uuid4().hex[:4]
    return f"rcbr{tag}", f"10.{100 + int(tag[:2], 16) % 100}.{int(tag[2:], 16)}.0/24"


def network_yaml(bridge: str, cidr: str) -> str:
    """The Fleet's ``spec`` putting the deployment on that bridge and pool (flow style)."""
    return f"spec: {{network: {{cidr: {cidr}, bridge: {bridge}}}}}"


def host_address(cidr: str, index: int) -> str:
    """The ``index``-th address of a /24 pool (1 is the bridge)."""
    return cidr.rsplit(".", 1)[0] + f".{index}"


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def link_names() -> set[str]:
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    return {line.split()[0].split("@")[0] for line in links.stdout.splitlines()}


def remove_deployment(state: Path, bridge: str | None = None) -> None:
    """Kill every sandbox of ``state`` and remove what its deployment made on the host."""
    for pidfile in (state / "vms").glob("*/process.pid"):
        with contextlib.suppress(OSError, ValueError):
            # The first process of the sandbox's PID namespace: everything in it dies with it.
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    scope = scope_for(str(state.resolve()))
    for name in netns_names():
        if name.startswith(f"rc{scope}-"):
            subprocess.run(["ip", "netns", "del", name], check=False)
    for name in link_names():
        if name.startswith(f"rc{scope}-") or name == bridge:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
    for family, table in (("bridge", f"reconciler{scope}"), ("ip", f"reconciler{scope}-nat")):
        subprocess.run(["nft", "delete", "table", family, table], check=False, capture_output=True)
