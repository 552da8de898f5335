"""``reconciler apply`` and ``status`` on the embedded defaults, as an operator uses them:
real QEMU VMs on a real bridge and TAP devices, health judged from the guest and over HTTP/TCP.

Runs as root (CI does). The fleet gets its own bridge and address pool so that it cannot clash
with anything else on the host, and every VM, TAP and the bridge are removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.repo import FLEET_EXAMPLE, FleetRepo

from reconciler.cli import main
from runtime.network import scope_for

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def deployment(tmp_path: Path, session_state: Path) -> Iterator[dict[str, object]]:
    tag = uuid.uuid4().hex[:4]
    bridge, subnet = f"rcbr{tag}", f"10.{100 + int(tag[:2], 16) % 100}.{int(tag[2:], 16)}"
    shutil.copytree(FLEET_EXAMPLE, tmp_path / "fleet")
    repo = FleetRepo(tmp_path / "fleet")
    repo.edit("fleet.yaml", "bridge: rcbr0", f"bridge: {bridge}")
    repo.edit("fleet.yaml", "cidr: 10.88.0.0/24", f"cidr: {subnet}.0/24")
    repo.commit("fleet-example on a test bridge")
    state = tmp_path / "state"
    shutil.copytree(session_state / "kernels", state / "kernels")
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    yield {"repo": repo, "state": state, "common": common, "subnet": subnet}
    for pidfile in (state / "vms").glob("*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    scope = scope_for(str(state.resolve()))
    for family, table in (("bridge", f"reconciler{scope}"), ("ip", f"reconciler{scope}-nat")):
        subprocess.run(["nft", "delete", "table", family, table], check=False, capture_output=True)
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    for line in links.splitlines():
        name = line.split()[0].split("@")[0]
        if name.startswith(f"rc{scope_for(str(state.resolve()))}-") or name == bridge:
            subprocess.run(["ip", "link", "del", name], check=False)


def status(capsys: pytest.CaptureFixture[str], state: Path) -> dict[str, object]:
    code, out = cli(capsys, "status", "--state-dir", str(state), "--format", "json")
    assert code == 0
    return json.loads(out)


def test_apply_converges_scales_heals_and_prunes(
    deployment: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = deployment["repo"]
    state = deployment["state"]
    common = deployment["common"]
    assert isinstance(repo, FleetRepo)
    assert isinstance(state, Path)
    assert isinstance(common, list)

    code, out = cli(capsys, "apply", *common)
    assert code == 0, out
    fleet = status(capsys, state)
    vms = {vm["name"]: vm for vm in fleet["vms"]}  # type: ignore[attr-defined]
    assert set(vms) == {"web-0", "web-1", "echo-0", "report-0"}
    assert all(vm["healthy"] for vm in vms.values()), vms
    assert fleet["applied_revision"] == repo.git("rev-parse", "HEAD")
    with urllib.request.urlopen(f"http://{vms['web-0']['address']}:8080/", timeout=10) as r:
        assert json.loads(r.read())["host"] == "web-0"
    # Workloads are kept apart on the bridge: report may reach web (dependsOn), echo nothing.
    scope = scope_for(str(state.resolve()))
    table = subprocess.run(
        ["nft", "list", "table", "bridge", f"reconciler{scope}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report_ip, web_ips = (
        vms["report-0"]["address"],
        sorted([vms["web-0"]["address"], vms["web-1"]["address"]]),
    )
    assert f"ip saddr {report_ip} ip daddr {{ {', '.join(web_ips)} }} accept" in table
    assert (
        f"ip saddr {deployment['subnet']}.0/24 ip daddr {deployment['subnet']}.0/24 drop" in table
    )
    code, out = cli(capsys, "apply", *common)
    assert code == 0
    assert "No changes." in out  # a second apply straight after is a no-op

    # Scale web 2 -> 3: one create in the diff, then three healthy replicas.
    repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    repo.commit("web: 3 replicas")
    code, out = cli(capsys, "diff", *common, "--format", "json")
    assert code == 2
    plan = json.loads(out)
    assert [(a["action"], a["vm"]) for a in plan["actions"]] == [("create", "web-2")]
    assert cli(capsys, "apply", *common)[0] == 0
    vms = {vm["name"]: vm for vm in status(capsys, state)["vms"]}  # type: ignore[attr-defined]
    assert all(vms[f"web-{i}"]["healthy"] for i in range(3))
    assert cli(capsys, "diff", *common)[0] == 0

    # A change that makes the service fail: the first VM of the rollout goes back to its last
    # healthy artifact, the others are never touched, and status says why.
    before = {name: vm["artifact"] for name, vm in vms.items()}
    good = repo.git("rev-parse", "HEAD")
    repo.write(
        "services/web/app.py",
        repo.read("services/web/app.py").replace(
            "def main() -> None:\n", "def main() -> None:\n    raise SystemExit(3)\n"
        ),
    )
    repo.commit("web: broken")
    code, out = cli(capsys, "apply", *common)
    assert code == 1, out
    assert "workload exited with code 3" in out
    assert "rolled back to the last healthy artifact: web-0" in out
    fleet = status(capsys, state)
    vms = {vm["name"]: vm for vm in fleet["vms"]}  # type: ignore[attr-defined]
    assert {name: vm["artifact"] for name, vm in vms.items()} == before
    assert all(vms[f"web-{i}"]["healthy"] for i in range(3))
    assert fleet["applied_revision"] == good
    assert "workload exited with code 3" in str(fleet["last_error"])
    repo.git("revert", "--no-edit", "HEAD")
    assert cli(capsys, "diff", *common)[0] == 0

    # A VM killed by hand is recreated, at the same address.
    address = vms["web-1"]["address"]
    os.kill(int(vms["web-1"]["pid"]), signal.SIGKILL)
    code, out = cli(capsys, "diff", *common)
    assert code == 2
    assert "web-1 must be replaced" in out
    assert cli(capsys, "apply", *common)[0] == 0
    vms = {vm["name"]: vm for vm in status(capsys, state)["vms"]}  # type: ignore[attr-defined]
    assert vms["web-1"]["healthy"]
    assert vms["web-1"]["address"] == address

    # Removing a workload removes its VM, TAP device and address.
    (repo.path / "workloads" / "echo.yaml").unlink()
    repo.commit("remove echo")
    assert cli(capsys, "apply", *common)[0] == 0
    vms = {vm["name"]: vm for vm in status(capsys, state)["vms"]}  # type: ignore[attr-defined]
    assert "echo-0" not in vms
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert f"rc{scope_for(str(state.resolve()))}-echo-0" not in links
    assert not (state / "vms" / "echo-0").exists()


def _qemu_processes(state: Path) -> dict[str, int]:
    """VM name -> number of QEMU processes running it under this state directory."""
    counts: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmdline or b"qemu-system" not in cmdline[0]:
            continue
        for arg in cmdline:
            if arg.startswith(str(state / "vms").encode()) and arg.endswith(b"qemu.pid"):
                name = Path(arg.decode()).parent.name
                counts[name] = counts.get(name, 0) + 1
    return counts


def test_apply_killed_midway_resumes_without_duplicates_or_orphans(
    deployment: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    state = deployment["state"]
    common = deployment["common"]
    assert isinstance(state, Path)
    assert isinstance(common, list)
    # Build first, so that the kill lands while VMs are being created.
    assert cli(capsys, "build", *common)[0] == 0
    apply = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert apply.stdout is not None
    for line in apply.stdout:
        if line.startswith("create   web-0"):
            break
    apply.kill()  # SIGKILL in the middle of creating VMs
    apply.wait()
    apply.stdout.close()

    from reconciler.state import open_state_store

    store = open_state_store(state)
    interrupted = [(i.vm, i.action) for i in store.open_intents()]
    store.close()
    assert ("web-0", "create") in interrupted  # written before the action, never completed

    code, out = cli(capsys, "apply", *common)
    assert code == 0, out
    assert "resuming after an interrupted create of web-0" in out
    fleet = status(capsys, state)
    vms = {vm["name"]: vm for vm in fleet["vms"]}  # type: ignore[attr-defined]
    assert set(vms) == {"web-0", "web-1", "echo-0", "report-0"}
    assert all(vm["healthy"] for vm in vms.values()), vms
    store = open_state_store(state)
    assert store.open_intents() == []
    store.close()
    running = _qemu_processes(state)
    assert all(count == 1 for count in running.values()), running  # no duplicate VM
    scope = scope_for(str(state.resolve()))
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    taps = sorted(
        line.split()[0] for line in links.stdout.splitlines() if line.startswith(f"rc{scope}-")
    )
    assert taps == sorted(f"rc{scope}-{name}" for name in vms)  # no orphaned TAP
    assert cli(capsys, "diff", *common)[0] == 0


def test_saved_plan_is_refused_once_the_fleet_moved(
    deployment: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = deployment["repo"]
    common = deployment["common"]
    assert isinstance(repo, FleetRepo)
    assert isinstance(common, list)
    plan = tmp_path / "plan.json"
    assert cli(capsys, "plan", *common, "-o", str(plan))[0] == 2
    repo.edit("workloads/echo.yaml", "replicas: 1", "replicas: 0")
    repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 0")
    repo.edit("workloads/report.yaml.j2", "replicas: 1", "replicas: 0")
    repo.commit("scale everything to zero")
    # The saved plan names its revision, so a new commit does not change what it applies, but a
    # change of what runs does: apply one VM behind its back, and the plan is refused.
    store_plan = json.loads(plan.read_text())
    assert store_plan["head"] != repo.git("rev-parse", "HEAD")
    state = deployment["state"]
    assert isinstance(state, Path)
    from support.fakes import fleet as make_fleet
    from support.fakes import running, workload

    from reconciler.state import open_state_store

    store = open_state_store(state)
    store.put_vm(running(make_fleet(workload("intruder"), name="other")).vms["intruder-0"])
    store.close()
    code, out = cli(capsys, "apply", *common, str(plan))
    assert code == 1
    assert "changed since" in out
    assert "make a new plan" in out
