"""Verification of webhook deliveries from GitHub, GitLab and anything else that can sign.

    POST /webhook/<kind> ──http_api──▶ verify_delivery(kind, headers, body, secret)
                                          │ WebhookDelivery(trigger, reason)
                                          ▼
                         DaemonView.request_reconcile(reason)   (only when trigger)

Pure functions over the raw request: no I/O, no view, no server. A delivery only wakes the
daemon; what to deploy is still read from git, so a webhook can never choose a revision. The
payload is therefore only used to describe the delivery in logs and events.

- ``github``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`` and
  ``X-GitHub-Event`` (``push`` triggers, ``ping`` is accepted without triggering).
- ``gitlab``: ``X-Gitlab-Token`` equal to the secret, and ``X-Gitlab-Event``.
- ``generic``: ``X-Reconciler-Signature: sha256=<hex HMAC-SHA256 of the raw body>``; the body
  is empty or JSON (``{"reason": ...}`` is logged).

Bodies are parsed by ``parse_json`` only after the signature matched, and a malformed one (not
UTF-8, not JSON, nested too deep) is a 400 with one line, never an exception in the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 1 << 20
KINDS = ("github", "gitlab", "generic")
# Real deliveries nest a handful of levels; a signed body nested thousands deep is an attack on
# the parser (RecursionError) and on whatever walks the result, not a push.
MAX_JSON_DEPTH = 64

# GitHub events that move a branch or tag; everything else is acknowledged and ignored.
_GITHUB_TRIGGERS = frozenset({"push"})
_GITLAB_TRIGGERS = frozenset({"Push Hook", "Tag Push Hook"})
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


class MalformedBody(ValueError):
    """A request body that is not acceptable JSON; the message is one line for the client."""


def parse_json(body: bytes | str) -> Any:
    """JSON of a request body, or ``MalformedBody``: never a ``RecursionError`` or a traceback.

    Bodies are untrusted (a webhook is verified first, but the sender's system is not ours):
    invalid UTF-8, invalid JSON and nesting deeper than ``MAX_JSON_DEPTH`` are all refused with
    one line.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"the body is not UTF-8 (byte {exc.start})") from exc
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise MalformedBody(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:
        raise MalformedBody(f"the body is not JSON: {_first_line(exc)}") from exc
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise MalformedBody(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative (a recursive walk is what the limit protects against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[Any] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class WebhookRejected(Exception):
    """A delivery that must not be acted on; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class WebhookDelivery:
    """A verified delivery. ``reason`` is one line for logs and the trigger queue."""

    kind: str
    event: str
    trigger: bool
    reason: str


def verify_delivery(
    kind: str, headers: Mapping[str, str], body: bytes, secret: bytes
) -> WebhookDelivery:
    """Check a delivery's signature (or token) against ``secret`` and describe it.

    Raises ``WebhookRejected``: 413 for a body over 1 MiB, 401 for a missing or wrong signature,
    400 for a signed delivery that cannot be understood (no event header, a body that is not
    JSON or nests too deep: ``parse_json``). ``headers`` are looked up case-insensitively.
    """
    if kind not in KINDS:
        raise WebhookRejected(404, f"unknown webhook kind {kind!r}: use {', '.join(KINDS)}")
    if not secret:
        # An empty HMAC key would accept anyone who guesses it is empty.
        raise ValueError("a webhook secret must not be empty")
    if len(body) > MAX_BODY_BYTES:
        raise WebhookRejected(413, f"body of {len(body)} bytes is over the 1 MiB limit")
    lowered = {name.lower(): value for name, value in headers.items()}
    if kind == "github":
        return _github(lowered, body, secret)
    if kind == "gitlab":
        return _gitlab(lowered, body, secret)
    return _generic(lowered, body, secret)


def _check_hmac(header: str, value: str | None, body: bytes, secret: bytes) -> None:
    if not value:
        raise WebhookRejected(401, f"missing {header} header")
    scheme, _, given = value.strip().partition("=")
    if scheme != "sha256" or not given:
        raise WebhookRejected(401, f"{header} must be sha256=<hex HMAC-SHA256 of the body>")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    # Both sides are ASCII-encoded so compare_digest stays constant-time on bytes; a non-ASCII
    # header simply fails to match.
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace")):
        raise WebhookRejected(401, f"{header} does not match the body: wrong secret?")


def _payload(body: bytes, *, form_field: str | None = None) -> dict[str, Any]:
    """The JSON object of a delivery (GitHub may also send it form-encoded as ``payload=``)."""
    text = body.decode("utf-8", "replace")
    if form_field and text.startswith(form_field + "="):
        text = urllib.parse.parse_qs(text).get(form_field, [""])[0]
    try:
        payload = parse_json(text) if text.strip() else {}
    except MalformedBody as exc:
        raise WebhookRejected(400, str(exc)) from exc
    if not isinstance(payload, dict):
        raise WebhookRejected(400, "the body is not a JSON object")
    return payload


def _clean(value: object, limit: int = 200) -> str:
    """One printable line: payload text ends up in log lines and events."""
    text = _UNPRINTABLE.sub(" ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _push_reason(source: str, payload: Mapping[str, Any], sha_key: str) -> str:
    ref = payload.get("ref")
    sha = payload.get(sha_key) or payload.get("after")
    reason = f"{source} push"
    if isinstance(ref, str) and ref:
        reason += f" to {_clean(ref, 120)}"
    if isinstance(sha, str) and sha:
        reason += f" ({_clean(sha, 40)[:7]})"
    return reason


def _github(headers: Mapping[str, str], body: bytes, secret: bytes) -> WebhookDelivery:
    _check_hmac("X-Hub-Signature-256", headers.get("x-hub-signature-256"), body, secret)
    event = headers.get("x-github-event", "").strip()
    if not event:
        raise WebhookRejected(400, "missing X-GitHub-Event header")
    payload = _payload(body, form_field="payload")
    if event == "ping":
        hook = payload.get("hook_id")
        return WebhookDelivery(
            "github", event, False, "github ping" + (f" (hook {_clean(hook, 40)})" if hook else "")
        )
    if event in _GITHUB_TRIGGERS:
        return WebhookDelivery("github", event, True, _push_reason("github", payload, "after"))
    return WebhookDelivery("github", event, False, f"github {_clean(event, 60)} event ignored")


def _gitlab(headers: Mapping[str, str], body: bytes, secret: bytes) -> WebhookDelivery:
    token = headers.get("x-gitlab-token")
    if not token:
        raise WebhookRejected(401, "missing X-Gitlab-Token header")
    if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), secret):
        raise WebhookRejected(401, "X-Gitlab-Token does not match the webhook secret")
    event = headers.get("x-gitlab-event", "").strip()
    if not event:
        raise WebhookRejected(400, "missing X-Gitlab-Event header")
    payload = _payload(body)
    if event in _GITLAB_TRIGGERS:
        return WebhookDelivery(
            "gitlab", event, True, _push_reason("gitlab", payload, "checkout_sha")
        )
    return WebhookDelivery("gitlab", event, False, f"gitlab {_clean(event, 60)} ignored")


def _generic(headers: Mapping[str, str], body: bytes, secret: bytes) -> WebhookDelivery:
    _check_hmac("X-Reconciler-Signature", headers.get("x-reconciler-signature"), body, secret)
    reason = "generic webhook"
    # Any signed JSON body (or an empty one) triggers; an object may say why, for the logs.
    try:
        payload = parse_json(body) if body.strip() else None
    except MalformedBody as exc:
        raise WebhookRejected(400, str(exc)) from exc
    if isinstance(payload, dict) and payload.get("reason"):
        reason += f": {_clean(payload['reason'])}"
    return WebhookDelivery("generic", "generic", True, reason)
