"""A volume of a process-runtime VM through ``reconciler apply``: a service counts its starts on
its volume, and the count continues across a restart, a replace (new source), ``kill -9`` of
its sandbox and a new ``apply``; a prune keeps the ``retain`` volume and deletes the ``delete``
one; ``volumes snapshot`` (the VM paused) and ``restore`` round-trip; ``volumes rm`` cleans up.

The process runtime bind-mounts a directory per volume (``<state>/volumes/<vm>/<name>/``),
owned by the VM's own uid. Own bridge and pool; everything removed at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.process_fleet import fleet_document, network_yaml, new_pool, remove_deployment
from support.volume_fleet import (
    counter_repo,
    counter_workload,
    last_counter,
    survives_restart_replace_and_kill,
)
from support.waiting import eventually

from reconciler.cli import main
from runtime.process.sandbox import sandbox_uid

pytestmark = [pytest.mark.root]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def counter(state: Path, vm: str = "count-0") -> int:
    console = state / "vms" / vm / "console.log"
    return eventually(lambda: last_counter(console), 30, f"{vm} to print its counter")


def test_a_process_vms_volume_outlives_restart_replace_kill_and_prune(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, cidr = new_pool()
    fleet = fleet_document("vols", network_yaml(bridge, cidr))
    fleet = fleet.replace("spec: {network:", "spec: {allowEmpty: true, network:")
    workload = counter_workload("count", target="executable", runtime="process")
    repo = counter_repo(tmp_path / "fleet", fleet + workload)
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    data = state / "volumes" / "count-0" / "data"
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert counter(state) == 1
        # The workload wrote it as its own uid, into the host directory of the volume.
        assert (data / "counter").read_text() == "1\n"
        assert data.stat().st_uid == sandbox_uid("count-0")
        assert (data / "counter").stat().st_uid == sandbox_uid("count-0")

        survives_restart_replace_and_kill(
            lambda: cli(capsys, "apply", *common),
            repo,
            state / "vms" / "count-0" / "process.pid",
            lambda: counter(state),
        )

        # Snapshot while it runs (its processes are paused meanwhile), then restore it.
        code, out = cli(capsys, "volumes", "snapshot", "count-0/data", "--state-dir", str(state))
        assert code == 0, out
        assert "VM paused while copying" in out, out
        stamp = out.split()[1]
        pid = int((state / "vms" / "count-0" / "process.pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert stat.rsplit(")", 1)[1].split()[0] != "T"  # resumed after the copy
        repo.edit("fleet.yaml", 'ROUND: "2"', 'ROUND: "3"')
        repo.commit("restart again")
        assert cli(capsys, "apply", *common)[0] == 0
        assert counter(state) == 5
        code, out = cli(capsys, "volumes", "restore", "count-0/data", "--state-dir", str(state))
        assert code == 0, out
        assert f"from snapshot {stamp}" in out, out
        assert (data / "counter").read_text() == "4\n"
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert counter(state) == 5  # 4 restored, plus this start

        code, out = cli(capsys, "volumes", "ls", "--state-dir", str(state), "--format", "json")
        listed = json.loads(out)
        assert {(v["name"], v["kind"], v["reclaim_policy"]) for v in listed["volumes"]} == {
            ("data", "directory", "retain"),
            ("scratch", "directory", "delete"),
        }
        assert [s["snapshot"] for s in listed["snapshots"]] == [stamp]

        # Prune: the plan says what is discarded; retain keeps data, delete removes scratch.
        repo.write("fleet.yaml", fleet)
        repo.commit("no more counter")
        code, out = cli(capsys, "diff", *common)
        assert code == 2
        assert "deleting VM count-0 discards the data of its volume(s) scratch" in out
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert (data / "counter").read_text() == "5\n"
        assert not (state / "volumes" / "count-0" / "scratch").exists()
        code, out = cli(capsys, "volumes", "ls", "--state-dir", str(state))
        assert "not declared by any VM" in out
        code, out = cli(capsys, "volumes", "rm", "count-0/data", "--state-dir", str(state))
        assert code == 0, out
        assert not data.exists()
    finally:
        remove_deployment(state, bridge)


def test_volumes_rm_refuses_a_volume_its_vm_still_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, cidr = new_pool()
    fleet = fleet_document("vols", network_yaml(bridge, cidr))
    repo = counter_repo(
        tmp_path / "fleet",
        fleet + counter_workload("count", target="executable", runtime="process"),
    )
    state = tmp_path / "state"
    try:
        assert cli(capsys, "apply", "--repo", str(repo.path), "--state-dir", str(state))[0] == 0
        code, out = cli(capsys, "volumes", "rm", "count-0/data", "--state-dir", str(state))
        assert code == 1
        assert "which still declares it" in out
        assert len(out.strip().splitlines()) == 1
        code, out = cli(capsys, "volumes", "rm", "nope", "--state-dir", str(state))
        assert code == 1
        assert "VM/NAME" in out
    finally:
        remove_deployment(state, bridge)
