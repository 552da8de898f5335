"""The bodies of notifications, one function per ``Fleet.spec.notifications[].format`` (pure).

    Notice ──render(format, notice, fleet)──▶ JSON text, stored in the outbox as it is sent

- ``generic``: one JSON object with the notice's fields, for anything that takes JSON.
- ``slack``: a Slack incoming-webhook message, ``{"text", "blocks"}`` (a section and a context
  block); ``text`` is the notification's fallback. Free text is escaped as Slack's mrkdwn
  requires (``&``, ``<``, ``>``), so a commit message cannot ping ``<!channel>`` or hide a link.
- ``teams``: a Microsoft Teams message carrying one Adaptive Card (version 1.4), the payload a
  Teams *Workflows* webhook ("When a Teams webhook request is received", the successor of the
  retired Office 365 connectors' MessageCard) posts to a channel.

Everything in a body comes from the daemon's events, masked by its redactor before it gets
here; nothing in it is a credential.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from reconciler.formatting import short_sha
from reconciler.notify.notices import Notice

FORMATS = ("generic", "slack", "teams")
_MAX_TEXT = 2900  # Slack: 3000 characters a section; Teams cards take more, kept alike


def render(fmt: str, notice: Notice, fleet: str) -> str:
    """The body for ``fmt``; ``ValueError`` for a format the schema does not allow."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise ValueError(f"unknown notification format {fmt!r}")
    return json.dumps(renderer(notice, fleet), sort_keys=True, ensure_ascii=False)


def _event(notice: Notice) -> str:
    return str(notice.event) if notice.event is not None else "revision-attempted"


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _when(notice: Notice) -> str:
    return datetime.fromtimestamp(notice.at, UTC).isoformat(timespec="seconds")


def generic(notice: Notice, fleet: str) -> dict[str, Any]:
    return {
        "event": _event(notice),
        "title": notice.title,
        "message": _cut(notice.message),
        "fleet": fleet,
        "revision": notice.revision,
        "vm": notice.vm,
        "host": notice.host,
        "at": _when(notice),
        "key": notice.key,
    }


def slack_escape(text: str) -> str:
    """Slack mrkdwn's three control characters, escaped as its documentation asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(notice: Notice, fleet: str) -> dict[str, Any]:
    title, message = slack_escape(notice.title), slack_escape(_cut(notice.message))
    context = [f"fleet *{slack_escape(fleet)}*", _event(notice)]
    if notice.revision:
        context.append(f"revision `{short_sha(notice.revision)}`")
    if notice.host:
        context.append(f"host `{slack_escape(notice.host)}`")
    section = f"*{title}*" + (f"\n{message}" if message else "")
    return {
        "text": f"{title}: {message}" if message else title,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": section}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]},
        ],
    }


def teams(notice: Notice, fleet: str) -> dict[str, Any]:
    facts = [{"title": "Fleet", "value": fleet}, {"title": "Event", "value": _event(notice)}]
    if notice.revision:
        facts.append({"title": "Revision", "value": short_sha(notice.revision)})
    if notice.vm:
        facts.append({"title": "VM", "value": notice.vm})
    if notice.host:
        facts.append({"title": "Host", "value": notice.host})
    facts.append({"title": "At", "value": _when(notice)})
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": notice.title,
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
        },
    ]
    if notice.message:
        body.append({"type": "TextBlock", "text": _cut(notice.message), "wrap": True})
    body.append({"type": "FactSet", "facts": facts})
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": body,
                },
            }
        ],
    }


_RENDERERS: dict[str, Callable[[Notice, str], dict[str, Any]]] = {
    "generic": generic,
    "slack": slack,
    "teams": teams,
}
