"""What the daemon shows and accepts over HTTP: the seam between the loop and the web layer.

    daemon.loop ──builds──▶ view_impl.LoopView ──implements──▶ DaemonView
                                                 ◀──reads── http_api, status page, metrics

The HTTP layer knows nothing of git, runtimes or the lease; it calls these methods. Tests give
it an in-memory view. The payloads are typed here (``DaemonStatus``, ``EventEntry``): the keys
of ``/api/status`` and ``/api/events``, which scripts and the status page read.
"""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

from reconciler.execution.status import FleetStatus, HostStatus, VMDescription


class LeaderStatus(TypedDict):
    is_leader: bool  # this replica leads
    term: int  # its term when it leads, else the leader's as far as it knows (0: none)
    holder: str  # the leading replica's identity ("" when unknown)
    me: str  # this replica's identity
    lease: str  # the lease backend: "file" or "postgresql"
    lease_error: str | None  # why the lease backend cannot be reached, when it cannot


class DaemonInfo(TypedDict):
    id: str
    started_at: float
    last_error: str | None  # of the last cycle
    last_outcome: str | None  # a cycle ``Outcome`` value
    last_cycle_at: float | None
    head: str | None  # the head the last cycle saw
    converged_to: str | None  # the revision it converged onto
    backoff_until: float | None  # when the refused head is tried again
    repo: str  # the repository, credentials masked
    poll_interval: float


class DaemonStatus(FleetStatus):
    """``GET /api/status``: ``reconciler status --format json`` and what the daemon knows.
    With a store that keeps a host registry (PostgreSQL), ``vms`` are every live host's, each
    with its ``host``, and ``hosts`` lists the hosts, as ``reconciler status --store`` does."""

    fleet: str | None  # the fleet's name, from the revision converged last
    leader: LeaderStatus
    daemon: DaemonInfo


class EventEntry(TypedDict):
    id: int
    at: float
    kind: str
    subject: str
    message: str
    term: int | None


class DaemonView(Protocol):
    def status(self) -> DaemonStatus:
        """What runs, the revisions, who leads and what the loop last did."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Ready to serve (``/readyz``): the state store answers and the first cycle ran (or
        this replica is a follower that is watching the lease); the reason when not."""
        ...

    def events(self, limit: int) -> list[EventEntry]:
        """The newest events, newest first."""
        ...

    def request_reconcile(self, reason: str) -> None:
        """Reconcile as soon as possible (webhook, ``reconciler reconcile --now``); returns at
        once. A follower raises ``LeadershipError`` naming the leader."""
        ...

    def suspend(self, workload: str | None, reason: str) -> None:
        """Suspend one workload, or the whole fleet when ``workload`` is None."""
        ...

    def resume(self, workload: str | None) -> None: ...


@runtime_checkable
class DescribesVMs(Protocol):
    """A view that can describe one VM whole (``GET /api/vms/NAME``, the page's VM panel)."""

    def describe_vm(self, name: str) -> VMDescription:
        """``reconciler describe NAME``'s data; ``ConfigError`` for an unknown VM."""
        ...


class HostsAnswer(TypedDict):
    """``GET /api/hosts``."""

    grace_seconds: float  # silent for longer than this: lost
    hosts: list[HostStatus]


@runtime_checkable
class ShowsHosts(Protocol):
    """A view that can list the fleet's hosts (``GET /api/hosts``)."""

    def hosts(self) -> HostsAnswer | None:
        """Every registered host, by name: state, VMs, allocation, heartbeat age; None when
        the state store keeps no host registry (SQLite: one host)."""
        ...
