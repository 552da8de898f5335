"""The host registry's records: what a host registers, what the registry says of it, and its
timing (how often hosts heartbeat, how long a silent one stays a member).

    daemon on host A ──register_host(HostRegistration)──▶ hosts row, epoch n+1
                     ──heartbeat(A, epoch) every HEARTBEAT_SECONDS──▶ heartbeat_at = now
    ``reconciler hosts`` / the leader ◀──hosts()── HostRecord (heartbeat age by the database
                                                   clock, VMs assigned to it)

Only the PostgreSQL store keeps a registry (``PostgresStateStore.register_host`` and friends);
the SQLite store is one host and has none. Every time is the database's clock, so hosts whose
clocks disagree still agree on how old a heartbeat is. A record becomes placement's
``HostFacts`` in ``reconciler.fleet_hosts`` (this layer does not know planning).

Registration and heartbeats are each host's own rows, written whether or not it leads: they
are never fenced. A new registration (a daemon restarted, or one that learned its epoch ended)
raises the host's epoch; the heartbeat of an older epoch is refused, which is how a host learns
that the fleet has stopped counting on what it was running.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.errors import ConfigError
from reconciler.model import RuntimeKind

HEARTBEAT_SECONDS = 2.0
"""How often a daemon heartbeats: the lease's retry period, so the registry is as fresh as the
leader election (one small UPDATE per host every 2 s is nothing to a database)."""

HOST_GRACE_SECONDS = 30.0
"""How long a host's heartbeat may be silent before the host is declared lost.

- Far above the heartbeat interval (15 missed beats): a long GC pause, a slow disk or a
  PostgreSQL restart or failover (typically 10-20 s) must not move a whole host's VMs.
- Above twice the lease duration (15 s): a host that cannot reach the database has lost any
  lease it held (renew deadline 10 s) well before its VMs are re-placed, and a host that stops
  its VMs once it cannot heartbeat for the renew deadline has them stopped ~20 s before their
  replacements start elsewhere, so a VM is not served from two hosts while the host is merely
  partitioned.
- Short enough that recovery after a real host loss is grace + boot + health, under a minute
  (Kubernetes' node grace period is 40-50 s for the same trade-off).
"""

_MAX_GRACE = 86_400.0


def grace_problem(grace: float) -> str | None:
    """Why ``grace`` seconds cannot be a host grace period, or None."""
    if not (HEARTBEAT_SECONDS < grace <= _MAX_GRACE):
        return (
            f"--host-grace-seconds must be above the heartbeat interval ({HEARTBEAT_SECONDS:g} s)"
            f" and at most a day, not {grace:g}"
        )
    return None


@dataclass(frozen=True)
class HostRegistration:
    """What a host says of itself when it registers: its capacity and what it can run."""

    name: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    """Free space in the state directory, where artifacts and volumes live."""
    labels: Mapping[str, str] = field(default_factory=dict)
    runtimes: frozenset[RuntimeKind] = frozenset()
    kvm: bool = False
    underlay_address: str | None = None
    """The IPv4 address other hosts reach this one at (``--underlay-address``, or the source
    address towards the database): they route this host's VM subnet via it."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a host's name must not be empty")
        for what, value in (
            ("vCPUs", self.vcpus),
            ("memory", self.memory_mib),
            ("disk", self.disk_mib),
        ):
            if value < 0:
                raise ConfigError(f"host {self.name}: {what} must not be negative, not {value}")
        if self.underlay_address is not None:
            try:
                ipaddress.IPv4Address(self.underlay_address)
            except ValueError:
                raise ConfigError(
                    f"host {self.name}: the underlay address must be an IPv4 address, not "
                    f"{self.underlay_address!r}"
                ) from None

    def labels_json(self) -> str:
        return json.dumps(dict(self.labels), sort_keys=True)

    def runtimes_json(self) -> str:
        return json.dumps(sorted(runtime.value for runtime in self.runtimes))


@dataclass(frozen=True)
class HostRecord:
    """One host as the registry holds it, read at one moment of the database clock."""

    registration: HostRegistration
    epoch: int
    cordoned: bool
    draining: bool
    registered_at: float
    heartbeat_at: float
    heartbeat_age: float
    """Seconds since the last heartbeat, by the database clock."""
    vms: int
    """VMs the fleet's assignments place on this host."""
    ended: bool = False
    """The leader ended this epoch (``end_epoch``): the host was declared lost, and its next
    heartbeat is refused until it registers anew."""
    subnet_slot: int | None = None
    """Which subnet of the fleet's pool is this host's (``runtime.network.carving``): the
    lowest free slot at its first registration, kept for the host's life. None: registered
    before hosts had subnets."""

    @property
    def name(self) -> str:
        return self.registration.name

    @property
    def underlay_address(self) -> str | None:
        return self.registration.underlay_address

    def lost(self, grace: float = HOST_GRACE_SECONDS) -> bool:
        """Silent for longer than ``grace``, or its epoch ended: its VMs are to be placed
        elsewhere."""
        return self.ended or self.heartbeat_age > grace


@dataclass(frozen=True)
class Assignment:
    """Where the leader placed one VM: the host that runs it, the revision whose definition of
    the VM it runs (rollouts and pins make the VMs of one workload run different revisions;
    empty when the VM was adopted as it ran) and the term that wrote it."""

    host: str
    revision: str
    term: int


HOST_COLUMNS = (
    "h.name, h.vcpus, h.memory_mib, h.disk_mib, h.labels, h.runtimes, h.kvm, h.epoch,"
    " h.cordoned, h.draining, h.registered_at, h.heartbeat_at, h.ended,"
    " h.subnet_slot, h.underlay_address"
)
"""The columns ``host_from_row`` decodes, in its order (then the age and the VM count)."""


def host_from_row(row: Sequence[object]) -> HostRecord:
    (name, vcpus, memory, disk, labels, runtimes, kvm, epoch) = row[:8]
    cordoned, draining, registered_at, heartbeat_at, ended, slot, underlay = row[8:15]
    age, vms = row[15:]
    return HostRecord(
        registration=HostRegistration(
            name=str(name),
            vcpus=int(str(vcpus)),
            memory_mib=int(str(memory)),
            disk_mib=int(str(disk)),
            labels={str(k): str(v) for k, v in json.loads(str(labels)).items()},
            runtimes=frozenset(RuntimeKind(str(r)) for r in json.loads(str(runtimes))),
            kvm=bool(kvm),
            underlay_address=None if underlay is None else str(underlay),
        ),
        epoch=int(str(epoch)),
        cordoned=bool(cordoned),
        draining=bool(draining),
        registered_at=float(str(registered_at)),
        heartbeat_at=float(str(heartbeat_at)),
        heartbeat_age=max(0.0, float(str(age))),
        vms=int(str(vms or 0)),
        ended=bool(ended),
        subnet_slot=None if slot is None else int(str(slot)),
    )


__all__ = [
    "HEARTBEAT_SECONDS",
    "HOST_COLUMNS",
    "HOST_GRACE_SECONDS",
    "Assignment",
    "HostRecord",
    "HostRegistration",
    "grace_problem",
    "host_from_row",
]
