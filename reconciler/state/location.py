"""Where a command's state store is, and ``open_state_store``, the one way to open it.

    cli (--state-dir, --store / $RECONCILER_STORE) ─┐
    daemon settings (+ the lease it elects with) ───┴─▶ StoreLocation ──open_state_store──▶
                                            SQLite in the state directory | PostgreSQL

Without a store URL the store is SQLite in the state directory: the embedded default, nothing
to start. A ``postgresql://`` URL (or a libpq DSN) selects the PostgreSQL store, which several
daemons on different hosts share; each handle then speaks for one host (this machine's name
unless told otherwise). The URL may hold a password, so it stays out of ``repr()`` and is only
ever shown through ``reconciler.state.postgres``'s password-free description.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import ConfigError, StateError
from reconciler.state.protocol import StateStore

if TYPE_CHECKING:
    from reconciler.state.postgres import PostgresStateStore

SQLITE = "sqlite"
SQLITE_FILE = "state.db"  # the embedded store's file in the state directory


def is_postgres_url(value: str) -> bool:
    """A ``postgresql://`` URL or a libpq ``key=value`` DSN."""
    return value.startswith(("postgresql://", "postgres://")) or "=" in value


def default_host_name() -> str:
    """This machine's name: the host whose VMs a handle observes when none is given."""
    return socket.gethostname()


@dataclass(frozen=True)
class LeaseBinding:
    """The PostgreSQL lease the daemon elects with: when it lives in the store's own database,
    every fenced write also checks the lease row (holder, term, expiry) in its transaction."""

    url: str = field(repr=False)  # may hold a password
    holder: str
    name: str = "fleet"  # the lease row PostgresLease takes by default


@dataclass(frozen=True)
class StoreLocation:
    state_dir: Path
    url: str | None = field(default=None, repr=False)  # None (or "sqlite"): SQLite
    host: str = field(default_factory=default_host_name)
    lease: LeaseBinding | None = None

    @property
    def kind(self) -> str:
        return SQLITE if self.url in (None, SQLITE) else "postgresql"

    def validated(self) -> StoreLocation:
        if self.url not in (None, SQLITE) and not is_postgres_url(self.url or ""):
            raise ConfigError(
                "--store must be 'sqlite' or a postgresql:// URL (or a libpq DSN), "
                f"not {self.url!r}"
            )
        if not self.host:
            raise ConfigError("a state store's host name must not be empty")
        return self


def open_state_store(where: Path | StoreLocation, *, existing: bool = False) -> StateStore:
    """The state store at ``where`` (a state directory means its SQLite store); every call opens
    a handle (a connection) of its own. ``existing``: a reading command's store, which must
    already be there; a mistyped ``--state-dir`` is an error, not a new empty store."""
    location = where if isinstance(where, StoreLocation) else StoreLocation(where)
    location = location.validated()
    if location.url is None or location.url == SQLITE:
        if existing and not (location.state_dir / SQLITE_FILE).exists():
            raise StateError(
                f"no state in {location.state_dir}: no reconciler has run with this state "
                "directory; check --state-dir (or $RECONCILER_STATE_DIR)"
            )
        # Imported here too: a command that opens no store (``diff --base``) loads no driver.
        from reconciler.state.sqlite import SQLiteStateStore  # noqa: PLC0415

        return SQLiteStateStore.in_directory(location.state_dir)
    # Imported here: a host on the embedded store never loads psycopg and libpq.
    from reconciler.state.postgres import PostgresStateStore  # noqa: PLC0415

    return PostgresStateStore(location.url, host=location.host, lease=location.lease)


def open_host_registry(location: StoreLocation) -> PostgresStateStore:
    """The PostgreSQL store of ``location``, which keeps the fleet's host registry; a
    ``ConfigError`` for the embedded SQLite store, which is one host and has no registry."""
    location = location.validated()
    if location.kind == SQLITE:
        raise ConfigError(
            "hosts are registered in a shared PostgreSQL store: pass --store postgresql://... "
            "(or set $RECONCILER_STORE); the SQLite store is one host"
        )
    from reconciler.state.postgres import PostgresStateStore  # noqa: PLC0415 (as above)

    return PostgresStateStore(location.url or "", host=location.host, lease=location.lease)
