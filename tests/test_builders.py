"""The build-target matrix on fleet-example: real PyInstaller, gcc, mkfs.ext4, real kernels,
and QEMU boots of the images (TCG here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from support.kernel import debian_kernel
from support.qemu import boot
from support.repo import FLEET_EXAMPLE, FleetRepo

from builders.cache import ArtifactCache
from builders.cpio import char_device, directory, file_entry, write_initramfs
from builders.executable import is_static_elf
from builders.kernels import VM_MODULES, KernelRegistry
from builders.toolchain import require
from reconciler.cli import main
from reconciler.errors import BuildError, ToolMissingError
from reconciler.guest_config import GuestConfig

# Real builds (PyInstaller, mkfs, QEMU) or a real browser: not part of the fast suite.
pytestmark = pytest.mark.slow


def build(
    capsys: pytest.CaptureFixture[str], repo: Path, state: Path, cache: Path, *extra: str
) -> tuple[int, list[dict[str, object]], str]:
    code = main(
        [
            "build",
            "--repo",
            str(repo),
            "--state-dir",
            str(state),
            "--cache-dir",
            str(cache),
            "--format",
            "json",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> dict[str, Path]:
    """fleet-example committed to a scratch repository and built once into a cache."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(FLEET_EXAMPLE, root / "fleet")
    repo = FleetRepo(root / "fleet")
    repo.commit("fleet-example")
    cache = root / "cache"
    code = main(
        [
            "build",
            "--repo",
            str(repo.path),
            "--state-dir",
            str(session_state),
            "--cache-dir",
            str(cache),
        ]
    )
    assert code == 0
    artifacts = {
        f"{e.manifest['workload']}/{e.manifest['target']}": e.path
        for e in ArtifactCache(cache).entries()
    }
    return {"repo": repo.path, "cache": cache, **artifacts}


def test_every_target_is_built_then_everything_is_a_cache_hit(
    example: dict[str, Path], session_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert {
        "web/executable",
        "web/unikernel",
        "web/microvm",
        "echo/executable",
        "echo/unikernel",
        "report/executable",
        "report/microvm",
    } <= example.keys()
    code, records, _ = build(capsys, example["repo"], session_state, example["cache"])
    assert code == 0
    assert len(records) == 7
    assert {r["status"] for r in records} == {"cached"}
    assert set(records[0]) >= {"workload", "target", "digest", "status", "seconds"}
    manifest = json.loads((example["web/microvm"] / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"kernel", "initramfs.cpio.gz", "rootfs.ext4", "cmdline"}
    assert manifest["toolchain"]["kernel"].startswith("sha256:")


def test_changing_one_source_rebuilds_only_that_workload(
    tmp_path: Path,
    example: dict[str, Path],
    session_state: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_dir = tmp_path / "fleet"
    shutil.copytree(FLEET_EXAMPLE, repo_dir)
    repo = FleetRepo(repo_dir)
    base = repo.commit("A")
    cache = tmp_path / "cache"
    shutil.copytree(example["cache"], cache)
    with (repo_dir / "services" / "echo" / "echo.c").open("a") as source:
        source.write("/* a comment changes the source digest */\n")
    head = repo.commit("B")
    code, records, _ = build(capsys, repo_dir, session_state, cache)
    assert code == 0
    built = {(r["workload"], r["target"]) for r in records if r["status"] == "built"}
    assert built == {("echo", "executable"), ("echo", "unikernel")}
    # The reviewer's diff names the artifacts whose inputs change, and which input.
    main(
        [
            "diff",
            "--repo",
            str(repo_dir),
            "--state-dir",
            str(session_state),
            "--base",
            base,
            "--head",
            head,
            "--format",
            "json",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert {(b["workload"], b["target"], tuple(b["changed_inputs"])) for b in plan["builds"]} == {
        ("echo", "executable", ("source",)),
        ("echo", "unikernel", ("source",)),
    }


def test_unikernel_is_byte_reproducible(
    tmp_path: Path,
    example: dict[str, Path],
    session_state: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digests = []
    for attempt in ("one", "two"):
        cache = tmp_path / attempt
        code, _records, _ = build(
            capsys,
            example["repo"],
            session_state,
            cache,
            "--target",
            "unikernel",
            "--target",
            "executable",
            "echo",
        )
        assert code == 0
        entry = next(
            e for e in ArtifactCache(cache).entries() if e.manifest["target"] == "unikernel"
        )
        digests.append((entry.key, entry.manifest["files"]["initramfs.cpio.gz"]["sha256"]))
        time.sleep(1.1)  # a different wall-clock second must not change a byte
    assert digests[0] == digests[1]


def test_c_syntax_error_fails_with_the_compiler_message_and_caches_nothing(
    tmp_path: Path, session_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo_dir = tmp_path / "fleet"
    shutil.copytree(FLEET_EXAMPLE, repo_dir)
    (repo_dir / "services" / "echo" / "echo.c").write_text("int main(void) { return 0 }\n")
    FleetRepo(repo_dir).commit("broken C")
    cache = tmp_path / "cache"
    code = main(
        [
            "build",
            "--repo",
            str(repo_dir),
            "--state-dir",
            str(session_state),
            "--cache-dir",
            str(cache),
            "echo",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 1
    assert "error: expected" in err  # the compiler's own message
    assert "not built: the executable of echo failed" in err
    assert "Traceback" not in err
    assert ArtifactCache(cache).entries() == []
    assert list((cache / "logs").glob("echo-executable-*.log"))
    assert not list(cache.glob(".tmp-*"))


def test_executables_run_on_the_host(example: dict[str, Path], tmp_path: Path) -> None:
    report = subprocess.run(
        [str(example["report/executable"] / "workload")],
        capture_output=True,
        text=True,
        env={"REPORT_LIMIT": "100", "REPORT_TITLE": "host"},
        timeout=120,
        check=True,
    )
    assert "host: 25 primes below 100" in report.stdout

    port = 17000 + (abs(hash(tmp_path)) % 2000)
    echo = subprocess.Popen(
        [str(example["echo/executable"] / "workload"), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert echo.stdout is not None
        assert "listening" in echo.stdout.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"ping\n")
            assert conn.recv(16) == b"ping\n"
    finally:
        echo.kill()
        echo.wait()
        if echo.stdout is not None:
            echo.stdout.close()
    assert is_static_elf((example["echo/executable"] / "workload").read_bytes())

    web_port = port + 1
    web = subprocess.Popen(
        [str(example["web/executable"] / "workload")],
        stdout=subprocess.DEVNULL,
        env={"PORT": str(web_port), "GREETING": "on the host"},
        # A one-file bundle's bootloader runs the program as its child: the group goes together.
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as r:
                    assert r.read() == b"ok\n"
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        os.killpg(web.pid, signal.SIGKILL)
        web.wait()


def test_every_cache_entry_keeps_its_log_and_gc_keeps_what_runs(
    example: dict[str, Path],
    tmp_path: Path,
    session_state: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(example["cache"], cache)
    entries = ArtifactCache(cache).entries()
    assert all((e.path / "build.log").is_file() for e in entries)
    assert main(["artifacts", "ls", "--cache-dir", str(cache)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert any(" executable-onedir " in row for row in rows)  # the web bundle the images carry
    column = header.index("INPUT")  # every row's input digest starts under its heading
    assert all(re.fullmatch(r" [0-9a-f]{12} ", row[column - 1 : column + 13]) for row in rows)
    # VMs in the state store run the echo and web unikernels: gc keeps those artifacts only,
    # not the executables and the bundle they were built from ...
    from dataclasses import replace

    from support.fakes import fleet, running, workload

    from reconciler.state import open_state_store

    keep = [e for e in entries if e.manifest["target"] == "unikernel"]
    assert {e.manifest["workload"] for e in keep} == {"echo", "web"}
    vms = running(fleet(workload("echo"), workload("web"))).vms
    store = open_state_store(tmp_path / "state")
    for entry in keep:
        vm = vms[f"{entry.manifest['workload']}-0"]
        store.put_vm(replace(vm, artifact_digest=entry.input_digest))
    store.close()
    assert (
        main(["artifacts", "gc", "--state-dir", str(tmp_path / "state"), "--cache-dir", str(cache)])
        == 0
    )
    assert f"removed {len(entries) - 2} artifacts" in capsys.readouterr().out
    assert [e.key for e in ArtifactCache(cache).entries()] == sorted(e.key for e in keep)
    # ... which is harmless: an image carries its own copy of the program, and building it
    # again is a cache hit that needs neither.
    code, records, _ = build(
        capsys, example["repo"], session_state, cache, "--target", "unikernel", "echo", "web"
    )
    assert code == 0
    assert [r["status"] for r in records] == ["cached", "cached"]
    assert [e.key for e in ArtifactCache(cache).entries()] == sorted(e.key for e in keep)


@pytest.mark.qemu
def test_report_microvm_prints_its_output_and_exit_code(
    example: dict[str, Path], tmp_path: Path
) -> None:
    vm = boot(
        example["report/microvm"],
        tmp_path,
        guest=GuestConfig(env={"REPORT_LIMIT": "1000"}, restart="never"),
    )
    try:
        assert vm.wait_exit(timeout=180) == 0
        exited = vm.wait_for("workload-exited")
        assert exited["code"] == 0
        assert "168 primes below 1000" in vm.text()
        events = [m["event"] for m in vm.markers]
        assert events[:2] == ["booted", "workload-started"]
        assert events[-1] == "poweroff"
    finally:
        vm.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["microvm", "unikernel"])
def test_web_service_answers_http_from_its_vm(
    target: str, example: dict[str, Path], tmp_path: Path
) -> None:
    vm = boot(
        example[f"web/{target}"],
        tmp_path,
        guest_port=8080,
        guest=GuestConfig(hostname="web-0", env={"GREETING": "hello from a VM"}),
    )
    try:
        vm.wait_for("workload-started", timeout=180)
        deadline = time.monotonic() + 120
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port}/", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(1)
        # Booted without the fleet's secret: the service says so, never a value.
        assert body == {"greeting": "hello from a VM", "host": "web-0", "api_token": "missing"}
    finally:
        vm.stop()


@pytest.mark.qemu
def test_echo_unikernel_echoes_over_the_vm_network(
    example: dict[str, Path], tmp_path: Path
) -> None:
    vm = boot(example["echo/unikernel"], tmp_path, guest_port=7007, memory_mib=128)
    try:
        vm.wait_for("workload-started", timeout=180)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", vm.host_port or 0), timeout=5) as c:
                    c.sendall(b"hello unikernel\n")
                    assert c.recv(64) == b"hello unikernel\n"
                    break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert "echo: listening on port 7007" in vm.text()
    finally:
        vm.stop()


def test_kernel_registry_reads_the_debian_kernel(session_state: Path) -> None:
    kernel = debian_kernel(session_state)
    assert kernel.format == "bzImage"
    assert kernel.features["virtio_blk"] == "module"
    assert kernel.features["ext4"] == "builtin"
    names = [p.name for p in kernel.modules_for(VM_MODULES)]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_blk.ko")
    assert (
        names.index("failover.ko") < names.index("net_failover.ko") < names.index("virtio_net.ko")
    )
    assert KernelRegistry(session_state / "kernels").get(kernel.name[:0] + kernel.name) == kernel
    assert KernelRegistry(session_state / "kernels").get(kernel.digest[:19]) == kernel


def test_kernel_registry_refuses_what_is_not_a_kernel(tmp_path: Path) -> None:
    registry = KernelRegistry(tmp_path / "kernels")
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"\x7fELF" + b"\x01" * 100)
    with pytest.raises(BuildError, match="is not an x86-64 Linux kernel"):
        registry.import_path(junk)
    with pytest.raises(BuildError, match="no kernel registered"):
        registry.get(None)
    assert not list((tmp_path / "kernels").glob(".import-*"))


def test_binary_language_takes_only_static_executables(tmp_path: Path) -> None:
    from builders.executable import build_executable
    from reconciler.model import Language

    source = tmp_path / "src"
    source.mkdir()
    (source / "hello.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(
        [require("gcc"), "-o", str(source / "dynamic"), str(source / "hello.c")], check=True
    )
    subprocess.run(
        [require("gcc"), "-static", "-o", str(source / "static"), str(source / "hello.c")],
        check=True,
    )
    out = tmp_path / "out"
    build_executable(
        Language.BINARY, source, entrypoint="static", options={}, output=out, log=tmp_path / "log"
    )
    assert is_static_elf(out.read_bytes())
    with pytest.raises(BuildError, match="dynamically linked"):
        build_executable(
            Language.BINARY,
            source,
            entrypoint="dynamic",
            options={},
            output=out,
            log=tmp_path / "log",
        )


def test_missing_tool_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from builders import toolchain

    monkeypatch.setitem(toolchain.APT_PACKAGE, "no-such-mkfs", "e2fsprogs")
    with pytest.raises(ToolMissingError, match="apt-get install e2fsprogs"):
        require("no-such-mkfs")


def test_initramfs_bytes_depend_only_on_entries(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_text("x")
    entries = [directory("etc"), file_entry("etc/x", payload), char_device("dev/console", 5, 1)]
    write_initramfs(entries, tmp_path / "a.gz")
    time.sleep(1.1)
    payload.touch()
    write_initramfs(list(reversed(entries)), tmp_path / "b.gz")
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    listing = subprocess.run(
        f"zcat {tmp_path / 'a.gz'} | cpio -itv 2>/dev/null",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dev/console" in listing
    assert "etc/x" in listing


def test_vmlinux_is_extracted_for_firecracker(session_state: Path) -> None:
    registry = KernelRegistry(session_state / "kernels")
    kernel = debian_kernel(session_state)  # a bzImage with no vmlinux beside it
    vmlinux = registry.vmlinux_for(kernel)
    header = vmlinux.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2  # ELFCLASS64
    assert int.from_bytes(header[18:20], "little") == 62  # EM_X86_64
    assert registry.vmlinux_for(kernel) == vmlinux  # kept, not extracted again
