"""The daemon's settings, grouped by what they configure and validated once at start-up (a bad
value is a ``ConfigError``).

    cli (options + ``cli.environment``) ──▶ DaemonSettings ──validated()──▶ daemon.loop
        source   which repository, which ref, which keys it must be signed with
        api      where the HTTP server listens, its token, webhooks, the names it answers to
        polling  how often the repository is polled
        lease    which lease backend elects the leader, its timing, this replica's name
        store    SQLite in the state directory, or a PostgreSQL database the hosts share
        notify   the RECONCILER_NOTIFY_* URLs, where commit statuses go, delivery retries
        hosts    this host's name, labels and underlay address in the fleet's registry, how
                 often it heartbeats

Each default is written here once: the command-line options take theirs from these classes.
Secrets (the token, the webhook secret, a credential, a PostgreSQL URL with a password) stay out
of ``repr()``: settings end up in log lines and tracebacks.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.leadership import LeaseSettings
from reconciler.notify import CommitStatusTarget, RetryPolicy
from reconciler.planning.placement import label_problem
from reconciler.source.credentials import GitCredential
from reconciler.state import LeaseBinding, StoreLocation
from reconciler.state.hosts import HEARTBEAT_SECONDS, HOST_GRACE_SECONDS, grace_problem
from reconciler.state.location import default_host_name

_HOST_NAME = re.compile(r"(?i)[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_.])?")
FILE_LEASE = "file"


def default_identity() -> str:
    """A replica's name when none is given: unique per host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class SourceSettings:
    repo: str  # a local path or a git URL
    path: str = ""  # the manifests' sub-directory
    ref: str | None = None  # None: HEAD, or the remote's default branch
    credential: GitCredential | None = field(default=None, repr=False)
    trusted_keys: tuple[Path, ...] = ()  # act only on commits signed by these keys
    revoked_keys: tuple[Path, ...] = ()  # revocations of trusted keys
    allow_non_descendant: bool = False  # apply a head that does not descend from the applied
    watch: bool = True  # file watch when the repository is a local path
    age_key_file: Path | None = None  # decrypts the fleet's secrets (else the state dir's)


@dataclass(frozen=True)
class ApiSettings:
    listen: str = "127.0.0.1:9180"
    token: str | None = field(default=None, repr=False)  # None: the state directory's own
    webhook_secret: bytes | None = field(default=None, repr=False)  # None: webhooks refused
    # Names the HTTP server answers to besides IP addresses and localhost (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()

    def validated(self) -> ApiSettings:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"--listen must be HOST:PORT, not {self.listen!r}")
        for name in self.allowed_hosts:
            if not _HOST_NAME.fullmatch(name):
                raise ConfigError(f"--allowed-host must be a DNS name without a port, not {name!r}")
        return self


@dataclass(frozen=True)
class PollingSettings:
    interval: float = 30.0  # seconds between polls of the repository
    jitter: float = 5.0  # up to this much is added, so replicas do not poll in step

    def validated(self) -> PollingSettings:
        if self.interval < 1:
            raise ConfigError(f"--poll-interval must be at least 1 s, not {self.interval:g}")
        if not 0 <= self.jitter < self.interval:
            raise ConfigError(
                f"--poll-jitter must be between 0 and the poll interval ({self.interval:g} s)"
            )
        return self


@dataclass(frozen=True)
class LeaderSettings:
    # "file" or a postgresql:// URL (or a libpq DSN), which may hold a password.
    backend: str = field(default=FILE_LEASE, repr=False)
    timing: LeaseSettings = field(default_factory=LeaseSettings)
    identity: str = field(default_factory=default_identity)

    @property
    def kind(self) -> str:
        return "file" if self.backend == FILE_LEASE else "postgresql"

    def validated(self) -> LeaderSettings:
        self.timing.validated()
        is_url = self.backend.startswith(("postgresql://", "postgres://"))
        if self.backend != FILE_LEASE and not is_url and "=" not in self.backend:  # or a DSN
            raise ConfigError(
                f"--lease must be 'file' or a postgresql:// URL, not {self.backend!r}"
            )
        return self


@dataclass(frozen=True)
class NotifySettings:
    # The daemon's RECONCILER_NOTIFY_<suffix> variables by suffix, and only those: what a
    # Fleet's notifications may name as their URL (``notify.endpoints``).
    endpoints_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    commit_status: CommitStatusTarget | None = None  # None: no commit statuses
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def validated(self) -> NotifySettings:
        self.retry.validated()
        if self.commit_status is not None:
            self.commit_status.validated()
        return self


@dataclass(frozen=True)
class HostSettings:
    """This host in the fleet's registry (a PostgreSQL store only): the name it registers
    and keeps its VMs under, its labels for ``hostSelector``, and how often it heartbeats."""

    name: str = field(default_factory=default_host_name)
    labels: Mapping[str, str] = field(default_factory=dict)
    heartbeat: float = HEARTBEAT_SECONDS  # seconds between heartbeats
    grace: float = HOST_GRACE_SECONDS
    """How long the leader waits for a silent host's heartbeat before it re-places its VMs."""
    underlay_address: str | None = None
    """The IPv4 address the other hosts route this host's VM subnet via; None: the source
    address towards the database (``daemon.loop.underlay_address``)."""

    def validated(self) -> HostSettings:
        problem = grace_problem(self.grace)
        if problem is not None:
            raise ConfigError(problem)
        if self.underlay_address is not None:
            try:
                ipaddress.IPv4Address(self.underlay_address)
            except ValueError:
                raise ConfigError(
                    f"--underlay-address must be an IPv4 address, not {self.underlay_address!r}"
                ) from None
        if not _HOST_NAME.fullmatch(self.name):
            raise ConfigError(
                f"--host must be a host name (letters, digits, '-', '_', '.'), not {self.name!r}"
            )
        for key, value in self.labels.items():
            problem = label_problem(key, value)
            if problem is not None:
                raise ConfigError(f"--label: {problem}")
        if not 0 < self.heartbeat <= HOST_GRACE_SECONDS / 3:
            raise ConfigError(
                f"the heartbeat interval must be in (0, {HOST_GRACE_SECONDS / 3:g}] s (a third "
                f"of the default grace period), not {self.heartbeat:g}"
            )
        return self


@dataclass(frozen=True)
class DaemonSettings:
    source: SourceSettings
    state_dir: Path
    cache_dir: Path
    api: ApiSettings = field(default_factory=ApiSettings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    lease: LeaderSettings = field(default_factory=LeaderSettings)
    force_deletions: bool = False  # lift the Fleet's maxDeletions guard (planning.guard)
    notify: NotifySettings = field(default_factory=NotifySettings)
    store: str | None = field(default=None, repr=False)  # None: SQLite; a URL may hold a password
    hosts: HostSettings = field(default_factory=HostSettings)

    def store_location(self) -> StoreLocation:
        """The daemon's state store; with a PostgreSQL lease, bound to it, so that the store
        checks the lease row in every fenced write when both share a database."""
        lease = self.lease
        binding = (
            LeaseBinding(lease.backend, holder=lease.identity) if lease.kind != "file" else None
        )
        return StoreLocation(self.state_dir, url=self.store, host=self.hosts.name, lease=binding)

    def validated(self) -> DaemonSettings:
        self.store_location().validated()
        self.hosts.validated()
        self.lease.validated()
        self.polling.validated()
        self.api.validated()
        self.notify.validated()
        return self
