"""Helpers for tests of code built on reconciler, shipped with the package (as httpx and trio
ship theirs): small factories of model objects and an in-memory ``StateStore``.

They build fleets without touching git or manifests, for fast tests of the pure core.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

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
from reconciler.state.protocol import Intent, RevisionRecord


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
        self._vms[vm.name] = vm
        self._version += 1

    def remove_vm(self, name: str) -> None:
        self._vms.pop(name, None)
        self._version += 1

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        self._revisions.append(RevisionRecord(revision, outcome, message, float(self._version)))
        self._version += 1

    def begin_intent(self, vm: str, action: str) -> int:
        self._intents.append(Intent(len(self._intents) + 1, vm, action, float(self._version)))
        self._version += 1
        return len(self._intents)

    def complete_intent(self, intent: int, outcome: str = "done") -> None:
        self._completed.add(intent)
        self._version += 1

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
