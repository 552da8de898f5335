"""Deployments of host-process VMs in tests and benchmarks: fleets of fleet-example's C echo
server (fast to build and start), each deployment on a bridge and an address pool of its own (so
that tests running at once, or a demo on the same host, never share addresses), and everything
it made on the host removed afterwards: the sandboxes, their network namespaces and veths, the
bridge and the deployment's nftables tables."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.network import scope_for
from support.repo import FLEET_EXAMPLE, FleetRepo

if TYPE_CHECKING:
    from runtime.protocol import VMSpec

ECHO = FLEET_EXAMPLE / "services" / "echo" / "echo.c"

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {{name: {name}}}
{network}
"""

ECHO_WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: {source}, language: c, entrypoint: echo.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    replicas: 1
    env: {{ECHO_PORT: "{port}"{extra_env}}}
    health: {health}
{extra_deploy}"""


def new_pool() -> tuple[str, str]:
    """A fresh ``(bridge, cidr)`` for one deployment."""
    tag = uuid.uuid4().hex[:4]
    return f"rcbr{tag}", f"10.{100 + int(tag[:2], 16) % 100}.{int(tag[2:], 16)}.0/24"


def network_yaml(bridge: str, cidr: str) -> str:
    """The Fleet's ``spec`` putting the deployment on that bridge and pool (flow style)."""
    return f"spec: {{network: {{cidr: {cidr}, bridge: {bridge}}}}}"


def fleet_document(name: str, network: str = "") -> str:
    """The Fleet document of a test fleet; ``network``: ``network_yaml``'s spec, or none."""
    return FLEET.format(name=name, network=network)


def echo_workload(
    name: str,
    port: int,
    *,
    source: str = "echo",
    extra_env: str = "",
    health: str | None = None,
    extra_deploy: str = "",
) -> str:
    """A Workload document running the echo server (from ``source/echo.c``) as one process VM
    listening on ``port``. ``extra_env`` continues the flow-style env map (``', A: "b"'``),
    ``health`` replaces the TCP check, ``extra_deploy`` adds lines to ``deploy``."""
    return ECHO_WORKLOAD.format(
        name=name,
        port=port,
        source=source,
        extra_env=extra_env,
        health=health or f"{{type: tcp, port: {port}, startPeriodSeconds: 30}}",
        extra_deploy=extra_deploy,
    )


def slow_echo_source() -> str:
    """The echo server, sleeping ``$ECHO_DELAY`` seconds before it listens: a VM that takes a
    while to get healthy, so a test can catch a leader in the middle of a rollout."""
    return ECHO.read_text().replace(
        "    signal(SIGPIPE, SIG_IGN);",
        '    if (getenv("ECHO_DELAY")) sleep((unsigned)atoi(getenv("ECHO_DELAY")));\n'
        "    signal(SIGPIPE, SIG_IGN);",
    )


def echo(port: int, address: str) -> bytes:
    """Ask the echo server of the VM at ``address`` (its pool address) for an echo."""
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(b"ping\n")
        return conn.recv(16)


def echo_repo(path: Path, fleet_yaml: str, *, slow: bool = False) -> FleetRepo:
    """A fleet repository holding ``fleet_yaml`` and the echo server in ``echo/`` (and the slow
    one in ``slow/``), committed once."""
    files = {"fleet.yaml": fleet_yaml, "echo/echo.c": ECHO.read_text()}
    if slow:
        files["slow/echo.c"] = slow_echo_source()
    return FleetRepo.create(path, files, "echo fleet")


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
    """Kill every VM of ``state`` (process sandboxes and QEMUs) and remove what its deployment
    made on the host."""
    for pidfile in [*(state / "vms").glob("*/process.pid"), *(state / "vms").glob("*/qemu.pid")]:
        with contextlib.suppress(OSError, ValueError):
            # A sandbox's pid is the first process of its PID namespace: all in it die with it.
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


SLEEPER_SCRIPT = "trap 'echo terminated; exit 0' TERM; echo waiting; while :; do sleep 1; done"


def sleeper_spec(directory: Path, restart: str) -> VMSpec:
    """A process VM (not started) whose workload, busybox's sh, prints ``waiting``, sleeps,
    and on SIGTERM prints ``terminated`` and exits 0: what a stop must reach."""
    from reconciler.guest_config import GuestConfig
    from reconciler.model import RuntimeKind
    from runtime.protocol import VMSpec

    busybox = directory / "busybox"  # a static executable, named so that it runs its applets
    busybox.write_bytes(Path("/bin/busybox").read_bytes())
    busybox.chmod(0o755)
    return VMSpec(
        name="sleeper-0",
        workload="sleeper",
        fleet="test",
        runtime=RuntimeKind.PROCESS,
        vcpus=1,
        memory_mib=64,
        vm_dir=directory / "vms" / "sleeper-0",
        executable=busybox,
        guest=GuestConfig(hostname="sleeper-0", args=("sh", "-c", SLEEPER_SCRIPT), restart=restart),
    )
