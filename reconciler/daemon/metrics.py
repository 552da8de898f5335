"""The daemon's Prometheus metrics, served at ``GET /metrics`` by ``http_api``.

    loop (after each cycle, on leadership changes) ──DaemonMetrics.observe_*/set_*──▶ registry
    http_api ──render()──▶ Prometheus text exposition

Every instance owns its own ``CollectorRegistry`` (never prometheus_client's global one), so a
process, or a test, can hold several daemons' metrics side by side. The methods take plain values
(strings, numbers, booleans): this module knows nothing of the state store, plans or leases.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

OUTCOMES = ("applied", "no_changes", "failed", "skipped")
BUILD_RESULTS = ("built", "cached", "failed")
FLEET_LABEL = "*"  # the ``workload`` label of a fleet-wide suspension

# Cycles range from milliseconds (nothing changed) to many minutes (cold builds of images).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Phases of the commit → healthy timeline range from a millisecond (a cache hit, a plan) to
# minutes (a cold build); a process VM restarts in well under a second.
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600)


def _healthy_label(healthy: bool | None) -> str:
    if healthy is None:
        return "unknown"
    return "true" if healthy else "false"


class HostGauges(NamedTuple):
    """One host of the fleet's registry, as its ``reconciler_host_*`` gauges show it."""

    host: str
    up: bool  # not lost (cordoned and draining hosts are up)
    vms: int  # VMs it reports it runs
    heartbeat_age: float  # seconds, by the database clock
    vcpus_allocated: int
    vcpus: int
    memory_allocated_mib: int
    memory_mib: int


def host_gauges(hosts: Iterable[Mapping[str, Any]]) -> list[HostGauges]:
    """The registry's hosts, as the view reads them (``execution.status.HostStatus``), as
    their gauges."""
    return [
        HostGauges(
            host=host["name"],
            up=host["state"] != "lost",
            vms=host["vms"],
            heartbeat_age=host["heartbeat_age_seconds"],
            vcpus_allocated=host["vcpus_allocated"],
            vcpus=host["vcpus"],
            memory_allocated_mib=host["memory_allocated_mib"],
            memory_mib=host["memory_mib"],
        )
        for host in hosts
    ]


class DaemonMetrics:
    """The ``reconciler_*`` metrics of one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # set_* methods clear a metric and fill it again; the lock keeps a scrape from seeing
        # the metric half rebuilt (every VM gone for one scrape would page someone).
        self._lock = threading.Lock()
        registry = self.registry
        self._duration = Histogram(
            "reconciler_reconcile_duration_seconds",
            "Wall-clock duration of reconcile cycles, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._phases = Histogram(
            "reconciler_phase_duration_seconds",
            "Where a commit's time goes on its way to healthy VMs: trigger, fetch, load, plan, "
            "build, stop, network, vmm-start, boot, workload, probe (per VM for the last six).",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self._cycles = Counter(
            "reconciler_reconcile_total",
            "Reconcile cycles run, by outcome (applied, no_changes, failed, skipped).",
            ["outcome"],
            registry=registry,
        )
        self._applied = Gauge(
            "reconciler_applied_revision_info",
            "The revision the fleet last converged to (value 1, revision as a label).",
            ["revision"],
            registry=registry,
        )
        self._attempted = Gauge(
            "reconciler_attempted_revision_info",
            "The revision of the last reconcile attempt (value 1, revision as a label).",
            ["revision"],
            registry=registry,
        )
        self._last_error = Gauge(
            "reconciler_last_reconcile_error",
            "1 when the last reconcile cycle failed, else 0.",
            registry=registry,
        )
        self._vms = Gauge(
            "reconciler_vms",
            "Observed VMs, by state and health (true, false or unknown).",
            ["state", "healthy"],
            registry=registry,
        )
        self._builds = Counter(
            "reconciler_builds_total",
            "Artifacts needed by reconcile cycles, by result (built, cached, failed).",
            ["result"],
            registry=registry,
        )
        self._cache_hits = Counter(
            "reconciler_artifact_cache_hits_total",
            "Artifacts found in the content-addressed cache instead of being built.",
            registry=registry,
        )
        self._leader = Gauge(
            "reconciler_leader",
            "1 while this replica holds the lease and acts, else 0.",
            registry=registry,
        )
        self._term = Gauge(
            "reconciler_lease_term",
            "The lease term this replica last held or saw.",
            registry=registry,
        )
        self._fenced = Counter(
            "reconciler_fenced_writes_total",
            "State writes and runtime actions refused because their lease term was stale.",
            registry=registry,
        )
        self._suspended = Gauge(
            "reconciler_suspended",
            '1 for each suspended workload; workload="*" when the whole fleet is suspended.',
            ["workload"],
            registry=registry,
        )
        # Per host of a fleet across hosts (a PostgreSQL store's registry); set by the leader.
        self._host_gauges = {
            field: Gauge(f"reconciler_host_{name}", text, ["host"], registry=registry)
            for field, name, text in (
                ("up", "up", "1 while the host heartbeats within the grace period, 0 once lost."),
                ("vms", "vms", "VMs the host reports it runs."),
                (
                    "heartbeat_age",
                    "heartbeat_age_seconds",
                    "Seconds since the host's last heartbeat, by the database clock.",
                ),
                ("vcpus_allocated", "allocated_vcpus", "vCPUs given to the VMs the host runs."),
                ("vcpus", "capacity_vcpus", "vCPUs the host registered."),
                (
                    "memory_allocated_mib",
                    "allocated_memory_mib",
                    "MiB of memory given to the VMs the host runs.",
                ),
                ("memory_mib", "capacity_memory_mib", "MiB of memory the host registered."),
            )
        }
        # Known label values start at 0 so rate() and absent() work before the first event.
        for outcome in OUTCOMES:
            self._duration.labels(outcome=outcome)
            self._cycles.labels(outcome=outcome)
        for result in BUILD_RESULTS:
            self._builds.labels(result=result)
        self._last_error.set(0)
        self._leader.set(0)

    def observe_cycle(self, seconds: float, outcome: str) -> None:
        """One reconcile cycle finished after ``seconds`` with ``outcome``."""
        self._duration.labels(outcome=outcome).observe(max(0.0, seconds))
        self._cycles.labels(outcome=outcome).inc()

    def observe_phase(self, phase: str, seconds: float) -> None:
        """One phase of a cycle's timeline (``daemon.timeline``) took ``seconds``."""
        self._phases.labels(phase=phase).observe(max(0.0, seconds))

    def set_revisions(self, applied: str | None, attempted: str | None, failed: bool) -> None:
        """The applied and attempted revisions (only the current ones are kept) and whether the
        last cycle failed."""
        with self._lock:
            for gauge, revision in ((self._applied, applied), (self._attempted, attempted)):
                gauge.clear()
                if revision:
                    gauge.labels(revision=revision).set(1)
            self._last_error.set(1 if failed else 0)

    def set_vms(self, vms: Iterable[tuple[str, bool | None]]) -> None:
        """The observed VMs as ``(state, healthy)`` pairs; label sets no VM has any more are
        dropped rather than left at their last value."""
        counts = Tally((state, _healthy_label(healthy)) for state, healthy in vms)
        with self._lock:
            self._vms.clear()
            for (state, healthy), count in counts.items():
                self._vms.labels(state=state, healthy=healthy).set(count)

    def count_builds(self, built: int, cached: int, failed: int) -> None:
        """Artifacts of one cycle: built, found in the cache, or failed to build. A cached
        artifact is a cache hit, so it also counts in ``artifact_cache_hits_total``."""
        for result, count in (("built", built), ("cached", cached), ("failed", failed)):
            if count > 0:
                self._builds.labels(result=result).inc(count)
        if cached > 0:
            self._cache_hits.inc(cached)

    def set_leader(self, is_leader: bool, term: int) -> None:
        self._leader.set(1 if is_leader else 0)
        self._term.set(term)

    def count_fenced(self, count: int = 1) -> None:
        """A write or runtime action was refused for carrying a stale term."""
        self._fenced.inc(count)

    def set_suspended(self, fleet: bool, workloads: Iterable[str]) -> None:
        """What is suspended now; resumed workloads disappear from the metric."""
        names = sorted(set(workloads))
        with self._lock:
            self._suspended.clear()
            if fleet:
                self._suspended.labels(workload=FLEET_LABEL).set(1)
            for name in names:
                self._suspended.labels(workload=name).set(1)

    def set_hosts(self, hosts: Iterable[HostGauges]) -> None:
        """The fleet's hosts now; a host that left the registry leaves every gauge, rather than
        staying at its last value."""
        rows = list(hosts)
        with self._lock:
            for field, gauge in self._host_gauges.items():
                gauge.clear()
                for row in rows:
                    gauge.labels(host=row.host).set(float(getattr(row, field)))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        with self._lock:
            body: bytes = generate_latest(self.registry)
        return body, str(CONTENT_TYPE_LATEST)
