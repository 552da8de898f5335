"""The lean images: how a workload is packed into the unikernel and microVM images.

The Python bundle is PyInstaller's one-directory layout under ``/app`` (nothing unpacks itself
at boot), the initramfs is compressed as ``images.INITRAMFS_COMPRESSION`` says, a kernel with
the features built in gets no module to load, and nothing a build leaves behind is followed out
of its tree. Ends with the lean web unikernel booted under QEMU answering its health check.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from support.builds import build_artifacts
from support.qemu import boot
from support.repo import FleetRepo

from builders.cpio import Compression, Entry, archive, compression_of, file_entry, write_initramfs
from builders.executable import take_tree
from builders.images import (
    CONFIG_PATH,
    INITRAMFS,
    INITRAMFS_COMPRESSION,
    build_microvm,
    build_unikernel,
    guest_init,
)
from builders.kernels import FEATURES, VM_MODULES, Kernel, KernelRegistry
from builders.matrix import BUNDLE_NAME
from builders.toolchain import require
from reconciler.errors import BuildError
from reconciler.guest_config import GuestConfig


def unpack(path: Path) -> dict[str, tuple[int, bytes]]:
    """``{path: (mode, data)}`` of a newc initramfs as the kernel reads it (any compression)."""
    raw = path.read_bytes()
    compression = compression_of(path)
    if compression is Compression.GZIP:
        raw = gzip.decompress(raw)
    elif compression is Compression.LZ4:
        raw = subprocess.run(["lz4", "-dc"], input=raw, capture_output=True, check=True).stdout
    files: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert raw[offset : offset + 6] == b"070701", f"bad header at {offset}"
        fields = [int(raw[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_at = offset + 110
        name = raw[name_at : name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, raw[data_at : data_at + size])
        offset = data_at + size + (-size % 4)


def builtin_kernel(tmp_path: Path) -> Kernel:
    """A kernel whose configuration has every feature built in (what a specialised one has)."""
    image = tmp_path / "bzImage"
    image.write_bytes(b"not booted in these tests")
    return Kernel(
        digest="sha256:" + "0" * 64,
        name="builtin",
        version="6.1",
        image=image,
        format="bzImage",
        modules_dir=None,
        features=dict.fromkeys(FEATURES, "builtin"),
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A one-directory bundle shaped like PyInstaller's: the entry point at the top (busybox, a
    static ELF, so no library is looked up), its files under ``_internal/``, a link inside."""
    top = tmp_path / "bundle"
    (top / "_internal" / "lib-dynload").mkdir(parents=True)
    (top / "workload").write_bytes(Path(require("busybox")).read_bytes())
    (top / "workload").chmod(0o755)
    (top / "_internal" / "libpython3.so.1.0").write_bytes(b"\x7fELF library")
    (top / "_internal" / "base_library.zip").write_bytes(b"PK zip")
    os.symlink("libpython3.so.1.0", top / "_internal" / "libpython3.so")
    return top


def init_conf(files: dict[str, tuple[int, bytes]]) -> list[str]:
    return files[CONFIG_PATH][1].decode().splitlines()


def test_unikernel_carries_the_onedir_bundle_and_loads_no_module_when_built_in(
    tmp_path: Path, bundle: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    build_unikernel(bundle, builtin_kernel(tmp_path), guest_init(tmp_path / "log"), out)
    assert compression_of(out / INITRAMFS) is INITRAMFS_COMPRESSION
    files = unpack(out / INITRAMFS)
    # The bundle as it is under /app: the bootloader, its files, its link as a link.
    assert files["app/workload"][1] == (bundle / "workload").read_bytes()
    assert files["app/workload"][0] & 0o111
    assert files["app/_internal/base_library.zip"][1] == b"PK zip"
    mode, target = files["app/_internal/libpython3.so"]
    assert stat.S_ISLNK(mode)
    assert target == b"libpython3.so.1.0"
    # Nothing to load, no disk to switch to: the init runs the workload from the initramfs.
    assert not [name for name in files if name.startswith("lib/modules")]
    conf = init_conf(files)
    assert "exec=/app/workload" in conf
    assert "workdir=/app" in conf
    assert not [line for line in conf if line.startswith(("module=", "root="))]


def test_debian_kernel_gets_its_modules_in_dependency_order(
    tmp_path: Path, bundle: Path, session_state: Path
) -> None:
    debian = KernelRegistry(session_state / "kernels").get(None)
    assert "module" in {debian.features[m] for m in VM_MODULES}
    out = tmp_path / "out"
    out.mkdir()
    build_unikernel(bundle, debian, guest_init(tmp_path / "log"), out)
    files = unpack(out / INITRAMFS)
    modules = [line.removeprefix("module=") for line in init_conf(files) if "module=" in line]
    expected = [f"/lib/modules/{m.name}" for m in debian.modules_for(VM_MODULES)]
    assert modules[: len(expected)] == expected  # (then the power button's, if any)
    assert all(m.lstrip("/") in files for m in modules)


def test_microvm_stages_the_bundle_on_its_root_disk(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    staging.mkdir()
    build_microvm(
        bundle,
        builtin_kernel(tmp_path),
        guest_init(tmp_path / "log"),
        out,
        staging=staging,
        log=tmp_path / "log",
    )
    root = staging / "rootfs"
    assert (root / "app/workload").read_bytes() == (bundle / "workload").read_bytes()
    assert os.readlink(root / "app/_internal/libpython3.so") == "libpython3.so.1.0"
    assert (root / CONFIG_PATH).read_text() == "exec=/app/workload\nworkdir=/app\n"
    boot_conf = init_conf(unpack(out / INITRAMFS))
    assert "root=/dev/vda" in boot_conf
    assert not [line for line in boot_conf if line.startswith("module=")]


@pytest.mark.parametrize("compression", list(Compression))
def test_every_compression_is_reproducible_and_unpacks_to_the_same_archive(
    tmp_path: Path, compression: Compression
) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(1000) + b"x" * 100_000)
    entries = [file_entry("app/x", payload), Entry("etc/y", 0o100644, b"y")]
    write_initramfs(entries, tmp_path / "a", compression)
    time.sleep(1.1)  # a different wall-clock second must not change a byte
    write_initramfs(list(reversed(entries)), tmp_path / "b", compression)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert compression_of(tmp_path / "a") is compression
    unpacked = unpack(tmp_path / "a")
    assert unpacked["app/x"][1] == payload.read_bytes()
    if compression is Compression.NONE:
        assert (tmp_path / "a").read_bytes() == archive(entries)
    if compression is Compression.LZ4:
        # The legacy frame: the only LZ4 format the kernel's initramfs unpacker reads.
        assert (tmp_path / "a").read_bytes()[:4] == b"\x02\x21\x4c\x18"


def test_a_bundle_is_taken_without_following_what_the_build_planted(tmp_path: Path) -> None:
    top = tmp_path / "dist"
    (top / "_internal").mkdir(parents=True)
    (top / "workload").write_bytes(b"run me")
    (top / "workload").chmod(0o4755)  # setuid: not kept
    os.symlink("../workload", top / "_internal" / "inside")
    take_tree(top, tmp_path / "taken")
    assert (tmp_path / "taken/workload").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(tmp_path / "taken/_internal/inside") == "../workload"

    secret = tmp_path / "state-db"
    secret.write_text("the reconciler's state")
    for name, plant in (
        ("absolute", lambda p: os.symlink(str(secret), p)),
        ("escaping", lambda p: os.symlink("../../state-db", p)),
        ("fifo", os.mkfifo),
    ):
        hostile = tmp_path / f"hostile-{name}"
        (hostile / "_internal").mkdir(parents=True)
        plant(hostile / "_internal" / "x")
        with pytest.raises(BuildError, match="_internal/x"):
            take_tree(hostile, tmp_path / f"taken-{name}")
    # The top itself replaced by a link to a host directory: refused, nothing followed.
    os.symlink(tmp_path / "dist", tmp_path / "linked")
    with pytest.raises(BuildError, match="no directory"):
        take_tree(tmp_path / "linked", tmp_path / "taken-linked")


@pytest.fixture(scope="module")
def web_unikernel(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> Path:
    """fleet-example's web service built as a unikernel through the build matrix."""
    root = tmp_path_factory.mktemp("web-unikernel")
    repo = FleetRepo.of_fleet_example(root / "fleet")
    built = build_artifacts(
        repo.path, session_state, root / "cache", "--target", "unikernel", "web"
    )
    # The bundle the image carries is a cache entry of its own, never the plan's executable.
    assert "web/executable-onedir" in built
    bundle = built["web/executable-onedir"].file(BUNDLE_NAME)
    assert built["web/executable-onedir"].input_digest != built["web/executable"].input_digest
    assert (bundle / "_internal").is_dir()
    libpython = next((bundle / "_internal").glob("libpython3*.so*"))
    sections = subprocess.run(
        ["readelf", "-S", "-W", str(libpython)], capture_output=True, text=True, check=True
    ).stdout
    assert ".debug_info" not in sections  # stripped
    return built["web/unikernel"].path


@pytest.mark.slow
def test_web_unikernel_holds_the_bundle_not_a_self_extracting_file(web_unikernel: Path) -> None:
    files = unpack(web_unikernel / INITRAMFS)
    workload = files["app/workload"][1]
    # The bootloader and the Python modules' archive; the interpreter and the extension
    # modules are files beside it (a one-file executable carries them all to unpack: 7.6 MB).
    assert len(workload) < 4 << 20
    assert any(name.startswith("app/_internal/libpython3") for name in files)
    assert "exec=/app/workload" in init_conf(files)


@pytest.mark.slow
@pytest.mark.qemu
def test_lean_web_unikernel_answers_its_health_check(web_unikernel: Path, tmp_path: Path) -> None:
    # The per-VM configuration is an uncompressed archive appended to the (now uncompressed)
    # initramfs: the greeting and the host name prove the init read it.
    vm = boot(
        web_unikernel,
        tmp_path,
        guest_port=8080,
        memory_mib=256,
        guest=GuestConfig(hostname="web-0", env={"GREETING": "lean"}),
    )
    try:
        vm.wait_for("workload-started", timeout=180)
        deadline = time.monotonic() + 120
        while True:
            try:
                url = f"http://127.0.0.1:{vm.host_port}"
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as reply:
                    assert reply.status == 200
                    assert reply.read() == b"ok\n"
                with urllib.request.urlopen(f"{url}/", timeout=5) as reply:
                    body = json.loads(reply.read())
                break
            except OSError:
                assert time.monotonic() < deadline, vm.text()
                time.sleep(0.5)
        assert body == {"greeting": "lean", "host": "web-0", "api_token": "missing"}
        assert "error" not in {m["event"] for m in vm.read_markers()}
    finally:
        vm.stop()
