"""GitLab (gitlab.com and self-managed) through its REST API v4.

    POST /projects/{id}/statuses/{sha}                        {state, name, description,
                                                              target_url}
    GET  /projects/{id}/merge_requests/{iid}/notes            paginated (Link: rel="next")
    POST /projects/{id}/merge_requests/{iid}/notes            {body}
    PUT  /projects/{id}/merge_requests/{iid}/notes/{note_id}  {body}

``{id}`` is the numeric project id or the URL-encoded path (``group%2Fproject``). GitLab names
a failed status ``failed``. As on GitHub, a marked note we may not edit is skipped; system notes
(GitLab's own "added 1 commit") are never candidates.
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

DESCRIPTION_LIMIT = 255
COMMENT_LIMIT = 1_000_000
STATES = {"pending": "pending", "success": "success", "failure": "failed"}


class GitLabForge:
    def __init__(self, client: JsonClient, project: str) -> None:
        self._client = client
        self._project = f"/projects/{quote(project)}"

    def set_commit_status(self, status: CommitStatus) -> None:
        description, context, target_url = check_status_text(status, DESCRIPTION_LIMIT)
        body: dict[str, str] = {
            "state": STATES[status.state],
            "name": context,
            "description": description,
        }
        if target_url is not None:
            body["target_url"] = target_url
        self._client.request("POST", f"{self._project}/statuses/{check_sha(status.sha)}", body)

    def upsert_pr_comment(self, number: int, body: str, marker: str) -> str:
        notes = f"{self._project}/merge_requests/{check_number(number)}/notes"
        return upsert_comment(
            self._client,
            notes,
            {"per_page": "100", "sort": "asc", "order_by": "created_at"},
            text=with_marker(body, marker, COMMENT_LIMIT),
            marker=marker,
            edit=lambda id_: ("PUT", f"{notes}/{id_}"),
            candidate=lambda note: not note.get("system", False),
        )
