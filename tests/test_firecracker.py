"""The Firecracker runtime: generated configs checked against Firecracker's own OpenAPI spec,
the API sequence against a Firecracker-shaped fake at our seam (its HTTP API), the jailer command
line, and honest errors where no Firecracker can run."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from reconciler.errors import ToolMissingError, VMRuntimeError
from reconciler.model import RuntimeKind
from runtime.firecracker.api import FirecrackerAPI
from runtime.firecracker.config import JailerOptions, firecracker_config, jailer_argv
from runtime.firecracker.driver import FirecrackerRuntime
from runtime.firecracker.jail import CONFIG_FILE, prepare_chroot
from runtime.guest_config import GuestConfig, initramfs_segment
from runtime.protocol import NetworkAttachment, VMSpec

GOLDEN = Path(__file__).parent / "golden" / "firecracker"
SWAGGER = (
    Path(__file__).resolve().parents[1]
    / "runtime"
    / "firecracker"
    / "spec"
    / "firecracker-swagger-v1.16.1.yaml"
)


def spec(**extra: Any) -> VMSpec:
    return VMSpec(
        name="web-0",
        workload="web",
        fleet="example",
        runtime=RuntimeKind.FIRECRACKER,
        vcpus=2,
        memory_mib=256,
        vm_dir=Path("/vms/web-0"),
        kernel=Path("/kernels/vmlinux"),
        initrd=Path("/artifacts/web/initramfs.cpio.gz"),
        kernel_cmdline="console=ttyS0",
        guest=GuestConfig(hostname="web-0", env={"SECRET": "not in the config file"}),
        **extra,
    )


CASES = {
    "unikernel": {},
    "microvm-tap": {
        "rootfs": Path("/vms/web-0/rootfs.ext4"),
        "network": NetworkAttachment("rc-web-0", "52:54:00:12:34:56", "10.88.0.2/24", "10.88.0.1"),
    },
}


@pytest.fixture(scope="module")
def full_vm_configuration() -> Draft4Validator:
    assert SWAGGER.exists(), f"Firecracker's OpenAPI spec is missing: {SWAGGER}"
    definitions = copy.deepcopy(yaml.safe_load(SWAGGER.read_text())["definitions"])
    for definition in definitions.values():
        # Firecracker deserialises with deny_unknown_fields: so does this validator.
        if definition.get("type") == "object" and "properties" in definition:
            definition.setdefault("additionalProperties", False)
    return Draft4Validator(
        {"$ref": "#/definitions/FullVmConfiguration", "definitions": definitions}
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_matches_golden_and_firecrackers_spec(
    case: str, full_vm_configuration: Draft4Validator
) -> None:
    config = firecracker_config(spec(**CASES[case]))
    rendered = json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert "not in the config file" not in rendered  # per-VM data is in the VM's initrd
    golden = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()
    errors = [e.message for e in full_vm_configuration.iter_errors(config)]
    assert errors == []


def test_the_spec_validator_can_fail(full_vm_configuration: Draft4Validator) -> None:
    config = firecracker_config(spec())
    config["machine-config"]["vcpus"] = 2  # a misspelt key Firecracker would refuse
    assert not full_vm_configuration.is_valid(config)
    config = firecracker_config(spec())
    config["machine-config"]["mem_size_mib"] = "256"
    assert not full_vm_configuration.is_valid(config)


def test_jailer_command_line() -> None:
    argv = jailer_argv(spec(), JailerOptions(uid=1234, gid=1234), "/firecracker.json")
    assert argv == [
        "/usr/local/bin/jailer",
        "--id",
        "web-0",
        "--exec-file",
        "/usr/local/bin/firecracker",
        "--uid",
        "1234",
        "--gid",
        "1234",
        "--chroot-base-dir",
        "/srv/jailer",
        "--new-pid-ns",
        "--",
        "--api-sock",
        "/firecracker.sock",
        "--config-file",
        "/firecracker.json",
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_jailed_config_uses_paths_inside_the_chroot(
    case: str, full_vm_configuration: Draft4Validator
) -> None:
    config = firecracker_config(spec(**CASES[case]), jailed=True)
    assert config["boot-source"]["kernel_image_path"] == "/vmlinux"
    assert config["boot-source"]["initrd_path"] == "/initrd.img"
    assert [d["path_on_host"] for d in config["drives"]] == (
        ["/rootfs.ext4"] if case == "microvm-tap" else []
    )
    assert list(full_vm_configuration.iter_errors(config)) == []


@pytest.mark.root
def test_chroot_holds_everything_the_jailed_vm_boots(tmp_path: Path) -> None:
    kernel = tmp_path / "artifact" / "vmlinux"
    kernel.parent.mkdir()
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(0o644)
    initramfs = tmp_path / "artifact" / "initramfs.cpio.gz"
    initramfs.write_bytes(b"\x1f\x8b initramfs")
    vm_dir = tmp_path / "vms" / "web-0"
    vm_dir.mkdir(parents=True)
    rootfs = vm_dir / "rootfs.ext4"
    rootfs.write_bytes(b"ext4")
    guest = GuestConfig(hostname="web-0", env={"SECRET": "x\ty"})
    vm = replace(
        spec(rootfs=rootfs, network=CASES["microvm-tap"]["network"]),
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=initramfs,
        guest=guest,
    )
    options = JailerOptions(uid=4242, gid=4343, chroot_base=vm_dir / "jail")
    root = prepare_chroot(vm, options)
    assert root == vm_dir / "jail" / "firecracker" / "web-0" / "root"
    assert (root / "vmlinux").read_bytes() == kernel.read_bytes()
    assert (root / "vmlinux").stat().st_mode & 0o777 == 0o644
    initrd = (root / "initrd.img").stat()
    assert (initrd.st_uid, initrd.st_gid, initrd.st_mode & 0o777) == (4242, 4343, 0o600)
    assert (root / "initrd.img").read_bytes().endswith(initramfs_segment(guest))
    disk = (root / "rootfs.ext4").stat()
    assert (disk.st_ino, disk.st_uid) == (rootfs.stat().st_ino, 4242)  # the VM's own copy
    config = json.loads((root / CONFIG_FILE).read_text())
    assert config == firecracker_config(vm, jailed=True)
    # The jailer is told the chroot's paths: the config file and API socket inside it.
    argv = jailer_argv(vm, options, f"/{CONFIG_FILE}")
    assert argv[argv.index("--chroot-base-dir") + 1] == str(vm_dir / "jail")
    assert argv[-4:] == ["--api-sock", "/firecracker.sock", "--config-file", "/firecracker.json"]
    # A second start replaces everything in place.
    assert prepare_chroot(vm, options) == root


@pytest.mark.root
def test_the_driver_runs_firecracker_under_the_jailer_when_there_is_one(tmp_path: Path) -> None:
    runtime = FirecrackerRuntime(binary="firecracker", jailer="no-such-jailer")
    assert runtime.jailer_options(spec(), "/usr/bin/firecracker") is None
    fake = tmp_path / "bin" / "jailer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    runtime = FirecrackerRuntime(binary="firecracker", jailer=str(fake))
    options = runtime.jailer_options(spec(), "/usr/bin/firecracker")
    assert options is not None
    assert options.uid != 0
    assert options.chroot_base == Path("/vms/web-0/jail")
    assert options.jailer == fake


class _FakeFirecracker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.vm_config: dict[str, Any] = {}
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _FakeFirecracker

    def address_string(self) -> str:
        return "fake"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: Any = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def do_PUT(self) -> None:
        body = self._body()
        self.server.calls.append(("PUT", self.path, body))
        if self.path == "/machine-config" and body.get("vcpu_count", 0) > 32:
            self._reply(400, {"fault_message": "Invalid vCPU count"})
            return
        section = self.path.strip("/").split("/")[0]
        if section in {"drives", "network-interfaces"}:
            self.server.vm_config.setdefault(section, []).append(body)
        elif section != "actions":
            self.server.vm_config[section] = body
        self._reply(204)

    def do_PATCH(self) -> None:
        self.server.calls.append(("PATCH", self.path, self._body()))
        self._reply(204)

    def do_GET(self) -> None:
        self.server.calls.append(("GET", self.path, None))
        if self.path == "/vm/config":
            self._reply(200, self.server.vm_config)
        else:
            self._reply(200, {"id": "web-0", "state": "Running", "vmm_version": "1.16.1"})


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[_FakeFirecracker, FirecrackerAPI]]:
    path = tmp_path / "firecracker.sock"
    server = _FakeFirecracker(str(path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, FirecrackerAPI(path)
    finally:
        server.shutdown()
        server.server_close()


def test_api_sequence_and_drift_check(
    fake_api: tuple[_FakeFirecracker, FirecrackerAPI],
) -> None:
    server, api = fake_api
    config = firecracker_config(spec(**CASES["microvm-tap"]))
    api.configure(config)
    assert [(m, p) for m, p, _ in server.calls] == [
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/root"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/actions"),
    ]
    assert server.calls[-1][2] == {"action_type": "InstanceStart"}
    assert api.get_vm_config()["machine-config"] == config["machine-config"]
    api.pause()
    api.resume()
    api.send_ctrl_alt_del()
    assert [c[2] for c in server.calls[-3:]] == [
        {"state": "Paused"},
        {"state": "Resumed"},
        {"action_type": "SendCtrlAltDel"},
    ]
    assert api.describe_instance()["state"] == "Running"
    # Drift: Firecracker reports defaults we never set; only a changed value is drift.
    from runtime.firecracker.driver import _covers

    reported = api.get_vm_config()
    reported["machine-config"]["track_dirty_pages"] = False
    assert _covers(reported["machine-config"], config["machine-config"])
    reported["machine-config"]["mem_size_mib"] = 512
    assert not _covers(reported["machine-config"], config["machine-config"])


def test_api_errors_carry_firecrackers_message(
    fake_api: tuple[_FakeFirecracker, FirecrackerAPI],
) -> None:
    _, api = fake_api
    with pytest.raises(VMRuntimeError, match="Invalid vCPU count"):
        api.put_machine_config({"vcpu_count": 64, "mem_size_mib": 128})


def test_without_a_firecracker_binary_the_error_says_so(tmp_path: Path) -> None:
    runtime = FirecrackerRuntime(binary="no-such-firecracker")
    with pytest.raises(ToolMissingError, match="firecracker release binary"):
        runtime.start(
            VMSpec(
                name="web-0",
                workload="web",
                fleet="f",
                runtime=RuntimeKind.FIRECRACKER,
                vcpus=1,
                memory_mib=128,
                vm_dir=tmp_path / "vm",
                kernel=tmp_path / "vmlinux",
            )
        )


@pytest.mark.skipif(
    shutil.which("firecracker") is None or not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="needs a firecracker binary and usable KVM: neither exists on this machine kind",
)
def test_firecracker_boots_the_echo_unikernel(
    tmp_path: Path, session_state: Path, echo_unikernel: Path
) -> None:
    from builders.kernels import KernelRegistry
    from runtime.console import read_markers

    artifact = echo_unikernel
    registry = KernelRegistry(session_state / "kernels")
    vm = VMSpec(
        name="echo-0",
        workload="echo",
        fleet="example",
        runtime=RuntimeKind.FIRECRACKER,
        vcpus=1,
        memory_mib=128,
        vm_dir=tmp_path / "echo-0",
        kernel=registry.vmlinux_for(registry.get(None)),
        initrd=artifact / "initramfs.cpio.gz",
        kernel_cmdline=(artifact / "cmdline").read_text().strip(),
    )
    runtime = FirecrackerRuntime()
    status = runtime.start(vm)
    try:
        assert status.pid is not None
        import time

        deadline = time.monotonic() + 60
        while not any(
            m["event"] == "workload-started" for m in read_markers(vm.vm_dir / "console.log")
        ):
            assert time.monotonic() < deadline, (vm.vm_dir / "console.log").read_text()
            time.sleep(0.2)
        assert runtime.drift(vm) == []
    finally:
        runtime.stop(vm, grace_seconds=5)
