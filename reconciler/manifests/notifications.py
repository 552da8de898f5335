"""``Fleet.spec.notifications`` compiled into ``NotificationSpec``s, while the revision loads.

Where it sits: ``loader.load_fleet`` calls ``compile_notifications`` once the fleet's secrets
(``manifests.secrets.FleetSecrets``) are known, and stores the result in ``FleetSettings``; the
daemon's notifier (``reconciler.notify``) reads it from the revision in force.

A URL is a secret and never a plain manifest value: it is a reference to one of the fleet's
secrets (resolved like ``deploy.secretEnv``, so only its keyed digest is kept with the settings)
or the suffix of a ``RECONCILER_NOTIFY_*`` variable of the daemon, which the schema holds to
``[A-Z0-9_]``, so no other variable of the daemon (its git credential, its API token) can ever
be named. A secret's value must be an http(s) URL: checked here, without ever quoting it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from reconciler.manifests.compile import Document, Report
from reconciler.manifests.secrets import FleetSecrets
from reconciler.model import NotificationEvent, NotificationSpec, SecretRef
from reconciler.secrets import DIGEST_PREFIX

ALLOWED_SCHEMES = ("http://", "https://")


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive notifications, in words that never quote it; ``None`` if it
    can."""
    if not url.lower().startswith(ALLOWED_SCHEMES):
        return "is not an http:// or https:// URL"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return "holds whitespace or control characters"
    return None


def compile_notifications(
    document: Document | None, secrets: FleetSecrets, report: Report
) -> tuple[NotificationSpec, ...]:
    """The endpoints the Fleet declares, each URL a secret reference or a variable's suffix;
    what is wrong is reported at its path."""
    if document is None:
        return ()
    wanted = (document.content.get("spec") or {}).get("notifications") or []
    found: list[NotificationSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(wanted):
        at: Sequence[Hashable] = ("spec", "notifications", index)
        name = entry["name"]
        if name in seen:
            report(document, (*at, "name"), f"notification {name!r} is declared twice")
            continue
        seen.add(name)
        url = entry["url"]
        if ("secret" in url) == ("env" in url):
            report(document, (*at, "url"), "name exactly one of url.secret or url.env")
            continue
        if "key" in url and "secret" not in url:
            report(document, (*at, "url", "key"), "url.key goes with url.secret")
            continue
        ref: SecretRef | None = None
        if "secret" in url:
            resolved = secrets.ref(url["secret"], url.get("key", ""))
            if isinstance(resolved, str):
                report(document, (*at, "url", "secret"), resolved)
                continue
            value = secrets.sensitive.get(resolved.digest)
            problem = url_problem(value) if value is not None else None
            if problem is not None and resolved.digest.startswith(DIGEST_PREFIX):
                report(document, (*at, "url", "secret"), f"the secret's value {problem}")
                continue
            ref = resolved
        found.append(
            NotificationSpec(
                name=name,
                format=entry["format"],
                events=tuple(NotificationEvent(e) for e in entry["events"]),
                url_secret=ref,
                url_env=url.get("env"),
            )
        )
    return tuple(found)
