"""Credentials out of everything a person or a log can see (pure).

A fleet repository is often reached as ``https://user:token@host/org/fleet.git``. That URL
travels far: the daemon's settings, ``/api/status``, the status page, log lines, events, git's
own error messages (which quote the remote). Every one of those places shows the URL through
:func:`redact_url` or scrubs free text through :func:`redact_text`, so the userinfo part of a
URL (``user:token@``) becomes ``***@`` wherever it would have appeared. The credential itself is
only ever handed to git (see ``reconciler.source``), never printed, stored or logged.

The functions are pure and total: anything that is not a URL with userinfo comes back as it was.
"""

from __future__ import annotations

import re

REDACTED = "***"

# scheme://userinfo@rest, with userinfo up to the first "@" before any "/", "?" or "#": RFC 3986
# section 3.2. Any scheme, since git accepts https, http, ssh, git+ssh and ftp alike.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")


def redact_url(url: str) -> str:
    """``https://user:token@host/x`` -> ``https://***@host/x``; other strings unchanged."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Every URL userinfo in free text (an error message, a log line) replaced by ``***``."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries userinfo (a user name, a password or a token)."""
    return _URL_USERINFO.search(url) is not None
