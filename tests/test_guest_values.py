"""What a manifest may hand the guest: the kernelArgs allow-list and the env/args limits, checked
as pure functions and through ``reconciler validate`` and ``apply`` (refused before anything
stops)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.process_fleet import (
    echo_repo,
    echo_workload,
    fleet_document,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.repo import FleetRepo
from support.waiting import free_port

from reconciler.cli import main
from reconciler.guest_values import (
    MAX_CONFIG_BYTES,
    MAX_VALUE_BYTES,
    deploy_problems,
    kernel_args_problem,
    value_problems,
)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "quiet",
        "console=ttyS0,115200 panic=-1",
        "mitigations=off nokaslr",
        "printk.time=1 tsc=reliable clocksource=tsc",
        "acpi=off loglevel=7 video=1024x768-24,foo:bar/baz+1",
    ],
)
def test_kernel_args_that_pass(text: str) -> None:
    assert kernel_args_problem(text) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("init=/bin/sh", "may not set init="),
        ("quiet rdinit=/bin/sh", "may not set rdinit="),
        ("root=/dev/vdb", "may not set root="),
        ("rc.exec=/bin/sh", "may not set rc.exec="),
        ("rc.env=A=1", "may not set rc.env="),
        ("quiet\tinit=/bin/sh", "character outside"),
        ("quiet\vinit=/bin/sh", "character outside"),
        ("quiet\finit=/bin/sh", "character outside"),
        ("quiet\rinit=/bin/sh", "character outside"),
        ("quiet\ninit=/bin/sh", "character outside"),
        ("quiet\u00a0init=/bin/sh", "character outside"),
        ('a="b c"', "character outside"),
        ("quiet  loglevel=3", "single spaces"),
        (" quiet", "single spaces"),
        ("quiet ", "single spaces"),
        ("--supervisor", "not a known kernel flag"),
        ("-- /bin/sh", "not a known kernel flag"),
        ("sh", "not a known kernel flag"),
        ("LD_PRELOAD=/x.so", "not a lower-case kernel parameter"),
        ("--config=/x", "not a lower-case kernel parameter"),
        ("a=" + "b" * 600, "longer than"),
    ],
)
def test_kernel_args_that_are_refused(text: str, why: str) -> None:
    problem = kernel_args_problem(text)
    assert problem is not None
    assert why in problem


def test_env_and_args_limits() -> None:
    assert value_problems({"A": 'tab\there "q" \u00a0 rc.exec=/bin/sh', "B": "x" * 8192}, []) == []
    problems = dict(
        value_problems(
            {"NUL": "a\0b", "LONG": "x" * MAX_VALUE_BYTES, "9BAD": "1", "S": "\udc80"},
            ["ok", "a\0", "y" * (MAX_VALUE_BYTES + 1)],
        )
    )
    assert "NUL byte" in problems[("env", "NUL")]
    assert "longer than" in problems[("env", "LONG")]  # NAME= counts too
    assert "not a valid identifier" in problems[("env", "9BAD")]
    assert "surrogate" in problems[("env", "S")]
    assert "NUL byte" in problems[("args", 1)]
    assert "longer than" in problems[("args", 2)]
    assert ("args", 0) not in problems
    many = {f"V{i}": "x" * 100_000 for i in range(11)}  # each fine, together over the cap
    (total,) = value_problems(many, [])
    assert total[0] == ()
    assert str(MAX_CONFIG_BYTES - 1024) in total[1]


def test_deploy_problems_name_their_json_paths() -> None:
    problems = deploy_problems({"env": {"A": "\0"}, "args": ["\0"], "kernelArgs": "init=/x"})
    assert [path for path, _ in problems] == [("env", "A"), ("args", 0), ("kernelArgs",)]


def _fleet(port: int, extra_env: str = "", extra_deploy: str = "", network: str = "") -> str:
    health = "{type: console, startPeriodSeconds: 20}"
    workload = echo_workload(
        "echo", port, extra_env=extra_env, health=health, extra_deploy=extra_deploy
    )
    return fleet_document("hosts", network) + workload


def _repo(
    tmp_path: Path, port: int, extra_env: str = "", extra_deploy: str = "", network: str = ""
) -> FleetRepo:
    return echo_repo(tmp_path / "fleet", _fleet(port, extra_env, extra_deploy, network))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize(
    "case",
    [
        ("", '    kernelArgs: "quiet init=/bin/sh"\n', "$.spec.deploy.kernelArgs", "init="),
        ("", '    kernelArgs: "quiet\\trc.exec=/bin/sh"\n', "$.spec.deploy.kernelArgs", "outside"),
        (', BAD: "a\\0b"', "", "$.spec.deploy.env.BAD", "NUL byte"),
        ("", '    args: ["ok", "a\\0b"]\n', "$.spec.deploy.args[1]", "NUL byte"),
    ],
)
def test_validate_refuses_what_cannot_reach_the_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple[str, str, str, str]
) -> None:
    extra_env, extra_deploy, where, why = case
    repo = _repo(tmp_path, 7007, extra_env, extra_deploy)
    code, out = _cli(
        capsys, "validate", "--repo", str(repo.path), "--state-dir", str(tmp_path / "state")
    )
    assert code == 1, out
    line = next(line for line in out.splitlines() if where in line)
    assert why in line
    assert "Traceback" not in out


@pytest.mark.root
def test_a_nul_in_env_is_refused_before_anything_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    # A bridge and pool of its own, all removed afterwards (tests and demos may run at once).
    bridge, cidr = new_pool()
    repo = _repo(tmp_path, port, network=network_yaml(bridge, cidr))
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    code, out = _cli(capsys, "apply", *common)
    assert code == 0, out
    try:
        code, out = _cli(capsys, "status", "--state-dir", str(state), "--format", "json")
        before = json.loads(out)["vms"][0]
        repo.write(
            "fleet.yaml",
            _fleet(port, ', GREETING: "hi\\0there"', network=network_yaml(bridge, cidr)),
        )
        repo.commit("a NUL in env")
        code, out = _cli(capsys, "apply", *common)
        assert code == 1
        assert "$.spec.deploy.env.GREETING" in out
        assert "NUL byte" in out
        code, out = _cli(capsys, "status", "--state-dir", str(state), "--format", "json")
        after = json.loads(out)["vms"][0]
        # The VM was never stopped: same process, still running and healthy.
        assert (after["pid"], after["state"], after["healthy"]) == (
            before["pid"],
            "running",
            True,
        )
        os.kill(int(after["pid"]), 0)
    finally:
        remove_deployment(state, bridge)
