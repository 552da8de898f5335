"""The PostgreSQL lease: leader election between replicas on several hosts, with psycopg 3.

    Elector ──▶ PostgresLease ──one statement per call──▶ table reconciler_leases (one row a name)
                              ──LISTEN reconciler_lease──▶ wakes followers when a leader lets go

The backend of the ``Lease`` Protocol for ``--lease postgresql://...``. No home-made consensus:
the row lock of ``INSERT ... ON CONFLICT DO UPDATE`` decides who takes an expired lease, and the
same statement increments the term, so a takeover and its term are one atomic step and two
holders can never share a term. Terms only grow: a released row keeps its term, the next taker
gets ``term + 1``.

Every expiry is computed and compared by the *database* clock (``clock_timestamp()``), never by
the replicas' clocks, which may disagree with each other. The elector's own deadlines run on its
monotonic clock; as ``renew_deadline < duration``, a leader stops acting before the database lets
anybody else in.

A follower waits in :meth:`PostgresLease.wait_for_change` on a background thread that holds a
dedicated ``LISTEN`` connection; :meth:`PostgresLease.release` sends ``NOTIFY`` in the statement
that frees the row, so the follower takes over at once instead of at expiry.

Connections are autocommit with a short statement timeout, opened lazily and reopened after one
is lost. Every psycopg error becomes a ``LeadershipError`` here, with one line that names the
database (never its password) and what to check.
"""

from __future__ import annotations

import logging
import math
import re
import select
import threading
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from reconciler.errors import ConfigError, LeadershipError
from reconciler.leadership.protocol import LeaseHolder, LeaseSettings
from reconciler.lifetimes import ClosedOnExit

log = logging.getLogger("reconciler.leadership")

DEFAULT_SETTINGS = LeaseSettings()
CHANNEL = "reconciler_lease"
TABLE = "reconciler_leases"
# Serialises the CREATE TABLE of replicas starting together: concurrent CREATE TABLE IF NOT EXISTS
# can still fail on the unique index of pg_type. Any fixed key works; this one spells "reconcil".
_SCHEMA_LOCK_KEY = 0x7265636F6E63696C
# How often the listener thread looks up from its socket to see whether it should stop.
_LISTEN_POLL = 0.5

_SCHEMA: LiteralString = """
CREATE TABLE IF NOT EXISTS reconciler_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    term bigint NOT NULL,
    acquired_at timestamptz,
    renewed_at timestamptz,
    expires_at timestamptz NOT NULL
)
"""

_ACQUIRE: LiteralString = """
INSERT INTO reconciler_leases AS l (name, holder, term, acquired_at, renewed_at, expires_at)
VALUES (%(name)s, %(holder)s, 1, clock_timestamp(), clock_timestamp(),
        clock_timestamp() + %(duration)s)
ON CONFLICT (name) DO UPDATE SET
    holder = EXCLUDED.holder,
    term = l.term + 1,
    acquired_at = EXCLUDED.acquired_at,
    renewed_at = EXCLUDED.renewed_at,
    expires_at = EXCLUDED.expires_at
WHERE l.expires_at < clock_timestamp()
RETURNING term
"""

_RENEW: LiteralString = """
UPDATE reconciler_leases
SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + %(duration)s
WHERE name = %(name)s AND holder = %(holder)s AND term = %(term)s
  AND expires_at > clock_timestamp()
RETURNING term
"""

# The NOTIFY rides in the statement that frees the row: it is delivered on commit, so a woken
# follower always sees the row free, and nobody is woken when there was nothing to release.
_RELEASE: LiteralString = """
WITH released AS (
    UPDATE reconciler_leases SET expires_at = clock_timestamp()
    WHERE name = %(name)s AND holder = %(holder)s AND term = %(term)s
      AND expires_at > clock_timestamp()
    RETURNING name
)
SELECT pg_notify('reconciler_lease', name) FROM released
"""

_CURRENT: LiteralString = """
SELECT holder, term, extract(epoch FROM expires_at - t.now)::float8
FROM reconciler_leases, clock_timestamp() AS t(now)
WHERE name = %(name)s AND expires_at > t.now
"""

_IS_FREE: LiteralString = """
SELECT NOT EXISTS (
    SELECT 1 FROM reconciler_leases WHERE name = %(name)s AND expires_at > clock_timestamp()
)
"""

Connection = psycopg.Connection[TupleRow]


class PostgresLease(ClosedOnExit):
    """``Lease`` on a row of ``reconciler_leases``; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str = "fleet",
        holder: str,
        settings: LeaseSettings = DEFAULT_SETTINGS,
        connect_timeout: float = 5.0,
    ) -> None:
        self.holder = holder
        self.name = name
        self.settings = settings.validated()
        if not connect_timeout > 0:
            raise ConfigError(f"the lease connect timeout must be positive, not {connect_timeout}")
        if not holder or not name:
            raise ConfigError("a lease needs a non-empty name and holder")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            # libpq quotes pieces of the string it could not parse, which may be the password.
            reason = re.sub(r'"[^"]*"', '"..."', _first_line(exc))
            raise ConfigError(
                f"--lease is not a valid postgresql:// URL or libpq DSN: {reason}"
            ) from exc
        self._password = str(params.get("password") or "")
        self.where = describe_database(params)
        self._duration = timedelta(seconds=self.settings.duration)
        # A renewal must not hang past the renew deadline waiting on a lock or a sick server.
        self._statement_timeout_ms = max(
            100, int(1000 * min(connect_timeout, self.settings.renew_deadline))
        )
        self._conninfo = make_conninfo(
            dsn,
            **_connect_defaults(
                params, holder=holder, connect_timeout=connect_timeout, settings=self.settings
            ),
        )
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._schema_ready = False
        self._held_term: int | None = None  # released by close(), as FileLease does
        self._changed = threading.Event()
        # Separate from _lock, so that a follower never queues behind a slow statement.
        self._listener_lock = threading.Lock()
        self._listener: _Listener | None = None
        self._closed = False

    # -- the Lease Protocol -------------------------------------------------------------------

    def try_acquire(self) -> int | None:
        rows = self._execute(
            "take",
            _ACQUIRE,
            {"name": self.name, "holder": self.holder, "duration": self._duration},
        )
        if not rows:
            return None
        term = int(rows[0][0])
        self._held_term = term
        return term

    def renew(self, term: int) -> bool:
        rows = self._execute(
            "renew",
            _RENEW,
            {"name": self.name, "holder": self.holder, "term": term, "duration": self._duration},
            term=term,
        )
        if not rows and self._held_term == term:
            self._held_term = None
        return bool(rows)

    def release(self, term: int) -> None:
        if self._held_term == term:
            self._held_term = None
        self._execute(
            "release",
            _RELEASE,
            {"name": self.name, "holder": self.holder, "term": term},
            term=term,
        )

    def current(self) -> LeaseHolder | None:
        rows = self._execute("read", _CURRENT, {"name": self.name})
        if not rows:
            return None
        holder, term, expires_in = rows[0]
        return LeaseHolder(str(holder), int(term), max(0.0, float(expires_in)))

    def wait_for_change(self, timeout: float) -> None:
        """Wait for a NOTIFY about this lease (or, when the listener has just connected, for the
        lease to be free already), at most ``timeout`` seconds whatever the state of the database:
        connecting and listening happen on a background thread, so an unreachable server costs
        the follower nothing but the timeout. Never raises; a database that is down shows up in
        the next ``try_acquire``."""
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = _Listener(self, self._changed)
                self._listener.start()
        self._changed.wait(max(0.0, timeout))
        # Clearing after the wait loses nothing: the caller reads the lease right after.
        self._changed.clear()

    def close(self) -> None:
        held, self._held_term = self._held_term, None
        if held is not None:
            try:
                self.release(held)
            except LeadershipError as err:
                log.debug("releasing the lease on close: %s", err)
        with self._listener_lock:
            self._closed = True
            listener, self._listener = self._listener, None
        with self._lock:
            conn, self._conn = self._conn, None
        if listener is not None:
            listener.stop()
        if conn is not None:
            conn.close()

    # -- connections ----------------------------------------------------------------------------

    def _execute(
        self, verb: str, query: LiteralString, params: dict[str, Any], *, term: int | None = None
    ) -> list[TupleRow]:
        what = f"{verb} the lease {self.name!r}" + (f" of term {term}" if term is not None else "")
        with self._lock:
            if self._closed:
                raise LeadershipError(f"cannot {what}: it was closed")
            conn = self._connection()
            try:
                cursor = conn.execute(query, params)
                return cursor.fetchall() if cursor.description else []
            except psycopg.Error as exc:
                if isinstance(exc, pg_errors.UndefinedTable):
                    self._schema_ready = False  # dropped under us: create it again next time
                if conn.closed or conn.broken:
                    self._drop_connection()
                raise LeadershipError(
                    f"cannot {what} in the lease database at {self.where}: "
                    f"{self.reason(exc)}; check that the database is up and healthy"
                ) from exc

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and _is_idle_and_alive(conn):
            return conn
        self._drop_connection()
        conn = self.connect()
        try:
            if not self._schema_ready:
                self._create_schema(conn)
                self._schema_ready = True
        except psycopg.Error as exc:
            conn.close()
            raise LeadershipError(
                f"cannot create table {TABLE} in the lease database at {self.where}: "
                f"{self.reason(exc)}; create it as its owner, or grant CREATE on the schema"
            ) from exc
        self._conn = conn
        return conn

    def connect(self) -> Connection:
        """A new autocommit connection with the lease's timeouts (also used by the listener)."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise LeadershipError(
                f"cannot reach the lease database at {self.where}: {self.reason(exc)}; "
                "check --lease"
            ) from exc
        try:
            timeout = f"{self._statement_timeout_ms}ms"
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false)",
                (timeout, timeout),
            )
        except psycopg.Error as exc:
            conn.close()
            raise LeadershipError(
                f"cannot set up a session in the lease database at {self.where}: "
                f"{self.reason(exc)}; check --lease"
            ) from exc
        return conn

    def _create_schema(self, conn: Connection) -> None:
        exists = conn.execute("SELECT to_regclass('reconciler_leases') IS NOT NULL").fetchone()
        if exists and exists[0]:
            return  # also lets a role without CREATE use a table made by its owner
        with conn.transaction():
            # Creating a table can queue behind other DDL; the lease timeout is too tight for it.
            conn.execute(
                "SELECT set_config('statement_timeout', '30s', true),"
                " set_config('lock_timeout', '30s', true)"
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            conn.execute(_SCHEMA)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def reason(self, exc: BaseException) -> str:
        """The useful part of a psycopg error, on one line and without the DSN's password."""
        return error_reason(exc, password=self._password)


class _Listener:
    """The follower's dedicated LISTEN connection, on a daemon thread that sets ``changed`` on
    every NOTIFY about the lease, and reconnects when the connection is lost."""

    def __init__(self, lease: PostgresLease, changed: threading.Event) -> None:
        self._lease = lease
        self._changed = changed
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-listener-{lease.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=_LISTEN_POLL + 1.0)

    def _run(self) -> None:
        lease = self._lease
        while not self._stop.is_set():
            try:
                conn = lease.connect()
            except LeadershipError as err:
                log.debug("lease listener: %s", err)
                self._stop.wait(lease.settings.retry)
                continue
            try:
                self._listen(conn)
            except psycopg.Error as exc:
                log.debug("lease listener lost its connection: %s", lease.reason(exc))
                self._stop.wait(lease.settings.retry)
            finally:
                conn.close()

    def _listen(self, conn: Connection) -> None:
        lease = self._lease
        conn.execute(f"LISTEN {CHANNEL}")
        # Whatever was notified before LISTEN is lost; if the lease became free meanwhile, say so
        # now. psycopg keeps notifies that arrive during this query for the loop below.
        try:
            row = conn.execute(_IS_FREE, {"name": lease.name}).fetchone()
            free = bool(row and row[0])
        except pg_errors.UndefinedTable:
            free = True  # nobody created the table yet, so nobody holds the lease
        if free:
            self._changed.set()
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=_LISTEN_POLL):
                if notify.payload == lease.name:
                    self._changed.set()


def _is_idle_and_alive(conn: Connection) -> bool:
    """Whether an idle connection still looks usable, without a round trip.

    An idle autocommit session has nothing to say unless the server is hanging up: a terminated
    backend or a restarting server sends its FATAL message and closes the socket. Noticing that
    before sending spares the caller an error after every database restart (a renewal that fails
    for nothing). Anything else unsolicited is rare enough that reconnecting is the simple answer.
    """
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def error_reason(exc: BaseException, *, password: str) -> str:
    """The useful part of a psycopg error, on one line and without ``password`` (the DSN's)."""
    text = _first_line(exc)
    # Connection errors repeat where they went ("connection to server at ... failed: ");
    # our message already says that.
    text = re.sub(r"^connection (?:failed|is bad): ", "", text)
    text = re.sub(r"^connection to server .*? failed: ", "", text)
    text = re.sub(r"^(?:FATAL|ERROR):\s+", "", text)
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    if password:
        text = text.replace(password, "***")
    return text or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_database(params: dict[str, Any]) -> str:
    """Where the DSN points, for messages: host, port, database and user, never the password."""
    keys = ("host", "hostaddr", "port", "dbname", "user")
    parts = [f"{key}={params[key]}" for key in keys if params.get(key)]
    return " ".join(parts) if parts else "the default server (libpq environment)"


def _connect_defaults(
    params: dict[str, Any], *, holder: str, connect_timeout: float, settings: LeaseSettings
) -> dict[str, str | int]:
    # Only fill in what the operator's DSN leaves open.
    defaults: dict[str, str | int] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq's minimum is 2 s
        "application_name": f"reconciler lease {holder}"[:63],
        # Over TCP, notice a peer that vanished without a word (a dead host, a dropped route)
        # instead of waiting on the socket forever; libpq ignores these on a Unix socket.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": int(1000 * settings.renew_deadline),
    }
    return {key: value for key, value in defaults.items() if key not in params}
