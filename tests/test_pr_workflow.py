"""The pull-request workflow of ``deploy/ci/`` as CI would run it: the GitHub workflow passes
actionlint; its shell steps (and the GitLab job's script), taken from the YAML as written, run
against a real clone of a local bare repository and post the plan to a local stand-in of the
provider's API, creating one comment and updating it on the next push; the job fails exactly
when reconciler exits 1. Also the pre-commit hook definition and ``reconciler pr-comment``."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml
from support.forge_server import FakeForge
from support.repo import FLEET_EXAMPLE, PROJECT, FleetRepo

from reconciler.cli import main
from reconciler.defaults import default_state_dir
from reconciler.forge import COMMENT_MARKER
from reconciler.manifests.compile_cache import CACHE_FILE

GITHUB_WORKFLOW = PROJECT / "deploy" / "ci" / "github-pr-plan.yml"
GITLAB_JOB = PROJECT / "deploy" / "ci" / "gitlab-pr-plan.yml"
BIN = Path(sys.executable).parent
TOKEN = "ghs_workflowT0ken0123456789abcdef"


def test_actionlint_passes_on_the_github_workflow() -> None:
    actionlint = BIN / "actionlint"
    assert actionlint.exists(), "actionlint is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(actionlint), "-no-color", str(GITHUB_WORKFLOW)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class PullRequest:
    """A fleet repository on a local bare "server", with a pull request branch, and the CI
    checkout: a clone at the merge of the branch into main (GitHub's refs/pull/N/merge)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = tmp / "server.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.server)], check=True)
        self.author = FleetRepo.of_fleet_example(tmp / "author")
        self.author.git("remote", "add", "origin", str(self.server))
        self.author.git("push", "-q", "origin", "main")
        self.author.git("checkout", "-q", "-b", "change")

    def push(self, message: str) -> None:
        self.author.commit(message)
        self.author.git("push", "-q", "-f", "origin", "change")

    def checkout(self) -> tuple[Path, str, str]:
        """A fresh CI checkout: (directory, base sha, merge sha)."""
        work = self.tmp / f"checkout-{len(list(self.tmp.glob('checkout-*')))}"
        subprocess.run(["git", "clone", "-q", str(self.server), str(work)], check=True)
        ci = FleetRepo(work)  # sets a committer for the merge
        ci.git("fetch", "-q", "origin", "change")
        base = ci.git("rev-parse", "origin/main")
        ci.git("merge", "-q", "--no-ff", "-m", "merge", "FETCH_HEAD")
        return work, base, ci.git("rev-parse", "HEAD")


def _environment(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(tmp / "home"),
        "RECONCILER_STATE_DIR": str(tmp / "ci-state"),
        "SOPS_AGE_KEY_FILE": os.environ["SOPS_AGE_KEY_FILE"],  # fleet-example has secrets
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def _run_script(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # GitHub's and GitLab's default: bash, stop at the first failing command.
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _expand(value: str, expressions: dict[str, str]) -> str:
    """``${{ expr }}`` replaced from ``expressions``; an unknown expression fails the test."""

    def one(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        assert expr in expressions, f"the test does not know ${{{{ {expr} }}}}"
        return expressions[expr]

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(value))


def _run_github_job(pr: PullRequest, forge: FakeForge, *, fork: bool = False) -> dict[str, Any]:
    """The job's steps after checkout/setup/install, with GitHub's ``if:`` rules for them."""
    workflow = yaml.safe_load(GITHUB_WORKFLOW.read_text())
    job = workflow["jobs"]["plan"]
    steps = {s["id"]: s for s in job["steps"] if "id" in s}
    # The conditions this emulation follows, checked against the file.
    assert steps["plan"]["if"] == "always() && steps.install.outcome == 'success'"
    assert steps["comment"]["if"] == (
        "always() && steps.plan.outputs.exit-code != '' && "
        "github.event.pull_request.head.repo.full_name == github.repository"
    )
    assert steps["verdict"]["if"] == "always() && steps.plan.outputs.exit-code != ''"
    work, base, merge = pr.checkout()
    output, summary = pr.tmp / "github_output", pr.tmp / "step_summary"
    output.write_text("")
    expressions = {
        "github.sha": merge,
        "github.event.pull_request.base.sha": base,
        "github.event.pull_request.number": "7",
        "secrets.GITHUB_TOKEN": TOKEN,
    }
    env = _environment(
        pr.tmp,
        GITHUB_OUTPUT=str(output),
        GITHUB_STEP_SUMMARY=str(summary),
        GITHUB_API_URL=forge.url,
        GITHUB_REPOSITORY="acme/fleet",
        **{k: str(v) for k, v in job["env"].items()},
    )
    results: dict[str, Any] = {}

    def run(step_id: str) -> subprocess.CompletedProcess[str]:
        step = steps[step_id]
        step_env = {k: _expand(v, expressions) for k, v in step.get("env", {}).items()}
        result = _run_script(step["run"], work, {**env, **step_env})
        results[step_id] = result
        return result

    run("validate")
    run("plan")
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    expressions["steps.plan.outputs.exit-code"] = outputs["exit-code"]
    results["exit-code"] = int(outputs["exit-code"])
    if not fork:
        run("comment")
    run("verdict")
    results["summary"] = summary.read_text()
    return results


def test_github_workflow_keeps_the_compile_cache_where_reconciler_writes_it() -> None:
    """The cache step saves and restores the file reconciler keeps its compiled workloads in,
    under the runner's default state directory, preferring one made against the same base."""
    job = yaml.safe_load(GITHUB_WORKFLOW.read_text())["jobs"]["plan"]
    assert "RECONCILER_STATE_DIR" not in job["env"]  # the default directory, then
    (cache,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache@")]
    home = "/home/runner"
    path = cache["with"]["path"].replace("~", home, 1)
    assert Path(path) == default_state_dir({"HOME": home}) / CACHE_FILE
    base = "${{ github.event.pull_request.base.sha }}"
    assert cache["with"]["key"].startswith(f"reconciler-compile-{base}-")
    assert cache["with"]["restore-keys"].splitlines() == [
        f"reconciler-compile-{base}-",
        "reconciler-compile-",
    ]
    steps = [s.get("id") or s.get("uses") for s in job["steps"]]
    assert steps.index(cache["uses"]) < steps.index("validate")


def test_github_workflow_posts_then_updates_one_comment(tmp_path: Path) -> None:
    pr = PullRequest(tmp_path)
    pr.author.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    pr.push("web: 3 replicas")
    with FakeForge("github", TOKEN) as forge:
        first = _run_github_job(pr, forge)
        assert first["validate"].returncode == 0, first["validate"].stderr
        assert first["exit-code"] == 2
        assert (
            first["comment"].stdout.strip() == "created the plan comment on github pull request #7"
        )
        assert first["verdict"].returncode == 0
        (comment,) = forge.comments[7]
        assert comment["body"].startswith(COMMENT_MARKER + "\n### reconciler plan")
        assert "`web-2`" in comment["body"]
        assert "web-2" in first["summary"]

        pr.author.edit("workloads/web.yaml", "replicas: 3", "replicas: 4")
        pr.push("web: 4 replicas")
        second = _run_github_job(pr, forge)
        assert (
            second["comment"].stdout.strip() == "updated the plan comment on github pull request #7"
        )
        (comment,) = forge.comments[7]  # still one comment
        assert "`web-3`" in comment["body"]
        methods = [(r.method, r.path) for r in forge.requests if r.method != "GET"]
        assert methods == [
            ("POST", "/repos/acme/fleet/issues/7/comments"),
            ("PATCH", f"/repos/acme/fleet/issues/comments/{comment['id']}"),
        ]
        # The token went in the header, never on a command line or in the job's output.
        assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in forge.requests)
        for result in (*first.values(), *second.values()):
            if isinstance(result, subprocess.CompletedProcess):
                assert TOKEN not in result.stdout + result.stderr


def test_github_workflow_fails_on_invalid_manifests_and_says_why(tmp_path: Path) -> None:
    pr = PullRequest(tmp_path)
    pr.author.write("workloads/broken.yaml", "apiVersion: reconciler/v1alpha1\nkind: Workload\n")
    pr.push("broken")
    with FakeForge("github", TOKEN) as forge:
        job = _run_github_job(pr, forge)
    assert job["validate"].returncode == 1
    assert "workloads/broken.yaml" in job["validate"].stderr
    assert job["exit-code"] == 1
    assert job["verdict"].returncode == 1
    (comment,) = forge.comments[7]
    assert "### reconciler plan: failed" in comment["body"]
    assert "workloads/broken.yaml" in comment["body"]


def test_github_workflow_passes_on_no_changes_and_skips_the_comment_for_forks(
    tmp_path: Path,
) -> None:
    pr = PullRequest(tmp_path)
    pr.author.write("README.md", "docs only\n")
    pr.push("docs")
    with FakeForge("github", TOKEN) as forge:
        job = _run_github_job(pr, forge, fork=True)
        assert forge.requests == []
    assert (job["exit-code"], job["verdict"].returncode) == (0, 0)
    assert "No changes" in job["summary"]


def test_gitlab_job_posts_then_updates_one_note(tmp_path: Path) -> None:
    job = yaml.safe_load(GITLAB_JOB.read_text())["reconciler-plan"]
    (script,) = job["script"]
    token = "glpat-workflowT0ken0123"
    pr = PullRequest(tmp_path)
    pr.author.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    pr.push("web: 3 replicas")
    (cached,) = job["cache"]["paths"]
    kept: bytes | None = None
    with FakeForge("gitlab", token, prefix="/api/v4") as forge:
        for expected in ("created", "updated"):
            work, base, merge = pr.checkout()
            if kept is not None:  # GitLab's cache: what the last job left at its paths
                (work / cached).parent.mkdir(parents=True)
                (work / cached).write_bytes(kept)
            env = _environment(
                tmp_path,
                CI_MERGE_REQUEST_DIFF_BASE_SHA=base,
                CI_COMMIT_SHA=merge,
                CI_API_V4_URL=forge.url,
                CI_PROJECT_ID="42",
                CI_PROJECT_DIR=str(work),
                CI_MERGE_REQUEST_IID="5",
                RECONCILER_FORGE_TOKEN=token,
            )
            # Job variables may name others, as GitLab expands them.
            env.update({k: Template(str(v)).substitute(env) for k, v in job["variables"].items()})
            result = _run_script(script, work, env)
            assert result.returncode == 0, result.stderr
            assert f"{expected} the plan comment on gitlab merge request #5" in result.stdout
            # The compile cache is where the job's cache keeps it.
            assert env["RECONCILER_STATE_DIR"] == str(work / ".reconciler-state")
            kept = (work / cached).read_bytes()
        (note,) = forge.comments[5]
        assert note["body"].startswith(COMMENT_MARKER)
        assert "`web-2`" in note["body"]
        writes = [(r.method, r.path) for r in forge.requests if r.method != "GET"]
        assert writes == [
            ("POST", "/api/v4/projects/42/merge_requests/5/notes"),
            ("PUT", f"/api/v4/projects/42/merge_requests/5/notes/{note['id']}"),
        ]
        pr.author.write("workloads/broken.yaml", "kind: Workload\n")
        pr.push("broken")
        work, base, merge = pr.checkout()
        env.update(CI_MERGE_REQUEST_DIFF_BASE_SHA=base, CI_COMMIT_SHA=merge)
        failed = _run_script(script, work, env)
        assert failed.returncode == 1  # validate fails first: the job fails


def test_pr_comment_needs_the_token_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECONCILER_FORGE_TOKEN", raising=False)
    body = tmp_path / "plan.md"
    body.write_text("plan\n")
    argv = ["pr-comment", "--provider", "github", "--repository", "a/b", "--pr", "1"]
    assert main([*argv, "--body-file", str(body)]) == 1
    assert capsys.readouterr().err == (
        "error: $RECONCILER_FORGE_TOKEN is not set: give the forge API token in that "
        "variable (never as an argument)\n"
    )
    monkeypatch.setenv("RECONCILER_FORGE_TOKEN", TOKEN)
    body.write_text("")
    assert main([*argv, "--body-file", str(body)]) == 1
    assert "is empty; did the diff step fail?" in capsys.readouterr().err
    body.write_text("plan")
    code = main([*argv, "--body-file", str(body), "--api-url", "http://forge.example.com"])
    assert code == 1
    assert "plain http to another host" in capsys.readouterr().err


def test_pre_commit_hook_definition_and_entry(tmp_path: Path) -> None:
    hooks = yaml.safe_load((PROJECT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = hooks
    assert {"id", "name", "entry", "language"} <= set(hook)
    assert hook["language"] == "python"
    assert hook["pass_filenames"] is False
    files = re.compile(hook["files"])
    assert files.search("workloads/web.yaml")
    assert files.search("x/.reconcilerignore")
    assert not files.search("services/web/app.py")
    repo = FleetRepo.of_fleet_example(tmp_path / "fleet")
    env = _environment(tmp_path)
    entry = [str(BIN / shlex.split(hook["entry"])[0]), *shlex.split(hook["entry"])[1:]]

    def hook_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            entry, check=False, cwd=repo.path, env=env, capture_output=True, text=True
        )

    ok = hook_run()
    assert ok.returncode == 0, ok.stderr
    assert "ok: fleet 'example' at the working tree" in ok.stdout
    # What pre-commit checks is the commit about to be made: the working tree, not HEAD.
    repo.edit("workloads/web.yaml", "replicas: 2", "replicas: -1")
    bad = hook_run()
    assert bad.returncode == 1
    assert "workloads/web.yaml" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert FLEET_EXAMPLE.is_dir()
