"""Fakes of the project's own seams, for fast tests: small factories of model objects, an
in-memory ``StateStore``, and a ``Host``, ``Source`` and revision loader that need no root, no
runtime and no git.

    fleet(workload(...)) ──▶ FakeSource.commit ──▶ FakeLoader ─┐
                                                              ├─▶ ReconcileCycle ─▶ CycleResult
    MemoryStateStore ◀── FakeHost (plans applied to the store) ┘

They live with the tests, not in the installed package: nothing a host runs imports them.
``MemoryStateStore`` keeps the promises of the ``StateStore`` Protocol, checked by the same
contract suite as the SQLite store (``test_store_contract.py``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.errors import SourceError
from reconciler.execution.events import EventKind, ExecutionEvent, Reporter, print_event
from reconciler.execution.executor import ApplyReport
from reconciler.leadership.fence import Fence
from reconciler.lifetimes import ClosedOnExit
from reconciler.model import (
    FLEET_WIDE,
    ActionType,
    BuildSpec,
    DeploySpec,
    DesiredFleet,
    FleetSettings,
    HealthCheck,
    Language,
    ObservedFleet,
    ObservedVM,
    Plan,
    RestartPolicy,
    RolloutState,
    RolloutSwitch,
    RuntimeKind,
    SourceSpec,
    Target,
    VMState,
    Workload,
    assemble_fleet,
    digest_of,
)
from reconciler.planning import observed_from_desired
from reconciler.redact import redact_text
from reconciler.state.protocol import (
    VM_HISTORY_KEPT,
    Event,
    Intent,
    OutboxEntry,
    OutboxMessage,
    OutboxState,
    Pin,
    RevisionRecord,
    VMHistoryEntry,
    pin_message,
)


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
        restart_policy=RestartPolicy(restart_policy),
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


class _Memory:
    """What a ``MemoryStateStore`` holds: shared by every handle opened on it, as one database
    file is shared by the connections of several replicas."""

    def __init__(self) -> None:
        self.vms: dict[str, ObservedVM] = {}
        self.version = 0
        self.revisions: list[RevisionRecord] = []
        self.intents: list[Intent] = []
        self.completed: set[int] = set()
        self.events: list[Event] = []
        self.suspensions: dict[str, str] = {}
        self.rollouts: dict[str, RolloutState] = {}
        self.switches: dict[str, RolloutSwitch] = {}
        self.artifacts: dict[tuple[str, str], tuple[str, ...]] = {}
        self.pins: dict[str, Pin] = {}
        self.vm_history: list[VMHistoryEntry] = []
        self.term = 0
        self.outbox: list[OutboxEntry] = []
        self.clock: Callable[[], float] = time.time


class MemoryStateStore(ClosedOnExit):
    """An in-memory ``StateStore``. ``handle()`` opens another handle on the same data (another
    replica's connection): fencing between replicas is tested through it."""

    def __init__(self, vms: Iterable[ObservedVM] = (), *, memory: _Memory | None = None) -> None:
        self._m = memory if memory is not None else _Memory()
        for vm in vms:
            self._m.vms[vm.name] = vm
        self.fence: Fence | None = None
        self.closed = False

    def handle(self) -> MemoryStateStore:
        return MemoryStateStore(memory=self._m)

    def _write(self) -> None:
        """Fence check and version bump of every fenced write (as the SQLite store does)."""
        if self.closed:
            raise ValueError("the store is closed")
        if self.fence is not None:
            self.fence.check("a state write")
            if self._m.term > self.fence.term:
                self.fence.refuse(
                    "a state write", f"term {self.fence.term} is stale, term {self._m.term} leads"
                )
        self._m.version += 1

    def claim_term(self, fence: Fence) -> None:
        if self._m.term > fence.term:
            fence.refuse("claiming the store", f"term {self._m.term} already leads")
        self._m.term = fence.term
        self.fence = fence

    def release_fence(self) -> None:
        self.fence = None

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None:
        events = self._m.events
        event = Event(len(events) + 1, 0.0, kind, redact_text(subject), redact_text(message), term)
        events.append(event)

    def events(self, limit: int = 50) -> list[Event]:
        return list(reversed(self._m.events))[:limit]

    def suspend(self, workload: str | None, reason: str = "") -> None:
        self._m.suspensions[workload or FLEET_WIDE] = reason
        self.record_event("suspended", workload or "fleet", reason or "by the operator")

    def resume(self, workload: str | None) -> bool:
        if self._m.suspensions.pop(workload or FLEET_WIDE, None) is None:
            return False
        self.record_event("resumed", workload or "fleet", "by the operator")
        return True

    def suspensions(self) -> dict[str, str]:
        return dict(self._m.suspensions)

    def rollouts(self) -> dict[str, RolloutState]:
        return dict(self._m.rollouts)

    def put_rollout(self, state: RolloutState) -> None:
        version = self._m.version
        self._write()  # fenced like the fleet's state, but the version does not move
        self._m.version = version
        self._m.rollouts[state.workload] = state

    def switch_rollout(self, switch: RolloutSwitch) -> None:
        self._m.switches[switch.workload] = switch
        self.record_event(f"rollout-{switch.command.value}", switch.workload, "by the operator")

    def rollout_switches(self) -> dict[str, RolloutSwitch]:
        return dict(self._m.switches)

    def observed(self) -> ObservedFleet:
        applied = self.applied_revision()
        return ObservedFleet(
            version=self._m.version,
            vms=dict(sorted(self._m.vms.items())),
            applied_revision=applied.revision if applied else None,
        )

    def version(self) -> int:
        return self._m.version

    def put_vm(self, vm: ObservedVM) -> None:
        self._write()
        self._m.vms[vm.name] = vm

    def remove_vm(self, name: str) -> None:
        self._write()
        self._m.vms.pop(name, None)

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        if outcome not in ("applied", "failed"):
            raise ValueError(f"outcome must be 'applied' or 'failed', not {outcome!r}")
        self._write()
        record = RevisionRecord(revision, outcome, redact_text(message), float(self._m.version))
        self._m.revisions.append(record)

    def revisions(self, limit: int = 50) -> list[RevisionRecord]:
        return list(reversed(self._m.revisions))[:limit]

    def record_artifacts(self, revision: str, artifacts: Mapping[str, Sequence[str]]) -> None:
        self._fenced()
        for name, digests in artifacts.items():
            self._m.artifacts[(revision, name)] = tuple(sorted(set(digests)))

    def revision_artifacts(self, revision: str) -> dict[str, tuple[str, ...]]:
        return {w: d for (r, w), d in self._m.artifacts.items() if r == revision}

    def pin(self, workload: str | None, revision: str, reason: str = "") -> None:
        key = workload or FLEET_WIDE
        self._m.pins[key] = Pin(key, revision, reason, self._m.clock())
        self.record_event("pinned", workload or "fleet", pin_message(revision, reason))

    def unpin(self, workload: str | None) -> bool:
        if self._m.pins.pop(workload or FLEET_WIDE, None) is None:
            return False
        self.record_event("unpinned", workload or "fleet", "by the operator")
        return True

    def pins(self) -> dict[str, Pin]:
        return dict(self._m.pins)

    def record_vm_history(
        self,
        vm: str,
        kind: str,
        detail: str,
        *,
        healthy: bool | None = None,
        term: int | None = None,
    ) -> None:
        entry = VMHistoryEntry(vm, self._m.clock(), kind, redact_text(detail), healthy, term)
        self._m.vm_history.append(entry)
        own = [e for e in self._m.vm_history if e.vm == vm]
        if len(own) > VM_HISTORY_KEPT:
            self._m.vm_history.remove(own[0])

    def vm_history(self, vm: str, limit: int = VM_HISTORY_KEPT) -> list[VMHistoryEntry]:
        return list(reversed([e for e in self._m.vm_history if e.vm == vm]))[:limit]

    def begin_intent(self, vm: str, action: str) -> int:
        self._write()
        intents = self._m.intents
        intents.append(Intent(len(intents) + 1, vm, action, float(self._m.version)))
        return len(intents)

    def complete_intent(self, intent: int, outcome: str = "done") -> None:
        self._write()
        self._m.completed.add(intent)

    def open_intents(self) -> list[Intent]:
        return [i for i in self._m.intents if i.id not in self._m.completed]

    def applied_revision(self) -> RevisionRecord | None:
        applied = [r for r in self._m.revisions if r.outcome == "applied"]
        return applied[-1] if applied else None

    def attempted_revision(self) -> RevisionRecord | None:
        return self._m.revisions[-1] if self._m.revisions else None

    def _fenced(self) -> None:
        """The fence check of a fenced write that moves no version (the outbox)."""
        version = self._m.version
        self._write()
        self._m.version = version

    def enqueue(self, messages: Sequence[OutboxMessage]) -> int:
        self._fenced()
        known = {e.message.key for e in self._m.outbox}
        now, added = self._m.clock(), 0
        for message in messages:
            if message.key not in known:
                known.add(message.key)
                entry = OutboxEntry(
                    len(self._m.outbox) + 1, message, OutboxState.PENDING, 0, now, now, ""
                )
                self._m.outbox.append(entry)
                added += 1
        return added

    def due_messages(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        first: dict[str, OutboxEntry] = {}
        for entry in self._m.outbox:
            if entry.state is OutboxState.PENDING:
                first.setdefault(entry.message.destination, entry)
        due = sorted((e for e in first.values() if e.next_attempt_at <= now), key=lambda e: e.id)
        return due[:limit]

    def settle_message(
        self, entry: int, *, delivered: bool, error: str = "", retry_at: float | None = None
    ) -> None:
        self._fenced()
        held = self._m.outbox[entry - 1]
        if held.state is not OutboxState.PENDING:
            return
        if delivered:
            settled = replace(held, state=OutboxState.DELIVERED)
        else:
            settled = replace(
                held,
                attempts=held.attempts + 1,
                last_error=redact_text(error),
                state=OutboxState.PENDING if retry_at is not None else OutboxState.ABANDONED,
                next_attempt_at=retry_at if retry_at is not None else held.next_attempt_at,
            )
        self._m.outbox[entry - 1] = settled

    def outbox(self, limit: int = 50) -> list[OutboxEntry]:
        return list(reversed(self._m.outbox))[:limit]

    def close(self) -> None:
        self.closed = True


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


@dataclass
class FakeSource:
    """A ``Source`` over an in-memory history. Each commit holds what loading it gives: a
    ``DesiredFleet``, or the exception loading it raises (a ``ManifestError`` ...)."""

    commits: dict[str, DesiredFleet | BaseException] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    head: str | None = None
    fetch_error: str | None = None
    """``fetch`` raises ``SourceError`` with this message (an unreachable remote)."""
    resolve_error: str | None = None
    remote: bool = True
    repo_path: Path = Path("fake-fleet.git")
    fetches: int = 0

    def commit(self, content: DesiredFleet | BaseException, *, orphan: bool = False) -> str:
        """A new commit on the head (or on nothing: a rewritten history), which becomes the
        head."""
        parent = None if orphan else self.head
        sha = _sha(f"{len(self.commits)}:{parent}")
        if isinstance(content, DesiredFleet):
            content = replace(content, revision=sha)
        self.commits[sha], self.parents[sha], self.head = content, parent, sha
        return sha

    def resolve(self, rev: str | None = None) -> str:
        if self.resolve_error is not None:
            raise SourceError(self.resolve_error)
        wanted = rev if rev is not None else self.head
        if wanted is None or wanted not in self.commits:
            raise SourceError(f"unknown revision {rev or 'HEAD'!r} in {self.describe()}")
        return wanted

    def checkout(self, rev: str) -> Path:
        return Path("trees") / self.resolve(rev)

    def fetch(self) -> None:
        self.fetches += 1
        if self.fetch_error is not None:
            raise SourceError(self.fetch_error)

    def describe(self) -> str:
        return "the fake repository"

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        for sha in (ancestor, descendant):
            if sha not in self.commits:
                raise SourceError(f"{sha[:12]} is not in {self.describe()}")
        walk: str | None = descendant
        while walk is not None:
            if walk == ancestor:
                return True
            walk = self.parents[walk]
        return False

    def changed_paths(self, base: str, head: str) -> list[str]:
        return [] if self.resolve(base) == self.resolve(head) else ["fleet.yaml"]


@dataclass
class FakeLoader:
    """The revision loader over a ``FakeSource``: loading gives what the commit holds."""

    source: FakeSource
    loads: list[str] = field(default_factory=list)

    def resolve(self, rev: str | None) -> str:
        return self.source.resolve(rev)

    def load(self, rev: str | None) -> DesiredFleet:
        revision = self.resolve(rev)
        self.loads.append(revision)
        content = self.source.commits[revision]
        if isinstance(content, BaseException):
            raise content
        return content


@dataclass
class FakeHost(ClosedOnExit):
    """A ``Host`` whose runtimes are the store: converging a plan writes the VMs it would run,
    as the executor does, and records the revision. What goes wrong is scripted."""

    store: MemoryStateStore = field(default_factory=MemoryStateStore)
    converge_error: BaseException | None = None
    """Raised by ``converge`` before anything changes (a build that failed ...)."""
    unhealthy: dict[str, str] = field(default_factory=dict)
    """VMs that do not get healthy when a ``converge`` starts them, and why: they are rolled
    back to what ran before (nothing, for a new VM)."""
    unsettled: dict[str, str] = field(default_factory=dict)
    """What ``settle_health`` reports."""
    supersede: Callable[[], str | None] = lambda: None
    """Asked after a converge has started its VMs: a reason makes the rollout superseded."""
    converged: list[tuple[str | None, Plan]] = field(default_factory=list)
    closed: bool = False

    def observe(self) -> ObservedFleet:
        return self.store.observed()

    def refresh(self) -> ObservedFleet:
        return self.observe()

    def converge(
        self,
        plan: Plan,
        desired: DesiredFleet,
        checkout: Path,
        cache_dir: Path,
        *,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        record_revision: bool = True,
        superseded: Callable[[], bool] = lambda: False,
    ) -> ApplyReport:
        self.converged.append((plan.head, plan))
        revision = plan.head or "unknown"
        if self.converge_error is not None:
            if record_revision:
                self.store.record_revision(
                    revision, outcome="failed", message=str(self.converge_error)
                )
            raise self.converge_error
        if fence is not None:
            fence.check("converging")
        wanted = observed_from_desired(desired).vms
        before = self.store.observed().vms
        report = ApplyReport(builds={"built": len(plan.builds)})
        for action in plan.actions:
            on_event(
                ExecutionEvent(
                    EventKind.ACTION, action.vm, action=action.action.value, detail=action.reason
                )
            )
            if action.action is ActionType.DELETE:
                self.store.remove_vm(action.vm)
            elif action.vm in self.unhealthy:
                report.unhealthy[action.vm] = self.unhealthy[action.vm]
            else:  # a surge stand-in runs its VM's spec under its own name
                spec = wanted[action.stands_in_for or action.vm]
                self.store.put_vm(replace(spec, name=action.vm, healthy=True))
            report.applied.append(action)
        # As the executor does, VMs that did not get healthy go back to what they ran.
        for name in report.unhealthy:
            if name in before:
                self.store.put_vm(before[name])
        report.rolled_back = sorted(report.unhealthy)
        why = self.supersede()
        if why is not None:
            report.superseded = why
            if record_revision:
                self.store.record_revision(revision, outcome="failed", message=why)
            return report
        if record_revision:
            if report.ok:
                self.store.record_revision(revision, outcome="applied")
            else:
                self.store.record_revision(revision, outcome="failed", message=report.problems())
        return report

    def settle_health(
        self,
        observed: ObservedFleet,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        superseded: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        return dict(self.unsettled)

    def close(self) -> None:
        self.closed = True
        self.store.close()


__all__ = [
    "FakeHost",
    "FakeLoader",
    "FakeSource",
    "MemoryStateStore",
    "VMState",
    "fleet",
    "running",
    "with_vm",
    "workload",
]
