"""The process runtime through ``reconciler apply``: executables as sandboxed host processes,
each in a network namespace of its own with its pool address on the fleet bridge, adopted,
healed and removed. What the sandbox keeps a workload from doing is in
``test_process_sandbox.py``."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from support.process_fleet import (
    echo,
    echo_repo,
    echo_workload,
    fleet_document,
    link_names,
    netns_names,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.repo import FleetRepo
from support.waiting import free_port

from reconciler.cli import main
from reconciler.model import NetworkPool
from runtime.network import Network, scope_for


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def vms(capsys: pytest.CaptureFixture[str], state: Path) -> dict[str, dict[str, object]]:
    code, out = cli(capsys, "status", "--state-dir", str(state), "--format", "json")
    assert code == 0, out
    return {vm["name"]: vm for vm in json.loads(out)["vms"]}


@pytest.mark.root
def test_process_workload_is_deployed_healed_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    bridge, cidr = new_pool()
    fleet = fleet_document("hosts", network_yaml(bridge, cidr)) + echo_workload("echo", port)
    repo = echo_repo(tmp_path / "fleet", fleet)
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    scope = scope_for(str(state.resolve()))
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        vm = vms(capsys, state)["echo-0"]
        assert (vm["runtime"], vm["healthy"]) == ("process", True)
        address = str(vm["address"])
        assert address == cidr.rsplit(".", 1)[0] + ".2"  # its pool address, not the host's
        assert echo(port, address) == b"ping\n"
        # Sandboxed: its own UTS, PID, user and network namespaces.
        pid = int(str(vm["pid"]))
        for kind in ("uts", "pid", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
        assert f"rc{scope}-echo-0" in netns_names()

        os.kill(pid, signal.SIGKILL)  # the sandbox's first process: its namespace ends
        time.sleep(0.5)
        code, out = cli(capsys, "diff", *common)
        assert code == 2
        assert "echo-0 must be replaced" in out
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert vms(capsys, state)["echo-0"]["address"] == address  # same address after healing
        assert echo(port, address) == b"ping\n"

        repo.write("fleet.yaml", fleet.replace("replicas: 1", "replicas: 0"))
        repo.commit("no echo")
        code, out = cli(capsys, "apply", *common)
        assert code == 1  # an empty fleet is refused unless the Fleet allows it
        assert "allowEmpty" in out
        assert echo(port, address) == b"ping\n"
        repo.write(
            "fleet.yaml",
            fleet.replace("replicas: 1", "replicas: 0").replace(
                "spec: {network: {", "spec: {allowEmpty: true, network: {"
            ),
        )
        repo.commit("no echo, and that is fine")
        assert cli(capsys, "apply", *common)[0] == 0
        with pytest.raises(OSError, match=r"No route to host|timed out|refused"):
            echo(port, address)  # nobody holds the address any more
        assert f"rc{scope}-echo-0" not in netns_names()  # the namespace and its veth are gone
        assert f"rc{scope}-echo-0" not in link_names()
    finally:
        remove_deployment(state, bridge)


@pytest.mark.root
def test_two_replicas_of_web_serve_on_their_own_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fleet-example's web (a Python service on port 8080, built with PyInstaller), two
    replicas as host processes: on the host's network they would collide on the port; each in
    its own namespace, both are healthy, each on its own address."""
    bridge, cidr = new_pool()
    repo = FleetRepo.of_fleet_example(tmp_path / "fleet")
    repo.edit("fleet.yaml", "bridge: rcbr0", f"bridge: {bridge}")
    repo.edit("fleet.yaml", "cidr: 10.88.0.0/24", f"cidr: {cidr}")
    repo.edit("workloads/web.yaml", "target: microvm", "target: executable\n    runtime: process")
    for other in ("workloads/echo.yaml", "workloads/report.yaml.j2"):
        (repo.path / other).unlink()
    repo.commit("web as host processes")
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    scope = scope_for(str(state.resolve()))
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        fleet = vms(capsys, state)
        assert sorted(fleet) == ["web-0", "web-1"]
        addresses = {name: str(vm["address"]) for name, vm in fleet.items()}
        assert len(set(addresses.values())) == 2
        for name, vm in fleet.items():
            assert (vm["runtime"], vm["state"], vm["healthy"]) == ("process", "running", True)
            assert addresses[name].startswith(cidr.rsplit(".", 1)[0] + ".")
            with urllib.request.urlopen(f"http://{addresses[name]}:8080/", timeout=10) as reply:
                assert json.loads(reply.read())["host"] == name  # each address is its own VM

        # A restarted reconciler adopts what runs: no change, the same processes.
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert {n: vm["pid"] for n, vm in vms(capsys, state).items()} == {
            n: vm["pid"] for n, vm in fleet.items()
        }

        # A reconciler killed after making a VM's namespace but before recording the VM: the
        # next apply that acts removes what nobody owns.
        network = Network(
            # The same pool and scope as the deployment, as the killed reconciler had them.
            NetworkPool(cidr=cidr, bridge=bridge),
            state / "state.db",
            scope=scope,
        )
        network.attach("web-9", "web", namespace=True)
        network.close()
        assert f"rc{scope}-web-9" in netns_names()
        repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 1")
        repo.commit("one web")
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        names = netns_names()
        assert f"rc{scope}-web-9" not in names  # the orphan
        assert f"rc{scope}-web-1" not in names  # the deleted replica
        assert f"rc{scope}-web-0" in names
        assert {n for n in link_names() if n.startswith(f"rc{scope}-")} == {f"rc{scope}-web-0"}
    finally:
        remove_deployment(state, bridge)
