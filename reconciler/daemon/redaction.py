"""What the daemon shows is scrubbed of credentials and secret values first (pure).

    Daemon ──remember(values)──▶ Redactor ◀──scrub── http_api (every answer), logs (every line),
                                                      loop (every event before it is stored)

The daemon's view is read without authentication (``/api/status``, ``/api/events``, the page,
``/readyz``), and its logs and events end up in journals and tickets. Two kinds of secret reach
those places through free text (error messages quoting a git remote or a command line) as much
as through fields:

- URL userinfo (``https://user:token@host/...``): always replaced, by ``reconciler.redact``;
  libpq ``password=...`` pairs of a lease DSN likewise;
- values the daemon knows to be secret (every workload's ``env`` values, the API token, the
  webhook secret): ``remember()``-ed by the daemon and masked wherever they occur.

``scrub_json`` also masks by shape: the values under an ``env`` mapping, the ``deploy.env.*``
settings and any key that names a secret (``token``, ``password``, ``secret``), so a field added
to the status later cannot leak what these keys hold.

Values shorter than ``MIN_SECRET_LENGTH`` are never masked inside text, and env values only
from ``ENV_MIN_LENGTH`` characters unless their name says secret (``env_values``): masking ``1``,
``8080`` or ``info`` would garble numbers, addresses and words everywhere while hiding nothing
(such a value is guessed faster than read).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.redact import REDACTED, redact_text

MIN_SECRET_LENGTH = 4
ENV_MIN_LENGTH = 8
_SECRET_ENV_NAME = re.compile(r"(?i)(token|password|passwd|secret|credential|key|auth)")
# libpq keyword/value DSNs (``host=db password=hunter2``) carry the password outside a URL.
_DSN_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_SECRET_KEY = re.compile(r"(?i)(token|password|passwd|secret|credential)")
_ENV_SETTING = "deploy.env."


class Redactor:
    """Scrubs text and JSON-ready data; ``remember()`` adds secret values (thread-safe: the
    worker adds while HTTP threads scrub)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.remember(values)

    def remember(self, values: Iterable[str]) -> None:
        """Mask these values from now on (values too short to mask are ignored)."""
        fresh = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
        with self._lock:
            if fresh <= self._values:
                return
            self._values = self._values | fresh
            # Longest first, so a value that contains another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def text(self, text: str) -> str:
        """``text`` with URL userinfo, DSN passwords and every remembered value masked."""
        text = redact_text(text)
        text = _DSN_PASSWORD.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None else text

    def json(self, value: Any) -> Any:
        """A copy of JSON-ready data with every string scrubbed and secret-shaped keys masked."""
        return self._json(value, None)

    def _json(self, value: Any, key: str | None) -> Any:
        if key is not None and _secret_key(key):
            return _masked(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                self.text(str(k)): self._json(v, str(k)) if str(k) != "env" else _masked_mapping(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._json(item, None) for item in value]
        return value


def env_values(settings: Mapping[str, str]) -> list[str]:
    """The env values of a VM's flat settings (``deploy.env.KEY`` -> canonical JSON) worth
    masking in free text, for ``Redactor.remember``: every value of ``ENV_MIN_LENGTH``
    characters or more, and shorter ones (down to ``MIN_SECRET_LENGTH``) under a key that names
    a secret (``API_KEY``, ``DB_PASSWORD``). Masking ``8080`` or ``debug`` everywhere would
    garble addresses, revisions and prose while hiding nothing worth hiding."""
    values: list[str] = []
    for key, raw in settings.items():
        if not key.startswith(_ENV_SETTING):
            continue
        try:
            value = json.loads(raw)
        except (ValueError, TypeError, RecursionError):
            value = raw
        text = value if isinstance(value, str) else str(raw)
        named_secret = _SECRET_ENV_NAME.search(key[len(_ENV_SETTING) :]) is not None
        if len(text) >= ENV_MIN_LENGTH or (named_secret and len(text) >= MIN_SECRET_LENGTH):
            values.append(text)
    return values


def _secret_key(key: str) -> bool:
    return key.startswith(_ENV_SETTING) or _SECRET_KEY.search(key) is not None


def _masked(value: Any) -> Any:
    # Keep the shape a client expects (null stays null, a boolean flag stays a flag).
    if value is None or isinstance(value, bool):
        return value
    return REDACTED


def _masked_mapping(value: Any) -> Any:
    """An ``env`` mapping keeps its keys (which variables are set) and loses its values."""
    if isinstance(value, Mapping):
        return {str(k): _masked(v) for k, v in value.items()}
    return _masked(value)
