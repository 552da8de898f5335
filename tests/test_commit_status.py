"""Commit statuses: what the outbox sends through ``reconciler.forge`` to GitHub and GitLab,
checked on a local fake API (method, path, headers, body), in order per commit, and from a real
daemon: ``pending`` when a revision is attempted, ``success`` once applied, ``failure`` with the
reason. Where statuses go is the operator's setting: no manifest field can redirect them."""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path

import pytest
from support.daemons import Daemon
from support.fakes import MemoryStateStore
from support.receiver import Receiver, Request
from support.repo import FleetRepo
from support.waiting import eventually

from reconciler.errors import ManifestError
from reconciler.forge import open_forge
from reconciler.leadership.fence import Fence
from reconciler.manifests.loader import load_fleet
from reconciler.notify import (
    Endpoints,
    Notifier,
    RetryPolicy,
    Sender,
    revision_applied,
    revision_attempted,
    revision_failed,
)
from reconciler.state import open_state_store

SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "ghp_s3cr3t-token"
FAST = RetryPolicy(base=0.01, ceiling=0.02, max_attempts=5, timeout=5)


def _sender(
    api: Receiver, provider: str, repository: str, policy: RetryPolicy = FAST
) -> tuple[Notifier, Sender]:
    store = MemoryStateStore()
    fence = Fence(1, renew_deadline=60)
    store.claim_term(fence)
    forge = open_forge(
        provider, api.url("/api/v3" if provider == "github" else "/api/v4"), repository, TOKEN
    )
    sender = Sender(
        store.handle,
        lambda: fence,
        Endpoints({}),
        policy=policy,
        forge=forge,
        target_url="https://reconciler.example/status",
    )
    return Notifier(lambda: store, commit_statuses=True), sender


def _statuses(api: Receiver) -> list[tuple[str, str, object]]:
    return [(r.method, r.path, r.json()) for r in api.requests]


def test_github_statuses_pending_failure_with_the_reason_then_success() -> None:
    with Receiver(statuses=(201,), answer=lambda r: b"{}") as api:
        notifier, sender = _sender(api, "github", "acme/fleet")
        notifier.notice(revision_attempted(SHA), None)
        notifier.notice(revision_failed(SHA, "0123456789ab has invalid manifests: w.yaml:3"), None)
        notifier.notice(revision_applied(SHA, "2 action(s), healthy"), None)
        while sender.send_due():
            pass
        path = f"/api/v3/repos/acme/fleet/statuses/{SHA}"
        target = "https://reconciler.example/status"
        assert _statuses(api) == [
            (
                "POST",
                path,
                {
                    "state": "pending",
                    "description": f"revision {SHA[:12]} is being applied",
                    "context": "reconciler",
                    "target_url": target,
                },
            ),
            (
                "POST",
                path,
                {
                    "state": "failure",
                    "description": "0123456789ab has invalid manifests: w.yaml:3",
                    "context": "reconciler",
                    "target_url": target,
                },
            ),
            (
                "POST",
                path,
                {
                    "state": "success",
                    "description": "2 action(s), healthy",
                    "context": "reconciler",
                    "target_url": target,
                },
            ),
        ]
        first = api.requests[0]
        assert first.header("Authorization") == f"Bearer {TOKEN}"
        assert first.header("Content-Type") == "application/json"
        assert first.header("Accept") == "application/vnd.github+json"


def test_gitlab_statuses_name_the_project_and_say_failed() -> None:
    with Receiver(statuses=(201,), answer=lambda r: b"{}") as api:
        notifier, sender = _sender(api, "gitlab", "infra/fleet")
        notifier.notice(revision_failed(SHA, "invalid manifests"), None)
        sender.send_due()
        (request,) = api.requests
        assert (request.method, request.path) == (
            "POST",
            f"/api/v4/projects/infra%2Ffleet/statuses/{SHA}",
        )
        assert request.header("PRIVATE-TOKEN") == TOKEN
        assert request.header("Authorization") is None
        assert request.json() == {
            "state": "failed",
            "name": "reconciler",
            "description": "invalid manifests",
            "target_url": "https://reconciler.example/status",
        }


def test_a_commit_s_statuses_arrive_in_order_when_one_must_be_retried() -> None:
    """A failure the forge refused once is sent again before the success that followed it, so
    the commit never ends on a stale state."""
    with Receiver(statuses=(201, 502, 201), answer=lambda r: b"{}") as api:
        notifier, sender = _sender(api, "github", "acme/fleet", RetryPolicy(base=0.5, ceiling=1))
        notifier.notice(revision_attempted(SHA), None)
        notifier.notice(revision_failed(SHA, "build failed"), None)
        assert sender.send_due() == 2  # pending sent, then the failure refused (502)
        notifier.notice(revision_applied(SHA, "healthy"), None)
        assert sender.send_due() == 0  # the failure waits for its retry, the success behind it
        deadline = time.monotonic() + 10
        while len(api.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
            sender.send_due()
        assert [r.json()["state"] for r in api.requests] == [
            "pending",
            "failure",
            "failure",
            "success",
        ]
        assert all(TOKEN not in r.body.decode() for r in api.requests)


def test_no_manifest_field_chooses_where_statuses_go(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: x}\n"
        "spec:\n  commitStatus: {api: 'https://evil.example', repository: a/b}\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_fleet(tmp_path)
    assert "commitStatus" in str(caught.value.problems[0])


@pytest.mark.slow
def test_the_daemon_writes_statuses_of_applied_and_failed_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = FleetRepo.create(
        tmp_path / "fleet",
        {
            "fleet.yaml": "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: cs}\n"
            "spec: {allowEmpty: true}\n"
        },
    )
    good = repo.git("rev-parse", "HEAD")
    monkeypatch.setenv("RECONCILER_COMMIT_STATUS_TOKEN", TOKEN)
    with Receiver(statuses=(201,), answer=lambda r: b"{}") as api:
        extra = [
            "--commit-status",
            "github",
            "--commit-status-api",
            api.url("/api/v3"),
            "--commit-status-repo",
            "acme/fleet",
        ]
        daemon = Daemon(repo.path, tmp_path / "state", tmp_path, "d0", extra)
        try:

            def states(sha: str) -> list[str]:
                path = f"/api/v3/repos/acme/fleet/statuses/{sha}"
                return [r.json()["state"] for r in api.requests if r.path == path]

            eventually(lambda: states(good) == ["pending", "success"], 60, "the good statuses")
            repo.write(
                "broken.yaml",
                "apiVersion: reconciler/v1alpha1\nkind: Workload\n"
                "metadata: {name: b}\nspec: {sorce: {}}\n",
            )
            bad = repo.commit("broken")
            eventually(lambda: states(bad) == ["pending", "failure"], 60, "the bad statuses")
            failure: Request = [r for r in api.requests if r.path.endswith(bad)][-1]
            assert "invalid manifests" in failure.json()["description"]
            assert failure.header("Authorization") == f"Bearer {TOKEN}"
            with closing(open_state_store(tmp_path / "state")) as store:
                assert {e.message.destination for e in store.outbox()} == {":commit-status"}
            assert TOKEN not in daemon.log()
            assert json.dumps(TOKEN) not in json.dumps([r.json() for r in api.requests])
        finally:
            daemon.stop()
