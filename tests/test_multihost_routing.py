"""Traffic between hosts of a fleet run by real daemons: each host's VMs take its own subnet of
the pool, every host routes its peers' subnets via their underlay addresses, and the firewall,
loaded from every host's VMs, keeps ``dependsOn`` isolation across hosts.

Three daemons (``--host host-a|b|c``), each inside one host namespace of
``support.multihost_net`` with ``--underlay-address`` its underlay address, sharing one
PostgreSQL store and lease over the server's UNIX socket (the underlay carries only the hosts'
traffic to each other). The fleet: ``web`` (process-runtime echo servers) at 3 replicas,
``client`` that declares ``dependsOn: [web]`` and ``stranger`` that declares nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.multihost_cluster import kill_vms, registered, rows, running_on
from support.multihost_net import MultiHostNet
from support.process_fleet import ECHO, echo_workload, fleet_document, network_yaml, new_pool
from support.repo import FleetRepo
from support.waiting import eventually

from runtime.network import namespace_path, scope_for, tap_name

pytestmark = [pytest.mark.postgres, pytest.mark.root]

PORT = 7321
BRIDGE, CIDR = new_pool()  # a /24: each host gets a /28 of it
FLEET = fleet_document("routed", network_yaml(BRIDGE, CIDR))
WORKLOADS = (
    echo_workload("web", PORT).replace("replicas: 1", "replicas: 3")
    + echo_workload("client", PORT, extra_deploy="    dependsOn: [web]\n")
    + echo_workload("stranger", PORT)
)
HOSTS = {"host-a": "a", "host-b": "b", "host-c": "c"}  # host name -> its namespace's name


def echo_from(netns: str, address: str) -> bytes:
    """An echo from the VM at ``address``, asked from inside the namespace ``netns`` (a
    host's, or a VM's own); empty when nothing answers within 3 s."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f"    c = socket.create_connection(({address!r}, {PORT}), timeout=3)\n"
        "    c.sendall(b'ping\\n'); sys.stdout.buffer.write(c.recv(16))\n"
        "except OSError: pass\n"
    )
    done = subprocess.run(
        ["nsenter", f"--net={namespace_path(netns)}", sys.executable, "-c", script],
        capture_output=True,
        timeout=20,
        check=False,
    )
    # Entering the namespace must work: an empty answer says the packets went nowhere.
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@contextlib.contextmanager
def host_daemons(
    net: MultiHostNet, repo: Path, tmp_path: Path, dsn: str
) -> Iterator[dict[str, Path]]:
    """The three daemons, registered; host -> its state directory. Stopped afterwards, with
    the VMs they started and the VMs' namespaces (the host namespaces are ``net``'s)."""
    states = {name: tmp_path / f"state-{name}" for name in HOSTS}
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, short in HOSTS.items():
            host = net.hosts[short]
            log = (tmp_path / f"{name}.log").open("ab")
            argv = [
                # nsenter, not ``ip netns exec``: the VMs' namespaces the daemon mounts must be
                # visible outside (``ip netns exec`` gives it a mount namespace of its own).
                *("nsenter", f"--net={namespace_path(host.netns)}", sys.executable),
                *("-m", "reconciler"),
                *("daemon", "--repo", str(repo), "--state-dir", str(states[name])),
                *("--listen", "127.0.0.1:0", "--id", name, "--host", name),
                *("--store", dsn, "--lease", dsn, "--log-format", "json"),
                *("--underlay-address", host.underlay_address),
            ]
            started.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        eventually(lambda: registered(dsn) == 3, 60, "the three hosts register")
        yield states
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for state in states.values():
            kill_vms(state)
            scope = f"rc{scope_for(str(state.resolve()))}-"
            for name in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True, check=True
            ).stdout.split():
                if name.startswith(scope):
                    subprocess.run(["ip", "netns", "del", name], check=False)


def test_vms_reach_each_other_across_hosts_as_declared(tmp_path: Path, lease_dsn: str) -> None:
    repo = FleetRepo.create(
        tmp_path / "fleet", {"fleet.yaml": FLEET, "echo/echo.c": ECHO.read_text()}
    )
    with MultiHostNet() as net, host_daemons(net, repo.path, tmp_path, lease_dsn) as states:
        # Committed once every host registered, so that the leader spreads the replicas.
        repo.write("fleet.yaml", FLEET + WORKLOADS)
        repo.commit("web, client, stranger")
        hosts = eventually(
            lambda: (
                (found := running_on(lease_dsn))
                and sum(len(vms) for vms in found.values()) == 5
                and found
            ),
            120,
            "the five VMs run healthy",
        )
        where = {vm: (host, address) for host, vms in hosts.items() for vm, address in vms.items()}
        webs = {where[f"web-{i}"] for i in range(3)}
        assert sorted(host for host, _ in webs) == sorted(HOSTS)  # one replica per host

        # Each host's VMs have addresses of its own subnet (a /28 of the pool, by its slot).
        slots = dict(rows(lease_dsn, "SELECT name, subnet_slot FROM hosts"))
        pool = ipaddress.IPv4Network(CIDR)
        for host, address in where.values():
            subnet = list(pool.subnets(new_prefix=28))[int(str(slots[host]))]
            assert ipaddress.IPv4Address(address) in subnet, (host, address)

        # Every web replica answers from another host's namespace: routed over the underlay.
        for host, address in webs:
            other = next(h for h in HOSTS if h != host)
            assert echo_from(net.hosts[HOSTS[other]].netns, address) == b"ping\n", (host, other)

        def vm_netns(vm: str) -> str:
            return tap_name(vm, scope_for(str(states[where[vm][0]].resolve())))

        # client (dependsOn: [web]) reaches web on another host; stranger does not.
        for vm in ("client-0", "stranger-0"):
            host = where[vm][0]
            _, remote = next((h, a) for h, a in sorted(webs) if h != host)
            answer = echo_from(vm_netns(vm), remote)
            assert answer == (b"ping\n" if vm == "client-0" else b""), (vm, host, remote)
