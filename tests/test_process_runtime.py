"""The process runtime through ``reconciler apply``: the echo server's executable as a
supervised host process, sandboxed with bubblewrap, adopted, healed and removed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import FleetRepo
from daemon_harness import ECHO, echo, free_port

from reconciler.cli import main

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {{name: hosts}}
---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: echo}}
spec:
  source: {{path: echo, language: c, entrypoint: echo.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    replicas: 1
    env: {{ECHO_PORT: "{port}"}}
    health: {{type: tcp, port: {port}, startPeriodSeconds: 20}}
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.root
def test_process_workload_is_deployed_healed_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    (tmp_path / "fleet").mkdir()
    repo = FleetRepo(tmp_path / "fleet")
    repo.write("fleet.yaml", FLEET.format(port=port))
    repo.write("echo/echo.c", ECHO.read_text())
    repo.commit("echo as a host process")
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert echo(port) == b"ping\n"
        code, out = cli(capsys, "status", "--state-dir", str(state), "--format", "json")
        vm = json.loads(out)["vms"][0]
        assert (vm["name"], vm["runtime"], vm["healthy"]) == ("echo-0", "process", True)
        # Sandboxed: the supervisor runs in its own UTS namespace named after the VM.
        pid = int(vm["pid"])
        assert os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")

        os.kill(pid, signal.SIGKILL)  # the supervisor dies; the workload goes with its group
        time.sleep(0.5)
        code, out = cli(capsys, "diff", *common)
        assert code == 2
        assert "echo-0 must be replaced" in out
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert echo(port) == b"ping\n"

        repo.write("fleet.yaml", FLEET.format(port=port).replace("replicas: 1", "replicas: 0"))
        repo.commit("no echo")
        code, out = cli(capsys, "apply", *common)
        assert code == 1  # an empty fleet is refused unless the Fleet allows it
        assert "allowEmpty" in out
        assert echo(port) == b"ping\n"
        repo.write(
            "fleet.yaml",
            FLEET.format(port=port)
            .replace("replicas: 1", "replicas: 0")
            .replace(
                "metadata: {name: hosts}", "metadata: {name: hosts}\nspec: {allowEmpty: true}"
            ),
        )
        repo.commit("no echo, and that is fine")
        assert cli(capsys, "apply", *common)[0] == 0
        with pytest.raises(ConnectionRefusedError):
            echo(port)
    finally:
        for pidfile in (state / "vms").glob("*/process.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
