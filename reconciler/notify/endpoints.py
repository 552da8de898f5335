"""Where each endpoint's notifications go: its URL, resolved only when a message is sent.

A URL is a secret (a Slack webhook URL lets whoever holds it post to the channel), so it is
never stored with a message: the outbox names the endpoint, and ``Endpoints`` resolves the name
with the configuration in force (the last applied revision's ``Fleet.spec.notifications``):
a value of the fleet's secrets, decrypted in memory, or the daemon's variable
``RECONCILER_NOTIFY_<suffix>``. Only variables with that prefix are ever given to this module
(``cli.environment`` collects them), so no name a commit writes can reach another variable of
the daemon: its git credential, its API token or its database URL.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.manifests.notifications import url_problem
from reconciler.model import DesiredFleet

NOTIFY_ENV_PREFIX = "RECONCILER_NOTIFY_"


@dataclass(frozen=True)
class Endpoint:
    name: str
    format: str
    url: str | None  # None: ``problem`` says why there is none
    problem: str = ""

    def __repr__(self) -> str:  # never the URL
        return f"Endpoint({self.name!r}, {self.format!r})"


def resolve_endpoints(desired: DesiredFleet, environ: Mapping[str, str]) -> dict[str, Endpoint]:
    """Each endpoint of ``desired`` with its URL, or the reason it has none (never quoting the
    value). ``environ`` holds the ``RECONCILER_NOTIFY_*`` variables by suffix, nothing else."""
    found: dict[str, Endpoint] = {}
    for spec in desired.fleet.notifications:
        url: str | None = None
        if spec.url_secret is not None:
            url = desired.sensitive.get(spec.url_secret.digest)
            where = f"secret {spec.url_secret.secret!r}"
        elif spec.url_env is not None:
            url = environ.get(spec.url_env) or None
            where = f"${NOTIFY_ENV_PREFIX}{spec.url_env}"
        else:  # the manifests allow no other
            where = "its manifest"
        if url is None:
            found[spec.name] = Endpoint(spec.name, spec.format, None, f"{where} is not set")
            continue
        problem = url_problem(url)
        if problem is not None:
            found[spec.name] = Endpoint(spec.name, spec.format, None, f"{where} {problem}")
            continue
        found[spec.name] = Endpoint(spec.name, spec.format, url)
    return found


class Endpoints:
    """The endpoints in force, shared between the worker (which sets them after each cycle)
    and the sender thread (which reads them)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = dict(environ)
        self._lock = threading.Lock()
        self._endpoints: dict[str, Endpoint] | None = None  # None: not known yet

    def __repr__(self) -> str:
        return f"Endpoints({sorted(self._endpoints or {})})"

    def configure(self, desired: DesiredFleet) -> None:
        resolved = resolve_endpoints(desired, self._environ)
        with self._lock:
            self._endpoints = resolved

    @property
    def known(self) -> bool:
        """Whether a configuration was ever set: until then (a daemon that just started has
        loaded no revision yet) messages wait, their attempts uncounted."""
        with self._lock:
            return self._endpoints is not None

    def get(self, name: str) -> Endpoint | None:
        with self._lock:
            return (self._endpoints or {}).get(name)
