"""What the daemon shows and accepts over HTTP: the seam between the loop and the web layer.

    Daemon (reconciler.daemon.loop) ──implements──▶ DaemonView ◀──reads── http_api, status page

The HTTP layer knows nothing of git, runtimes or the lease; it calls these methods. Tests give
it an in-memory view.
"""

from __future__ import annotations

from typing import Any, Protocol


class DaemonView(Protocol):
    def status(self) -> dict[str, Any]:
        """JSON-ready status: the keys of ``reconciler status --format json``
        (``applied_revision``, ``attempted_revision``, ``last_error``, ``vms``: a list of
        ``{name, workload, state, healthy, address, pid, artifact, runtime, detail,
        uptime_seconds, restarts}``) plus ``fleet`` (its name), ``leader``: ``{is_leader,
        term, holder}``, ``daemon``: ``{id, started_at, last_error, last_outcome,
        last_cycle_at, head, converged_to, backoff_until, repo, poll_interval}`` and
        ``suspended``: ``{fleet: bool, workloads: [str]}``."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Ready to serve (``/readyz``): the state store answers and the first cycle ran (or
        this replica is a follower that is watching the lease); the reason when not."""
        ...

    def events(self, limit: int) -> list[dict[str, Any]]:
        """The newest events, newest first: ``{id, at, kind, subject, message, term}``."""
        ...

    def request_reconcile(self, reason: str) -> None:
        """Reconcile as soon as possible (webhook, ``reconciler reconcile --now``); returns at
        once. A follower raises ``LeadershipError`` naming the leader."""
        ...

    def suspend(self, workload: str | None, reason: str) -> None:
        """Suspend one workload, or the whole fleet when ``workload`` is None."""
        ...

    def resume(self, workload: str | None) -> None: ...
