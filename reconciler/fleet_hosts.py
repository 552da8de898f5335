"""The host registry as placement sees it: registry records become ``HostFacts``.

    state store ──hosts()──▶ HostRecord* ──placement_hosts(grace)──▶ HostFacts* ──▶ placement
                                                                                └─▶ ``hosts``

The one place where a heartbeat's age becomes the verdict ``lost``: placement takes it as an
input, the registry only measures ages. Pure (no I/O, no clock: the ages were measured by the
database clock when the records were read); above both the state store and planning, which do
not know each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.planning.placement import HostFacts
from reconciler.state.hosts import HOST_GRACE_SECONDS, HostRecord


def host_facts(record: HostRecord, grace: float = HOST_GRACE_SECONDS) -> HostFacts:
    """``record`` as placement's input; lost once silent for longer than ``grace`` seconds."""
    registered = record.registration
    return HostFacts(
        name=registered.name,
        vcpus=registered.vcpus,
        memory_mib=registered.memory_mib,
        labels=dict(registered.labels),
        runtimes=registered.runtimes,
        kvm=registered.kvm,
        cordoned=record.cordoned,
        draining=record.draining,
        lost=record.lost(grace),
    )


def placement_hosts(
    records: Iterable[HostRecord], grace: float = HOST_GRACE_SECONDS
) -> list[HostFacts]:
    """Every record as ``HostFacts``, in name order (placement's determinism starts here)."""
    return sorted((host_facts(record, grace) for record in records), key=lambda h: h.name)


__all__ = ["host_facts", "placement_hosts"]
