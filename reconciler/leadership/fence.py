"""Fencing: the term a leader acts under, checked before every state write and runtime action.

    Elector ──elected(term)──▶ Fence ◀──check()── StateStore writes, Executor (runtime calls)
            ──renewed(at)────▶       └─revoke()── lease lost / shutdown

A leader that was paused (SIGSTOP, a long GC, a stuck disk) may wake up after another replica
took over. Its lease thread will notice on its next renewal, but by then its reconcile thread may
already be writing. So each write asks the fence, which refuses when the lease was not renewed
within the renew deadline (a local, monotonic check) and the state store additionally refuses a
term older than the newest one it has seen (the fencing token).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from reconciler.errors import StaleTermError


class Fence:
    """The term of one leadership, valid until ``renewed_at + renew_deadline``."""

    def __init__(
        self,
        term: int,
        *,
        renew_deadline: float,
        monotonic: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.term = term
        self.renew_deadline = renew_deadline
        self._monotonic = monotonic
        self._on_refused = on_refused
        self._valid_until = monotonic() + renew_deadline
        self._revoked: str | None = None
        self._lock = threading.Lock()
        self.refused = 0

    def renewed(self, attempt_started: float) -> None:
        """The lease was renewed by a request sent at ``attempt_started`` (monotonic): the
        deadline counts from when the request left, never from when the answer came back."""
        with self._lock:
            if self._revoked is None:
                self._valid_until = max(self._valid_until, attempt_started + self.renew_deadline)

    def revoke(self, why: str) -> None:
        with self._lock:
            if self._revoked is None:
                self._revoked = why

    @property
    def valid(self) -> bool:
        with self._lock:
            return self._revoked is None and self._monotonic() < self._valid_until

    @property
    def valid_until(self) -> float:
        return self._valid_until

    def check(self, what: str) -> None:
        """Raise ``StaleTermError`` (and count it) unless this term may still act."""
        with self._lock:
            revoked = self._revoked
            expired = self._monotonic() >= self._valid_until
        if revoked is not None:
            self.refuse(what, f"leadership of term {self.term} ended: {revoked}")
        if expired:
            self.refuse(
                what,
                f"the lease of term {self.term} was not renewed within {self.renew_deadline:g} s",
            )

    def refuse(self, what: str, why: str) -> None:
        with self._lock:
            self.refused += 1
        if self._on_refused is not None:
            self._on_refused(what)
        raise StaleTermError(f"refused {what}: {why}; this replica stops acting")
