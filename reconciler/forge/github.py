"""GitHub (github.com and GitHub Enterprise Server) through its REST API.

    POST  /repos/{owner}/{repo}/statuses/{sha}              {state, description, context,
                                                             target_url}
    GET   /repos/{owner}/{repo}/issues/{number}/comments    paginated (per_page, Link: rel="next")
    POST  /repos/{owner}/{repo}/issues/{number}/comments    {body}
    PATCH /repos/{owner}/{repo}/issues/comments/{id}        {body}

A pull request's conversation comments are its issue comments. A marked comment we may not
edit is skipped (``api.upsert_comment``).
"""

from __future__ import annotations

from reconciler.forge.api import (
    CommitStatus,
    check_number,
    check_sha,
    check_status_text,
    quote,
    upsert_comment,
    with_marker,
)
from reconciler.forge.http import JsonClient

DESCRIPTION_LIMIT = 140
COMMENT_LIMIT = 65536


class GitHubForge:
    def __init__(self, client: JsonClient, repository: str) -> None:
        owner, name = repository.split("/")
        self._client = client
        self._repo = f"/repos/{quote(owner)}/{quote(name)}"

    def set_commit_status(self, status: CommitStatus) -> None:
        description, context, target_url = check_status_text(status, DESCRIPTION_LIMIT)
        body: dict[str, str] = {
            "state": status.state,
            "description": description,
            "context": context,
        }
        if target_url is not None:
            body["target_url"] = target_url
        self._client.request("POST", f"{self._repo}/statuses/{check_sha(status.sha)}", body)

    def upsert_pr_comment(self, number: int, body: str, marker: str) -> str:
        return upsert_comment(
            self._client,
            f"{self._repo}/issues/{check_number(number)}/comments",
            {"per_page": "100"},
            text=with_marker(body, marker, COMMENT_LIMIT),
            marker=marker,
            edit=lambda id_: ("PATCH", f"{self._repo}/issues/comments/{id_}"),
        )
