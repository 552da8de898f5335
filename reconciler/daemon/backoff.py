"""Exponential back-off for revisions that failed: pure, time passed in by the caller.

    cycle fails at head H ──▶ Backoff.failed(H, now) ──▶ retry_at(H)
    a newer head ──────────▶ no waiting: a new revision is tried at once
    cycle succeeds ────────▶ Backoff.succeeded() forgets the failures

While a head waits, the daemon keeps the last good revision running and corrects drift against
it; the wait applies to *trying the failed revision again*, never to healing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 5.0
    factor: float = 2.0
    maximum: float = 300.0
    revision: str | None = None
    failures: int = 0
    failed_at: float = 0.0
    message: str = ""

    def failed(self, revision: str, now: float, message: str = "") -> float:
        """Record a failure of ``revision``; returns the delay before it is tried again."""
        if revision != self.revision:
            self.revision, self.failures = revision, 0
        self.failures += 1
        self.failed_at = now
        self.message = message
        return self.delay()

    def delay(self) -> float:
        if not self.failures:
            return 0.0
        return float(min(self.maximum, self.base * self.factor ** (self.failures - 1)))

    def retry_at(self, revision: str) -> float:
        """When ``revision`` may be tried (0: now). Only the revision that failed waits."""
        if revision != self.revision or not self.failures:
            return 0.0
        return self.failed_at + self.delay()

    def succeeded(self) -> None:
        self.revision, self.failures, self.failed_at, self.message = None, 0, 0.0, ""
