"""The one HTTP client of the forge package: JSON over urllib, nothing else.

Why not follow redirects as urllib does: a redirect keeps the request's headers, the token
among them, so an API (or anything between) answering ``302 Location: https://elsewhere/``
would hand the token to another host. Redirects are followed only to the same scheme, host and
port, a few times at most. Every request has a timeout. Error messages name the method, the
path and the provider's own one-line message, never a header, and go through
``reconciler.redact`` with the token itself removed, should a server ever echo it.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from email.message import Message
from http.client import HTTPMessage
from typing import IO, Any

from reconciler.errors import ReconcilerError
from reconciler.redact import REDACTED, redact_text

MAX_RESPONSE = 8 * 1024 * 1024  # a page of comments is far smaller; anything bigger is refused
MAX_REDIRECTS = 3
MAX_PAGES = 100  # 100 comments a page: 10,000 comments before giving up
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class ForgeError(ReconcilerError):
    """A forge (GitHub, GitLab) refused a request, could not be reached, or was misconfigured.
    ``status`` is the HTTP status of a refusal (None when no answer came)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the request's own scheme, host and port."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(  # noqa: PLR0917 (urllib's signature, overridden)
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"redirected to another host ({new.scheme}://{new.hostname}); not followed, "
                "the request carries the token",
                headers,
                fp,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JsonClient:
    """Requests under one API base URL, with the provider's token headers on each."""

    def __init__(
        self,
        base: str,
        headers: Mapping[str, str],
        provider: str,
        *,
        secret: str,
        timeout: float = 30.0,
    ) -> None:
        self.base = base
        self.provider = provider
        self.timeout = timeout
        self._headers = dict(headers)
        self._secret = secret
        self._opener = urllib.request.build_opener(_SameOriginRedirects())
        self._origin = urllib.parse.urlsplit(base)[:2]

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Any:
        """The JSON the API answers ``method path``; a status other than 2xx is a
        ``ForgeError``."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return self._send(method, url, body, shown=path)[0]

    def pages(self, path: str, query: Mapping[str, str]) -> Iterator[Any]:
        """Each element of a paginated list, following ``Link: <...>; rel="next"`` (GitHub and
        GitLab both send it) as long as it stays under the API base."""
        url: str | None = self.base + path + "?" + urllib.parse.urlencode(query)
        for _ in range(MAX_PAGES):
            if url is None:
                return
            items, headers = self._send("GET", url, None, shown=path)
            if not isinstance(items, list):
                raise ForgeError(f"{self.provider}: GET {path}: the answer is not a list")
            yield from items
            url = self._next_page(headers.get("Link", ""), path)
        raise ForgeError(f"{self.provider}: GET {path}: more than {MAX_PAGES} pages")

    def _next_page(self, link: str, path: str) -> str | None:
        found = _LINK_NEXT.search(link)
        if found is None:
            return None
        url = found.group(1)
        parts = urllib.parse.urlsplit(url)
        if parts[:2] != self._origin or not parts.path.startswith(
            urllib.parse.urlsplit(self.base).path
        ):
            raise ForgeError(
                f"{self.provider}: GET {path}: the next page is on another host; not followed"
            )
        return url

    def _send(
        self, method: str, url: str, body: Mapping[str, Any] | None, *, shown: str
    ) -> tuple[Any, Message]:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        headers["User-Agent"] = "reconciler"
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        where = f"{self.provider}: {method} {shown}"
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE + 1)
                response_headers: Message = response.headers
        except urllib.error.HTTPError as exc:
            raise ForgeError(
                self._clean(f"{where}: HTTP {exc.code} {_message_of(exc)}"), status=exc.code
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ForgeError(
                self._clean(f"{where}: cannot reach {self.base}: {reason}; check the API URL")
            ) from None
        if len(raw) > MAX_RESPONSE:
            raise ForgeError(f"{where}: the answer is larger than {MAX_RESPONSE} bytes")
        if not raw.strip():
            return None, response_headers
        try:
            return json.loads(raw), response_headers
        except ValueError:
            raise ForgeError(f"{where}: the answer is not JSON") from None

    def _clean(self, text: str) -> str:
        text = redact_text(" ".join(text.split()))
        if self._secret:
            text = text.replace(self._secret, REDACTED)
        return text[:400]


def _message_of(exc: urllib.error.HTTPError) -> str:
    """The provider's own message (``{"message": ...}`` on both forges), else the reason."""
    try:
        raw = exc.read(64 * 1024)
        data = json.loads(raw) if raw else None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict):
        message = data.get("message") or data.get("error")
        if isinstance(message, (str, list, dict)):
            return message if isinstance(message, str) else json.dumps(message)
    return str(exc.reason)
