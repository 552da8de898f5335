"""The repository options of the CLI: revision names, rollback protection, credentials and
signature verification, through ``reconciler.cli.main`` on real repositories."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.cli.main import main
from reconciler.daemon.cycle import ReconcileCycle
from reconciler.execution.host import open_host_at
from reconciler.leadership.fence import Fence
from reconciler.pipeline import RevisionLoader
from reconciler.source import open_source
from reconciler.state import open_state_store


@pytest.fixture
def repo(tmp_path: Path) -> FleetRepo:
    (tmp_path / "origin").mkdir()
    r = FleetRepo(tmp_path / "origin")
    r.write("fleet/a.yaml", "one\n")
    r.commit("first")
    r.git("tag", "v1")
    r.write("fleet/a.yaml", "two\n")
    r.commit("second")
    return r


def test_cli_refuses_option_like_revisions_in_one_line(
    repo: FleetRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owned = tmp_path / "owned"
    common = ["--repo", str(repo.path), "--state-dir", str(tmp_path / "state")]
    for argv in (
        ["validate", *common, f"--rev=--upload-pack=touch {owned}"],
        ["validate", *common, "--ref=-x"],
        ["build", *common, f"--rev=--output={owned}"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: refusing the "), err
        assert err.count("\n") == 1
    assert not owned.exists()


def test_apply_refuses_a_revision_that_does_not_descend_from_the_applied_one(
    repo: FleetRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    store = open_state_store(state)
    store.record_revision(repo.git("rev-parse", "main"), outcome="applied")
    store.close()
    argv = ["apply", "--repo", str(repo.path), "--state-dir", str(state), "--rev", "v1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "does not descend from the applied revision" in err
    assert err.count("\n") == 1


def test_a_credential_in_the_url_is_not_in_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "https://user:s3cret@127.0.0.1:1/x.git"
    assert main(["validate", "--repo", url, "--state-dir", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "cannot fetch https://127.0.0.1:1/x.git" in err


def _ssh_key(tmp_path: Path) -> Path:
    key = tmp_path / "deploy"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy", "-f", str(key)],
        check=True,
    )
    return key


@pytest.mark.parametrize("command", ["apply", "build", "validate", "diff"])
def test_commands_that_act_verify_signatures_with_trusted_keys(
    repo: FleetRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    key = _ssh_key(tmp_path)
    head = repo.git("rev-parse", "HEAD")
    argv = [command, "--repo", str(repo.path), "--state-dir", str(tmp_path / "state")]
    assert main([*argv, "--trusted-key", f"{key}.pub"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: commit {head[:12]} is not signed; only revisions signed by a trusted key are "
        "applied (--trusted-key)\n"
    )
    # Nothing was exported from the unsigned commit.
    assert not (tmp_path / "state" / "git" / "trees" / head).exists()


def test_a_signed_head_is_read_and_a_revoked_key_is_not_trusted(
    repo: FleetRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _ssh_key(tmp_path)
    signing = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")
    repo.git(*signing, "commit", "-q", "--amend", "-S", "--no-edit")
    head = repo.git("rev-parse", "HEAD")
    state = tmp_path / "state"
    argv = ["build", "--repo", str(repo.path), "--state-dir", str(state)]
    argv += ["--trusted-key", f"{key}.pub", "--target", "executable", "nothing"]
    main(argv)  # the fleet has no manifests: whatever build says, the tree was verified first
    assert (state / "git" / "trees" / head).is_dir()
    capsys.readouterr()
    assert main([*argv, "--revoked-key", f"{key}.pub"]) == 1
    assert "which is revoked (--revoked-key)" in capsys.readouterr().err


def test_the_credential_comes_from_a_file_or_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "https://127.0.0.1:1/x.git"
    common = ["validate", "--repo", url, "--state-dir", str(tmp_path / "state")]
    empty = tmp_path / "credential"
    empty.write_text("\n")
    assert main([*common, "--repo-credential-file", str(empty)]) == 1
    assert capsys.readouterr().err == (
        f"error: {empty} is empty; it should hold user:token or a token\n"
    )
    assert main([*common, "--repo-credential-file", str(tmp_path / "none")]) == 1
    assert "cannot read the credential file" in capsys.readouterr().err
    monkeypatch.setenv("RECONCILER_GIT_CREDENTIAL", "user:s3cret\nmore")
    assert main(common) == 1
    assert capsys.readouterr().err == (
        "error: $RECONCILER_GIT_CREDENTIAL must hold one line: user:token or a token\n"
    )
    monkeypatch.setenv("RECONCILER_GIT_CREDENTIAL", "user:s3cret")
    assert main(common) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot fetch {url}: ")
    assert "s3cret" not in err


@pytest.mark.parametrize("allow", [False, True])
def test_the_daemon_cycle_refuses_a_head_that_does_not_descend_from_the_applied_one(
    repo: FleetRepo, tmp_path: Path, allow: bool
) -> None:
    state = tmp_path / "state"
    applied = repo.git("rev-parse", "main")
    host = open_host_at(state)
    try:
        host.store.record_revision(applied, outcome="applied")
        repo.git("reset", "-q", "--hard", "v1")  # the branch is pushed back to an older commit
        older = repo.git("rev-parse", "HEAD")
        source = open_source(str(repo.path), ref="refs/heads/main", cache_dir=state / "git")
        cycle = ReconcileCycle(
            RevisionLoader(source=source),
            host,
            tmp_path / "cache",
            allow_non_descendant=allow,
        )
        result = cycle.run(Fence(1, renew_deadline=60))
        attempted = host.store.attempted_revision()
    finally:
        host.close()
    assert result.head == older
    assert attempted is not None
    assert attempted.revision == older
    assert attempted.outcome == "failed"
    refusal = f"refusing {older[:12]}: it does not descend from the applied revision"
    # The scratch fleet holds no valid manifests: allowed, the head gets as far as loading.
    assert attempted.message.startswith(refusal) is not allow
    assert "invalid manifests" in attempted.message or not allow
