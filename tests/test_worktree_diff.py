"""``reconciler diff --worktree``: the uncommitted working tree of a real checkout as the head,
against a revision or the live fleet, held to the same rules as a commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.cli import main


def diff(
    capsys: pytest.CaptureFixture[str], repo: FleetRepo, state_dir: Path, *argv: str
) -> tuple[int, str, str]:
    code = main(["diff", "--repo", str(repo.path), "--state-dir", str(state_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_uncommitted_and_untracked_changes_are_the_head(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")  # tracked, modified
    fleet_repo.write(
        "workloads/extra.yaml",
        fleet_repo.read("workloads/echo.yaml").replace("name: echo", "name: extra"),
    )  # untracked, not ignored
    fleet_repo.write(".gitignore", "scratch/\n")
    fleet_repo.write("scratch/broken.yaml", "apiVersion: [")  # ignored: not part of the head
    os.remove(fleet_repo.path / "workloads" / "report.yaml.j2")  # tracked, deleted
    code, out, err = diff(capsys, fleet_repo, state_dir, "--worktree", "--base", "HEAD")
    assert code == 2, err
    assert "-> working tree" in out
    assert "+ vm 'web-2'" in out
    assert "+ vm 'extra-0'" in out
    assert "- vm 'report-0'" in out
    assert "echo-0" in out  # unchanged
    # What was committed is untouched, and the export is gone once the command is done.
    assert fleet_repo.git("status", "--porcelain")
    assert list((state_dir / "git" / "worktrees").iterdir()) == []


def test_a_clean_worktree_has_no_changes(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = diff(capsys, fleet_repo, state_dir, "--worktree", "--base", "HEAD")
    assert (code, err) == (0, ""), err
    assert "No changes" in out


def test_worktree_against_the_live_fleet(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = diff(capsys, fleet_repo, state_dir, "--worktree", "--format", "markdown")
    assert code == 2, err
    assert "nothing applied -> working tree" in out


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (
            lambda p: os.symlink("/etc/passwd", p / "workloads" / "leak.yaml"),
            "leaves the repository",
        ),
        (lambda p: os.symlink("../../..", p / "workloads" / "up"), "leaves the repository"),
        (lambda p: (p / "workloads" / "bad.yaml").write_text("kind: [\n"), "workloads/bad.yaml"),
    ],
)
def test_hostile_or_invalid_worktrees_are_refused_like_commits(
    fleet_repo: FleetRepo,
    state_dir: Path,
    capsys: pytest.CaptureFixture[str],
    setup: object,
    expected: str,
) -> None:
    setup(fleet_repo.path)  # type: ignore[operator]
    code, _out, err = diff(capsys, fleet_repo, state_dir, "--worktree", "--base", "HEAD")
    assert code == 1
    assert expected in err
    assert "Traceback" not in err


def test_special_files_are_skipped(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FIFO would block a reader forever; a commit cannot hold one, so neither does this."""
    os.mkfifo(fleet_repo.path / "workloads" / "pipe.yaml")
    code, _out, err = diff(capsys, fleet_repo, state_dir, "--worktree", "--base", "HEAD")
    assert (code, err) == (0, "")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--worktree", "--base", "HEAD", "--head", "HEAD"), "--worktree is the head"),
        (("--worktree", "--rev", "HEAD"), "--worktree is the head"),
    ],
)
def test_conflicting_options(
    fleet_repo: FleetRepo,
    state_dir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    expected: str,
) -> None:
    code, _, err = diff(capsys, fleet_repo, state_dir, *argv)
    assert code == 1
    assert expected in err


def test_a_remote_has_no_worktree(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "diff",
            "--repo",
            f"file://{fleet_repo.path}",
            "--state-dir",
            str(state_dir),
            "--worktree",
            "--base",
            "HEAD",
        ]
    )
    assert code == 1
    assert "--worktree needs a local checkout" in capsys.readouterr().err
