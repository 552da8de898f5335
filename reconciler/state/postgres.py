"""PostgreSQL implementation of the state store: one database shared by the daemons of a fleet.

    daemon / CLI on host A ─┐                  schema_migrations  numbered migrations applied
    daemon / CLI on host B ─┼─one connection──▶ fleet_term         the newest term (one row)
    ...                     ┘   per handle      host_versions      each host's version
                                                vms (host, name)   what each host runs
                                                assignments (vm)   VM -> host, with its term
                                                intents (host), revisions, events, suspensions
                                                hosts (name)       the registry: epochs, heartbeats
                                                fleet_digest_key   the secret digest key (one row)

Selected with ``--store postgresql://...`` (``reconciler.state.location``). The schema is made
for several hosts sharing the fleet: observed VMs, intents and versions are keyed by host (a
handle speaks for one host, this machine's name by default), while revisions, assignments, the
term and suspensions are the fleet's. ``observed()`` is the handle's host's VMs and version.

Migrations are numbered data in this module (``MIGRATIONS``), recorded in
``schema_migrations`` and applied when a handle opens, in one transaction under an advisory
lock, so two daemons starting together never apply one twice; a database migrated by a newer
reconciler is refused in one line. Times are the database clock's, the same for every host.

Fencing: a leader claims its term (``fleet_term`` only grows); every write of VMs, intents,
revisions and assignments then runs, in one transaction, behind a check that its term is still
the newest, with the ``fleet_term`` row locked ``FOR SHARE``. That lock is what makes the check
hold until the commit: a new leader's ``claim_term`` locks the row ``FOR UPDATE``, so it waits
for every write already past its check and every later write sees the new term. Without it, an
old leader paused between its check and its commit (SIGSTOP, a long GC, a stuck disk) would
land its write *after* the new leader had read the world, which is the split brain this
prevents. When the daemon's lease is the PostgreSQL lease in this same database, the check
also reads the lease row itself, ``FOR SHARE``: the holder and the term must be the writer's
and the lease unexpired *by the database clock*. That refuses the write of a leader whose
lease expired even before anybody else claimed the store, and holds off a takeover until the
write committed. A paused writer cannot hold those locks for long:
``idle_in_transaction_session_timeout`` ends its session, and its write with it. Events and
suspensions are the operator's history and switches, not fleet state, and are never fenced;
nor is the host registry (``reconciler.state.hosts``): each host writes its own registration
and heartbeats whether or not it leads, and cordon and drain are the operator's switches.

Every psycopg error becomes one ``StateError`` line that names the database (never its
password); a lost connection is reopened by the next call.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from reconciler.errors import ConfigError, StateError
from reconciler.leadership.fence import Fence
from reconciler.leadership.postgres_lease import describe_database, error_reason
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
from reconciler.state.hosts import (
    HOST_COLUMNS,
    Assignment,
    HostRecord,
    HostRegistration,
    host_from_row,
)
from reconciler.state.location import LeaseBinding
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

Connection = psycopg.Connection[TupleRow]

_EVENTS_KEPT = 10_000
_OUTBOX_KEPT = 10_000  # settled messages; their keys deduplicate for as long as they are kept
# Serialises migrations of daemons starting together; spells "rcstate" (the lease's is another).
_MIGRATION_LOCK_KEY = 0x7263737461746500
# A writer stopped inside a transaction holds the term row (and the lease row) locked; the
# server ends such a session after this long, so a paused old leader never blocks a takeover.
_IDLE_IN_TRANSACTION = "5s"
_STATEMENT_TIMEOUT = "30s"
_NOW: LiteralString = "extract(epoch FROM clock_timestamp())"


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: LiteralString


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "fleet state shared by hosts",
        """
CREATE TABLE fleet_term (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    term bigint NOT NULL
);
INSERT INTO fleet_term (term) VALUES (0);
CREATE TABLE host_versions (host text PRIMARY KEY, version bigint NOT NULL);
CREATE TABLE vms (
    host text NOT NULL,
    name text NOT NULL,
    fleet text NOT NULL,
    workload text NOT NULL,
    runtime text NOT NULL,
    target text NOT NULL,
    artifact_digest text NOT NULL,
    artifact_inputs text NOT NULL,
    settings text NOT NULL,
    state text NOT NULL,
    healthy boolean,
    pid integer,
    address text,
    detail text NOT NULL DEFAULT '',
    updated_at double precision NOT NULL,
    started_at double precision,
    restarts integer NOT NULL DEFAULT 0,
    PRIMARY KEY (host, name)
);
CREATE TABLE assignments (
    vm text PRIMARY KEY,
    host text NOT NULL,
    term bigint NOT NULL,
    assigned_at double precision NOT NULL
);
CREATE INDEX assignments_by_host ON assignments (host);
CREATE TABLE intents (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    vm text NOT NULL,
    action text NOT NULL,
    term bigint,
    started_at double precision NOT NULL,
    completed_at double precision,
    outcome text
);
CREATE INDEX intents_open ON intents (host, id) WHERE completed_at IS NULL;
CREATE TABLE revisions (
    id bigserial PRIMARY KEY,
    revision text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('applied', 'failed')),
    message text NOT NULL,
    host text NOT NULL,
    term bigint,
    at double precision NOT NULL
);
CREATE INDEX revisions_applied ON revisions (id) WHERE outcome = 'applied';
CREATE TABLE events (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    host text NOT NULL,
    kind text NOT NULL,
    subject text NOT NULL,
    message text NOT NULL,
    term bigint
);
CREATE TABLE suspensions (
    workload text PRIMARY KEY,
    reason text NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    destination text NOT NULL,
    kind text NOT NULL,
    body text NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    last_error text NOT NULL DEFAULT ''
);
CREATE INDEX outbox_pending ON outbox (destination, id) WHERE state = 'pending';
""",
    ),
    Migration(
        2,
        "progressive rollouts",
        """
CREATE TABLE rollouts (
    workload text PRIMARY KEY,
    state text NOT NULL,
    term bigint
);
CREATE TABLE rollout_switches (
    workload text PRIMARY KEY,
    command text NOT NULL CHECK (command IN ('promote', 'abort')),
    version text NOT NULL,
    at double precision NOT NULL
);
""",
    ),
    Migration(
        3,
        "history, pins and the history of each VM",
        """
CREATE TABLE revision_artifacts (
    revision text NOT NULL,
    workload text NOT NULL,
    digests text NOT NULL,
    host text NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (revision, workload)
);
CREATE TABLE pins (
    workload text PRIMARY KEY,
    revision text NOT NULL,
    reason text NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE vm_history (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    vm text NOT NULL,
    at double precision NOT NULL,
    kind text NOT NULL,
    detail text NOT NULL,
    healthy boolean,
    term bigint
);
CREATE INDEX vm_history_by_vm ON vm_history (vm, id);
""",
    ),
    Migration(
        4,
        "the host registry",
        """
CREATE TABLE hosts (
    name text PRIMARY KEY,
    epoch bigint NOT NULL,
    vcpus integer NOT NULL,
    memory_mib bigint NOT NULL,
    disk_mib bigint NOT NULL,
    labels text NOT NULL,
    runtimes text NOT NULL,
    kvm boolean NOT NULL,
    cordoned boolean NOT NULL DEFAULT false,
    draining boolean NOT NULL DEFAULT false,
    registered_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);
""",
    ),
    Migration(
        5,
        "each host converges its own assignments",
        """
ALTER TABLE assignments ADD COLUMN revision text NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN ended boolean NOT NULL DEFAULT false;
ALTER TABLE fleet_term ADD COLUMN placed_term bigint NOT NULL DEFAULT 0;
""",
    ),
    Migration(
        6,
        "each host's subnet slot and underlay address",
        """
ALTER TABLE hosts ADD COLUMN subnet_slot integer UNIQUE;
ALTER TABLE hosts ADD COLUMN underlay_address text;
""",
    ),
    Migration(
        7,
        "the fleet's secret digest key",
        """
CREATE TABLE fleet_digest_key (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    key bytea NOT NULL
);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].number

_MIGRATIONS_TABLE: LiteralString = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_APPLIED_MIGRATION: LiteralString = "SELECT coalesce(max(version), 0) FROM schema_migrations"

_TERM_FOR_WRITE: LiteralString = "SELECT term FROM fleet_term FOR SHARE"

_TERM_AND_LEASE_FOR_WRITE: LiteralString = """
SELECT t.term, l.holder, l.term, l.expires_at > clock_timestamp()
FROM fleet_term t LEFT JOIN LATERAL (
    SELECT holder, term, expires_at FROM reconciler_leases WHERE name = %(name)s FOR SHARE
) l ON true
FOR SHARE OF t
"""

_BUMP: LiteralString = """
INSERT INTO host_versions AS v (host, version) VALUES (%(host)s, 1)
ON CONFLICT (host) DO UPDATE SET version = v.version + 1
"""

_VERSION: LiteralString = (
    "SELECT coalesce((SELECT version FROM host_versions WHERE host = %(host)s), 0)"
)

# One statement, so one snapshot: the version, the applied revision and the VMs agree.
_OBSERVED: LiteralString = f"""
SELECT ({_VERSION}),
       (SELECT revision FROM revisions WHERE outcome = 'applied' ORDER BY id DESC LIMIT 1),
       vm.name, vm.fleet, vm.workload, vm.runtime, vm.target, vm.artifact_digest,
       vm.artifact_inputs, vm.settings, vm.state, vm.healthy, vm.pid, vm.address, vm.detail,
       vm.started_at, vm.restarts
FROM (SELECT 1) AS one LEFT JOIN vms AS vm ON vm.host = %(host)s
ORDER BY vm.name
"""

_PUT_VM: LiteralString = f"""
INSERT INTO vms AS v (host, name, fleet, workload, runtime, target, artifact_digest,
    artifact_inputs, settings, state, healthy, pid, address, detail, updated_at, started_at,
    restarts)
VALUES (%(host)s, %(name)s, %(fleet)s, %(workload)s, %(runtime)s, %(target)s, %(digest)s,
    %(inputs)s, %(settings)s, %(state)s, %(healthy)s, %(pid)s, %(address)s, %(detail)s,
    {_NOW}, %(started_at)s, %(restarts)s)
ON CONFLICT (host, name) DO UPDATE SET
    fleet = EXCLUDED.fleet, workload = EXCLUDED.workload, runtime = EXCLUDED.runtime,
    target = EXCLUDED.target, artifact_digest = EXCLUDED.artifact_digest,
    artifact_inputs = EXCLUDED.artifact_inputs, settings = EXCLUDED.settings,
    state = EXCLUDED.state, healthy = EXCLUDED.healthy, pid = EXCLUDED.pid,
    address = EXCLUDED.address, detail = EXCLUDED.detail, updated_at = EXCLUDED.updated_at,
    started_at = EXCLUDED.started_at, restarts = EXCLUDED.restarts
"""

_LAST_REVISION: LiteralString = """
SELECT revision, outcome, message, at FROM revisions
WHERE %(applied_only)s = false OR outcome = 'applied'
ORDER BY id DESC LIMIT 1
"""


_ASSIGN: LiteralString = f"""
INSERT INTO assignments AS a (vm, host, term, assigned_at, revision)
VALUES (%s, %s, %s, {_NOW}, %s)
ON CONFLICT (vm) DO UPDATE SET host = EXCLUDED.host, term = EXCLUDED.term,
    assigned_at = EXCLUDED.assigned_at, revision = EXCLUDED.revision
"""

# Every host's VMs with its version, in one snapshot; a host with a version and no VM is listed
# with NULLs.
_FLEET_OBSERVED: LiteralString = """
SELECT v.host, v.version,
       (SELECT revision FROM revisions WHERE outcome = 'applied' ORDER BY id DESC LIMIT 1),
       vm.name, vm.fleet, vm.workload, vm.runtime, vm.target, vm.artifact_digest,
       vm.artifact_inputs, vm.settings, vm.state, vm.healthy, vm.pid, vm.address, vm.detail,
       vm.started_at, vm.restarts
FROM host_versions AS v LEFT JOIN vms AS vm ON vm.host = v.host
ORDER BY v.host, vm.name
"""

# A host's subnet of the fleet's pool (runtime.network.carving): the lowest slot no host holds,
# taken at its first registration and kept for its life. One more candidate than there are
# hosts, so there is always a free one; registrations are serialised (_SLOT_LOCK_KEY) so two
# new hosts never take the same.
_FREE_SLOT: LiteralString = """
SELECT min(s) FROM generate_series(0, (SELECT count(*) FROM hosts)) AS s
WHERE NOT EXISTS (SELECT 1 FROM hosts WHERE subnet_slot = s)
"""
_SLOT_LOCK_KEY = 0x7263736C6F740000  # spells "rcslot"

# A new registration keeps the operator's flags: a restarted host stays cordoned.
_REGISTER_HOST: LiteralString = f"""
INSERT INTO hosts AS h (name, epoch, vcpus, memory_mib, disk_mib, labels, runtimes, kvm,
    registered_at, heartbeat_at, underlay_address, subnet_slot)
VALUES (%(name)s, 1, %(vcpus)s, %(memory)s, %(disk)s, %(labels)s, %(runtimes)s, %(kvm)s,
    {_NOW}, {_NOW}, %(underlay)s, ({_FREE_SLOT}))
ON CONFLICT (name) DO UPDATE SET
    epoch = h.epoch + 1, vcpus = EXCLUDED.vcpus, memory_mib = EXCLUDED.memory_mib,
    disk_mib = EXCLUDED.disk_mib, labels = EXCLUDED.labels, runtimes = EXCLUDED.runtimes,
    kvm = EXCLUDED.kvm, registered_at = EXCLUDED.registered_at,
    heartbeat_at = EXCLUDED.heartbeat_at, ended = false,
    underlay_address = EXCLUDED.underlay_address,
    subnet_slot = coalesce(h.subnet_slot, EXCLUDED.subnet_slot)
RETURNING h.epoch
"""

_HOSTS: LiteralString = f"""
SELECT {HOST_COLUMNS}, {_NOW} - h.heartbeat_at, coalesce(a.vms, 0)
FROM hosts AS h
LEFT JOIN (SELECT host, count(*) AS vms FROM assignments GROUP BY host) AS a ON a.host = h.name
ORDER BY h.name
"""


class PostgresStateStore(ClosedOnExit):
    """``StateStore`` in a PostgreSQL database, speaking for ``host``; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        host: str,
        lease: LeaseBinding | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        if not host:
            raise ConfigError("a state store's host name must not be empty")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            # libpq quotes pieces of the string it could not parse, which may be the password.
            reason = re.sub(r'"[^"]*"', '"..."', error_reason(exc, password=""))
            raise ConfigError(
                f"--store is not a valid postgresql:// URL or libpq DSN: {reason}"
            ) from exc
        self._password = str(params.get("password") or "")
        self.where = describe_database(params)
        self.host = host
        self.fence: Fence | None = None
        self.epoch_fence: Fence | None = None  # a host agent's handle: its registration epoch
        self._lease_name = _lease_in_same_database(params, lease)
        self._lease_holder = lease.holder if lease is not None else ""
        defaults: dict[str, str | int] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq's minimum is 2 s
            "application_name": f"reconciler store {host}"[:63],
        }
        self._conninfo = make_conninfo(
            dsn, **{key: value for key, value in defaults.items() if key not in params}
        )
        self._conn: Connection | None = None
        self._closed = False
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- connections and transactions ---------------------------------------------------------

    def _connection(self) -> Connection:
        if self._closed:
            raise StateError(f"the state store at {self.where} was closed")
        conn = self._conn
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StateError(
                f"cannot reach the state store at {self.where}: {self._reason(exc)}; check --store"
            ) from exc
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (_STATEMENT_TIMEOUT, _IDLE_IN_TRANSACTION),
            )
        except psycopg.Error as exc:
            conn.close()
            raise StateError(
                f"cannot set up a session in the state store at {self.where}: "
                f"{self._reason(exc)}; check --store"
            ) from exc
        self._conn = conn
        return conn

    @contextmanager
    def _session(self, what: str) -> Iterator[Connection]:
        """The connection, with every psycopg error turned into one ``StateError`` line."""
        conn = self._connection()
        try:
            yield conn
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self._conn = None
                conn.close()
            raise StateError(
                f"cannot {what} the state store at {self.where}: {self._reason(exc)}; "
                "check that the database is up and healthy"
            ) from exc

    @contextmanager
    def _write(self, *, fenced: bool = True, bump: bool = True) -> Iterator[Connection]:
        fence = self.fence if fenced else None
        epoch = self.epoch_fence if fenced else None
        for check in (fence, epoch):
            if check is not None:
                check.check("a state write")
        with self._session("write") as conn, conn.transaction():
            if fence is not None:
                self._check_term(conn, fence, "a state write")
            if epoch is not None:
                self._check_epoch(conn, epoch, "a state write")
            yield conn
            if bump:
                conn.execute(_BUMP, {"host": self.host})

    def _check_term(self, conn: Connection, fence: Fence, what: str) -> None:
        """Inside the transaction, with the rows locked until it ends: refuse unless ``fence``'s
        term is the newest claimed (and, with a bound lease, the live lease's)."""
        if self._lease_name is None:
            row = conn.execute(_TERM_FOR_WRITE).fetchone()
            current = int(row[0]) if row else 0
            if current > fence.term:
                fence.refuse(what, f"term {fence.term} is stale, term {current} leads")
            return
        row = conn.execute(_TERM_AND_LEASE_FOR_WRITE, {"name": self._lease_name}).fetchone()
        current, holder, lease_term, live = row if row else (0, None, None, None)
        if int(current) > fence.term:
            fence.refuse(what, f"term {fence.term} is stale, term {current} leads")
        if holder is None:
            fence.refuse(what, f"the lease {self._lease_name!r} is held by nobody")
        if (holder, lease_term) != (self._lease_holder, fence.term):
            fence.refuse(what, f"the lease is held by {holder} with term {lease_term}")
        if not live:
            fence.refuse(what, f"the lease of term {fence.term} expired by the database clock")

    def _reason(self, exc: BaseException) -> str:
        return error_reason(exc, password=self._password)

    def _migrate(self) -> None:
        """Apply the migrations this database lacks; refuse one migrated by a newer reconciler."""
        with self._session("migrate") as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if (
                _first(exists.fetchone())
                and _first(conn.execute(_APPLIED_MIGRATION).fetchone()) == SCHEMA_VERSION
            ):
                return  # the common case, without taking the lock
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
                conn.execute(_MIGRATIONS_TABLE)
                applied = _first(conn.execute(_APPLIED_MIGRATION).fetchone())
                if applied > SCHEMA_VERSION:
                    raise StateError(
                        f"the state store at {self.where} was migrated by a newer reconciler "
                        f"(schema {applied} > {SCHEMA_VERSION}); upgrade reconciler"
                    )
                for migration in MIGRATIONS:
                    if migration.number > applied:
                        conn.execute(migration.sql)
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                            (migration.number, migration.name),
                        )
                        log.info(
                            "state store at %s: applied migration %d (%s)",
                            self.where,
                            migration.number,
                            migration.name,
                        )

    # -- terms -----------------------------------------------------------------------------------

    def claim_term(self, fence: Fence) -> None:
        """Make ``fence`` the fence of this handle's writes and raise the fleet's term to its
        term, waiting for writes in flight under an older one; ``StaleTermError`` when a newer
        term already leads (or, with a bound lease, when the lease is not this term's)."""
        fence.check("claiming the store")
        with self._session("write") as conn, conn.transaction():
            row = conn.execute("SELECT term FROM fleet_term FOR UPDATE").fetchone()
            current = int(row[0]) if row else 0
            if current > fence.term:
                fence.refuse("claiming the store", f"term {current} already leads")
            if self._lease_name is not None:
                self._check_term(conn, fence, "claiming the store")
            conn.execute("UPDATE fleet_term SET term = %s", (fence.term,))
        self.fence = fence

    def release_fence(self) -> None:
        self.fence = None

    # -- the operator's history and switches (never fenced) ----------------------------------

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None:
        with self._write(fenced=False, bump=False) as conn:
            row = conn.execute(
                "INSERT INTO events (at, host, kind, subject, message, term)"
                f" VALUES ({_NOW}, %s, %s, %s, %s, %s) RETURNING id",
                (self.host, kind, redact_text(subject), redact_text(message), term),
            ).fetchone()
            # A daemon runs for months: keep the newest events, not all of them.
            if row and int(row[0]) % 100 == 0:
                conn.execute("DELETE FROM events WHERE id <= %s", (int(row[0]) - _EVENTS_KEPT,))

    def events(self, limit: int = 50) -> list[Event]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT id, at, kind, subject, message, term FROM events ORDER BY id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return [Event(int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5]) for r in rows]

    def suspend(self, workload: str | None, reason: str = "") -> None:
        with self._write(fenced=False, bump=False) as conn:
            conn.execute(
                f"INSERT INTO suspensions AS s VALUES (%s, %s, {_NOW})"
                " ON CONFLICT (workload) DO UPDATE SET reason = EXCLUDED.reason, at = EXCLUDED.at",
                (workload or FLEET_WIDE, reason),
            )
            self._insert_event(conn, "suspended", workload or "fleet", reason or "by the operator")

    def resume(self, workload: str | None) -> bool:
        with self._write(fenced=False, bump=False) as conn:
            cursor = conn.execute(
                "DELETE FROM suspensions WHERE workload = %s", (workload or FLEET_WIDE,)
            )
            resumed = cursor.rowcount > 0
            if resumed:
                self._insert_event(conn, "resumed", workload or "fleet", "by the operator")
        return resumed

    def _insert_event(self, conn: Connection, kind: str, subject: str, message: str) -> None:
        conn.execute(
            "INSERT INTO events (at, host, kind, subject, message)"
            f" VALUES ({_NOW}, %s, %s, %s, %s)",
            (self.host, kind, subject, message),
        )

    def suspensions(self) -> dict[str, str]:
        with self._session("read") as conn:
            rows = conn.execute("SELECT workload, reason FROM suspensions").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def pin(self, workload: str | None, revision: str, reason: str = "") -> None:
        with self._write(fenced=False, bump=False) as conn:
            conn.execute(
                f"INSERT INTO pins VALUES (%s, %s, %s, {_NOW}) ON CONFLICT (workload) DO UPDATE"
                " SET revision = EXCLUDED.revision, reason = EXCLUDED.reason, at = EXCLUDED.at",
                (workload or FLEET_WIDE, revision, reason),
            )
            self._insert_event(conn, "pinned", workload or "fleet", pin_message(revision, reason))

    def unpin(self, workload: str | None) -> bool:
        with self._write(fenced=False, bump=False) as conn:
            cursor = conn.execute("DELETE FROM pins WHERE workload = %s", (workload or FLEET_WIDE,))
            unpinned = cursor.rowcount > 0
            if unpinned:
                self._insert_event(conn, "unpinned", workload or "fleet", "by the operator")
        return unpinned

    def pins(self) -> dict[str, Pin]:
        with self._session("read") as conn:
            rows = conn.execute("SELECT workload, revision, reason, at FROM pins").fetchall()
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
        with self._write(fenced=False, bump=False) as conn:
            conn.execute(
                "INSERT INTO vm_history (host, vm, at, kind, detail, healthy, term)"
                f" VALUES (%s, %s, {_NOW}, %s, %s, %s, %s)",
                (self.host, vm, kind, redact_text(detail), healthy, term),
            )
            conn.execute(
                "DELETE FROM vm_history WHERE vm = %s AND id NOT IN"
                " (SELECT id FROM vm_history WHERE vm = %s ORDER BY id DESC LIMIT %s)",
                (vm, vm, VM_HISTORY_KEPT),
            )

    def vm_history(self, vm: str, limit: int = VM_HISTORY_KEPT) -> list[VMHistoryEntry]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT vm, at, kind, detail, healthy, term FROM vm_history WHERE vm = %s"
                " ORDER BY id DESC LIMIT %s",
                (vm, limit),
            ).fetchall()
        return [history_from_row(r) for r in rows]

    def rollouts(self) -> dict[str, RolloutState]:
        with self._session("read") as conn:
            rows = conn.execute("SELECT workload, state FROM rollouts").fetchall()
        return {str(r[0]): RolloutState.from_json(str(r[1])) for r in rows}

    def put_rollout(self, state: RolloutState) -> None:
        with self._write(bump=False) as conn:
            conn.execute(
                "INSERT INTO rollouts VALUES (%s, %s, %s) ON CONFLICT (workload)"
                " DO UPDATE SET state = EXCLUDED.state, term = EXCLUDED.term",
                (state.workload, state.to_json(), self.fence.term if self.fence else None),
            )

    def switch_rollout(self, switch: RolloutSwitch) -> None:
        with self._write(fenced=False, bump=False) as conn:
            conn.execute(
                "INSERT INTO rollout_switches VALUES (%s, %s, %s, %s) ON CONFLICT (workload)"
                " DO UPDATE SET command = EXCLUDED.command, version = EXCLUDED.version,"
                " at = EXCLUDED.at",
                (switch.workload, switch.command.value, switch.version, switch.at),
            )
            self._insert_event(
                conn, f"rollout-{switch.command.value}", switch.workload, "by the operator"
            )

    def rollout_switches(self) -> dict[str, RolloutSwitch]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT workload, command, version, at FROM rollout_switches"
            ).fetchall()
        return {
            str(r[0]): RolloutSwitch(str(r[0]), RolloutCommand(r[1]), str(r[2]), float(r[3]))
            for r in rows
        }

    # -- fleet state -----------------------------------------------------------------------------

    def version(self) -> int:
        with self._session("read") as conn:
            row = conn.execute(_VERSION, {"host": self.host}).fetchone()
        return int(row[0]) if row else 0

    def observed(self) -> ObservedFleet:
        with self._session("read") as conn:
            rows = conn.execute(_OBSERVED, {"host": self.host}).fetchall()
        version, applied = int(rows[0][0]), rows[0][1]
        vms = {str(row[2]): vm_from_row(row[2:]) for row in rows if row[2] is not None}
        return ObservedFleet(
            version=version, vms=vms, applied_revision=None if applied is None else str(applied)
        )

    def put_vm(self, vm: ObservedVM) -> None:
        with self._write() as conn:
            conn.execute(
                _PUT_VM,
                {
                    "host": self.host,
                    "name": vm.name,
                    "fleet": vm.fleet,
                    "workload": vm.workload,
                    "runtime": vm.runtime.value,
                    "target": vm.target.value,
                    "digest": vm.artifact_digest,
                    "inputs": json.dumps(dict(vm.artifact_inputs), sort_keys=True),
                    "settings": json.dumps(dict(vm.settings), sort_keys=True),
                    "state": vm.state.value,
                    "healthy": vm.healthy,
                    "pid": vm.pid,
                    "address": vm.address,
                    "detail": vm.detail,
                    "started_at": vm.started_at,
                    "restarts": vm.restarts,
                },
            )

    def remove_vm(self, name: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM vms WHERE host = %s AND name = %s", (self.host, name))

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        if outcome not in ("applied", "failed"):
            raise ValueError(f"outcome must be 'applied' or 'failed', not {outcome!r}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO revisions (revision, outcome, message, host, term, at)"
                f" VALUES (%s, %s, %s, %s, %s, {_NOW})",
                # Messages quote git remotes; credentials in them are never stored.
                (revision, outcome, redact_text(message), self.host, self._term()),
            )

    def _last_revision(self, *, applied_only: bool) -> RevisionRecord | None:
        with self._session("read") as conn:
            row = conn.execute(_LAST_REVISION, {"applied_only": applied_only}).fetchone()
        return RevisionRecord(str(row[0]), str(row[1]), str(row[2]), float(row[3])) if row else None

    def applied_revision(self) -> RevisionRecord | None:
        return self._last_revision(applied_only=True)

    def attempted_revision(self) -> RevisionRecord | None:
        return self._last_revision(applied_only=False)

    def revisions(self, limit: int = 50) -> list[RevisionRecord]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT revision, outcome, message, at FROM revisions ORDER BY id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return [RevisionRecord(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    def record_artifacts(self, revision: str, artifacts: Mapping[str, Sequence[str]]) -> None:
        with self._write(bump=False) as conn:
            for workload, digests in artifacts.items():
                conn.execute(
                    "INSERT INTO revision_artifacts VALUES"
                    f" (%s, %s, %s, %s, {_NOW}) ON CONFLICT (revision, workload) DO UPDATE"
                    " SET digests = EXCLUDED.digests, host = EXCLUDED.host, at = EXCLUDED.at",
                    (revision, workload, json.dumps(sorted(set(digests))), self.host),
                )

    def revision_artifacts(self, revision: str) -> dict[str, tuple[str, ...]]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT workload, digests FROM revision_artifacts WHERE revision = %s", (revision,)
            ).fetchall()
        return {str(r[0]): tuple(json.loads(str(r[1]))) for r in rows}

    def begin_intent(self, vm: str, action: str) -> int:
        with self._write() as conn:
            row = conn.execute(
                "INSERT INTO intents (host, vm, action, term, started_at)"
                f" VALUES (%s, %s, %s, %s, {_NOW}) RETURNING id",
                (self.host, vm, action, self._term()),
            ).fetchone()
        return int(row[0]) if row else 0

    def complete_intent(self, intent: int, outcome: str = "done") -> None:
        with self._write() as conn:
            conn.execute(
                f"UPDATE intents SET completed_at = {_NOW}, outcome = %s"
                " WHERE id = %s AND host = %s",
                (outcome, intent, self.host),
            )

    def open_intents(self) -> list[Intent]:
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT id, vm, action, started_at FROM intents"
                " WHERE host = %s AND completed_at IS NULL ORDER BY id",
                (self.host,),
            ).fetchall()
        return [Intent(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    # -- the notification outbox (the leader's: fenced, never bumps the version) -------------

    def enqueue(self, messages: Sequence[OutboxMessage]) -> int:
        if not messages:
            return 0
        # The caller's clock, as due_messages(now) is asked in it.
        now = time.time()
        with self._write(bump=False) as conn:
            cursor = conn.execute(
                "INSERT INTO outbox (key, destination, kind, body, created_at, next_attempt_at)"
                " SELECT key, destination, kind, body, %(now)s, %(now)s"
                " FROM unnest(%(keys)s::text[], %(destinations)s::text[], %(kinds)s::text[],"
                "             %(bodies)s::text[]) WITH ORDINALITY"
                "      AS m(key, destination, kind, body, n)"
                " ORDER BY n ON CONFLICT (key) DO NOTHING",
                {
                    "now": now,
                    "keys": [m.key for m in messages],
                    "destinations": [m.destination for m in messages],
                    "kinds": [m.kind for m in messages],
                    "bodies": [m.body for m in messages],
                },
            )
            return max(0, cursor.rowcount)

    def due_messages(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        with self._session("read") as conn:
            rows = conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM ("
                "  SELECT DISTINCT ON (destination) * FROM outbox WHERE state = 'pending'"
                "  ORDER BY destination, id"
                ") AS oldest WHERE next_attempt_at <= %s ORDER BY id LIMIT %s",
                (now, limit),
            ).fetchall()
        return [outbox_entry_from_row(row) for row in rows]

    def settle_message(
        self, entry: int, *, delivered: bool, error: str = "", retry_at: float | None = None
    ) -> None:
        with self._write(bump=False) as conn:
            if delivered:
                conn.execute(
                    "UPDATE outbox SET state = 'delivered' WHERE id = %s AND state = 'pending'",
                    (entry,),
                )
            else:
                conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = %s, state = %s,"
                    " next_attempt_at = coalesce(%s, next_attempt_at)"
                    " WHERE id = %s AND state = 'pending'",
                    (
                        redact_text(error),
                        "pending" if retry_at is not None else "abandoned",
                        retry_at,
                        entry,
                    ),
                )
            # Settled messages are kept for their keys (deduplication) and the operator's
            # history, the newest of them only.
            conn.execute(
                "DELETE FROM outbox WHERE state <> 'pending'"
                " AND id <= (SELECT max(id) FROM outbox) - %s",
                (_OUTBOX_KEPT,),
            )

    def outbox(self, limit: int = 50) -> list[OutboxEntry]:
        with self._session("read") as conn:
            rows = conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox ORDER BY id DESC LIMIT %s", (limit,)
            ).fetchall()
        return [outbox_entry_from_row(row) for row in rows]

    # -- placement (filled by the leader of a fleet of hosts) --------------------------------

    def assign(self, vm: str, host: str, revision: str = "") -> None:
        """Place ``vm`` on ``host``, running ``revision``'s definition of it, under the leader's
        term (fenced; the term is recorded)."""
        with self._write() as conn:
            conn.execute(_ASSIGN, (vm, host, self._term(), revision))

    def confirm_assignments(self, kept: Mapping[str, tuple[str, str]]) -> None:
        """Rewrite every assignment of ``kept`` (VM -> (host, revision)) with the leader's term
        and mark the term's placement confirmed, in one transaction: until then a host's agent
        leaves what it runs as it runs (``placement_terms``)."""
        with self._write() as conn:
            term = self._term()
            for vm, (host, revision) in sorted(kept.items()):
                conn.execute(_ASSIGN, (vm, host, term, revision))
            conn.execute("UPDATE fleet_term SET placed_term = %s", (term or 0,))

    def unassign(self, vm: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM assignments WHERE vm = %s", (vm,))

    def assignments(self) -> dict[str, Assignment]:
        """Every placed VM: its host, the revision it runs and the term that placed it."""
        with self._session("read") as conn:
            rows = conn.execute(
                "SELECT vm, host, revision, term FROM assignments ORDER BY vm"
            ).fetchall()
        return {str(r[0]): Assignment(str(r[1]), str(r[2]), int(r[3])) for r in rows}

    def placement_terms(self) -> tuple[int, int]:
        """The fleet's newest term, and the newest term whose leader confirmed the assignments
        (``confirm_assignments``); an agent acts on assignments only when both agree."""
        with self._session("read") as conn:
            row = conn.execute("SELECT term, placed_term FROM fleet_term").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def fleet_observed(self) -> dict[str, ObservedFleet]:
        """What every host reports it runs, by host (each with its own version), in one
        snapshot; the leader's view of a fleet of hosts."""
        with self._session("read") as conn:
            rows = conn.execute(_FLEET_OBSERVED).fetchall()
        heads: dict[str, tuple[int, str | None]] = {}
        vms: dict[str, dict[str, ObservedVM]] = {}
        for row in rows:
            host = str(row[0])
            heads[host] = (int(row[1]), None if row[2] is None else str(row[2]))
            found = vms.setdefault(host, {})
            if row[3] is not None:
                found[str(row[3])] = vm_from_row(row[3:])
        return {
            host: ObservedFleet(version=version, vms=vms[host], applied_revision=applied)
            for host, (version, applied) in heads.items()
        }

    def fleet_digest_key(self, candidate: bytes) -> bytes:
        """The fleet's secret digest key (``reconciler.secrets.keys``): ``candidate`` when no
        host stored one yet, else the one stored first; every host digests under the same key.
        Two statements, not one: the read must see a row a concurrent first writer committed
        while the insert waited on it. Not fenced: any host may be the first to load a secret."""
        with self._session("read the digest key from") as conn:
            conn.execute(
                "INSERT INTO fleet_digest_key (key) VALUES (%s) ON CONFLICT (id) DO NOTHING",
                (candidate,),
            )
            row = conn.execute("SELECT key FROM fleet_digest_key").fetchone()
        return bytes(row[0]) if row else b""

    def end_epoch(self, host: str, epoch: int) -> bool:
        """End ``host``'s registration ``epoch`` (the leader declared it lost; fenced by the
        leader's term): its next heartbeat is refused, which tells its agent to stop what it
        runs before it registers anew. False when that epoch had already ended or passed."""
        with self._write(bump=False) as conn:
            cursor = conn.execute(
                "UPDATE hosts SET ended = true WHERE name = %s AND epoch = %s AND NOT ended",
                (host, epoch),
            )
            ended = cursor.rowcount == 1
            if ended:
                self._insert_event(conn, "host-lost", host, f"epoch {epoch} ended by the leader")
        return ended

    def claim_epoch(self, fence: Fence) -> None:
        """Fence this handle's writes of VMs and intents by its host's registration epoch
        (``fence.term``): each is refused, inside its transaction, unless that epoch is still
        the host's and not ended, with the hosts row locked ``FOR SHARE`` so that an
        ``end_epoch`` waits for the write in flight and every later write sees it. The agent
        of a host's daemon writes through such a handle (``daemon.agent``)."""
        fence.check("claiming the host's epoch")
        self.epoch_fence = fence

    def release_epoch(self) -> None:
        self.epoch_fence = None

    def _check_epoch(self, conn: Connection, fence: Fence, what: str) -> None:
        row = conn.execute(
            "SELECT epoch, ended FROM hosts WHERE name = %s FOR SHARE", (self.host,)
        ).fetchone()
        if row is None:
            fence.refuse(what, f"host {self.host} is not registered")
            return
        epoch, ended = int(row[0]), bool(row[1])
        if epoch != fence.term:
            fence.refuse(what, f"epoch {fence.term} of host {self.host} ended, epoch {epoch} is on")
        if ended:
            fence.refuse(what, f"epoch {epoch} of host {self.host} was ended by the leader")

    # -- the host registry (each host's own rows, and the operator's flags: never fenced) ---

    def register_host(self, host: HostRegistration) -> int:
        """Register ``host`` anew with its facts, keeping the operator's cordon and drain
        flags; returns its new epoch, one above its last (1 for a new host)."""
        with self._write(fenced=False, bump=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SLOT_LOCK_KEY,))
            row = conn.execute(
                _REGISTER_HOST,
                {
                    "name": host.name,
                    "vcpus": host.vcpus,
                    "memory": host.memory_mib,
                    "disk": host.disk_mib,
                    "labels": host.labels_json(),
                    "runtimes": host.runtimes_json(),
                    "kvm": host.kvm,
                    "underlay": host.underlay_address,
                },
            ).fetchone()
            epoch = _first(row)
            self._insert_event(conn, "host-registered", host.name, f"epoch {epoch}")
        return epoch

    def heartbeat(self, host: str, epoch: int) -> bool:
        """Say ``host`` is alive in ``epoch``; False when that is no longer its epoch (it
        registered again since, elsewhere or in another process, or the leader declared it
        lost with ``end_epoch``): its registration ended."""
        with self._write(fenced=False, bump=False) as conn:
            cursor = conn.execute(
                f"UPDATE hosts SET heartbeat_at = {_NOW}"
                " WHERE name = %s AND epoch = %s AND NOT ended",
                (host, epoch),
            )
            return cursor.rowcount == 1

    def hosts(self) -> list[HostRecord]:
        """Every registered host, by name, with its heartbeat's age by the database clock and
        the number of VMs the assignments place on it."""
        with self._session("read") as conn:
            rows = conn.execute(_HOSTS).fetchall()
        return [host_from_row(row) for row in rows]

    def set_host_flag(
        self, name: str, *, cordoned: bool | None = None, draining: bool | None = None
    ) -> None:
        """Set the operator's switches of host ``name`` (None: unchanged); ``ConfigError`` for
        a host that never registered."""
        with self._write(fenced=False, bump=False) as conn:
            cursor = conn.execute(
                "UPDATE hosts SET cordoned = coalesce(%s, cordoned),"
                " draining = coalesce(%s, draining) WHERE name = %s",
                (cordoned, draining, name),
            )
            if cursor.rowcount == 0:
                raise ConfigError(
                    f"no host {name!r} in the registry at {self.where}; "
                    "`reconciler hosts` lists the registered hosts"
                )
            changes = [
                f"{flag}={value}".lower()
                for flag, value in (("cordoned", cordoned), ("draining", draining))
                if value is not None
            ]
            self._insert_event(conn, "host-flags", name, ", ".join(changes) + " by the operator")

    def _term(self) -> int | None:
        return self.fence.term if self.fence is not None else None

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _first(row: TupleRow | None) -> int:
    return int(row[0]) if row and row[0] is not None else 0


def _lease_in_same_database(params: dict[str, Any], lease: LeaseBinding | None) -> str | None:
    """The lease row's name when the lease lives in the store's database, else ``None`` (a
    file lease, or a lease in another database: then the term alone fences)."""
    if lease is None:
        return None
    try:
        other = conninfo_to_dict(lease.url)
    except psycopg.Error:
        return None  # the lease itself reports its bad URL
    keys = ("host", "hostaddr", "port", "dbname")
    return lease.name if all(params.get(k) == other.get(k) for k in keys) else None


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "PostgresStateStore"]
