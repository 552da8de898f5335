"""The expected disruption in the Markdown plan: waves from the rollout policy times the
measured start-to-healthy time per workload (``vm.timeline`` events in the state store), a
warning over the budget or when a wave takes every VM of a workload down, and "not measured
yet" rather than an invented figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.fakes import fleet, running, workload
from support.repo import FleetRepo

from reconciler.cli import main
from reconciler.model import Plan, RolloutPolicy
from reconciler.planning import diff
from reconciler.planning.disruption import estimate_disruption, start_to_healthy_samples
from reconciler.render import render_markdown
from reconciler.state import open_state_store


def _plan(replicas: int = 4, max_unavailable: int = 1) -> Plan:
    rollout = RolloutPolicy(max_unavailable=max_unavailable)
    before = fleet(
        workload("web", replicas=replicas), workload("db"), revision="a" * 40, rollout=rollout
    )
    after = fleet(
        workload("web", replicas=replicas, env={"V": "2"}),
        workload("db"),
        workload("new"),
        revision="b" * 40,
        rollout=rollout,
    )
    return diff(after, running(before), base=before)


def test_waves_times_the_median_start_to_healthy() -> None:
    estimate = estimate_disruption(_plan(4, 2), {"web": [3.0, 5.0, 4.0, 100.0]}, 60)
    (web,) = estimate.workloads  # db unchanged, new only created: nothing is disturbed
    assert (web.disrupted, web.running, web.at_once, web.waves) == (4, 4, 2, 2)
    assert (web.median_seconds, web.samples) == (4.5, 4)
    assert web.degraded_seconds == 9.0
    assert estimate.warnings() == []


def test_over_budget_and_outage_warn() -> None:
    slow = estimate_disruption(_plan(4, 1), {"web": [40.0]}, 120)
    assert slow.warnings() == [
        "web: about 160 s below full capacity (4 waves of 40 s), over the disruption "
        "budget of 120 s"
    ]
    outage = estimate_disruption(_plan(2, 2), {}, 120)
    assert outage.warnings() == [
        "web: all 2 running VMs are unavailable at once: the service is down "
        "(lower maxUnavailable or add replicas)"
    ]


def test_not_measured_is_said_not_invented() -> None:
    text = render_markdown(_plan(), estimate_disruption(_plan(), {"db": [1.0]}, 120))
    assert "| web | 4 | 1 of 4 | 4 | not measured yet | not measured yet |" in text
    assert "#### Expected disruption" in text


def test_markdown_without_an_estimate_is_unchanged() -> None:
    """The golden files (tests/golden) render without an estimate; with one, only the new
    section is added."""
    plan = _plan()
    plain = render_markdown(plan)
    with_section = render_markdown(plan, estimate_disruption(plan, {"web": [2.0]}, 120))
    assert "Expected disruption" not in plain
    start = with_section.index("#### Expected disruption")
    end = with_section.index("#### ", start + 1)  # the next section: artifacts to build
    assert with_section[:start] + with_section[end:] == plain
    assert "| 2.0 s (1 run) | ~8.0 s |" in with_section


def test_timeline_events_are_parsed_defensively() -> None:
    good = json.dumps({"workload": "web", "start_to_healthy": 2.5, "phases": {"boot": 1.0}})
    events = [
        ("vm.timeline", good),
        ("vm.timeline", json.dumps({"workload": "web", "start_to_healthy": 3})),
        ("revision.applied", good),  # another kind
        ("vm.timeline", "not json"),
        ("vm.timeline", json.dumps(["web", 1.0])),
        ("vm.timeline", json.dumps({"workload": "web", "start_to_healthy": "fast"})),
        ("vm.timeline", json.dumps({"workload": "web", "start_to_healthy": True})),
        ("vm.timeline", json.dumps({"workload": "web", "start_to_healthy": -1})),
        ("vm.timeline", '{"workload": "web", "start_to_healthy": NaN}'),
        ("vm.timeline", json.dumps({"workload": "", "start_to_healthy": 1})),
        ("vm.timeline", json.dumps({"start_to_healthy": 1})),
    ]
    assert start_to_healthy_samples(events) == {"web": [2.5, 3.0]}


def test_only_the_newest_measurements_count() -> None:
    estimate = estimate_disruption(_plan(), {"web": [1.0] * 20 + [500.0] * 30}, 120)
    assert estimate.workloads[0].median_seconds == 1.0


def test_diff_reads_measurements_from_the_state_store(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: vm.timeline events in a real state store, a real two-commit diff."""
    base = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/web.yaml", "env:\n", "env:\n      NEW: value\n")
    head = fleet_repo.commit("web: new env (a restart)")
    state_dir.mkdir(mode=0o700)
    with open_state_store(state_dir) as store:
        for seconds in (50.0, 70.0, 60.0):
            message = {"workload": "web", "start_to_healthy": seconds, "phases": {}}
            store.record_event("vm.timeline", "web-0", json.dumps(message))
    argv = ["diff", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)]
    argv += ["--base", base, "--head", head, "--format", "markdown"]
    assert main([*argv, "--disruption-budget", "100"]) == 2
    out = capsys.readouterr().out
    assert "| web | 2 | 1 of 2 | 2 | 60.0 s (3 runs) | ~120.0 s |" in out
    assert "> **Warning:** web: about 120 s below full capacity (2 waves of 60 s)" in out
    assert main([*argv, "--disruption-budget", "600"]) == 2
    assert "Warning" not in capsys.readouterr().out


@pytest.mark.postgres
def test_diff_reads_measurements_from_the_store_it_is_given(
    fleet_repo: FleetRepo, tmp_path: Path, lease_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--store postgresql://...``: the measurements come from there, not from the (empty)
    SQLite store of the state directory."""
    from reconciler.state import StoreLocation

    base = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/web.yaml", "env:\n", "env:\n      NEW: value\n")
    head = fleet_repo.commit("web: new env (a restart)")
    state_dir = tmp_path / "state"
    with open_state_store(StoreLocation(state_dir, url=lease_dsn)) as store:
        message = {"workload": "web", "start_to_healthy": 42.0, "phases": {}}
        store.record_event("vm.timeline", "web-0", json.dumps(message))
    argv = ["diff", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)]
    argv += ["--store", lease_dsn, "--base", base, "--head", head, "--format", "markdown"]
    assert main(argv) == 2
    assert "| 42.0 s (1 run) |" in capsys.readouterr().out


def test_a_bad_budget_is_one_line(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["diff", "--repo", str(fleet_repo.path), "--disruption-budget", "soon"])
    assert code == 1
    assert "'soon' is not a number of seconds" in capsys.readouterr().err
