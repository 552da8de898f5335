"""A volume of a real QEMU microVM through ``reconciler apply``: a C service in a microvm image
counts its starts on an ext4 volume (a virtio-blk disk the guest init finds by its serial and
mounts before the workload starts), and the count continues across a restart, a replace (a
new artifact, a fresh root disk), ``kill -9`` of QEMU and a new ``apply``; growing the volume
grows the disk in place; shrinking is refused in the plan; a snapshot taken with the VM paused
(QMP ``stop``/``cont``) restores; a prune keeps the ``retain`` volume and deletes the
``delete`` one.

Runs as root with QEMU (CI has both). Own bridge and pool; every QEMU, TAP, the bridge and the
nftables tables are removed at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
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

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]
MIB = 1024 * 1024


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def counter(state: Path) -> int:
    console = state / "vms" / "count-0" / "console.log"
    return eventually(lambda: last_counter(console), 120, "count-0 to print its counter")


def disk_file(image: Path, name: str) -> str:
    """A file of the volume as the guest will see it at its next mount: read from a copy whose
    journal was replayed (debugfs alone reads only what has been checkpointed)."""
    copy = image.with_name(".test-copy")
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    try:
        subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, check=False)
        return subprocess.run(
            ["debugfs", "-R", f"cat {name}", str(copy)], capture_output=True, text=True, check=True
        ).stdout
    finally:
        copy.unlink()


def test_a_qemu_vms_volume_outlives_restart_replace_kill_and_prune(
    tmp_path: Path, session_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, cidr = new_pool()
    fleet = fleet_document("vols", network_yaml(bridge, cidr))
    fleet = fleet.replace("spec: {network:", "spec: {allowEmpty: true, network:")
    workload = counter_workload("count", target="microvm", runtime="qemu")
    repo = counter_repo(tmp_path / "fleet", fleet + workload)
    state = tmp_path / "state"
    shutil.copytree(session_state / "kernels", state / "kernels")
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    data = state / "volumes" / "count-0" / "data.ext4"
    scratch = state / "volumes" / "count-0" / "scratch.ext4"
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert counter(state) == 1
        console = (state / "vms" / "count-0" / "console.log").read_text()
        assert '"event":"volume-mounted","name":"data"' in console
        assert data.stat().st_size == 32 * MIB
        assert data.stat().st_mode & 0o777 == 0o600

        survives_restart_replace_and_kill(
            lambda: cli(capsys, "apply", *common),
            repo,
            state / "vms" / "count-0" / "qemu.pid",
            lambda: counter(state),
        )

        # Grow: a restart, the disk grown while the VM is stopped, the data kept.
        repo.edit("fleet.yaml", "sizeMiB: 32", "sizeMiB: 48")
        repo.commit("grow")
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert "volume count-0/data: grown to 48 MiB" in out
        assert data.stat().st_size == 48 * MIB
        assert counter(state) == 5

        # Shrink: refused in the plan, one line, nothing touched.
        repo.edit("fleet.yaml", "sizeMiB: 48", "sizeMiB: 32")
        repo.commit("shrink")
        code, out = cli(capsys, "diff", *common)
        assert code == 1
        assert "count-0/data from 48 to 32 MiB" in out
        assert "Traceback" not in out
        repo.edit("fleet.yaml", "sizeMiB: 32", "sizeMiB: 48")
        repo.commit("no shrink")

        # Snapshot while it runs (QMP stop/cont), another start, then restore.
        code, out = cli(capsys, "volumes", "snapshot", "count-0/data", "--state-dir", str(state))
        assert code == 0, out
        assert "VM paused while copying" in out, out
        stamp = out.split()[1]
        status = json.loads(cli(capsys, "status", "--state-dir", str(state), "--format", "json")[1])
        assert status["vms"][0]["state"] == "running"  # resumed
        repo.edit("fleet.yaml", 'ROUND: "2"', 'ROUND: "3"')
        repo.commit("restart again")
        assert cli(capsys, "apply", *common)[0] == 0
        assert counter(state) == 6
        code, out = cli(capsys, "volumes", "restore", "count-0/data", "--state-dir", str(state))
        assert code == 0, out
        assert f"from snapshot {stamp}" in out, out
        assert disk_file(data, "counter") == "5\n"
        assert cli(capsys, "apply", *common)[0] == 0
        assert counter(state) == 6  # 5 restored, plus this start
        assert "boot 6" in disk_file(data, "boots.log")

        # Prune: the diff warns about the data it discards; retain stays, delete goes.
        repo.write("fleet.yaml", fleet)
        repo.commit("no more counter")
        code, out = cli(capsys, "diff", *common, "--format", "markdown")
        assert code == 2
        assert "discards the data of its volume(s) scratch" in out
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert data.exists()
        assert disk_file(data, "counter") == "6\n"
        assert not scratch.exists()
        assert not (state / "vms" / "count-0").exists()
    finally:
        remove_deployment(state, bridge)
