"""The redirect policy of the requests reconciler sends: a redirect is not followed.

    cli (reconcile --now, logs, rollback: the API token) ──┐
    notify (webhooks: the URL is the secret) ──────────────┴─▶ urllib opener with NoRedirect

Following a redirect would send the request, and what it carries (a bearer token, the
fleet's events), to wherever the answer points: another host, another port, a plain-HTTP
downgrade. The forge client (``reconciler.forge.http``) follows redirects within the API's
own origin only, which its providers need; it has its own handler.
"""

from __future__ import annotations

import urllib.request
from email.message import Message
from typing import IO


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into an error: urllib then raises the 3xx as an ``HTTPError``,
    which the caller reports (naming the ``Location`` only after redacting it)."""

    def redirect_request(  # noqa: PLR0917 (the standard library's signature)
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None
