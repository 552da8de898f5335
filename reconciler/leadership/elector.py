"""The elector: turns a ``Lease`` into leadership, with a ``Fence`` for each term.

    Elector.step() ── follower: Lease.try_acquire ── won ──▶ on_elected(Fence)
                   └─ leader:   Lease.renew ──────── ok ───▶ Fence.renewed
                                               lost/late ──▶ Fence.revoke, on_lost(why)

``step`` does one round and returns how long to wait before the next; ``run`` loops it on a
thread. Time comes from an injected monotonic clock, so tests drive elections in virtual time.
A backend error (the database went away) is a failed renewal, not a crash: the leader keeps its
term until the renew deadline passes, then steps down, which is before the lease expires for the
others (``renew_deadline < duration``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from reconciler.errors import LeadershipError
from reconciler.leadership.fence import Fence
from reconciler.leadership.protocol import Lease, LeaseHolder

log = logging.getLogger("reconciler.leadership")


class Elector:
    def __init__(
        self,
        lease: Lease,
        *,
        on_elected: Callable[[Fence], None],
        on_lost: Callable[[Fence, str], None],
        on_refused: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.settings = lease.settings.validated()
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._on_refused = on_refused
        self._monotonic = monotonic
        self.fence: Fence | None = None
        self.holder: LeaseHolder | None = None  # as of the last round, for status pages
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()

    @property
    def is_leader(self) -> bool:
        fence = self.fence
        return fence is not None and fence.valid

    def step(self) -> float:
        """One round of the election; returns the seconds to wait before the next round
        (0 for a follower, which waits inside ``Lease.wait_for_change`` instead)."""
        with self._lock:
            delay = self._try_to_lead() if self.fence is None else self._renew(self.fence)
            fence = self.fence
            if fence is not None:
                self.holder = LeaseHolder(self.lease.holder, fence.term)
            else:
                try:
                    self.holder = self.lease.current()
                except LeadershipError as err:
                    self._note_error(str(err))
            return delay

    def _try_to_lead(self) -> float:
        started = self._monotonic()
        try:
            term = self.lease.try_acquire()
        except LeadershipError as err:
            self._note_error(str(err))
            return self.settings.retry
        self.last_error = None
        if term is None:
            return 0.0
        fence = Fence(
            term,
            renew_deadline=self.settings.renew_deadline,
            monotonic=self._monotonic,
            on_refused=self._on_refused,
        )
        fence.renewed(started)
        self.fence = fence
        log.info("elected leader with term %d as %s", term, self.lease.holder)
        self._on_elected(fence)
        return self.settings.retry

    def _renew(self, fence: Fence) -> float:
        started = self._monotonic()
        try:
            renewed = self.lease.renew(fence.term)
        except LeadershipError as err:
            self._note_error(str(err))
            if self._monotonic() >= fence.valid_until:
                self._step_down(
                    fence, f"the lease was not renewed within {fence.renew_deadline:g} s: {err}"
                )
            return self.settings.retry
        if not renewed:
            holder = self._holder_description()
            self._step_down(fence, f"the lease of term {fence.term} was lost{holder}")
            return 0.0
        if self._monotonic() >= fence.valid_until:
            # Renewed, but too late: writes may already have been refused for this term, and a
            # clean new term is simpler to reason about than a resurrected one.
            self._step_down(fence, f"the renewal took longer than {fence.renew_deadline:g} s")
            return self.settings.retry
        self.last_error = None
        fence.renewed(started)
        return self.settings.retry

    def _holder_description(self) -> str:
        try:
            current = self.lease.current()
        except LeadershipError:
            return ""
        return f" to {current.holder} (term {current.term})" if current else ""

    def _step_down(self, fence: Fence, why: str, *, graceful: bool = False) -> None:
        log.log(logging.INFO if graceful else logging.WARNING, "stepping down: %s", why)
        fence.revoke(why)
        self.fence = None
        try:
            self.lease.release(fence.term)
        except LeadershipError as err:
            log.debug("releasing a lost lease: %s", err)
        self._on_lost(fence, why)

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message

    def run(self) -> None:
        """Elect and renew until :meth:`stop`; meant for a daemon thread."""
        while not self._stop.is_set():
            delay = self.step()
            if self._stop.is_set():
                break
            if delay <= 0:
                self.lease.wait_for_change(self.settings.retry)
            else:
                self._wake.wait(delay)
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def resign(self, why: str = "shutting down") -> None:
        """Give up leadership now (graceful shutdown), so a follower takes over at once."""
        with self._lock:
            fence = self.fence
            if fence is not None:
                self._step_down(fence, why, graceful=True)
