"""When a revision that failed is tried again: pure, time passed in by the caller.

    transient failure of head H ──▶ Backoff.failed(H, now) ──▶ retry_at(H): 5 s doubling to 300 s
    terminal failure of head H ───▶ Backoff.park(H, now) ────▶ H is not tried again at all
    a newer head ─────────────────▶ no waiting: a new revision is tried at once
    head H succeeds ──────────────▶ Backoff.succeeded() forgets the failures

A terminal failure (``ReconcilerError.terminal``: invalid manifests, a bad signature ...) is a
property of the commit, so trying it again every few minutes only repeats the same refusal in
the events; it is parked until the head moves. While a head waits, the daemon keeps the last
good revision running and corrects drift against it; the wait applies to *trying the failed
revision again*, never to healing.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.formatting import short_sha


@dataclass
class Backoff:
    base: float = 5.0
    factor: float = 2.0
    maximum: float = 300.0
    revision: str | None = None
    failures: int = 0
    failed_at: float = 0.0
    message: str = ""
    parked: bool = False
    """``revision`` failed terminally: it waits for the head to move, not for a time."""

    def failed(self, revision: str, now: float, message: str = "") -> float:
        """Record a transient failure of ``revision``; returns the delay before it is tried
        again."""
        if revision != self.revision:
            self.revision, self.failures = revision, 0
        self.failures += 1
        self.failed_at = now
        self.message = message
        self.parked = False
        return self.delay()

    def park(self, revision: str, now: float, message: str = "") -> None:
        """Record a terminal failure of ``revision``: it is not tried again while it is the
        head (a newer head, or a restart of the daemon, tries again)."""
        self.failed(revision, now, message)
        self.parked = True

    def delay(self) -> float:
        if not self.failures:
            return 0.0
        return float(min(self.maximum, self.base * self.factor ** (self.failures - 1)))

    def retry_at(self, revision: str) -> float:
        """When a timed retry of ``revision`` is due; 0 when it is not waiting for a time
        (it never failed, it is not the one that failed, or it is parked: see ``waits``)."""
        if revision != self.revision or not self.failures or self.parked:
            return 0.0
        return self.failed_at + self.delay()

    def waits(self, revision: str, now: float) -> str | None:
        """Why ``revision`` is not tried now (one line), or ``None`` when it may be."""
        if revision != self.revision or not self.failures:
            return None
        if self.parked:
            return (
                f"{short_sha(revision)} failed ({self.message}); not retried until the head moves"
            )
        retry_at = self.retry_at(revision)
        if retry_at <= now:
            return None
        return f"{short_sha(revision)} failed ({self.message}); next try in {retry_at - now:.0f} s"

    def succeeded(self) -> None:
        self.revision, self.failures, self.failed_at, self.message = None, 0, 0.0, ""
        self.parked = False
