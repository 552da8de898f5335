"""The ``Lease`` Protocol: leader election between daemon replicas, and its settings.

    daemon ──▶ Elector (reconciler.leadership.elector) ──▶ Lease backend (file | postgresql)
                        │ elected with a term
                        ▼
                     Fence ──▶ every state write and runtime action checks it

A lease is held by one *holder* (an identity string such as ``host-4242``) for a *term*: an
integer that only grows and increments on every takeover. The backend takes the lease and the
new term in one atomic step, so two holders can never share a term. The elector renews the lease
every ``retry`` seconds; a leader that has not renewed within ``renew_deadline`` stops every side
effect, and since ``renew_deadline < duration`` it does so before anybody else can take over.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from reconciler.errors import ConfigError


@dataclass(frozen=True)
class LeaseSettings:
    """Timing of a lease, in seconds; :meth:`validated` enforces ``duration > renew > retry``."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0

    def validated(self) -> LeaseSettings:
        if not (self.duration > self.renew_deadline > self.retry > 0):
            raise ConfigError(
                f"lease timing must satisfy lease ({self.duration:g} s) > renew deadline "
                f"({self.renew_deadline:g} s) > retry ({self.retry:g} s) > 0; "
                "fix --lease-duration, --renew-deadline or --retry-period"
            )
        return self


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease now, as far as the backend knows."""

    holder: str
    term: int
    expires_in: float | None = None  # seconds left; None when the backend has no expiry (flock)


class Lease(Protocol):
    """One named lease in one backend. Methods never block longer than their timeouts.

    Errors talking to the backend (a database that went away) raise ``LeadershipError``; the
    elector treats them as a failed renewal, never as a crash.
    """

    holder: str
    settings: LeaseSettings

    def try_acquire(self) -> int | None:
        """Take the lease when it is free or expired; the new term, or ``None`` when it is held."""
        ...

    def renew(self, term: int) -> bool:
        """Extend the lease held for ``term``; ``False`` when it was lost to another holder."""
        ...

    def release(self, term: int) -> None:
        """Give the lease up at once (graceful shutdown) so a follower takes over without
        waiting for expiry; a lease already lost is not an error."""
        ...

    def current(self) -> LeaseHolder | None:
        """The present holder and term, or ``None`` when nobody holds the lease."""
        ...

    def wait_for_change(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when the lease may have become free
        (a NOTIFY from a releasing leader, an flock that was let go)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Closes it: a lease is used as ``with open_...(...) as lease:``."""
        ...
