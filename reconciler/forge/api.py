"""The forge API every caller sees (``CommitStatus``, the ``Forge`` Protocol) and the checks and
the comment upsert that both providers share; ``connect.open_forge`` makes a ``Forge``.

The repository name, the API base URL and the token come from the operator (CI variables, the
daemon's settings); the comment body and a status description come from a fleet revision, which
is untrusted: they travel only as JSON string values, are cut to the provider's limits, and the
names that reach a URL path are checked and percent-encoded here.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from reconciler.forge.http import ForgeError, JsonClient

COMMENT_MARKER = "<!-- reconciler-plan -->"
"""The hidden first line of the plan comment: how a later run finds the comment to update."""

_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_MARKER = re.compile(r"^<!-- [A-Za-z0-9_.:/-]{1,100} -->$")


@dataclass(frozen=True)
class CommitStatus:
    sha: str
    state: Literal["pending", "success", "failure"]
    description: str
    """Cut to the provider's limit (GitHub: 140 characters)."""
    context: str = "reconciler"
    target_url: str | None = None


class Forge(Protocol):
    """A repository on a forge, as reconciler writes to it."""

    def set_commit_status(self, status: CommitStatus) -> None:
        """Set ``status.context``'s status of commit ``status.sha``."""
        ...

    def upsert_pr_comment(self, number: int, body: str, marker: str) -> str:
        """Post ``body`` on pull (merge) request ``number``, or update in place the comment
        that already carries ``marker``: one comment per request. Returns ``"created"`` or
        ``"updated"``."""
        ...


def check_sha(sha: str) -> str:
    if not _SHA.match(sha):
        raise ForgeError(f"{sha!r} is not a full commit SHA")
    return sha


def check_number(number: int) -> int:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 2**31:
        raise ForgeError(f"{number!r} is not a pull request number")
    return number


def with_marker(body: str, marker: str, limit: int) -> str:
    """``body`` starting with ``marker`` (its own line), cut to ``limit`` characters with a
    note when longer: a comment over the provider's limit would be refused."""
    if not _MARKER.match(marker):
        raise ForgeError(
            f"the comment marker {marker!r} is not an HTML comment like {COMMENT_MARKER}"
        )
    body = body.replace(marker, "")  # the marker is ours alone: never twice, never elsewhere
    text = f"{marker}\n{body}"
    if len(text) > limit:
        note = "\n\n_(truncated: the plan is longer than a comment may be)_\n"
        text = text[: limit - len(note)] + note
    return text


def quote(segment: str) -> str:
    """One URL path segment, every reserved character (``/`` included) percent-encoded."""
    return urllib.parse.quote(segment, safe="")


def check_status_text(status: CommitStatus, limit: int) -> tuple[str, str, str | None]:
    """``(description, context, target_url)`` of a status as a provider may take them: the
    description on one line and cut to ``limit``, a short context, an http(s) target URL."""
    if status.state not in ("pending", "success", "failure"):
        raise ForgeError(f"commit status state {status.state!r} is not pending, success or failure")
    description = " ".join(status.description.split())
    if len(description) > limit:
        description = description[: limit - 1] + "…"
    context = " ".join(status.context.split())
    if not context or len(context) > 100:
        raise ForgeError(f"commit status context {status.context!r} must be 1 to 100 characters")
    url = status.target_url
    if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ForgeError(f"commit status target URL {url!r} is not an http(s) URL")
    return description, context, url


_NOT_OURS = (403, 404)


def upsert_comment(
    client: JsonClient,
    listing: str,
    query: Mapping[str, str],
    *,
    text: str,
    marker: str,
    edit: Callable[[int], tuple[str, str]],
    candidate: Callable[[dict[str, object]], bool] = lambda _: True,
) -> str:
    """Edit the first comment of ``listing`` that starts with ``marker`` (``edit(id)`` gives
    the method and path), else post ``text`` there. Anyone who may comment can write a comment
    holding the marker: one we may not edit (403/404) is skipped, so nobody can keep the plan
    from appearing."""
    for comment in client.pages(listing, query):
        if not (
            isinstance(comment, dict)
            and isinstance(comment.get("body"), str)
            and comment["body"].startswith(marker)
            and isinstance(comment.get("id"), int)
            and candidate(comment)
        ):
            continue
        method, path = edit(comment["id"])
        try:
            client.request(method, path, {"body": text})
        except ForgeError as err:
            if err.status in _NOT_OURS:
                continue
            raise
        return "updated"
    client.request("POST", listing, {"body": text})
    return "created"
