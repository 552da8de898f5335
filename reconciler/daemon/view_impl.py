"""The daemon's ``DaemonView``: what the HTTP threads read of the loop, and what they may ask.

    daemon.loop (worker thread) ──writes──▶ LoopState ◀──reads── LoopView (HTTP threads)
    LoopView ──its own store connection per call──▶ StateStore (observed VMs, revisions, events)

The view never touches runtimes or git and never writes what the worker owns: it opens a state
store connection of its own per request (a store connection is not shared between threads),
reads what the worker last recorded in ``LoopState``, and asks for a cycle through the trigger
queue. Suspending and resuming write the store directly, as ``reconciler suspend`` does; the
worker reads suspensions every cycle.

With a store that keeps a host registry, ``status`` and ``hosts`` add the host dimension
(``execution.host_status``), and the loop refreshes the per-host gauges after each cycle
(``refresh_host_metrics``) with the same grace period its placement uses.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

from reconciler.daemon.cycle import CycleResult, ReconcileCycle
from reconciler.daemon.metrics import DaemonMetrics, host_gauges
from reconciler.daemon.redaction import Redactor, env_values
from reconciler.daemon.settings import DaemonSettings
from reconciler.daemon.triggers import TriggerQueue
from reconciler.daemon.view import (
    DaemonInfo,
    DaemonStatus,
    EventEntry,
    HostsAnswer,
    LeaderStatus,
)
from reconciler.errors import LeadershipError, ReconcilerError
from reconciler.execution.host_status import (
    FleetHosts,
    Judge,
    fleet_hosts,
    registry_of,
    vm_statuses,
)
from reconciler.execution.status import VMDescription, describe_vm, fleet_status
from reconciler.fleet_hosts import placement_hosts
from reconciler.leadership.elector import Elector
from reconciler.leadership.fence import Fence
from reconciler.model import ObservedFleet
from reconciler.source import Source
from reconciler.state import StateStore, open_state_store
from reconciler.state.location import SQLITE


@dataclass
class LoopState:
    """What the worker learns as it goes; written by the worker only, read by the view."""

    started_at: float
    claimed: Fence | None = None  # the term this replica claimed the store for, while it leads
    last_result: CycleResult | None = None
    last_error: str | None = None
    last_cycle_at: float | None = None


def remember_secrets(redactor: Redactor, observed: ObservedFleet) -> None:
    """Teach ``redactor`` the env values of what runs, so no answer or log line shows them."""
    for vm in observed.vms.values():
        redactor.remember(env_values(vm.settings))


def judge(grace: float) -> Judge:
    """Registry records as the daemon's placement sees them: lost after ``grace`` seconds."""
    return lambda records: placement_hosts(records, grace)


def read_fleet_hosts(
    store: StateStore,
    grace: float,
    redactor: Redactor,
    local: tuple[str, ObservedFleet] | None = None,
) -> FleetHosts | None:
    """The fleet's hosts and what they run, when ``store`` keeps a host registry; the redactor
    learns the env values of every host's VMs, not only this one's."""
    registry = registry_of(store)
    if registry is None:
        return None
    fleet = fleet_hosts(registry, judge(grace), local=local)
    for _, vm in fleet.vms:
        redactor.remember(env_values(vm.settings))
    return fleet


def refresh_host_metrics(
    metrics: DaemonMetrics, store: StateStore, grace: float, redactor: Redactor
) -> None:
    """The per-host gauges, from the registry (none for a store without one); hosts that left
    the registry leave the gauges."""
    fleet = read_fleet_hosts(store, grace, redactor)
    if fleet is None:
        return
    metrics.set_hosts(host_gauges(fleet.hosts))


@dataclass
class LoopView:
    """The ``DaemonView`` of one daemon replica."""

    settings: DaemonSettings
    state: LoopState
    elector: Elector
    cycle: ReconcileCycle
    source: Source
    queue: TriggerQueue
    redactor: Redactor

    @contextmanager
    def _reader(self) -> Iterator[StateStore]:
        with closing(open_state_store(self.settings.store_location())) as store:
            yield store

    def _leader(self) -> LeaderStatus:
        fence = self.elector.fence
        is_leader = fence is not None and fence.valid
        holder = self.elector.holder
        me = self.settings.lease.identity
        return {
            "is_leader": is_leader,
            "term": fence.term if is_leader and fence else (holder.term if holder else 0),
            "holder": me if is_leader else (holder.holder if holder else ""),
            "me": me,
            "lease": self.settings.lease.kind,
            "lease_error": self.elector.last_error,
        }

    def _daemon(self) -> DaemonInfo:
        result, backoff = self.state.last_result, self.cycle.backoff
        return {
            "id": self.settings.lease.identity,
            "started_at": self.state.started_at,
            "last_error": self.state.last_error,
            "last_outcome": str(result.outcome) if result else None,
            "last_cycle_at": self.state.last_cycle_at,
            "head": result.head if result else None,
            "converged_to": result.converged_to if result else None,
            "backoff_until": backoff.retry_at(backoff.revision or "") or None,
            "repo": self.redactor.text(self.source.describe()),
            "poll_interval": self.settings.polling.interval,
        }

    def status(self) -> DaemonStatus:
        with self._reader() as store:
            observed = store.observed()
            remember_secrets(self.redactor, observed)
            fleet = fleet_status(
                observed,
                store.applied_revision(),
                store.attempted_revision(),
                store.suspensions(),
                state_dir=self.settings.state_dir,
                rollouts=store.rollouts(),
                pins=store.pins(),
            )
            hosts = read_fleet_hosts(
                store, self.settings.hosts.grace, self.redactor, (self._host, observed)
            )
        if hosts is not None:
            # A fleet across hosts: every live host's VMs, each with its host.
            fleet["vms"] = vm_statuses(
                hosts, time.time(), local=self._host, state_dir=self.settings.state_dir
            )
            fleet["hosts"] = hosts.hosts
        return {
            **fleet,
            "fleet": self.cycle.fleet_name,
            "leader": self._leader(),
            "daemon": self._daemon(),
        }

    @property
    def _host(self) -> str:
        return self.settings.hosts.name

    def hosts(self) -> HostsAnswer | None:
        if self.settings.store_location().kind == SQLITE:
            return None  # one host, no registry: asked at every scrape, so no store is opened
        grace = self.settings.hosts.grace
        with self._reader() as store:
            hosts = read_fleet_hosts(store, grace, self.redactor)
        return None if hosts is None else {"grace_seconds": grace, "hosts": hosts.hosts}

    def describe_vm(self, name: str) -> VMDescription:
        """One VM whole, read from the store, its console and the artifact cache; its manifest
        from the desired fleet the worker loaded last (whose trees are exported already, so
        this thread never runs git)."""
        loaded = self.cycle.last_loaded
        with self._reader() as store:
            desired = loaded[1] if loaded is not None else None
            root = None
            if loaded is not None:
                workload = store.observed().vms.get(name)
                pins = store.pins()
                pin = pins.get(workload.workload) if workload is not None else None
                revision = pin.revision if pin is not None else loaded[0]
                root = self.source.checkout(revision) / self.settings.source.path
            return describe_vm(
                store,
                name,
                state_dir=self.settings.state_dir,
                cache_dir=self.cycle.cache_dir,
                host=socket.gethostname(),
                desired=desired,
                manifest_root=root,
            )

    def ready(self) -> tuple[bool, str]:
        try:
            with self._reader() as store:
                store.version()
        except ReconcilerError as err:
            return False, str(err)
        if self.elector.last_error:
            return False, self.elector.last_error
        claimed = self.state.claimed
        if claimed is not None:
            if self.state.last_cycle_at is None:
                return False, "leading; the first cycle has not finished"
            return True, f"leading with term {claimed.term}"
        holder = self.elector.holder
        return True, f"following {holder.holder} (term {holder.term})" if holder else "following"

    def events(self, limit: int) -> list[EventEntry]:
        with self._reader() as store:
            return [
                {
                    "id": e.id,
                    "at": e.at,
                    "kind": e.kind,
                    "subject": e.subject,
                    "message": e.message,
                    "term": e.term,
                }
                for e in store.events(limit)
            ]

    def _require_leader(self) -> None:
        if self.state.claimed is None:
            holder = self.elector.holder
            leader = f"{holder.holder} (term {holder.term})" if holder else "unknown"
            raise LeadershipError(f"this replica does not lead; the leader is {leader}")

    def request_reconcile(self, reason: str) -> None:
        self._require_leader()
        self.queue.request(reason)

    def suspend(self, workload: str | None, reason: str) -> None:
        with self._reader() as store:
            store.suspend(workload, reason)

    def resume(self, workload: str | None) -> None:
        with self._reader() as store:
            if not store.resume(workload):
                raise ReconcilerError(f"{workload or 'the fleet'} is not suspended")
        if self.state.claimed is not None:
            self.queue.request("resumed")
