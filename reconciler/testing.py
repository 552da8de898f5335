"""Helpers for tests of code built on reconciler, shipped with the package (as httpx and trio
ship theirs): small factories of model objects and an in-memory ``StateStore``.

They build fleets without touching git or manifests, for fast tests of the pure core.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from reconciler.leadership.fence import Fence
from reconciler.model import (
    BuildSpec,
    DeploySpec,
    DesiredFleet,
    FleetSettings,
    HealthCheck,
    Language,
    ObservedFleet,
    ObservedVM,
    RuntimeKind,
    SourceSpec,
    Target,
    VMState,
    Workload,
    assemble_fleet,
    digest_of,
)
from reconciler.planning import observed_from_desired
from reconciler.planning.suspend import FLEET_WIDE
from reconciler.state.protocol import Event, Intent, RevisionRecord


def workload(
    name: str,
    *,
    replicas: int = 1,
    source: str = "src",
    targets: Iterable[Target] = (Target.EXECUTABLE, Target.MICROVM),
    target: Target = Target.MICROVM,
    runtime: RuntimeKind = RuntimeKind.QEMU,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    depends_on: Iterable[str] = (),
    vcpus: int = 1,
    memory_mib: int = 256,
    health: HealthCheck | None = None,
    restart_policy: str = "always",
    suspended: bool = False,
    **deploy_overrides: Any,
) -> Workload:
    """A valid Workload; ``source`` stands for the content of its source tree."""
    deploy = DeploySpec(
        target=target,
        runtime=runtime,
        replicas=replicas,
        vcpus=vcpus,
        memory_mib=memory_mib,
        env=dict(env or {}),
        health=health,
        depends_on=tuple(depends_on),
        restart_policy=restart_policy,
    )
    if deploy_overrides:
        deploy = replace(deploy, **deploy_overrides)
    return Workload(
        name=name,
        labels=dict(labels or {}),
        source=SourceSpec(path=f"services/{name}", language=Language.PYTHON, entrypoint="app.py"),
        build=BuildSpec(targets=tuple(targets)),
        deploy=deploy,
        source_digest=digest_of(source),
        suspended=suspended,
    )


def fleet(
    *workloads: Workload,
    revision: str | None = "0" * 40,
    name: str = "test",
    **settings: Any,
) -> DesiredFleet:
    return assemble_fleet(
        revision, FleetSettings(name=name, **settings), {w.name: w for w in workloads}
    )


def running(desired: DesiredFleet, *, version: int = 1, **vm_changes: Any) -> ObservedFleet:
    """The observed fleet once ``desired`` runs, with ``vm_changes`` applied to every VM."""
    observed = observed_from_desired(desired, version=version)
    if not vm_changes:
        return observed
    vms = {name: replace(vm, **vm_changes) for name, vm in observed.vms.items()}
    return replace(observed, vms=vms)


def with_vm(observed: ObservedFleet, name: str, **changes: Any) -> ObservedFleet:
    """``observed`` with one VM changed (``state=VMState.MISSING`` ...) or removed (``None``)."""
    vms = dict(observed.vms)
    if changes.get("remove"):
        del vms[name]
    else:
        vms[name] = replace(vms[name], **changes)
    return replace(observed, vms=vms, version=observed.version + 1)


class MemoryStateStore:
    """An in-memory ``StateStore`` for unit tests."""

    def __init__(self, vms: Iterable[ObservedVM] = ()) -> None:
        self._vms = {vm.name: vm for vm in vms}
        self._version = 0
        self._revisions: list[RevisionRecord] = []
        self._intents: list[Intent] = []
        self._completed: set[int] = set()
        self._events: list[Event] = []
        self._suspensions: dict[str, str] = {}
        self._term = 0
        self.fence: Fence | None = None

    def _write(self) -> None:
        """Fence check and version bump of every fenced write (as the SQLite store does)."""
        if self.fence is not None:
            self.fence.check("a state write")
            if self._term > self.fence.term:
                self.fence.refuse("a state write", f"term {self._term} leads")
        self._version += 1

    def claim_term(self, fence: Fence) -> None:
        if self._term > fence.term:
            fence.refuse("claiming the store", f"term {self._term} already leads")
        self._term = fence.term
        self.fence = fence

    def release_fence(self) -> None:
        self.fence = None

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None:
        self._events.append(Event(len(self._events) + 1, 0.0, kind, subject, message, term))

    def events(self, limit: int = 50) -> list[Event]:
        return list(reversed(self._events))[:limit]

    def suspend(self, workload: str | None, reason: str = "") -> None:
        self._suspensions[workload or FLEET_WIDE] = reason
        self.record_event("suspended", workload or "fleet", reason or "by the operator")

    def resume(self, workload: str | None) -> bool:
        if self._suspensions.pop(workload or FLEET_WIDE, None) is None:
            return False
        self.record_event("resumed", workload or "fleet", "by the operator")
        return True

    def suspensions(self) -> dict[str, str]:
        return dict(self._suspensions)

    def observed(self) -> ObservedFleet:
        applied = self.applied_revision()
        return ObservedFleet(
            version=self._version,
            vms=dict(self._vms),
            applied_revision=applied.revision if applied else None,
        )

    def version(self) -> int:
        return self._version

    def put_vm(self, vm: ObservedVM) -> None:
        self._write()
        self._vms[vm.name] = vm

    def remove_vm(self, name: str) -> None:
        self._write()
        self._vms.pop(name, None)

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        self._write()
        self._revisions.append(RevisionRecord(revision, outcome, message, float(self._version)))

    def begin_intent(self, vm: str, action: str) -> int:
        self._write()
        self._intents.append(Intent(len(self._intents) + 1, vm, action, float(self._version)))
        return len(self._intents)

    def complete_intent(self, intent: int, outcome: str = "done") -> None:
        self._write()
        self._completed.add(intent)

    def open_intents(self) -> list[Intent]:
        return [i for i in self._intents if i.id not in self._completed]

    def applied_revision(self) -> RevisionRecord | None:
        applied = [r for r in self._revisions if r.outcome == "applied"]
        return applied[-1] if applied else None

    def attempted_revision(self) -> RevisionRecord | None:
        return self._revisions[-1] if self._revisions else None

    def close(self) -> None:
        pass


__all__ = [
    "MemoryStateStore",
    "VMState",
    "fleet",
    "running",
    "with_vm",
    "workload",
]
