"""A plan placed on the live hosts: what ``diff`` and ``plan`` show of a multi-host fleet.

    Plan (planning.diff) ─────────────────────────┐
    DesiredFleet ──placement.demands_of──▶ VMDemand* ─┼──placement.place──▶ Placement
    LiveHosts (registry's HostFacts, assignments) ┘          │
                                       place_plan ◀──────────┘──▶ Plan with a PlanPlacement
                                                              └─▶ CapacityError (nothing fits)

The command reads the registry and the assignments from the PostgreSQL store and hands them in
as ``LiveHosts``; this module does no I/O. The placement shown is the one the leader would make
from the same inputs (``place`` is deterministic), so a reviewer reads where each VM goes, which
VMs move between hosts and why, and what room each host keeps.

A plan that does not fit is refused here with one line (``CapacityError``), before any renderer
or executor sees it: nothing is saved, nothing starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from reconciler.errors import PlanError
from reconciler.model import DesiredFleet, HostMove, HostRoom, Plan, PlanPlacement
from reconciler.planning.placement import (
    HostFacts,
    Overcommit,
    Placement,
    VMDemand,
    demands_of,
    place,
)


class CapacityError(PlanError):
    """A plan that needs more than the fleet's hosts have: names the first VM that does not
    fit, what it needs and the largest free slot. Not terminal: a host that joins, or one
    uncordoned, can make the same revision fit."""

    def __init__(self, placement: Placement, shortfall: str = "") -> None:
        self.placement = placement
        first = placement.unplaceable[0]
        super().__init__(
            f"the plan does not fit the fleet's hosts{shortfall}: workload {first.workload}: "
            f"{placement.refusal()}; nothing was changed"
        )


@dataclass(frozen=True)
class LiveHosts:
    """What placement needs of the live fleet, as the command read it from the store."""

    hosts: Sequence[HostFacts]
    """Every registered host, lost or not (the registry's verdict is in each ``HostFacts``)."""
    current: Mapping[str, str] = field(default_factory=dict)
    """VM -> the host it is assigned to now: VMs stay where they are unless they must move."""
    overcommit: Overcommit = field(default_factory=Overcommit)


def place_plan(plan: Plan, desired: DesiredFleet, live: LiveHosts) -> Plan:
    """``plan`` with the placement of ``desired``'s VMs on ``live``'s hosts; a
    ``CapacityError`` when a VM fits on none of them."""
    demands = demands_of(desired)
    placement = place(demands, live.hosts, live.current, live.overcommit)
    if placement.unplaceable:
        raise CapacityError(placement, shortfall(demands, live))
    return replace(plan, placement=plan_placement(placement, live.current, live.hosts))


def shortfall(demands: Sequence[VMDemand], live: LiveHosts) -> str:
    """`` (memory: 2432 MiB wanted, 1536 MiB on the schedulable hosts)`` when the fleet as a
    whole is too small, so the first VM named is not mistaken for the cause (it is only the
    first of those left over); empty when the refusal is about fragmentation, runtimes or
    selectors, which the per-VM line says."""
    usable = [h for h in live.hosts if h.state == "ready"]
    wanted = (sum(d.vcpus for d in demands), sum(d.memory_mib for d in demands))
    offered = (
        sum(math.floor(h.vcpus * live.overcommit.cpu) for h in usable),
        sum(math.floor(h.memory_mib * live.overcommit.memory) for h in usable),
    )
    short = [
        f"{what}: {want}{unit} wanted, {have}{unit} on the schedulable hosts"
        for what, unit, want, have in (
            ("vCPUs", "", wanted[0], offered[0]),
            ("memory", " MiB", wanted[1], offered[1]),
        )
        if want > have
    ]
    return f" ({'; '.join(short)})" if short else ""


def plan_placement(
    placement: Placement, current: Mapping[str, str], hosts: Sequence[HostFacts] = ()
) -> PlanPlacement:
    """A (fitting) ``Placement`` as the plan carries it; ``hosts`` say which ones take no new
    VM (their room is shown, marked)."""
    states = {h.name: h.state for h in hosts}
    assigned = placement.assignments
    return PlanPlacement(
        hosts=placement.hosts_summary,
        assignments=tuple(sorted(assigned.items())),
        new=tuple(sorted(vm for vm in assigned if vm not in current)),
        moves=tuple(
            HostMove(m.vm, m.workload, m.source, m.destination, m.reason) for m in placement.moves
        ),
        released=tuple(sorted((vm, h) for vm, h in current.items() if vm not in assigned)),
        free=tuple(
            HostRoom(host, room.vcpus, room.memory_mib, states.get(host, "ready"))
            for host, room in sorted(placement.free.items())
        ),
    )


__all__ = ["CapacityError", "LiveHosts", "place_plan", "plan_placement", "shortfall"]
