"""The specialised kernel builder: fragment merging and verification (pure), the fragments'
derivation from Firecracker's configuration, the checked-in profiles on tinyconfig against the
real Kconfig of linux-source-6.1, the registry's choice of kernel per
target, and QEMU boots (TCG here) of fleet-example's images on the specialised kernels."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from support.qemu import boot
from support.repo import FLEET_EXAMPLE, FleetRepo

from builders.cache import ArtifactCache
from builders.kernel_build import (
    CONFIG_DIR,
    DEVIATIONS,
    PROFILES,
    REFERENCE_CONFIG,
    SOURCE_DIR,
    SOURCE_TARBALL,
    build_key,
    fragment_paths,
    merge,
    omitted_features,
    parse_config,
    render_config,
    verify,
    wanted_options,
)
from builders.kernels import VM_MODULES, KernelRegistry, profile_for
from reconciler.cli import main
from reconciler.errors import EXIT_ERROR, BuildError

# -- merging and verification (pure) ------------------------------------------------------------


def test_a_fragment_overrides_the_base_and_says_what_it_wants() -> None:
    base = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_S="x"\n'
    merged, wanted = merge(base, ["# CONFIG_A is not set\nCONFIG_B=y\n", "CONFIG_D=y\nCONFIG_B=n"])
    assert parse_config(merged) == {
        "CONFIG_A": "n",
        "CONFIG_B": "n",
        "CONFIG_C": "m",
        "CONFIG_S": '"x"',
        "CONFIG_D": "y",
    }
    assert "# CONFIG_A is not set\n" in merged  # Kconfig's own spelling of "no"
    assert wanted == {"CONFIG_A": "n", "CONFIG_B": "n", "CONFIG_D": "y"}  # the last value wins


def test_a_line_that_is_not_an_option_is_refused_with_its_number() -> None:
    with pytest.raises(BuildError, match=r"line 2 is not an option: 'MODULES=n'"):
        parse_config("CONFIG_A=y\nMODULES=n\n")


def test_verify_names_every_option_kconfig_did_not_take() -> None:
    final = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    verify(final, {"CONFIG_A": "y", "CONFIG_C": "n", "CONFIG_Z": "n"}, profile="p")
    with pytest.raises(BuildError) as caught:
        verify(final, {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y"}, profile="p")
    message = str(caught.value)
    assert "kernel profile p" in message
    assert "CONFIG_B (wanted n, got y)" in message
    assert "CONFIG_C (wanted y, got n)" in message
    assert "CONFIG_A" not in message


def test_the_build_key_covers_source_configuration_and_toolchain() -> None:
    tools = {"gcc": "gcc 12.2.0", "ld": "GNU ld 2.40"}
    key = build_key("6.1.1-1", "CONFIG_A=y\n", tools)
    assert key == build_key("6.1.1-1", "CONFIG_A=y\n", dict(tools))
    assert key != build_key("6.1.1-2", "CONFIG_A=y\n", tools)
    assert key != build_key("6.1.1-1", "# CONFIG_A is not set\n", tools)
    assert key != build_key("6.1.1-1", "CONFIG_A=y\n", tools | {"gcc": "gcc 13.1.0"})


def test_an_unknown_profile_is_one_line() -> None:
    with pytest.raises(BuildError, match="no kernel profile 'tiny' \\(have: microvm, unikernel"):
        fragment_paths("tiny")


def test_the_checked_in_profiles_ask_for_what_a_guest_needs() -> None:
    common = parse_config((CONFIG_DIR / "common.config").read_text())
    for option, value in {
        "CONFIG_MODULES": "n",
        "CONFIG_VIRTIO_MMIO": "y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y",
        "CONFIG_SERIAL_8250_CONSOLE": "y",
        "CONFIG_PCI": "y",
        "CONFIG_ACPI": "y",
        "CONFIG_ACPI_BUTTON": "y",
        "CONFIG_INPUT_EVDEV": "y",
        "CONFIG_DEVTMPFS_MOUNT": "y",
        "CONFIG_BLK_DEV_INITRD": "y",
        "CONFIG_RD_LZ4": "y",
        "CONFIG_RD_XZ": "n",
        "CONFIG_KERNEL_LZ4": "y",
        "CONFIG_PVH": "y",
    }.items():
        assert common[option] == value, option
    wants = {p: parse_config((CONFIG_DIR / f"{p}.config").read_text()) for p in PROFILES}
    assert wants["microvm"]["CONFIG_VIRTIO_BLK"] == wants["microvm"]["CONFIG_VIRTIO_NET"] == "y"
    # tinyconfig has no block layer and no network device: a profile adds what it uses.
    assert "CONFIG_VIRTIO_BLK" not in wants["unikernel"]
    assert "CONFIG_VIRTIO_NET" not in wants["batch"]
    assert "Apache License, Version 2.0" in (CONFIG_DIR / "NOTICE").read_text()
    assert [p.name for p in fragment_paths("batch")] == ["common.config", "batch.config"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_option_is_set_as_firecracker_sets_it_or_is_a_listed_deviation(
    profile: str,
) -> None:
    """The fragments are derived from Firecracker's guest configuration: an option set another
    way must be in ``DEVIATIONS`` with its reason, and a deviation that is none is stale."""
    reference = parse_config((CONFIG_DIR / REFERENCE_CONFIG).read_text())
    wanted = wanted_options([p.read_text() for p in fragment_paths(profile)])
    differing = {o for o, v in wanted.items() if reference.get(o, "n") != v}
    unexplained = sorted(differing - set(DEVIATIONS))
    assert not unexplained, f"set unlike Firecracker and not in DEVIATIONS: {unexplained}"
    assert all(reason.strip() for reason in DEVIATIONS.values())


def test_every_deviation_is_one_the_fragments_make() -> None:
    reference = parse_config((CONFIG_DIR / REFERENCE_CONFIG).read_text())
    differing: set[str] = set()
    for profile in PROFILES:
        wanted = wanted_options([p.read_text() for p in fragment_paths(profile)])
        differing |= {o for o, v in wanted.items() if reference.get(o, "n") != v}
    assert set(DEVIATIONS) == differing


def test_omitted_features_are_the_registry_features_left_out() -> None:
    final = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_NET=y\n# CONFIG_VIRTIO_BLK is not set\n"
    omitted = omitted_features(final)
    assert "virtio_blk" in omitted
    assert "ext4" in omitted
    assert "virtio_mmio" not in omitted
    assert "virtio_net" not in omitted


# -- the registry's choice ----------------------------------------------------------------------


def fake_image(path: Path, seed: bytes) -> Path:
    """A file with a bzImage's setup header: all the registry reads of an image."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x800 : 0x800 + len(seed)] = seed
    path.write_bytes(bytes(data))
    return path


def test_a_target_boots_the_kernel_built_for_its_profile_else_the_general_one(
    tmp_path: Path,
) -> None:
    registry = KernelRegistry(tmp_path / "kernels")
    config = tmp_path / "config"
    config.write_text(
        render_config(
            {"CONFIG_VIRTIO_MMIO": "y", "CONFIG_VIRTIO_NET": "y", "CONFIG_VIRTIO_CONSOLE": "y"}
        )
    )
    debian = registry.import_path(fake_image(tmp_path / "a", b"debian"), name="debian-6.1")
    assert registry.default_for("unikernel") == debian
    uni = registry.import_path(
        fake_image(tmp_path / "b", b"uni"),
        name="linux-6.1-unikernel",
        config=config,
        build={"profile": "unikernel", "omits": "virtio_blk,ext4"},
    )
    assert registry.default_for("unikernel") == uni
    # The microvm target never gets a disk-less kernel by default, even the newest one.
    assert registry.default_for("microvm") == debian
    micro = registry.import_path(
        fake_image(tmp_path / "c", b"micro"),
        name="linux-6.1-microvm",
        config=config,
        build={"profile": "microvm"},
    )
    assert registry.default_for("microvm") == micro
    assert registry.default_for("unikernel") == uni
    # A profile not built yet borrows the microvm kernel: it has every device.
    assert registry.default_for("batch") == micro
    assert registry.get(None) == micro
    assert registry.get("debian-6.1") == debian
    assert uni.profile == "unikernel"
    assert debian.profile is None
    again = KernelRegistry(tmp_path / "kernels").get("linux-6.1-unikernel")
    assert again.build["omits"] == "virtio_blk,ext4"
    # Built in, or left out by design: no module to load, and no error for the disk it lacks.
    assert uni.features["virtio_net"] == "builtin"
    assert uni.features["virtio_blk"] == "missing"
    assert uni.modules_for(VM_MODULES) == []


def test_only_a_unikernel_without_volumes_boots_the_diskless_profile() -> None:
    assert profile_for("unikernel", volumes=False) == "unikernel"
    assert profile_for("unikernel", volumes=True) == "microvm"
    assert profile_for("microvm", volumes=False) == "microvm"


def test_kernel_build_refuses_an_unknown_profile_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["kernel", "build", "--profile", "tiny"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "invalid choice: 'tiny'" in err
    assert "Traceback" not in err


# -- the profiles against the real Kconfig ------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """linux-source-6.1 unpacked once (Kconfig only is used)."""
    assert SOURCE_TARBALL.is_file(), "linux-source-6.1 is missing: apt-get install linux-source-6.1"
    root = tmp_path_factory.mktemp("linux")
    subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(root)], check=True)
    return root / SOURCE_DIR


def olddefconfig(tree: Path, merged: str) -> str:
    (tree / ".config").write_text(merged)
    make = ["make", "-s", "ARCH=x86_64"]
    subprocess.run([*make, "olddefconfig"], cwd=tree, check=True, capture_output=True)
    return (tree / ".config").read_text()


@pytest.fixture(scope="module")
def tinyconfig(kernel_tree: Path) -> str:
    """``make tinyconfig``: the base every profile is merged onto."""
    make = ["make", "-s", "ARCH=x86_64", "tinyconfig"]
    subprocess.run(make, cwd=kernel_tree, check=True, capture_output=True)
    return (kernel_tree / ".config").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_holds_after_olddefconfig(
    kernel_tree: Path, tinyconfig: str, profile: str
) -> None:
    merged, wanted = merge(tinyconfig, [p.read_text() for p in fragment_paths(profile)])
    final = parse_config(olddefconfig(kernel_tree, merged))
    verify(render_config(final), wanted, profile=profile)
    assert final.get("CONFIG_MODULES", "n") == "n"
    assert final.get("CONFIG_64BIT") == "y"
    # The guest's needs that are not named but must follow: the power button's input device,
    # and no initramfs decompressor beyond LZ4 and gzip.
    assert final.get("CONFIG_ACPI_BUTTON") == final.get("CONFIG_INPUT_EVDEV") == "y"
    assert {o for o, v in final.items() if o.startswith("CONFIG_RD_") and v == "y"} == {
        "CONFIG_RD_GZIP",
        "CONFIG_RD_LZ4",
    }
    devices = ("CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_VIRTIO_NET")
    has = {o for o in devices if final.get(o) == "y"}
    assert (
        has
        == {
            "microvm": {"CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_VIRTIO_NET"},
            "unikernel": {"CONFIG_VIRTIO_NET"},
            "batch": {"CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS"},
        }[profile]
    )


@pytest.mark.slow
def test_an_option_kconfig_drops_is_a_build_error_naming_it(
    kernel_tree: Path, tinyconfig: str
) -> None:
    base = tinyconfig
    fragments = [p.read_text() for p in fragment_paths("microvm")]
    # virtio-blk depends on the block-device menu: Kconfig drops it without a word.
    merged, wanted = merge(base, [*fragments, "# CONFIG_BLK_DEV is not set\nCONFIG_VIRTIO_BLK=y"])
    with pytest.raises(BuildError, match=r"CONFIG_VIRTIO_BLK \(wanted y, got n\)"):
        verify(olddefconfig(kernel_tree, merged), wanted, profile="microvm")


# -- the built kernels, registered and booted ---------------------------------------------------


def test_the_built_kernels_are_registered_with_their_provenance(specialised_state: Path) -> None:
    registry = KernelRegistry(specialised_state / "kernels")
    for profile in ("microvm", "unikernel"):
        kernel = registry.default_for(profile)
        assert kernel.profile == profile
        meta = json.loads((kernel.image.parent / "kernel.json").read_text())["build"]
        assert meta["source"].startswith("linux-source-6.1 ")
        assert meta["fragments_digest"].startswith("sha256:")
        assert meta["key"] == kernel.build["key"]
        assert meta["gcc"].startswith("gcc ")
        assert kernel.features["virtio_mmio"] == kernel.features["virtio_net"] == "builtin"
        assert kernel.modules_dir is None
        assert kernel.modules_for(VM_MODULES) == []
        # The uncompressed kernel came with it: nothing to extract for Firecracker.
        assert registry.vmlinux_for(kernel).read_bytes()[:4] == b"\x7fELF"
    assert registry.default_for("microvm").features["virtio_blk"] == "builtin"
    assert registry.default_for("unikernel").features["virtio_blk"] == "missing"


def test_a_second_build_on_the_machine_reuses_the_cache(
    specialised_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``specialised_state`` built (or found) both kernels; ``kernel build`` in a fresh state
    directory registers them from the cache without building."""
    assert main(["kernel", "build", "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert all("cached" in line for line in out), out
    names = {k.name for k in KernelRegistry(tmp_path / "state" / "kernels").list()}
    mine = {k.name for k in KernelRegistry(specialised_state / "kernels").list() if k.profile}
    assert names == mine


@pytest.fixture(scope="module")
def specialised_images(
    tmp_path_factory: pytest.TempPathFactory, specialised_state: Path
) -> dict[str, Path]:
    """fleet-example's echo and web images, built with the specialised kernels by default."""
    root = tmp_path_factory.mktemp("specialised")
    shutil.copytree(FLEET_EXAMPLE, root / "fleet")
    repo = FleetRepo(root / "fleet")
    repo.commit("fleet-example")
    cache = root / "cache"
    argv = ["build", "--repo", str(repo.path), "--state-dir", str(specialised_state)]
    targets = ["--target", "unikernel", "--target", "microvm"]
    assert main([*argv, "--cache-dir", str(cache), *targets, "echo", "web"]) == 0
    entries = ArtifactCache(cache).entries()
    return {f"{e.manifest['workload']}/{e.manifest['target']}": e.path for e in entries}


def test_images_name_the_specialised_kernel_of_their_target(
    specialised_images: dict[str, Path], specialised_state: Path
) -> None:
    registry = KernelRegistry(specialised_state / "kernels")
    images = {
        label: path
        for label, path in specialised_images.items()
        if label.split("/")[1] in ("unikernel", "microvm")  # not the executables they embed
    }
    assert set(images) == {"echo/unikernel", "web/unikernel", "web/microvm"}
    for label, path in images.items():
        target = label.split("/")[1]
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["kernel"]["name"] == registry.default_for(target).name
        assert (path / "kernel").read_bytes() == registry.default_for(target).image.read_bytes()
        # Everything is built in: the initramfs carries no module and tells the init to load none.
        for initramfs in path.glob("initramfs*"):
            data = initramfs.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            assert b"lib/modules/" not in data, initramfs
            assert b"module=/lib/modules/" not in data, initramfs


def wait_http(port: int | None, path: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["microvm", "unikernel"])
def test_web_answers_its_health_check_on_the_specialised_kernel(
    target: str, specialised_images: dict[str, Path], tmp_path: Path
) -> None:
    vm = boot(specialised_images[f"web/{target}"], tmp_path, guest_port=8080)
    try:
        vm.wait_for("workload-started", timeout=180)
        assert wait_http(vm.host_port, "/healthz", time.monotonic() + 120) == b"ok\n"
    finally:
        vm.stop()


@pytest.mark.qemu
def test_echo_unikernel_answers_on_the_specialised_kernel(
    specialised_images: dict[str, Path], tmp_path: Path
) -> None:
    vm = boot(specialised_images["echo/unikernel"], tmp_path, guest_port=7007, memory_mib=128)
    try:
        vm.wait_for("workload-started", timeout=180)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", vm.host_port or 0), timeout=5) as c:
                    c.sendall(b"specialised\n")
                    assert c.recv(64) == b"specialised\n"
                    break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        vm.stop()
