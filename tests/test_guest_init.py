"""The guest init in host mode: configuration, markers, signals, reaping, static linking."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parents[1] / "guest"


@pytest.fixture(scope="session")
def init_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True)
    return GUEST / "build" / "reconciler-init"


def markers(output: str) -> list[dict[str, object]]:
    return [
        json.loads(line.split(" ", 1)[1])
        for line in output.splitlines()
        if line.startswith("@@reconciler ")
    ]


def run_init(
    init: Path, tmp_path: Path, config: str, cmdline: str | None = None
) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "init.conf"
    conf.write_text(config)
    argv = [str(init), "--config", str(conf)]
    if cmdline is not None:
        (tmp_path / "cmdline").write_text(cmdline)
        argv += ["--cmdline", str(tmp_path / "cmdline")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_runs_the_workload_with_env_workdir_and_exit_code(
    init_binary: Path, tmp_path: Path
) -> None:
    result = run_init(
        init_binary,
        tmp_path,
        "# the workload\nexec=/bin/sh\narg=-c\narg=echo $GREETING; pwd; exit 7\n"
        f"env=GREETING=hello\nworkdir={tmp_path}\n",
    )
    assert result.returncode == 7
    assert f"hello\n{tmp_path}\n" in result.stdout
    events = markers(result.stdout)
    assert [e["event"] for e in events] == ["booted", "workload-started", "workload-exited"]
    assert events[2]["code"] == 7
    assert isinstance(events[1]["pid"], int)
    times = [float(e["t"]) for e in events]  # type: ignore[arg-type]
    assert times == sorted(times)


def test_kernel_command_line_overrides_and_extends(init_binary: Path, tmp_path: Path) -> None:
    result = run_init(
        init_binary,
        tmp_path,
        "exec=/bin/false\nenv=A=file\n",
        'quiet rc.exec=/bin/sh rc.arg=-c "rc.arg=echo $A $B" rc.env="B=two words" rc.env=A=cmd\n',
    )
    assert result.returncode == 0, result.stdout
    assert "cmd two words" in result.stdout


def test_exec_failure_is_an_error_marker(init_binary: Path, tmp_path: Path) -> None:
    result = run_init(init_binary, tmp_path, "exec=/no/such/program\n")
    assert result.returncode == 127
    errors = [e for e in markers(result.stdout) if e["event"] == "error"]
    assert "No such file or directory" in str(errors[0]["message"])


def test_sigterm_is_forwarded_then_sigkill_after_the_grace_period(
    init_binary: Path, tmp_path: Path
) -> None:
    conf = tmp_path / "init.conf"
    conf.write_text(
        "exec=/bin/sh\narg=-c\narg=trap 'echo got-term' TERM; while :; do sleep 0.1; done\n"
        "grace=1\n"
    )
    process = subprocess.Popen(
        [str(init_binary), "--config", str(conf)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert "workload-started" in process.stdout.readline() + process.stdout.readline()
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert "got-term" in output
    exited = [e for e in markers(output) if e["event"] == "workload-exited"]
    assert exited[0]["code"] == 128 + signal.SIGKILL
    assert process.returncode == 128 + signal.SIGKILL


def test_restart_on_failure_reruns_the_workload(init_binary: Path, tmp_path: Path) -> None:
    flag = tmp_path / "ran-once"
    result = run_init(
        init_binary,
        tmp_path,
        f"exec=/bin/sh\narg=-c\narg=[ -e {flag} ] && exit 0; touch {flag}; exit 1\n"
        "restart=on-failure\n",
    )
    codes = [e["code"] for e in markers(result.stdout) if e["event"] == "workload-exited"]
    assert codes == [1, 0]


def test_orphans_are_reaped_and_the_workload_code_wins(init_binary: Path, tmp_path: Path) -> None:
    result = run_init(
        init_binary,
        tmp_path,
        "exec=/bin/sh\narg=-c\narg=(sleep 0.2 &) ; sleep 0.5; exit 4\n",
    )
    assert result.returncode == 4


def test_init_is_a_static_binary(init_binary: Path) -> None:
    header = init_binary.read_bytes()
    assert header[:4] == b"\x7fELF"
    assert b"/lib64/ld-linux" not in header  # no PT_INTERP: nothing needed in the guest
    out = subprocess.run(
        ["file", str(init_binary)], capture_output=True, text=True, check=True
    ).stdout
    assert "statically linked" in out
