"""The lean images: how a workload is packed into the unikernel and microVM images.

The Python bundle is PyInstaller's one-directory layout under ``/app`` (nothing unpacks itself
at boot) without the standard library's optional parts the workload's code cannot reach
(``bundle_trim``: the rules on graphs, then real bundles that keep or drop them, and run), the
initramfs is compressed as ``images.INITRAMFS_COMPRESSION`` says, a kernel with
the features built in gets no module to load, and nothing a build leaves behind is followed out
of its tree. Ends with the lean web unikernel booted under QEMU answering its health check.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.builds import build_artifacts
from support.kernel import debian_kernel
from support.qemu import boot
from support.repo import FleetRepo
from support.waiting import free_port

from builders.bundle_trim import Module, decide
from builders.cpio import Compression, Entry, archive, compression_of, file_entry, write_initramfs
from builders.executable import Layout, build_executable, take_tree
from builders.images import (
    CONFIG_PATH,
    INITRAMFS,
    INITRAMFS_COMPRESSION,
    build_microvm,
    build_unikernel,
    guest_init,
)
from builders.kernels import FEATURES, VM_MODULES, Kernel
from builders.matrix import BUNDLE_NAME
from builders.toolchain import require
from reconciler.errors import BuildError
from reconciler.guest_config import GuestConfig
from reconciler.model import Language


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
    debian = debian_kernel(session_state)
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


ALIASES = {"sjis": "shift_jis", "latin1": "latin_1", "utf8": "utf_8"}
STDLIB_GRAPH = {
    "http.server": Module(own=False, imports=frozenset({"http.client", "socketserver"})),
    "http.client": Module(own=False, imports=frozenset({"ssl", "email.parser"})),
    "hmac": Module(own=False, imports=frozenset({"_hashlib", "hashlib"})),
    "hashlib": Module(own=False, imports=frozenset({"_hashlib", "_sha256"})),
    "ssl": Module(own=False, imports=frozenset({"_ssl"})),
    "_ssl": Module(own=False),
    "_hashlib": Module(own=False),
    "urllib.request": Module(own=False, imports=frozenset({"http.client"})),
    "encodings.utf_8": Module(own=False),
    "encodings.cp437": Module(own=False),
    "encodings.shift_jis": Module(own=False, imports=frozenset({"_codecs_jp"})),
    "encodings.cp1252": Module(own=False),
}


def cut_for(**own: Module) -> dict[str, str]:
    graph = {**STDLIB_GRAPH, **own}
    return decide(graph, aliases=ALIASES, openssl_only=frozenset({"sha512_224"})).cut


def test_a_server_that_only_compares_tokens_loses_tls_openssl_and_unnamed_codecs() -> None:
    # fleet-example's web service: http.server (whose http.client tries ssl) and hmac.
    script = Module(own=True, imports=frozenset({"http.server", "hmac", "json"}))
    cut = cut_for(__main__=script)
    assert set(cut) == {"ssl", "_ssl", "_hashlib", "encodings.shift_jis", "encodings.cp1252"}
    assert "TLS" in cut["ssl"]


@pytest.mark.parametrize(
    "script",
    [
        Module(own=True, imports=frozenset({"ssl"})),
        Module(own=True, imports=frozenset({"http.client"})),  # imports ssl itself
        Module(own=True, imports=frozenset({"urllib.request"})),  # through http.client
        Module(own=True, imports=frozenset({"asyncio.streams"})),
    ],
)
def test_code_that_can_open_tls_connections_keeps_tls_and_openssl(script: Module) -> None:
    cut = cut_for(__main__=script)
    assert not {"ssl", "_ssl", "_hashlib"} & set(cut)


def test_a_third_party_package_counts_as_the_workloads_code() -> None:
    script = Module(own=True, imports=frozenset({"requests"}))
    requests = Module(own=True, imports=frozenset({"ssl"}))
    assert "ssl" not in cut_for(__main__=script, requests=requests)


@pytest.mark.parametrize(
    ("strings", "names"),
    [
        (frozenset(), frozenset({"pbkdf2_hmac"})),
        (frozenset({"SHA512_224"}), frozenset({"new"})),
    ],
)
def test_openssl_only_hashes_keep_hashlib_without_tls(
    strings: frozenset[str], names: frozenset[str]
) -> None:
    script = Module(own=True, imports=frozenset({"hashlib"}), strings=strings, names=names)
    cut = cut_for(__main__=script)
    assert "_hashlib" not in cut
    assert "ssl" in cut


def test_a_codec_the_code_names_by_any_alias_stays() -> None:
    script = Module(own=True, strings=frozenset({"SJIS", "Windows-1252?"}))
    cut = cut_for(__main__=script)
    assert "encodings.shift_jis" not in cut
    assert "encodings.cp1252" in cut  # not a codec name: "windows_1252?" is no alias here
    cut = cut_for(__main__=Module(own=True, imports=frozenset({"encodings.cp1252"})))
    assert "encodings.cp1252" not in cut


def elf_needed(path: Path) -> set[str]:
    dynamic = subprocess.run(
        ["readelf", "-d", "-W", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return {
        line.split("[", 1)[1].split("]", 1)[0]
        for line in dynamic.splitlines()
        if "(NEEDED)" in line
    }


def bundle_files(bundle: Path) -> dict[str, Path]:
    return {p.name: p for p in bundle.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def web_build(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> dict[str, Any]:
    """fleet-example's web service built as a unikernel through the build matrix."""
    root = tmp_path_factory.mktemp("web-unikernel")
    repo = FleetRepo.of_fleet_example(root / "fleet")
    built = build_artifacts(
        repo.path, session_state, root / "cache", "--target", "unikernel", "web"
    )
    # The bundle the image carries is a cache entry of its own, never the plan's executable.
    assert "web/executable-onedir" in built
    assert built["web/executable-onedir"].input_digest != built["web/executable"].input_digest
    return built


@pytest.fixture(scope="module")
def web_bundle(web_build: dict[str, Any]) -> Path:
    bundle: Path = web_build["web/executable-onedir"].file(BUNDLE_NAME)
    assert (bundle / "_internal").is_dir()
    libpython = next((bundle / "_internal").glob("libpython3*.so*"))
    sections = subprocess.run(
        ["readelf", "-S", "-W", str(libpython)], capture_output=True, text=True, check=True
    ).stdout
    assert ".debug_info" not in sections  # stripped
    return bundle


@pytest.fixture(scope="module")
def web_unikernel(web_build: dict[str, Any], web_bundle: Path) -> Path:
    path: Path = web_build["web/unikernel"].path
    return path


@pytest.mark.slow
def test_web_bundle_carries_no_tls_openssl_or_unnamed_codecs(web_bundle: Path) -> None:
    files = bundle_files(web_bundle)
    names = set(files)
    assert not {n for n in names if n.startswith(("libssl", "libcrypto", "_ssl.", "_hashlib."))}
    assert not {n for n in names if n.startswith(("_codecs_", "_multibytecodec"))}
    assert any(n.startswith("_sha256.") for n in names)  # what hmac and hashlib use instead
    # Every shared library is linked against by something kept: nothing rides along.
    elves = [p for p in files.values() if p.read_bytes()[:4] == b"\x7fELF"]
    needed = set().union(*(elf_needed(p) for p in elves))
    libraries = {
        n for n in names if ".so" in n and not n.endswith(".cpython-311-x86_64-linux-gnu.so")
    }
    assert libraries - {n for n in libraries if n.startswith("libpython")} <= needed
    total = sum(p.stat().st_size for p in files.values())
    assert total < 12 << 20, total  # 18.4 MB before the trim


@pytest.mark.slow
def test_web_bundle_still_serves_and_checks_the_token_without_openssl(
    web_bundle: Path, tmp_path: Path
) -> None:
    # hmac.compare_digest without _hashlib: _operator's, as hmac falls back to.
    port = free_port()
    env = {"PORT": str(port), "API_TOKEN": "s3cret", "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen(
        [web_bundle / "workload"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as reply:
                    assert reply.read() == b"ok\n"
                break
            except OSError:
                assert server.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.2)
        request = urllib.request.Request(
            f"{url}/private", headers={"Authorization": "Bearer s3cret"}
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.read() == b"welcome\n"
        wrong = urllib.request.Request(f"{url}/private", headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=5)
        assert refused.value.code == 403
        refused.value.close()
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


GREEDY = """\
import hashlib, json, urllib.request
print(json.dumps({
    "sjis": "\\u30c6\\u30b9\\u30c8".encode("shift_jis").hex(),
    "https": hasattr(urllib.request, "HTTPSHandler"),
    "pbkdf2": hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1).hex()[:8],
}))
"""


@pytest.mark.slow
def test_a_program_that_uses_tls_openssl_and_a_named_codec_keeps_them(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text(GREEDY)
    bundle, log = tmp_path / "bundle", tmp_path / "log"
    build_executable(
        Language.PYTHON,
        source,
        entrypoint="main.py",
        options={},
        output=bundle,
        log=log,
        layout=Layout.ONEDIR,
    )
    names = set(bundle_files(bundle))
    for kept in ("_ssl.", "_hashlib.", "_codecs_jp.", "libcrypto"):
        assert any(n.startswith(kept) for n in names), kept
    assert "left out ssl" not in log.read_text()
    assert "left out encodings.cp1252" in log.read_text()
    ran = subprocess.run(
        [bundle / "workload"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert json.loads(ran.stdout) == {
        "sjis": "836583588367",
        "https": True,
        "pbkdf2": hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1).hex()[:8],
    }


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
