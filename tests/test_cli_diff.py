"""``reconciler validate``, ``diff`` and ``plan`` as a user runs them, on a scratch repository
holding a copy of fleet-example: what a reviewer sees in a pull request, with its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def diff(
    capsys: pytest.CaptureFixture[str], repo: Path, state_dir: Path, *argv: str
) -> tuple[int, str, str]:
    """``reconciler diff --repo REPO --state-dir STATE_DIR ARGV...``."""
    return run(capsys, "diff", "--repo", str(repo), "--state-dir", str(state_dir), *argv)


@pytest.fixture
def ab(fleet_repo: FleetRepo) -> tuple[FleetRepo, str, str]:
    """Commit A is fleet-example; commit B adds a replica to web and changes echo's env."""
    a = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    fleet_repo.edit("workloads/echo.yaml", "env:\n", "env:\n      ECHO_BANNER: changed\n")
    b = fleet_repo.commit("B: scale web, change echo env")
    return fleet_repo, a, b


def test_validate_fleet_example(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "validate", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)
    )
    assert (code, err) == (0, "")
    assert "fleet 'example'" in out
    assert "4 VMs" in out


def test_diff_between_two_commits(
    ab: tuple[FleetRepo, str, str], state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, a, b = ab
    common = ("--repo", str(repo.path), "--state-dir", str(state_dir), "--base", a, "--head", b)
    code, text, err = run(capsys, "diff", *common)
    assert code == 2, err
    assert "  + vm 'web-2'" in text
    assert "vm 'echo-0'" in text
    assert (
        "Plan: 1 to create, 0 to update in place, 1 to restart, 0 to replace, 0 to delete." in text
    )

    code, out, _ = run(capsys, "diff", *common, "--format", "json")
    assert code == 2
    data = json.loads(out)
    assert (data["base"], data["head"]) == (a, b)
    # Workloads in dependency order (echo, web, report), each in its own wave.
    assert [(x["action"], x["vm"], x["wave"]) for x in data["actions"]] == [
        ("restart", "echo-0", 1),
        ("create", "web-2", 2),
    ]
    assert data["summary"] == {"create": 1, "update": 0, "restart": 1, "replace": 0, "delete": 0}
    assert data["actions"][0].keys() >= {"action", "vm", "workload", "disruption", "reason"}

    code, md, _ = run(capsys, "diff", *common, "--format", "markdown")
    assert code == 2
    assert "| create | update | restart | replace | delete |" in md
    assert "| 1 | 0 | 1 | 0 | 0 |" in md


def test_same_revision_has_no_changes(
    ab: tuple[FleetRepo, str, str], state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, a, _ = ab
    code, out, _ = diff(capsys, repo.path, state_dir, "--base", a, "--head", a)
    assert code == 0
    assert "No changes." in out


def test_moving_a_document_to_another_file_changes_nothing(
    ab: tuple[FleetRepo, str, str], state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, _, b = ab
    (repo.path / "moved").mkdir()
    (repo.path / "workloads" / "web.yaml").rename(repo.path / "moved" / "frontend.yaml")
    c = repo.commit("C: move web to another file")
    code, out, _ = diff(capsys, repo.path, state_dir, "--base", b, "--head", c)
    assert code == 0, out


def test_diff_against_an_empty_live_fleet_creates_everything(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = diff(capsys, fleet_repo.path, state_dir, "--format", "json")
    assert code == 2
    data = json.loads(out)
    assert data["summary"]["create"] == 4
    assert data["base"] is None
    # Dependencies first: report depends on web.
    vms = [a["vm"] for a in data["actions"]]
    assert vms.index("web-0") < vms.index("report-0")


def test_plan_is_saved_with_revision_and_observed_version(
    fleet_repo: FleetRepo, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "plan.json"
    code, _, err = run(
        capsys,
        "plan",
        "--repo",
        str(fleet_repo.path),
        "--state-dir",
        str(state_dir),
        "-o",
        str(out_file),
    )
    assert code == 2
    saved = json.loads(out_file.read_text())
    assert saved["head"] == fleet_repo.git("rev-parse", "HEAD")
    assert saved["observed_version"] >= 0
    assert "plan saved" in err


HOSTILE = {
    "schema error": ("workloads/web.yaml", "replicas: 2", "replicas: three", "replicas"),
    "source path leaving the repo": (
        "workloads/web.yaml",
        "path: services/web",
        "path: ../../etc",
        "../../etc",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_revisions_exit_1_with_one_line_per_problem(
    case: str, fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, old, new, needle = HOSTILE[case]
    fleet_repo.edit(file, old, new)
    fleet_repo.commit(case)
    for command in ("validate", "diff"):
        code, out, err = run(
            capsys, command, "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)
        )
        assert code == 1, out
        assert "Traceback" not in err
        assert file in err
        assert needle in err


def test_alias_bomb_symlink_duplicates_and_cycles_are_all_reported(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = "\n".join(
        [
            "apiVersion: reconciler/v1alpha1",
            "kind: Workload",
            "metadata: {name: bomb}",
            'a: &a ["x","x","x","x","x","x","x","x","x","x"]',
        ]
        + [
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
            f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
            f"*{chr(97 + i)},*{chr(97 + i)}]"
            for i in range(8)
        ]
    )
    fleet_repo.write("workloads/bomb.yaml", bomb + "\n")
    os.symlink("../../../../etc", fleet_repo.path / "services" / "escape")
    fleet_repo.write("workloads/dup.yaml", fleet_repo.read("workloads/echo.yaml"))
    fleet_repo.commit("everything hostile at once")
    code, _, err = run(
        capsys, "validate", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)
    )
    assert code == 1
    assert "Traceback" not in err
    assert "workloads/bomb.yaml" in err
    assert "workloads/dup.yaml" in err
    assert "escape" in err
    assert len(err.strip().splitlines()) >= 4


def test_dependency_cycle_is_refused(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_repo.edit("workloads/web.yaml", "deploy:\n", "deploy:\n    dependsOn: [report]\n")
    fleet_repo.commit("cycle")
    code, _, err = run(
        capsys, "diff", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)
    )
    assert code == 1
    assert "cycle" in err


def test_unknown_revision_and_bad_flags_are_one_line_errors(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = diff(capsys, fleet_repo.path, state_dir, "--base", "no-such-branch")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "no-such-branch" in err
    code, _, err = run(capsys, "diff", "--format", "yaml")
    assert code == 1
    assert err.startswith("error:")


@pytest.mark.slow
def test_console_script_and_module_entry_points(fleet_repo: FleetRepo, state_dir: Path) -> None:
    for argv in (
        [str(Path(sys.executable).parent / "reconciler")],
        [sys.executable, "-m", "reconciler"],
    ):
        result = subprocess.run(
            [*argv, "validate", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_a_reader_that_went_away_ends_the_output_without_a_traceback(
    fleet_repo: FleetRepo, state_dir: Path
) -> None:
    # `reconciler diff | head -1`: the reader closed before the plan was written.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "reconciler",
                "diff",
                "--repo",
                str(fleet_repo.path),
                "--state-dir",
                str(state_dir),
            ],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(writer)
    assert result.returncode == 141
    assert result.stderr == ""


# -- A misspelt key, a deleting plan, a protected workload -------------------------------------


def test_a_misspelt_api_version_is_refused_by_validate_and_diff(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/echo.yaml", "apiVersion:", "apiVerison:")
    head = fleet_repo.commit("typo")
    repo = ("--repo", str(fleet_repo.path), "--state-dir", str(state_dir))
    expected = (
        "workloads/echo.yaml:2: $.apiVerison: no apiVersion; did you mean apiVersion "
        "(found 'apiVerison')?\n"
        "error: 1 problem in the manifests; nothing was changed\n"
    )
    assert run(capsys, "validate", *repo) == (1, "", expected)
    assert run(capsys, "diff", *repo) == (1, "", expected)
    assert run(capsys, "diff", *repo, "--base", base, "--head", head) == (1, "", expected)


def test_diff_shows_a_plan_over_max_deletions_and_says_it_is_refused(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 7")
    base = fleet_repo.commit("web: 7 replicas")
    fleet_repo.edit("workloads/web.yaml", "replicas: 7", "replicas: 1")
    head = fleet_repo.commit("web: 1 replica")
    common = ("--repo", str(fleet_repo.path), "--state-dir", str(state_dir), "--base", base)
    code, out, err = run(capsys, "diff", *common, "--head", head)
    assert code == 1
    assert "  - vm 'web-6'" in out
    assert "Warning: this plan is refused: the plan deletes 6 VMs" in out
    assert err == (
        "error: refusing the plan: the plan deletes 6 VMs (web-1, web-2, web-3, web-4 and 2 "
        "more), over the default maxDeletions (25% of the fleet's 9 VMs, at least 5) of 5; "
        "raise spec.maxDeletions in a commit, or run with --force-deletions\n"
    )
    code, out, _ = run(capsys, "diff", *common, "--head", head, "--format", "json")
    assert code == 1
    assert json.loads(out)["summary"]["delete"] == 6
    out_path = state_dir.parent / "plan.json"
    assert run(capsys, "plan", *common, "--head", head, "-o", str(out_path))[0] == 1
    assert not out_path.exists()  # a refused plan is not saved

    code, out, err = run(capsys, "diff", *common, "--head", head, "--force-deletions")
    assert (code, err) == (2, "")
    assert "refused" not in out

    fleet_repo.edit("fleet.yaml", "  prune: true", "  prune: true\n  maxDeletions: 6")
    raised = fleet_repo.commit("allow 6 deletions")
    assert run(capsys, "diff", *common, "--head", raised)[0] == 2


def test_prevent_destroy_is_lifted_only_by_a_commit(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_repo.edit("workloads/echo.yaml", "  deploy:\n", "  deploy:\n    preventDestroy: true\n")
    protected = fleet_repo.commit("echo: prevent destroy")
    (fleet_repo.path / "workloads" / "echo.yaml").unlink()
    dropped = fleet_repo.commit("drop echo")
    common = ("--repo", str(fleet_repo.path), "--state-dir", str(state_dir), "--base", protected)
    for force in ((), ("--force-deletions",)):
        code, out, err = run(capsys, "diff", *common, "--head", dropped, *force)
        assert code == 1
        assert "  - vm 'echo-0'" in out
        assert "protected by deploy.preventDestroy (echo-0)" in err
        assert "sets preventDestroy: false on 'echo'" in err


@pytest.mark.slow
def test_template_bombs_are_refused_by_validate_one_line_each(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_manifests import BOMBS

    for name, text in BOMBS.items():
        fleet_repo.write(f"workloads/{name}", text)
    fleet_repo.commit("template bombs")
    code, out, err = run(
        capsys, "validate", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)
    )
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "workloads/loops.yaml.j2: template exceeded its CPU limit (5 s)",
        "workloads/memory.yaml.j2: template exceeded its memory limit (256 MiB)",
        "workloads/output.yaml.j2: template output exceeds the limit of 1048576 bytes",
        "workloads/recursion.yaml.j2: template nests or recurses too deeply (a macro calling "
        "itself?)",
        "error: 4 problems in the manifests; nothing was changed",
    ]
