"""Volumes (``deploy.volumes``) without booting anything: what a manifest may declare, what the
plan says about a volume (grow = restart, shrink refused, a delete that discards data), how each
runtime is told to attach one (golden QEMU argv and Firecracker config), what the guest init is
given, the process sandbox's bind mount, and the disk files themselves (real ``mkfs.ext4``,
``resize2fs``, copies). The boots are in ``test_volumes_process.py`` and
``test_volumes_qemu.py``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator
from support.fakes import fleet, running, workload
from test_qemu_argv import matches_golden
from test_qemu_runtime import spec_for

from reconciler.errors import PlanError, VMRuntimeError
from reconciler.execution.launch import guest_config, launch_config
from reconciler.guest_config import GuestConfigError, GuestVolume, encode
from reconciler.guest_values import deploy_problems
from reconciler.model import ActionType, Disruption, VolumeSpec, volumes_of
from reconciler.planning import diff
from reconciler.render import RENDERERS
from runtime import volumes as disks
from runtime.firecracker.config import firecracker_config
from runtime.process.sandbox import HostLayout, Tools, sandbox_argv
from runtime.protocol import VolumeAttachment

DATA = VolumeSpec(name="data", size_mib=64, mount_path="/var/lib/app")
SCRATCH = VolumeSpec(name="scratch", size_mib=16, mount_path="/scratch", reclaim_policy="delete")


def with_volumes(*volumes: VolumeSpec, replicas: int = 1) -> object:
    return workload("db", replicas=replicas, volumes=tuple(volumes))


# ------------------------------------------------------------------------- validation --


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ({"name": "Data", "sizeMiB": 64, "mountPath": "/data"}, "must be 1-16 of"),
        ({"name": "a" * 17, "sizeMiB": 64, "mountPath": "/data"}, "must be 1-16 of"),
        ({"name": "data", "sizeMiB": 8, "mountPath": "/data"}, "sizeMiB must be 16"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "data"}, "absolute path"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/"}, "absolute path"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/proc"}, "would hide /proc"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/sys/kernel"}, "would hide /sys"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/dev"}, "would hide /dev"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/etc/reconciler"}, "would hide /etc"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/app"}, "would hide /app"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/usr/lib"}, "would hide /usr"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/data/../etc"}, "may not contain"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/data/"}, "no empty, trailing"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/da ta"}, "no empty, trailing"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/data\nx"}, "no empty, trailing"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/data", "filesystem": "xfs"}, "only"),
        ({"name": "data", "sizeMiB": 64, "mountPath": "/data", "reclaimPolicy": "x"}, "retain"),
    ],
)
def test_a_volume_the_guest_cannot_mount_safely_is_refused(
    volume: dict[str, object], message: str
) -> None:
    problems = deploy_problems({"volumes": [volume]})
    assert any(message in why for _at, why in problems), problems
    assert all(at[0] == "volumes" for at, _why in problems)


def test_volumes_may_not_share_a_name_or_overlap() -> None:
    problems = deploy_problems(
        {
            "volumes": [
                {"name": "a", "sizeMiB": 16, "mountPath": "/data"},
                {"name": "a", "sizeMiB": 16, "mountPath": "/other"},
                {"name": "b", "sizeMiB": 16, "mountPath": "/data/inner"},
            ]
        }
    )
    whys = [why for _at, why in problems]
    assert "volume 'a' is declared twice" in whys
    assert "mountPath /data/inner overlaps volumes[0] at /data" in whys
    good = {"name": "data", "sizeMiB": 16, "mountPath": "/var/lib/app.d", "reclaimPolicy": "delete"}
    assert deploy_problems({"volumes": [good]}) == []


def test_a_manifest_with_volumes_validates_and_compiles(tmp_path: Path) -> None:
    from support.repo import FleetRepo

    from reconciler.cli import main

    repo = FleetRepo.create(
        tmp_path / "fleet",
        {
            "fleet.yaml": "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n",
            "db/main.c": "int main(void) { return 0; }\n",
            "db.yaml": (
                "apiVersion: reconciler/v1alpha1\nkind: Workload\nmetadata: {name: db}\n"
                "spec:\n  source: {path: db, language: c, entrypoint: main.c}\n"
                "  build: {targets: [microvm]}\n"
                "  deploy:\n    target: microvm\n    runtime: qemu\n    replicas: 1\n"
                "    volumes:\n      - {name: data, sizeMiB: 64, mountPath: /srv/data}\n"
                "      - {name: bad, sizeMiB: 64, mountPath: /proc/x}\n"
            ),
        },
    )
    assert main(["validate", "--repo", str(repo.path), "--state-dir", str(tmp_path / "s")]) == 1
    repo.edit("db.yaml", "      - {name: bad, sizeMiB: 64, mountPath: /proc/x}\n", "")
    repo.commit("only data")
    assert main(["validate", "--repo", str(repo.path), "--state-dir", str(tmp_path / "s")]) == 0


# ----------------------------------------------------------------------------- planning --


def test_volumes_are_settings_of_the_vm_and_read_back() -> None:
    desired = fleet(with_volumes(DATA, SCRATCH))
    settings = desired.vms["db-0"].settings
    assert json.loads(settings["deploy.volumes.data"]) == {
        "filesystem": "ext4",
        "mountPath": "/var/lib/app",
        "sizeMiB": 64,
    }
    assert json.loads(settings["deploy.volumeReclaim.scratch"]) == "delete"
    assert volumes_of(settings) == (DATA, SCRATCH)
    # A fleet without volumes has no volume keys: nothing changes for it.
    assert not any("volume" in key for key in fleet(workload("db")).vms["db-0"].settings)


def test_adding_or_growing_a_volume_is_a_restart_and_the_policy_in_place() -> None:
    before = fleet(with_volumes(DATA))
    grown = fleet(with_volumes(VolumeSpec("data", 128, "/var/lib/app")))
    plan = diff(grown, running(before))
    assert [(a.action, a.disruption) for a in plan.actions] == [
        (ActionType.RESTART, Disruption.RESTART)
    ]
    (change,) = plan.actions[0].changes
    assert change.key == "deploy.volumes.data"
    assert '"sizeMiB":64' in str(change.before)
    assert '"sizeMiB":128' in str(change.after)
    text = RENDERERS["text"](plan)
    assert "~ deploy.volumes.data" in text
    assert "will be restarted" in text

    added = diff(fleet(with_volumes(DATA, SCRATCH)), running(before))
    assert [a.action for a in added.actions] == [ActionType.RESTART]
    retain = fleet(with_volumes(VolumeSpec("data", 64, "/var/lib/app", reclaim_policy="delete")))
    assert [a.action for a in diff(retain, running(before)).actions] == [ActionType.UPDATE]


def test_shrinking_a_volume_is_refused_naming_it() -> None:
    before = fleet(with_volumes(DATA, replicas=2))
    smaller = fleet(with_volumes(VolumeSpec("data", 32, "/var/lib/app"), replicas=2))
    with pytest.raises(PlanError, match=r"cannot shrink.*db-0/data from 64 to 32 MiB"):
        diff(smaller, running(before))


def test_a_delete_says_whether_it_discards_volume_data() -> None:
    before = fleet(with_volumes(DATA, SCRATCH), workload("web"))
    plan = diff(fleet(workload("web")), running(before))
    (delete,) = plan.actions
    assert delete.action is ActionType.DELETE
    assert "discards volume data: scratch" in delete.reason
    assert "keeps volume(s) data (reclaimPolicy retain)" in delete.reason
    assert plan.warnings == (
        "deleting VM db-0 discards the data of its volume(s) scratch (reclaimPolicy delete)",
    )
    for name, render in RENDERERS.items():
        assert "discards the data of its volume(s) scratch" in render(plan), name


# ---------------------------------------------------------------- the runtimes' view --


def test_the_guest_is_told_each_volume_by_serial_and_path() -> None:
    config = launch_config(fleet(with_volumes(DATA, SCRATCH)).vms["db-0"].settings)
    guest = guest_config(config, hostname="db-0", address=None, gateway=None)
    blob = encode(guest)
    assert b"volume 22\ndata ext4 /var/lib/app\n" in blob
    assert b"volume 21\nscratch ext4 /scratch\n" in blob
    # The runtime's encoder holds the same line as the manifests (settings from an old store).
    with pytest.raises(GuestConfigError, match="would hide /etc"):
        encode(replace_volumes(guest, GuestVolume("data", "/etc")))
    with pytest.raises(GuestConfigError, match="cannot be mounted"):
        encode(replace_volumes(guest, GuestVolume("x y", "/data")))


def replace_volumes(guest: object, *volumes: GuestVolume) -> object:
    from dataclasses import replace

    return replace(guest, volumes=volumes)  # type: ignore[type-var]


VOLUMES = (
    VolumeAttachment("data", Path("/state/volumes/web-0/data.ext4"), "/var/lib/app"),
    VolumeAttachment("scratch", Path("/state/volumes/web-0/scratch.ext4"), "/scratch"),
)


def test_qemu_attaches_one_virtio_blk_disk_per_volume_with_its_serial() -> None:
    from runtime.qemu.argv import qemu_argv

    spec = spec_for(Path("/vms/web-0"), rootfs=Path("/vms/web-0/rootfs.ext4"), volumes=VOLUMES)
    argv = qemu_argv(spec, accel="tcg")
    assert "virtio-blk-device,drive=vol-data,serial=data" in argv
    assert "id=vol-data,file=/state/volumes/web-0/data.ext4,format=raw,if=none,cache=writeback" in (
        argv
    )
    matches_golden("microvm-volumes", argv)
    comma = spec_for(Path("/v"), volumes=(VolumeAttachment("d", Path("/a,b/d.ext4"), "/d"),))
    assert "id=vol-d,file=/a,,b/d.ext4,format=raw,if=none,cache=writeback" in qemu_argv(
        comma, accel="tcg"
    )


def test_firecracker_gets_one_drive_per_volume_valid_against_its_spec() -> None:
    from test_firecracker import GOLDEN, SWAGGER
    from test_firecracker import spec as firecracker_spec

    config = firecracker_config(
        firecracker_spec(rootfs=Path("/vms/web-0/rootfs.ext4"), volumes=VOLUMES)
    )
    assert [d["drive_id"] for d in config["drives"]] == ["root", "vol-data", "vol-scratch"]
    jailed = firecracker_config(firecracker_spec(volumes=VOLUMES), jailed=True)
    assert jailed["drives"][0]["path_on_host"] == "/volume-data.ext4"
    rendered = json.dumps(config, indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / "microvm-volumes.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()
    definitions = copy.deepcopy(yaml.safe_load(SWAGGER.read_text())["definitions"])
    for definition in definitions.values():
        if definition.get("type") == "object" and "properties" in definition:
            definition.setdefault("additionalProperties", False)
    validator = Draft4Validator(
        {"$ref": "#/definitions/FullVmConfiguration", "definitions": definitions}
    )
    assert [e.message for e in validator.iter_errors(config)] == []


TOOLS = Tools("/usr/bin/nsenter", "/usr/bin/bwrap", "/usr/bin/setpriv")
LAYOUT = HostLayout(links={"/lib": "usr/lib"}, directories=(), etc=("/etc/hosts",))


def sandbox(volumes: list[tuple[Path, str]]) -> list[str]:
    return sandbox_argv(
        name="db-0",
        command=["/state/init", "--supervisor"],
        read_only=[Path("/state/init")],
        workdir=Path("/state/vms/db-0/work"),
        uid=1234,
        netns=None,
        tools=TOOLS,
        layout=LAYOUT,
        volumes=volumes,
    )


def test_the_process_sandbox_bind_mounts_the_volume_directory_writable() -> None:
    argv = sandbox([(Path("/state/volumes/db-0/data"), "/var/lib/app")])
    inner = argv.index("--unshare-user")
    outer, inside = argv[:inner], argv[inner:]
    bind = outer.index("/state/volumes/db-0/data")
    assert outer[bind - 1 : bind + 2] == ["--bind", "/state/volumes/db-0/data", "/var/lib/app"]
    # Its parents exist for the workload's uid to walk through, and it is writable inside
    # the inner sandbox too (everything else is read-only there).
    assert outer[outer.index("/var") - 3 : outer.index("/var") + 1] == [
        "--perms",
        "0755",
        "--dir",
        "/var",
    ]
    at = inside.index("/var/lib/app")
    assert inside[at - 1 : at + 2] == ["--bind", "/var/lib/app", "/var/lib/app"]


@pytest.mark.parametrize("target", ["/state", "/state/vms/db-0/work/x", "/state/init"])
def test_a_volume_over_the_sandboxs_own_paths_is_refused(target: str) -> None:
    with pytest.raises(VMRuntimeError, match="overlaps"):
        sandbox([(Path("/state/volumes/db-0/data"), target)])


# ------------------------------------------------------------------- the disk files --


def test_a_disk_is_created_once_sparse_grown_in_place_and_never_shrunk(tmp_path: Path) -> None:
    path = disks.disk_path(tmp_path, "db-0", "data")
    assert disks.ensure_disk(path, 32, "data") == "created"
    info = path.stat()
    assert info.st_size == 32 * disks.MIB
    assert info.st_blocks * 512 < info.st_size // 2  # sparse
    label = subprocess.run(["e2label", str(path)], capture_output=True, text=True, check=True)
    assert label.stdout.strip() == "data"
    # Data written into the filesystem survives a grow (debugfs writes as the guest would).
    (tmp_path / "counter").write_text("41\n")
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {tmp_path / 'counter'} counter", str(path)],
        check=True,
        capture_output=True,
    )
    assert disks.ensure_disk(path, 32, "data") == "kept"
    assert disks.ensure_disk(path, 48, "data") == "grown"
    assert path.stat().st_size == 48 * disks.MIB
    blocks = subprocess.run(
        ["dumpe2fs", "-h", str(path)], capture_output=True, text=True, check=True
    ).stdout
    block_count = int(
        next(ln for ln in blocks.splitlines() if ln.startswith("Block count:")).split()[-1]
    )
    block_size = int(
        next(ln for ln in blocks.splitlines() if ln.startswith("Block size:")).split()[-1]
    )
    assert block_count * block_size == 48 * disks.MIB  # the filesystem grew with the file
    assert cat(path, "counter") == "41\n"
    assert disks.ensure_disk(path, 16, "data") == "larger"  # kept whole, never shrunk
    assert path.stat().st_size == 48 * disks.MIB


def cat(image: Path, name: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"cat {name}", str(image)], capture_output=True, text=True, check=True
    ).stdout


def test_snapshot_and_restore_round_trip(tmp_path: Path) -> None:
    path = disks.disk_path(tmp_path, "db-0", "data")
    disks.ensure_disk(path, 16, "data")
    source = tmp_path / "counter"
    source.write_text("1\n")
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {source} counter", str(path)],
        check=True,
        capture_output=True,
    )
    volume = disks.find_volume(tmp_path, "db-0", "data")
    taken = disks.snapshot(tmp_path, volume)
    assert taken.path.stat().st_blocks * 512 < 16 * disks.MIB  # still sparse
    subprocess.run(
        ["debugfs", "-w", "-R", "rm counter", str(path)], check=True, capture_output=True
    )
    assert (
        "counter"
        not in subprocess.run(
            ["debugfs", "-R", "ls", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert [s.stamp for s in disks.list_snapshots(tmp_path)] == [taken.stamp]
    restored = disks.restore(tmp_path, volume, None)
    assert restored.stamp == taken.stamp
    assert cat(path, "counter") == "1\n"
    with pytest.raises(disks.VolumeError, match="no snapshot 2020"):
        disks.restore(tmp_path, volume, "20200101T000000.000000Z")


def test_directory_volumes_copy_without_following_symlinks(tmp_path: Path) -> None:
    path = disks.directory_path(tmp_path, "db-0", "data")
    assert disks.ensure_directory(path) == "created"
    (path / "counter").write_text("7\n")
    (path / "escape").symlink_to("/etc/hostname")
    volume = disks.find_volume(tmp_path, "db-0", "data")
    assert volume.directory
    taken = disks.snapshot(tmp_path, volume)
    assert (taken.path / "escape").is_symlink()
    (path / "counter").write_text("8\n")
    disks.restore(tmp_path, volume, taken.stamp)
    assert (path / "counter").read_text() == "7\n"
    assert os.readlink(path / "escape") == "/etc/hostname"
    removed = disks.remove_volume(tmp_path, "db-0", "data")
    assert removed == [path]
    assert not path.exists()


@pytest.mark.parametrize(("vm", "name"), [("../x", "data"), ("db-0", "../../etc"), ("db-0", "")])
def test_volume_paths_cannot_leave_the_state_directory(tmp_path: Path, vm: str, name: str) -> None:
    with pytest.raises(disks.VolumeError):
        disks.disk_path(tmp_path, vm, name)


def test_the_tools_that_parse_a_guests_filesystem_run_confined(tmp_path: Path) -> None:
    image = tmp_path / "data.ext4"
    argv = disks._confined(["/usr/sbin/e2fsck", "-f", "-p", str(image)], image)
    assert argv[-4:] == ["/usr/sbin/e2fsck", "-f", "-p", "/volume"]
    for flag in ("--unshare-all", "--cap-drop", "--die-with-parent"):
        assert flag in argv
    writable = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert writable == [str(image)]  # the image is the only host file it can write


def test_a_corrupt_volume_fails_its_grow_in_one_line_and_is_left_as_it_was(tmp_path: Path) -> None:
    path = disks.disk_path(tmp_path, "db-0", "data")
    disks.ensure_disk(path, 16, "data")
    with path.open("r+b") as disk:  # the guest overwrote its superblock
        disk.seek(1024)
        disk.write(b"\xff" * 1024)
    with pytest.raises(disks.VolumeError, match=r"checking volume data\.ext4") as failed:
        disks.ensure_disk(path, 32, "data")
    assert "\n" not in str(failed.value)
    assert path.stat().st_size == 16 * disks.MIB  # not truncated before the check passed


def test_a_jailed_firecracker_writes_the_volume_itself_never_a_copy(tmp_path: Path) -> None:
    from dataclasses import replace

    from test_firecracker import spec as firecracker_spec

    from runtime.firecracker.config import JailerOptions
    from runtime.firecracker.jail import prepare_chroot

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF kernel")
    vm_dir = tmp_path / "vms" / "web-0"
    vm_dir.mkdir(parents=True)
    volume = disks.disk_path(tmp_path, "web-0", "data")
    volume.parent.mkdir(parents=True)
    volume.write_bytes(b"ext4 data")
    vm = replace(
        firecracker_spec(volumes=(VolumeAttachment("data", volume, "/data"),)),
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=None,
    )
    options = JailerOptions(uid=os.getuid(), gid=os.getgid(), chroot_base=vm_dir / "jail")
    root = prepare_chroot(vm, options)
    assert (root / "volume-data.ext4").stat().st_ino == volume.stat().st_ino  # a hard link
    config = json.loads((root / "firecracker.json").read_text())
    assert config["drives"][0]["path_on_host"] == "/volume-data.ext4"
