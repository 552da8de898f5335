"""SQLite implementation of the state store (the embedded default).

One file, ``state.db`` in the state directory, in WAL mode with ``synchronous=FULL``: a write
that returned survives a power cut, which the intents of the execution layer rely on. Every
write runs in one transaction together with the bump of ``meta.version``.

Fencing: a daemon that leads sets a :class:`~reconciler.leadership.fence.Fence` and claims its
term (``meta.term`` only grows). Every write of VMs, intents and revisions then checks, inside
its transaction, that the fence is still valid and that no newer term was claimed since; a stale
leader's write is rolled back and raises ``StaleTermError``. Events and suspensions are the
operator's history and switches, not fleet state, and are never fenced.
The notification outbox is fenced (only the leader enqueues and settles) but, not being
fleet state, never bumps the version.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from reconciler.errors import StateError
from reconciler.leadership.fence import Fence
from reconciler.lifetimes import ClosedOnExit
from reconciler.model import (
    FLEET_WIDE,
    ObservedFleet,
    ObservedVM,
    RolloutCommand,
    RolloutState,
    RolloutSwitch,
)
from reconciler.redact import redact_text
from reconciler.state.location import SQLITE_FILE
from reconciler.state.paths import private_file, private_state_dir
from reconciler.state.protocol import (
    VM_HISTORY_KEPT,
    Event,
    Intent,
    OutboxEntry,
    OutboxMessage,
    Pin,
    RevisionRecord,
    VMHistoryEntry,
    pin_message,
)
from reconciler.state.rows import (
    OUTBOX_COLUMNS,
    history_from_row,
    outbox_entry_from_row,
    vm_from_row,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_EVENTS_KEPT = 10_000
_OUTBOX_KEPT = 10_000  # settled messages; their keys deduplicate for as long as they are kept

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    workload TEXT NOT NULL,
    runtime TEXT NOT NULL,
    target TEXT NOT NULL,
    artifact_digest TEXT NOT NULL,
    artifact_inputs TEXT NOT NULL,
    settings TEXT NOT NULL,
    state TEXT NOT NULL,
    healthy INTEGER,
    pid INTEGER,
    address TEXT,
    detail TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    started_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    action TEXT NOT NULL,
    started_at REAL NOT NULL,
    completed_at REAL,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL,
    term INTEGER
);
CREATE TABLE IF NOT EXISTS suspensions (
    workload TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    workload TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_switches (
    workload TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    version TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision TEXT NOT NULL,
    outcome TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revision_artifacts (
    revision TEXT NOT NULL,
    workload TEXT NOT NULL,
    digests TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (revision, workload)
);
CREATE TABLE IF NOT EXISTS pins (
    workload TEXT PRIMARY KEY,
    revision TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    healthy INTEGER,
    term INTEGER
);
CREATE INDEX IF NOT EXISTS vm_history_by_vm ON vm_history (vm, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, destination, id);
"""


class SQLiteStateStore(ClosedOnExit):
    """``StateStore`` on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fence: Fence | None = None
        tightened = private_state_dir(path.parent)
        try:
            # SQLite gives new -wal and -shm files the database file's mode: 0600 for all three.
            tightened += private_file(path)
            for companion in _companion_files(path):
                tightened += private_file(companion, create=False)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in _write).
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
            self._check_schema_version()
        except (OSError, sqlite3.Error) as exc:
            raise StateError(
                f"cannot open the state store {path}: {exc}; check --state-dir and its permissions"
            ) from exc
        if tightened:
            log.warning("made private what others could read: %s", ", ".join(tightened))

    @classmethod
    def in_directory(cls, state_dir: Path) -> SQLiteStateStore:
        """The store of ``state_dir``. Commands open it through
        ``reconciler.state.location.open_state_store``, which also knows the other stores."""
        return cls(state_dir / SQLITE_FILE)

    def _add_missing_columns(self) -> None:
        """Columns added after a store was created (same schema version: additive only)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(vms)")}
        for column, kind in (("started_at", "REAL"), ("restarts", "INTEGER NOT NULL DEFAULT 0")):
            if column not in have:
                self._db.execute(f"ALTER TABLE vms ADD COLUMN {column} {kind}")

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with self._write():
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('version', '0')",
                    (str(SCHEMA_VERSION),),
                )
        elif int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"the state store {self.path} was written by a newer reconciler "
                f"(schema {row[0]} > {SCHEMA_VERSION}); upgrade reconciler"
            )

    @contextmanager
    def _write(self, *, fenced: bool = True, bump: bool = True) -> Iterator[None]:
        fence = self.fence if fenced else None
        if fence is not None:
            fence.check("a state write")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if fence is not None:
                    current = self._term()
                    if current > fence.term:
                        fence.refuse(
                            "a state write", f"term {fence.term} is stale, term {current} leads"
                        )
                yield
                if bump:
                    self._db.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'"
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state store {self.path}: {exc}") from exc

    def _term(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='term'").fetchone()
        return int(row[0]) if row else 0

    def claim_term(self, fence: Fence) -> None:
        """Make ``fence`` the fence of this store's writes and raise ``meta.term`` to its term,
        so writes of every older term are refused from now on. A newer term already claimed
        means this leadership is stale: ``StaleTermError``."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            current = self._term()
            if current > fence.term:
                self._db.execute("ROLLBACK")
                fence.refuse("claiming the store", f"term {current} already leads")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('term', ?)", (str(fence.term),))
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(f"cannot write the state store {self.path}: {exc}") from exc
        self.fence = fence

    def release_fence(self) -> None:
        """Writes are no longer fenced (the daemon stepped down and only reads now)."""
        self.fence = None

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None:
        with self._write(fenced=False, bump=False):
            self._db.execute(
                "INSERT INTO events (at, kind, subject, message, term) VALUES (?,?,?,?,?)",
                (time.time(), kind, redact_text(subject), redact_text(message), term),
            )
            # A daemon runs for months: keep the newest events, not all of them.
            self._db.execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (_EVENTS_KEPT,)
            )

    def events(self, limit: int = 50) -> list[Event]:
        rows = self._db.execute(
            "SELECT id, at, kind, subject, message, term FROM events ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Event(int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5]) for r in rows]

    def suspend(self, workload: str | None, reason: str = "") -> None:
        with self._write(fenced=False, bump=False):
            self._db.execute(
                "INSERT OR REPLACE INTO suspensions VALUES (?, ?, ?)",
                (workload or FLEET_WIDE, reason, time.time()),
            )
            self._db.execute(
                "INSERT INTO events (at, kind, subject, message) VALUES (?, 'suspended', ?, ?)",
                (time.time(), workload or "fleet", reason or "by the operator"),
            )

    def resume(self, workload: str | None) -> bool:
        with self._write(fenced=False, bump=False):
            cursor = self._db.execute(
                "DELETE FROM suspensions WHERE workload = ?", (workload or FLEET_WIDE,)
            )
            if cursor.rowcount > 0:
                self._db.execute(
                    "INSERT INTO events (at, kind, subject, message) "
                    "VALUES (?, 'resumed', ?, 'by the operator')",
                    (time.time(), workload or "fleet"),
                )
        return cursor.rowcount > 0

    def suspensions(self) -> dict[str, str]:
        """Suspended workloads and their reasons; the key ``*`` suspends the whole fleet."""
        rows = self._db.execute("SELECT workload, reason FROM suspensions").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def rollouts(self) -> dict[str, RolloutState]:
        rows = self._db.execute("SELECT workload, state FROM rollouts").fetchall()
        return {str(r[0]): RolloutState.from_json(str(r[1])) for r in rows}

    def put_rollout(self, state: RolloutState) -> None:
        with self._write(bump=False):
            self._db.execute(
                "INSERT OR REPLACE INTO rollouts VALUES (?, ?)", (state.workload, state.to_json())
            )

    def switch_rollout(self, switch: RolloutSwitch) -> None:
        with self._write(fenced=False, bump=False):
            self._db.execute(
                "INSERT OR REPLACE INTO rollout_switches VALUES (?, ?, ?, ?)",
                (switch.workload, switch.command.value, switch.version, switch.at),
            )
            self._db.execute(
                "INSERT INTO events (at, kind, subject, message) VALUES (?, ?, ?, ?)",
                (
                    time.time(),
                    f"rollout-{switch.command.value}",
                    switch.workload,
                    "by the operator",
                ),
            )

    def rollout_switches(self) -> dict[str, RolloutSwitch]:
        rows = self._db.execute(
            "SELECT workload, command, version, at FROM rollout_switches"
        ).fetchall()
        return {
            str(r[0]): RolloutSwitch(str(r[0]), RolloutCommand(r[1]), str(r[2]), float(r[3]))
            for r in rows
        }

    def version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        return int(row[0]) if row else 0

    def observed(self) -> ObservedFleet:
        try:
            self._db.execute("BEGIN")
            try:
                version = self.version()
                rows = self._db.execute(
                    "SELECT name, fleet, workload, runtime, target, artifact_digest,"
                    " artifact_inputs, settings, state, healthy, pid, address, detail,"
                    " started_at, restarts FROM vms ORDER BY name"
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state store {self.path}: {exc}") from exc
        vms = {row[0]: vm_from_row(row) for row in rows}
        applied = self.applied_revision()
        return ObservedFleet(
            version=version, vms=vms, applied_revision=applied.revision if applied else None
        )

    def put_vm(self, vm: ObservedVM) -> None:
        with self._write():
            self._db.execute(
                "INSERT OR REPLACE INTO vms VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    vm.name,
                    vm.fleet,
                    vm.workload,
                    vm.runtime.value,
                    vm.target.value,
                    vm.artifact_digest,
                    json.dumps(dict(vm.artifact_inputs), sort_keys=True),
                    json.dumps(dict(vm.settings), sort_keys=True),
                    vm.state.value,
                    None if vm.healthy is None else int(vm.healthy),
                    vm.pid,
                    vm.address,
                    vm.detail,
                    time.time(),
                    vm.started_at,
                    vm.restarts,
                ),
            )

    def remove_vm(self, name: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM vms WHERE name = ?", (name,))

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        if outcome not in ("applied", "failed"):
            raise ValueError(f"outcome must be 'applied' or 'failed', not {outcome!r}")
        with self._write():
            self._db.execute(
                "INSERT INTO revisions (revision, outcome, message, at) VALUES (?,?,?,?)",
                # Messages quote git remotes; credentials in them are never stored.
                (revision, outcome, redact_text(message), time.time()),
            )

    def _last_revision(self, where: str) -> RevisionRecord | None:
        row = self._db.execute(
            f"SELECT revision, outcome, message, at FROM revisions {where} ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return RevisionRecord(row[0], row[1], row[2], row[3]) if row else None

    def revisions(self, limit: int = 50) -> list[RevisionRecord]:
        rows = self._db.execute(
            "SELECT revision, outcome, message, at FROM revisions ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [RevisionRecord(r[0], r[1], r[2], r[3]) for r in rows]

    def record_artifacts(self, revision: str, artifacts: Mapping[str, Sequence[str]]) -> None:
        with self._write(bump=False):
            for workload, digests in artifacts.items():
                self._db.execute(
                    "INSERT OR REPLACE INTO revision_artifacts VALUES (?, ?, ?, ?)",
                    (revision, workload, json.dumps(sorted(set(digests))), time.time()),
                )

    def revision_artifacts(self, revision: str) -> dict[str, tuple[str, ...]]:
        rows = self._db.execute(
            "SELECT workload, digests FROM revision_artifacts WHERE revision = ?", (revision,)
        ).fetchall()
        return {str(r[0]): tuple(json.loads(str(r[1]))) for r in rows}

    def pin(self, workload: str | None, revision: str, reason: str = "") -> None:
        with self._write(fenced=False, bump=False):
            self._db.execute(
                "INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?)",
                (workload or FLEET_WIDE, revision, reason, time.time()),
            )
            self._db.execute(
                "INSERT INTO events (at, kind, subject, message) VALUES (?, 'pinned', ?, ?)",
                (time.time(), workload or "fleet", pin_message(revision, reason)),
            )

    def unpin(self, workload: str | None) -> bool:
        with self._write(fenced=False, bump=False):
            cursor = self._db.execute(
                "DELETE FROM pins WHERE workload = ?", (workload or FLEET_WIDE,)
            )
            if cursor.rowcount > 0:
                self._db.execute(
                    "INSERT INTO events (at, kind, subject, message) "
                    "VALUES (?, 'unpinned', ?, 'by the operator')",
                    (time.time(), workload or "fleet"),
                )
        return cursor.rowcount > 0

    def pins(self) -> dict[str, Pin]:
        rows = self._db.execute("SELECT workload, revision, reason, at FROM pins").fetchall()
        return {str(r[0]): Pin(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows}

    def record_vm_history(
        self,
        vm: str,
        kind: str,
        detail: str,
        *,
        healthy: bool | None = None,
        term: int | None = None,
    ) -> None:
        with self._write(fenced=False, bump=False):
            self._db.execute(
                "INSERT INTO vm_history (vm, at, kind, detail, healthy, term)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    vm,
                    time.time(),
                    kind,
                    redact_text(detail),
                    None if healthy is None else int(healthy),
                    term,
                ),
            )
            self._db.execute(
                "DELETE FROM vm_history WHERE vm = ? AND id NOT IN"
                " (SELECT id FROM vm_history WHERE vm = ? ORDER BY id DESC LIMIT ?)",
                (vm, vm, VM_HISTORY_KEPT),
            )

    def vm_history(self, vm: str, limit: int = VM_HISTORY_KEPT) -> list[VMHistoryEntry]:
        rows = self._db.execute(
            "SELECT vm, at, kind, detail, healthy, term FROM vm_history WHERE vm = ?"
            " ORDER BY id DESC LIMIT ?",
            (vm, limit),
        ).fetchall()
        return [history_from_row(row) for row in rows]

    def begin_intent(self, vm: str, action: str) -> int:
        with self._write():
            cursor = self._db.execute(
                "INSERT INTO intents (vm, action, started_at) VALUES (?, ?, ?)",
                (vm, action, time.time()),
            )
        return int(cursor.lastrowid or 0)

    def complete_intent(self, intent: int, outcome: str = "done") -> None:
        with self._write():
            self._db.execute(
                "UPDATE intents SET completed_at = ?, outcome = ? WHERE id = ?",
                (time.time(), outcome, intent),
            )

    def open_intents(self) -> list[Intent]:
        rows = self._db.execute(
            "SELECT id, vm, action, started_at FROM intents WHERE completed_at IS NULL ORDER BY id"
        ).fetchall()
        return [Intent(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    def applied_revision(self) -> RevisionRecord | None:
        return self._last_revision("WHERE outcome = 'applied'")

    def attempted_revision(self) -> RevisionRecord | None:
        return self._last_revision("")

    def enqueue(self, messages: Sequence[OutboxMessage]) -> int:
        added = 0
        with self._write(bump=False):
            now = time.time()
            for message in messages:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO outbox"
                    " (key, destination, kind, body, created_at, next_attempt_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (message.key, message.destination, message.kind, message.body, now, now),
                )
                added += cursor.rowcount
        return added

    def due_messages(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        rows = self._db.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox AS o WHERE state = 'pending'"
            " AND id = (SELECT MIN(id) FROM outbox"
            "           WHERE state = 'pending' AND destination = o.destination)"
            " AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [outbox_entry_from_row(row) for row in rows]

    def settle_message(
        self, entry: int, *, delivered: bool, error: str = "", retry_at: float | None = None
    ) -> None:
        with self._write(bump=False):
            if delivered:
                self._db.execute(
                    "UPDATE outbox SET state = 'delivered' WHERE id = ? AND state = 'pending'",
                    (entry,),
                )
            else:
                self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?,"
                    " state = ?, next_attempt_at = COALESCE(?, next_attempt_at)"
                    " WHERE id = ? AND state = 'pending'",
                    (
                        redact_text(error),
                        "pending" if retry_at is not None else "abandoned",
                        retry_at,
                        entry,
                    ),
                )
            # Settled messages are kept for their keys (deduplication) and the operator's
            # history, the newest of them only.
            self._db.execute(
                "DELETE FROM outbox WHERE state != 'pending' AND id <= "
                "(SELECT MAX(id) FROM outbox) - ?",
                (_OUTBOX_KEPT,),
            )

    def outbox(self, limit: int = 50) -> list[OutboxEntry]:
        rows = self._db.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [outbox_entry_from_row(row) for row in rows]

    def close(self) -> None:
        self._db.close()


def _companion_files(db: Path) -> list[Path]:
    return [db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
