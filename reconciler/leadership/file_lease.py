"""The embedded-default lease: ``flock`` on a lock file in the state directory, term in SQLite.

    Elector ──▶ FileLease ──flock──▶ <state-dir>/leader.lock
                          ──term───▶ <state-dir>/state.db, table lease_terms

For replicas on one host sharing one state directory. The kernel drops an ``flock`` the moment
its holder dies (even by ``kill -9``), so a follower polling the lock every
``POLL_INTERVAL`` seconds takes over within a fraction of a second; there is no expiry to wait
for. The term is incremented in the same SQLite database as the fleet state, while holding the
lock, so it is taken atomically with the lease and only ever grows.

A holder that is stopped (SIGSTOP) keeps its lock, and with it the lease: on one host nobody can
act in its place without the risk of two actors, which is the safe side.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from reconciler.errors import LeadershipError
from reconciler.leadership.protocol import LeaseHolder, LeaseSettings
from reconciler.lifetimes import ClosedOnExit

POLL_INTERVAL = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lease_terms (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term INTEGER NOT NULL,
    acquired_at REAL NOT NULL
)
"""


class FileLease(ClosedOnExit):
    """``Lease`` on an ``flock``; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        holder: str,
        name: str = "fleet",
        settings: LeaseSettings | None = None,
    ) -> None:
        self.holder = holder
        self.name = name
        self.settings = (settings or LeaseSettings()).validated()
        self.lock_path = state_dir / "leader.lock"
        self._db_path = state_dir / "state.db"
        self._fd: int | None = None  # open (and locked) while we hold the lease
        self._term: int | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            # Made on the daemon's main thread, used by the elector's: one user at a time.
            self._db = sqlite3.connect(
                self._db_path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LeadershipError(
                f"cannot open the file lease in {state_dir}: {exc}; check --state-dir"
            ) from exc

    def _open_lock(self) -> int:
        try:
            # O_CLOEXEC (Python's default) matters: a VMM that inherited the descriptor would keep
            # the lock after the daemon died, and no follower could ever take over.
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LeadershipError(f"cannot open {self.lock_path}: {exc.strerror}") from exc

    def try_acquire(self) -> int | None:
        if self._fd is not None and self._term is not None:
            return self._term
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            term = self._next_term()
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder} {term}\n".encode(), 0)
        self._fd, self._term = fd, term
        return term

    def _next_term(self) -> int:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT term FROM lease_terms WHERE name = ?", (self.name,)
                ).fetchone()
                term = (int(row[0]) if row else 0) + 1
                self._db.execute(
                    "INSERT OR REPLACE INTO lease_terms VALUES (?, ?, ?, ?)",
                    (self.name, self.holder, term, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LeadershipError(
                f"cannot record the lease term in {self._db_path}: {exc}"
            ) from exc
        return term

    def renew(self, term: int) -> bool:
        # The lock cannot be taken from a live holder; what can move is the term, when someone
        # deleted the lock file and another replica locked a new one.
        if self._fd is None or self._term != term:
            return False
        try:
            if os.fstat(self._fd).st_ino != os.stat(self.lock_path).st_ino:
                return False
        except OSError:
            return False
        current = self._stored()
        return current is not None and current[1] == term

    def release(self, term: int) -> None:
        if self._fd is None or self._term != term:
            return
        fd, self._fd, self._term = self._fd, None, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _stored(self) -> tuple[str, int] | None:
        try:
            row = self._db.execute(
                "SELECT holder, term FROM lease_terms WHERE name = ?", (self.name,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise LeadershipError(f"cannot read the lease term in {self._db_path}: {exc}") from exc
        return (str(row[0]), int(row[1])) if row else None

    def _lock_is_free(self) -> bool:
        if self._fd is not None:
            return False
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the probe's shared lock too
        return True

    def current(self) -> LeaseHolder | None:
        if self._lock_is_free():
            return None
        stored = self._stored()
        return LeaseHolder(stored[0], stored[1]) if stored else None

    def wait_for_change(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._lock_is_free():
                return
            time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if self._term is not None:
            self.release(self._term)
        self._db.close()
