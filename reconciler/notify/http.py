"""One POST of a JSON body to a webhook URL: no redirects, a timeout, errors without the URL.

A redirect is an error rather than followed: the endpoint was chosen by the configuration in
force, and wherever a ``Location`` points was not. The request carries no credential of the
daemon (the URL itself is the only secret), and no error, log line or event quotes the URL:
failures name the endpoint and say what went wrong (an HTTP status, a refused connection).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from reconciler.errors import ReconcilerError
from reconciler.http_client import NoRedirect

MAX_ANSWER = 64 * 1024  # what is read of an answer: webhooks answer "ok"


class DeliveryError(ReconcilerError):
    """An endpoint did not take a notification; the message never holds its URL."""


_OPENER = urllib.request.build_opener(NoRedirect())


def scrub(text: str, url: str) -> str:
    """``text`` without ``url`` or the parts of it that are secret (its path, query, userinfo)."""
    parts = urllib.parse.urlsplit(url)
    for secret in (url, parts.netloc + parts.path, parts.path, parts.query, parts.netloc):
        if len(secret) > 1:
            text = text.replace(secret, "…")
    return text


def post_json(url: str, body: str, *, timeout: float, key: str) -> None:
    """POST ``body`` (JSON text) to ``url``; ``DeliveryError`` unless the answer is 2xx.
    ``key`` goes in ``X-Reconciler-Delivery``: a receiver can drop a duplicate by it."""
    request = urllib.request.Request(
        url,
        data=body.encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "reconciler",
            "X-Reconciler-Delivery": key,
        },
    )
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        exc.close()
        what = "a redirect (not followed)" if 300 <= exc.code < 400 else f"HTTP {exc.code}"
        raise DeliveryError(f"answered {what}") from None
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise DeliveryError(f"no answer within {timeout:g} s") from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise DeliveryError(scrub(f"unreachable: {text}", url)) from None
    except (OSError, ValueError) as exc:
        raise DeliveryError(scrub(f"failed: {exc}", url)) from None
