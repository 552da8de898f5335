"""The host dimension of the fleet's status: per host, its state, its VMs, what they were given
of its capacity and how old its heartbeat is; and each VM with the host that reports it.

    PostgreSQL store ──hosts(), fleet_observed()──▶ fleet_hosts ──▶ FleetHosts
        (judge: registry records -> HostFacts,          .hosts  HostStatus per host ─▶ status,
         lost after the grace period)                   .vms    (host, VM) pairs      /api/hosts,
                                                                                      the page,
                                                                                      metrics

Shared by ``reconciler status``, the daemon's ``/api/status``, ``/api/hosts``, status page and
per-host metrics, so they all say the same thing. Only a store with a host registry (the
PostgreSQL store, ``FleetRegistry``) has this dimension; the SQLite store is one host and its
status stays as it is.

The verdict ``lost`` is not made here: the caller passes the judge it places with
(``fleet_hosts.placement_hosts`` with its grace period), so the status never calls a host lost
that placement still counts on, or the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from reconciler.execution.launch import launch_config
from reconciler.execution.status import HostStatus, VMStatus, vm_status
from reconciler.model import ObservedFleet, ObservedVM, VMState
from reconciler.planning.placement import HostFacts
from reconciler.state.hosts import HostRecord

Judge = Callable[[Sequence[HostRecord]], list[HostFacts]]
"""Registry records as placement sees them (``fleet_hosts.placement_hosts`` and its grace)."""


@runtime_checkable
class FleetRegistry(Protocol):
    """What the host dimension reads of a store that keeps a host registry."""

    def hosts(self) -> list[HostRecord]: ...

    def fleet_observed(self) -> dict[str, ObservedFleet]: ...


def registry_of(store: object) -> FleetRegistry | None:
    """``store`` when it keeps a host registry (PostgreSQL), else None (SQLite: one host)."""
    return store if isinstance(store, FleetRegistry) else None


@dataclass(frozen=True)
class FleetHosts:
    hosts: list[HostStatus]
    """Every registered host, by name."""
    vms: list[tuple[str, ObservedVM]]
    """What the hosts that are not lost report, as (host, VM), by host then VM. A lost host's
    VMs are left out: they are being placed elsewhere, and its record of them is stale. A VM
    that two live hosts report (one woke up and has not stopped its stale copy yet) is listed
    twice, once for each host, because that is what runs."""


def allocated(vms: Iterable[ObservedVM]) -> tuple[int, int]:
    """The vCPUs and MiB of memory ``vms`` were given; a stopped VM holds neither."""
    vcpus = memory = 0
    for vm in vms:
        if vm.state is VMState.STOPPED:
            continue
        config = launch_config(vm.settings)
        vcpus += config.vcpus
        memory += config.memory_mib
    return vcpus, memory


def host_statuses(
    records: Sequence[HostRecord],
    facts: Sequence[HostFacts],
    per_host: Mapping[str, ObservedFleet],
) -> list[HostStatus]:
    """Each record's status, by name; ``facts`` are the same hosts as placement sees them."""
    state = {host.name: host.state for host in facts}
    rows: list[HostStatus] = []
    for record in sorted(records, key=lambda r: r.name):
        reported = per_host.get(record.name)
        vms = list(reported.vms.values()) if reported is not None else []
        vcpus, memory = allocated(vms)
        registered = record.registration
        rows.append(
            {
                "name": record.name,
                "state": state.get(record.name, "lost"),
                "epoch": record.epoch,
                "vms": len(vms),
                "assigned": record.vms,
                "vcpus_allocated": vcpus,
                "vcpus": registered.vcpus,
                "memory_allocated_mib": memory,
                "memory_mib": registered.memory_mib,
                "heartbeat_age_seconds": round(record.heartbeat_age, 3),
                "labels": dict(sorted(registered.labels.items())),
            }
        )
    return rows


def fleet_hosts(
    registry: FleetRegistry,
    judge: Judge,
    *,
    local: tuple[str, ObservedFleet] | None = None,
) -> FleetHosts:
    """The fleet's hosts and what they run, read from ``registry``. ``local``: this machine's
    host and what it observed itself (its runtimes' word), which is fresher than its row in
    the store."""
    records = registry.hosts()
    per_host = dict(registry.fleet_observed())
    if local is not None:
        per_host[local[0]] = local[1]
    hosts = host_statuses(records, judge(records), per_host)
    lost = {host["name"] for host in hosts if host["state"] == "lost"}
    vms = [
        (host, vm)
        for host, fleet in sorted(per_host.items())
        if host not in lost
        for _, vm in sorted(fleet.vms.items())
    ]
    return FleetHosts(hosts, vms)


def vm_statuses(
    fleet: FleetHosts, now: float, *, local: str | None = None, state_dir: Path | None = None
) -> list[VMStatus]:
    """Each VM of ``fleet`` with its host; a VM of the ``local`` host also carries the last
    console lines from ``state_dir`` when it is not healthy (other hosts' consoles are on
    their machines)."""
    rows: list[VMStatus] = []
    for host, vm in fleet.vms:
        here = state_dir if host == local else None
        row = vm_status(vm, now, here)
        row["host"] = host
        rows.append(row)
    return rows


__all__ = [
    "FleetHosts",
    "FleetRegistry",
    "Judge",
    "allocated",
    "fleet_hosts",
    "host_statuses",
    "registry_of",
    "vm_statuses",
]
