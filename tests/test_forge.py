"""The forge client against a local stand-in of the GitHub and GitLab REST APIs: the exact
requests (method, path, headers, JSON body) for comments and commit statuses, pagination,
one comment per pull request, and what a hostile or broken server cannot make it do."""

from __future__ import annotations

import logging

import pytest
from support.forge_server import FakeForge

from reconciler.forge import COMMENT_MARKER, CommitStatus, ForgeError, open_forge

TOKEN = "ghp_s3cr3tT0kenValue0123456789"
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_github_comment_is_created_then_updated_in_place() -> None:
    with FakeForge("github", TOKEN) as server:
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        assert forge.upsert_pr_comment(7, "plan one", COMMENT_MARKER) == "created"
        assert forge.upsert_pr_comment(7, "plan two", COMMENT_MARKER) == "updated"
        assert server.comments[7] == [{"id": 1001, "body": f"{COMMENT_MARKER}\nplan two"}]
        get, post, _get2, patch = server.requests
        assert (get.method, get.path, get.query) == (
            "GET",
            "/repos/acme/fleet/issues/7/comments",
            {"per_page": "100"},
        )
        assert (post.method, post.path, post.body) == (
            "POST",
            "/repos/acme/fleet/issues/7/comments",
            {"body": f"{COMMENT_MARKER}\nplan one"},
        )
        assert (patch.method, patch.path, patch.body) == (
            "PATCH",
            "/repos/acme/fleet/issues/comments/1001",
            {"body": f"{COMMENT_MARKER}\nplan two"},
        )
        for request in server.requests:
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
            assert request.headers["accept"] == "application/vnd.github+json"
            assert request.headers["x-github-api-version"] == "2022-11-28"


def test_github_finds_the_marked_comment_on_a_later_page() -> None:
    with FakeForge("github", TOKEN, prefix="/api/v3", page_size=2) as server:
        for n in range(5):
            server.add_comment(3, f"review {n}")
        ours = server.add_comment(3, f"{COMMENT_MARKER}\nold plan")
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        assert forge.upsert_pr_comment(3, "new plan", COMMENT_MARKER) == "updated"
        pages = [r.query.get("page", "1") for r in server.requests if r.method == "GET"]
        assert pages == ["1", "2", "3"]
        assert server.requests[-1].path == f"/api/v3/repos/acme/fleet/issues/comments/{ours}"
        assert len(server.comments[3]) == 6


def test_a_marked_comment_we_may_not_edit_is_skipped() -> None:
    """Anyone may write a comment holding the marker; that cannot stop the plan's comment."""
    with FakeForge("github", TOKEN) as server:
        server.add_comment(1, f"{COMMENT_MARKER}\nfake plan", foreign=True)
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        assert forge.upsert_pr_comment(1, "real plan", COMMENT_MARKER) == "created"
        assert forge.upsert_pr_comment(1, "real plan 2", COMMENT_MARKER) == "updated"
        bodies = [c["body"] for c in server.comments[1]]
        assert bodies == [f"{COMMENT_MARKER}\nfake plan", f"{COMMENT_MARKER}\nreal plan 2"]


def test_the_marker_is_never_repeated_and_long_bodies_are_cut() -> None:
    with FakeForge("github", TOKEN) as server:
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        forge.upsert_pr_comment(2, f"x {COMMENT_MARKER} y" + "z" * 70000, COMMENT_MARKER)
        body = server.comments[2][0]["body"]
        assert body.count(COMMENT_MARKER) == 1
        assert body.startswith(COMMENT_MARKER)
        assert len(body) == 65536
        assert "truncated" in body[-100:]


def test_github_commit_status() -> None:
    with FakeForge("github", TOKEN, prefix="/api/v3") as server:
        forge = open_forge("github", server.url + "/", "acme/fleet", TOKEN)
        forge.set_commit_status(
            CommitStatus(SHA, "failure", "web-0 unhealthy\n" + "x" * 300, target_url="https://x/")
        )
        forge.set_commit_status(CommitStatus(SHA, "pending", "applying"))
        first, second = server.requests
        assert (first.method, first.path) == ("POST", f"/api/v3/repos/acme/fleet/statuses/{SHA}")
        assert first.headers["content-type"] == "application/json"
        assert first.body["state"] == "failure"
        assert first.body["context"] == "reconciler"
        assert first.body["target_url"] == "https://x/"
        assert len(first.body["description"]) == 140
        assert "\n" not in first.body["description"]
        assert second.body == {
            "state": "pending",
            "description": "applying",
            "context": "reconciler",
        }


def test_gitlab_notes_and_statuses() -> None:
    token = "glpat-0123456789abcdefghij"
    with FakeForge("gitlab", token, prefix="/api/v4", page_size=1) as server:
        server.add_comment(5, "a review")
        forge = open_forge("gitlab", server.url, "group/sub/fleet", token)
        assert forge.upsert_pr_comment(5, "plan", COMMENT_MARKER) == "created"
        assert forge.upsert_pr_comment(5, "plan 2", COMMENT_MARKER) == "updated"
        project = "/api/v4/projects/group%2Fsub%2Ffleet"
        methods = [(r.method, r.path) for r in server.requests]
        assert methods == [
            ("GET", f"{project}/merge_requests/5/notes"),
            ("POST", f"{project}/merge_requests/5/notes"),
            ("GET", f"{project}/merge_requests/5/notes"),
            ("GET", f"{project}/merge_requests/5/notes"),
            ("PUT", f"{project}/merge_requests/5/notes/1002"),
        ]
        assert server.requests[-1].body == {"body": f"{COMMENT_MARKER}\nplan 2"}
        forge.set_commit_status(CommitStatus(SHA, "failure", "broken", context="fleet/plan"))
        status = server.requests[-1]
        assert (status.method, status.path) == ("POST", f"{project}/statuses/{SHA}")
        assert status.body == {"state": "failed", "name": "fleet/plan", "description": "broken"}
        for request in server.requests:
            assert request.headers["private-token"] == token
            assert "authorization" not in request.headers


def test_refusals_are_one_line_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeForge("github", "another-token-entirely") as server:
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        with pytest.raises(ForgeError) as caught:
            forge.upsert_pr_comment(1, "plan", COMMENT_MARKER)
    message = str(caught.value)
    assert message == "github: GET /repos/acme/fleet/issues/1/comments: HTTP 401 Bad credentials"
    assert TOKEN not in caplog.text


def test_no_redirect_to_another_host() -> None:
    with FakeForge("github", TOKEN) as elsewhere, FakeForge("github", TOKEN) as server:
        server.redirect_to = elsewhere.url.replace("127.0.0.1", "localhost") + "/steal"
        forge = open_forge("github", server.url, "acme/fleet", TOKEN)
        with pytest.raises(ForgeError, match="redirected to another host"):
            forge.set_commit_status(CommitStatus(SHA, "success", "ok"))
        assert elsewhere.requests == []


def test_unreachable_api_is_one_line() -> None:
    forge = open_forge("gitlab", "http://127.0.0.1:9/api/v4", "42", TOKEN, timeout=2)
    with pytest.raises(ForgeError, match=r"^gitlab: POST /projects/42/statuses/.*cannot reach"):
        forge.set_commit_status(CommitStatus(SHA, "success", "ok"))


@pytest.mark.parametrize(
    ("provider", "api_url", "repository", "token", "expected"),
    [
        ("bitbucket", "https://x", "a/b", TOKEN, "unknown forge provider"),
        ("github", "http://api.example.com", "a/b", TOKEN, "plain http to another host"),
        ("github", "https://u:p@api.example.com", "a/b", TOKEN, "must not carry a user"),
        ("github", "file:///etc", "a/b", TOKEN, "not an http"),
        ("github", "https://api.github.com", "a/../b", TOKEN, "is not OWNER/NAME"),
        ("github", "https://api.github.com", "a/b?x=1", TOKEN, "is not OWNER/NAME"),
        ("github", "https://api.github.com", "a/b", "", "token is empty"),
        ("github", "https://api.github.com", "a/b", "tok\nX-Evil: 1", "holds whitespace"),
        ("gitlab", "https://gitlab.com/api/v4", "../../users", TOKEN, "is not a project id"),
    ],
)
def test_bad_settings_are_refused_before_any_request(
    provider: str, api_url: str, repository: str, token: str, expected: str
) -> None:
    with pytest.raises(ForgeError, match=expected):
        open_forge(provider, api_url, repository, token)


def test_bad_arguments_are_refused() -> None:
    forge = open_forge("github", "https://api.github.com", "a/b", TOKEN)
    with pytest.raises(ForgeError, match="not a full commit SHA"):
        forge.set_commit_status(CommitStatus("HEAD/../x", "success", "ok"))
    with pytest.raises(ForgeError, match="not a pull request number"):
        forge.upsert_pr_comment(0, "plan", COMMENT_MARKER)
    with pytest.raises(ForgeError, match="marker"):
        forge.upsert_pr_comment(1, "plan", "plain text marker")
