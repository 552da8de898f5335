"""Console logs: rotated by size under a writer that keeps appending, read back by tail and
time, served by ``GET /api/vms/NAME/logs`` (token, stream, scrubbed), and the last lines of an
unhealthy VM in the status."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.waiting import eventually

from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.redaction import Redactor
from reconciler.execution.console_logs import StateDirConsoleLogs, last_lines
from reconciler.redact import REDACTED
from runtime.console import read_markers
from runtime.console_log import ConsoleLog, RotationPolicy

TOKEN = "console-test-token-0123456789"


def _writer(log: Path, count: int, delay: float = 0.0) -> subprocess.Popen[bytes]:
    """A process appending numbered lines to ``log`` as QEMU does (O_APPEND, one open)."""
    code = (
        "import os,sys,time\n"
        f"fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)\n"
        f"for i in range({count}):\n"
        "    os.write(fd, b'line %06d ' % i + b'x' * 60 + b'\\n')\n"
        f"    time.sleep({delay})\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def test_rotation_keeps_the_log_bounded_under_a_live_writer(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path, RotationPolicy(max_bytes=8 << 10, keep=2))
    log.new_boot()
    (tmp_path / "console.log").write_bytes(b'@@reconciler {"event":"booted","t":0.5}\n')
    writer = _writer(tmp_path / "console.log", 6000)
    rotations = 0
    biggest = 0
    while writer.poll() is None:
        rotations += log.maintain()
        retained = sum(p.stat().st_size for p in tmp_path.glob("console.log*") if p.is_file())
        biggest = max(biggest, retained)
        time.sleep(0.002)
    rotations += log.maintain()
    assert rotations >= 10
    files = sorted(p.name for p in tmp_path.glob("console.log*"))
    assert files == ["console.log", "console.log.1", "console.log.2", "console.log.markers"]
    # Bounded by the files kept, whatever was written (6000 lines, about 430 KiB).
    assert (tmp_path / "console.log").stat().st_size <= 8 << 10
    assert all((tmp_path / f"console.log.{n}").stat().st_size < 64 << 10 for n in (1, 2))
    # The boot marker left with the first rotation, and health still sees it.
    assert [m["event"] for m in read_markers(tmp_path / "console.log")] == ["booted"]
    # What is retained reads back in order, the newest line last.
    lines = log.read()
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == sorted(numbers)
    assert numbers[-1] == 5999
    assert log.read(tail=3) == lines[-3:]
    assert len(log.read(tail=50)) == 50


def test_since_reads_from_the_time_index_and_a_new_boot_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(tmp_path)
    log.new_boot(now=1000.0)
    path.write_text("old 1\nold 2\n")
    os.utime(path, (1005.0, 1005.0))
    log.maintain(now=1010.0)
    with path.open("a") as out:
        out.write("new 1\nnew 2\n")
    os.utime(path, (1020.0, 1020.0))
    log.maintain(now=1030.0)
    assert log.read(since=1012.0) == ["new 1", "new 2"]
    assert log.read(since=990.0) == ["old 1", "old 2", "new 1", "new 2"]
    assert log.read(since=1025.0) == []  # nothing arrived after the file's last write
    log.new_boot()
    assert (tmp_path / "previous-console.log").read_text().endswith("new 2\n")
    assert log.read() == []


def test_last_lines_of_a_vm_skip_blank_ones_and_refuse_paths(tmp_path: Path) -> None:
    vm = tmp_path / "vms" / "web-2"
    vm.mkdir(parents=True)
    (vm / "console.log").write_text(
        "[    1.2] virtio_net: module verification failed\r\n\r\n"
        "db: connection refused\n"
        '@@reconciler {"event":"workload-exited","code":3,"t":2.5}\n'
    )
    assert last_lines(tmp_path, "web-2", 2) == [
        "db: connection refused",
        '@@reconciler {"event":"workload-exited","code":3,"t":2.5}',
    ]
    assert last_lines(tmp_path, "../../etc") == []
    assert not StateDirConsoleLogs(tmp_path).exists("..")


class _View:
    """The smallest DaemonView: the logs endpoint does not use it."""

    def status(self) -> dict[str, Any]:
        return {"vms": []}

    def ready(self) -> tuple[bool, str]:
        return True, "ready"

    def events(self, limit: int) -> list[dict[str, Any]]:
        return []

    def request_reconcile(self, reason: str) -> None:
        pass

    def suspend(self, workload: str | None, reason: str) -> None:
        pass

    def resume(self, workload: str | None) -> None:
        pass


def _get(
    server: OperatorServer, path: str, token: str | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    return conn, conn.getresponse()


def test_logs_endpoint_needs_the_token_streams_and_masks_secrets(tmp_path: Path) -> None:
    vm = tmp_path / "vms" / "web-0"
    vm.mkdir(parents=True)
    console = vm / "console.log"
    console.write_text("booting\npassword is hunter2-secret\n")
    redactor = Redactor(["hunter2-secret"])
    server = OperatorServer(
        _View(),
        DaemonMetrics(),
        listen="127.0.0.1:0",
        token=TOKEN,
        webhook_secret=None,
        redactor=redactor,
        console_logs=StateDirConsoleLogs(tmp_path),
    )
    server.start()
    try:
        conn, answer = _get(server, "/api/vms/web-0/logs")
        assert answer.status == 401
        conn.close()
        conn, answer = _get(server, "/api/vms/web-0/logs", "wrong")
        assert answer.status == 401
        conn.close()
        conn, answer = _get(server, "/api/vms/nope-0/logs", TOKEN)
        assert answer.status == 404
        conn.close()
        conn, answer = _get(server, "/api/vms/web-0/logs?tail=x", TOKEN)
        assert answer.status == 400
        conn.close()

        conn, answer = _get(server, "/api/vms/web-0/logs?tail=1", TOKEN)
        assert answer.status == 200
        assert answer.getheader("Transfer-Encoding") == "chunked"
        assert answer.read() == f"password is {REDACTED}\n".encode()
        conn.close()

        # Followed: lines written after the request arrive on the open stream.
        conn, answer = _get(server, "/api/vms/web-0/logs?follow=1", TOKEN)
        assert answer.readline() == b"booting\n"
        assert answer.readline() == f"password is {REDACTED}\n".encode()
        with console.open("a") as out:
            out.write("later line\n")
        assert answer.readline() == b"later line\n"
        conn.close()
        # The client went away: its stream ends and gives its slot back.
        eventually(lambda: server._streams.acquire(blocking=False) or None, 5, "a free stream slot")
        server._streams.release()
    finally:
        server.close()


def test_status_json_carries_an_unhealthy_vms_last_console_lines(tmp_path: Path) -> None:
    from dataclasses import replace

    from reconciler.execution.status import fleet_status
    from reconciler.model import ObservedFleet, ObservedVM, RuntimeKind, Target, VMState

    vm = ObservedVM(
        name="web-2",
        workload="web",
        fleet="demo",
        runtime=RuntimeKind.QEMU,
        target=Target.MICROVM,
        artifact_digest="sha256:1",
        artifact_inputs={},
        settings={},
        state=VMState.FAILED,
        healthy=False,
    )
    healthy = replace(vm, name="web-0", state=VMState.RUNNING, healthy=True)
    for name in ("web-0", "web-2"):
        (tmp_path / "vms" / name).mkdir(parents=True)
        (tmp_path / "vms" / name / "console.log").write_text(f"{name}: modprobe failed\n")
    observed = ObservedFleet(version=1, vms={"web-0": healthy, "web-2": vm})
    status = fleet_status(observed, None, None, {}, state_dir=tmp_path)
    tails = {v["name"]: v["console_tail"] for v in json.loads(json.dumps(status))["vms"]}
    assert tails == {"web-0": [], "web-2": ["web-2: modprobe failed"]}


TICKER = r"""#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    const char *fail = getenv("FAIL_WITH");
    if (fail) {
        printf("db: cannot connect to 10.0.0.9:5432: connection refused\n");
        fflush(stdout);
        return atoi(fail);
    }
    for (int i = 0;; i++) {
        printf("tick %d\n", i);
        fflush(stdout);
        usleep(200000);
    }
}
"""

TICKER_WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: ticker, language: c, entrypoint: ticker.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    replicas: 1
    env: {{{env}}}
    health: {{type: console}}
"""


@pytest.mark.root
def test_logs_follow_a_live_process_vm_and_status_shows_why_one_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from support.process_fleet import fleet_document, network_yaml, new_pool, remove_deployment
    from support.repo import FleetRepo

    from reconciler.cli import main

    bridge, cidr = new_pool()
    fleet = fleet_document("logs", network_yaml(bridge, cidr)) + TICKER_WORKLOAD.format(
        name="web", env='QUIET: "1"'
    )
    repo = FleetRepo.create(
        tmp_path / "fleet", {"fleet.yaml": fleet, "ticker/ticker.c": TICKER}, "ticker"
    )
    state = tmp_path / "state"
    try:
        assert main(["apply", "--repo", str(repo.path), "--state-dir", str(state)]) == 0
        repo.write("fleet.yaml", fleet + TICKER_WORKLOAD.format(name="bad", env='FAIL_WITH: "3"'))
        repo.commit("a workload that fails")
        code = main(["apply", "--repo", str(repo.path), "--state-dir", str(state)])
        applied = capsys.readouterr()
        assert code == 1, applied

        # `status` says why bad-0 is not healthy: its console's last lines.
        assert main(["status", "--state-dir", str(state), "--format", "json"]) == 0
        vms = {vm["name"]: vm for vm in json.loads(capsys.readouterr().out)["vms"]}
        assert set(vms) == {"bad-0", "web-0"}, applied
        assert not vms["bad-0"]["healthy"]
        tail = "\n".join(vms["bad-0"]["console_tail"])
        assert "connection refused" in tail
        assert '"code":3' in tail
        assert vms["web-0"]["console_tail"] == []

        # `logs -f` follows web-0 live: lines written after it started arrive.
        with subprocess.Popen(
            [sys.executable, "-m", "reconciler", "logs", "web-0", "-f", "--tail", "1"],
            env={**os.environ, "RECONCILER_STATE_DIR": str(state)},
            stdout=subprocess.PIPE,
        ) as follow:
            try:
                assert follow.stdout is not None
                first = int(follow.stdout.readline().split()[1])
                seen = [first]
                while len(seen) < 6:
                    line = follow.stdout.readline()
                    if line.startswith(b"tick "):
                        seen.append(int(line.split()[1]))
                assert seen == list(range(first, first + 6))
            finally:
                follow.kill()  # -f runs until interrupted

        assert main(["logs", "web-0", "--state-dir", str(state), "--tail", "2"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2
        assert main(["console", "web-0", "--state-dir", str(state)]) == 1
        assert "no serial console" in capsys.readouterr().err
    finally:
        remove_deployment(state, bridge)


@pytest.mark.qemu
@pytest.mark.root
def test_console_attaches_to_a_shell_less_qemu_guest_and_detaches_with_ctrl_bracket(
    echo_unikernel: Path, tmp_path: Path
) -> None:
    from support.qemu import artifact_spec

    from reconciler.model import ObservedVM, RuntimeKind, Target
    from reconciler.state import open_state_store
    from runtime.qemu.driver import QemuRuntime

    state = tmp_path / "state"
    spec = artifact_spec(echo_unikernel, state / "vms" / "echo-0", "echo-0")
    store = open_state_store(state)
    try:
        store.put_vm(
            ObservedVM(
                name="echo-0",
                workload="echo",
                fleet="example",
                runtime=RuntimeKind.QEMU,
                target=Target.UNIKERNEL,
                artifact_digest="sha256:test",
                artifact_inputs={},
                settings={},
            )
        )
    finally:
        store.close()
    runtime = QemuRuntime(state_dir=state, accel="tcg")
    runtime.start(spec)
    try:
        # Attached while the guest boots: its console output (the kernel's, the init's
        # markers, the echo server's first line) reaches the terminal.
        with subprocess.Popen(
            [sys.executable, "-m", "reconciler", "console", "echo-0"],
            env={**os.environ, "RECONCILER_STATE_DIR": str(state)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as console:
            try:
                assert console.stdout is not None
                assert console.stdin is not None
                seen = b""
                deadline = time.monotonic() + 180
                while b"echo: listening" not in seen:
                    assert time.monotonic() < deadline, seen.decode(errors="replace")
                    chunk = os.read(console.stdout.fileno(), 4096)
                    assert chunk, seen.decode(errors="replace")
                    seen += chunk
                assert b'@@reconciler {"event":"workload-started"' in seen
                console.stdin.write(b"\x1d")
                console.stdin.flush()
                assert console.wait(timeout=10) == 0
                assert console.stderr is not None
                assert b"detached from echo-0" in console.stderr.read()
            finally:
                console.kill()
        # The log kept everything meanwhile, and `logs` reads it.
        assert any(
            "echo: listening" in line
            for line in StateDirConsoleLogs(state).lines("echo-0", tail=50)
        )
    finally:
        runtime.stop(spec, grace_seconds=1)
