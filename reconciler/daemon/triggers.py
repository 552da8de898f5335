"""What wakes the daemon: polling, a file watch on a local repository, webhooks and
``reconciler reconcile --now``, all funnelled into one ``TriggerQueue``.

    APScheduler interval job (poll, with jitter) ─┐
    watchfiles on the repository's refs ──────────┼──▶ TriggerQueue ──▶ the one reconcile worker
    HTTP: webhook, POST /api/reconcile ───────────┘

Triggers coalesce: ten pushes during one cycle cause one more cycle, not ten, and that cycle
reads the newest head, so a newer revision never waits behind an older one. The queue keeps when
the earliest waiting trigger happened (``taken_at`` after a ``take``): the start of the cycle's
commit → healthy timeline (``timeline.py``). For the file watch that is the time git wrote the
ref (its mtime), so the watch's own latency is measured too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from watchfiles import watch

log = logging.getLogger("reconciler.daemon")


class TriggerQueue:
    """Reasons to reconcile, collected until the worker takes them all at once."""

    def __init__(self) -> None:
        self._reasons: list[str] = []
        self._first_at: float | None = None
        self._condition = threading.Condition()
        self.taken_at: float | None = None
        """When the earliest trigger of the last ``take`` happened (wall clock), or None."""

    def request(self, reason: str, at: float | None = None) -> None:
        """A reason to reconcile; ``at`` is when it happened (default: now, wall clock)."""
        happened = time.time() if at is None else at
        with self._condition:
            if reason not in self._reasons:
                self._reasons.append(reason)
            if self._first_at is None or happened < self._first_at:
                self._first_at = happened
            self._condition.notify_all()

    def pending(self) -> bool:
        """Whether a trigger waits (without taking it)."""
        with self._condition:
            return bool(self._reasons)

    def wake(self) -> None:
        """Wake the worker without a reason (leadership changed, shutdown)."""
        with self._condition:
            self._condition.notify_all()

    def take(self, timeout: float | None) -> list[str]:
        """Wait up to ``timeout`` seconds for triggers; returns and clears them (maybe none)."""
        with self._condition:
            if not self._reasons and (timeout is None or timeout > 0):
                self._condition.wait(timeout)
            reasons, self._reasons = self._reasons, []
            self.taken_at = self._first_at if reasons else None
            self._first_at = None
            return reasons


class Poller:
    """Requests a cycle every ``interval`` seconds (plus up to ``jitter`` seconds, so replicas
    and fleets polling one server spread out)."""

    def __init__(self, queue: TriggerQueue, *, interval: float, jitter: float) -> None:
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(
            queue.request,
            IntervalTrigger(seconds=interval, jitter=int(jitter) or None),
            args=["poll"],
            id="poll",
            max_instances=1,
            coalesce=True,
        )

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)


class RepositoryWatcher:
    """Requests a cycle when a ref of a local repository moves (a commit, a push into it)."""

    def __init__(self, queue: TriggerQueue, repository: Path) -> None:
        git_dir = repository / ".git"
        self._git_dir = git_dir if git_dir.is_dir() else repository  # bare repositories
        self._queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repo-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        def is_ref(_change: object, path: str) -> bool:
            relative = Path(path).relative_to(self._git_dir).as_posix()
            return relative in ("HEAD", "packed-refs") or relative.startswith("refs/")

        try:
            for changes in watch(
                self._git_dir,
                watch_filter=is_ref,
                stop_event=self._stop,
                # A commit moves one ref (a lock file renamed into place): yield 20 ms after
                # the last change rather than the default 50, grouping at most 200 ms.
                debounce=200,
                step=20,
                rust_timeout=1000,
                yield_on_timeout=False,
            ):
                self._queue.request("file-watch", at=changed_at(path for _, path in changes))
        except Exception as exc:  # a watch that dies must not take the daemon with it
            log.warning("file watch on %s stopped: %s; polling continues", self._git_dir, exc)

    def stop(self) -> None:
        self._stop.set()


def changed_at(paths: Iterable[str]) -> float:
    """When the earliest of the changed ``paths`` was written (its mtime), else now: a
    deleted ref (a branch removed) has no time of its own."""
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime)
        except OSError:
            continue
    return min(times, default=time.time())
