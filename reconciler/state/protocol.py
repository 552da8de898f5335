"""The ``StateStore`` Protocol: the seam between the control plane and its persistence.

    execution (observer, executor, health) ──writes (fenced)──▶ StateStore ◀──reads── status,
    daemon (revisions, events; claims its term)                                 diff, the view

Every implementation keeps the same promises, checked by one contract suite run against each
(``tests/test_store_contract.py``): the version moves on every write of VMs, intents and
revisions and on nothing else; fenced writes are refused, inside the write, when the fence is no
longer valid or a newer term has claimed the store; events and suspensions are never fenced;
credentials are never stored in messages; the notification outbox deduplicates by key and
its writes are fenced like the fleet's; rollouts are fenced fleet state that never bumps the
version, and the operator's rollout switches are never fenced; the artifacts of an applied
revision are fenced history that never bumps the version; pins (the operator's rollbacks) and
the history of each VM are never fenced. ``SQLiteStateStore`` is the
embedded default, ``PostgresStateStore`` the one the hosts of a fleet share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self

from reconciler.formatting import short_sha
from reconciler.leadership.fence import Fence
from reconciler.model import ObservedFleet, ObservedVM, RolloutState, RolloutSwitch


@dataclass(frozen=True)
class RevisionRecord:
    revision: str
    outcome: str  # "applied" | "failed"
    message: str
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class Pin:
    """An operator's rollback: the fleet (``workload`` is ``model.FLEET_WIDE``) or one workload
    held at ``revision``, an earlier applied one, until it is unpinned."""

    workload: str
    revision: str
    reason: str
    at: float


@dataclass(frozen=True)
class VMHistoryEntry:
    """One thing the daemon did to a VM or learnt of it: an action, a rollback, a health
    verdict (``healthy`` set: its probe history), under the leader's ``term``."""

    vm: str
    at: float
    kind: str  # an ``execution.events.EventKind`` value: action, rollback, health
    detail: str
    healthy: bool | None = None
    term: int | None = None


VM_HISTORY_KEPT = 50
"""How many entries of each VM's history a store keeps: the newest."""


def pin_message(revision: str, reason: str) -> str:
    """The events history's line of a pin, the same in every store."""
    return f"at {short_sha(revision)}: {reason or 'by the operator'}"


@dataclass(frozen=True)
class Event:
    """One line of the daemon's history: an election, a cycle, a refused write ..."""

    id: int
    at: float
    kind: str
    subject: str
    message: str
    term: int | None


@dataclass(frozen=True)
class Intent:
    """An action on a VM that was begun; one without completion was interrupted."""

    id: int
    vm: str
    action: str
    started_at: float


@dataclass(frozen=True)
class OutboxMessage:
    """A notification to deliver (``reconciler.notify``): ``body`` is what is sent, already
    rendered for ``destination`` (an endpoint's name, never its URL, which is a secret)."""

    key: str  # deduplicates: the outbox holds at most one message per key, ever enqueued
    destination: str
    kind: str
    body: str


class OutboxState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    ABANDONED = "abandoned"  # given up after its attempts or its age


@dataclass(frozen=True)
class OutboxEntry:
    """A message of the outbox as stored."""

    id: int
    message: OutboxMessage
    state: OutboxState
    attempts: int  # failed attempts so far
    created_at: float
    next_attempt_at: float
    last_error: str


class StateStore(Protocol):
    def claim_term(self, fence: Fence) -> None:
        """Fence every later write with ``fence`` and record its term as the newest, so writes
        under any older term (another replica's, through another handle) are refused from now
        on. ``StaleTermError`` when a newer term already claimed the store."""
        ...

    def release_fence(self) -> None:
        """Writes are no longer fenced (the daemon stepped down and only reads now)."""
        ...

    def observed(self) -> ObservedFleet:
        """Every recorded VM and the store's current version."""
        ...

    def version(self) -> int: ...

    def put_vm(self, vm: ObservedVM) -> None:
        """Insert or replace one VM's record; bumps the version."""
        ...

    def remove_vm(self, name: str) -> None:
        """Forget one VM; bumps the version. Removing an unknown VM is not an error."""
        ...

    def record_revision(self, revision: str, *, outcome: str, message: str = "") -> None:
        """Record an attempt at a revision; ``applied`` ones become the applied revision.
        ``outcome`` is ``applied`` or ``failed`` (``ValueError`` otherwise)."""
        ...

    def begin_intent(self, vm: str, action: str) -> int:
        """Record, durably, that ``action`` on ``vm`` starts now; returns the intent's id."""
        ...

    def complete_intent(self, intent: int, outcome: str = "done") -> None: ...

    def open_intents(self) -> list[Intent]:
        """Intents begun and never completed: what a killed reconciler was doing."""
        ...

    def applied_revision(self) -> RevisionRecord | None: ...

    def revisions(self, limit: int = 50) -> list[RevisionRecord]:
        """The newest attempts at revisions, applied and failed, newest first: the history."""
        ...

    def record_artifacts(self, revision: str, artifacts: Mapping[str, Sequence[str]]) -> None:
        """Fenced: the artifact digests each workload ran when ``revision`` was applied,
        replacing what was recorded for those workloads at that revision; never bumps the
        version."""
        ...

    def revision_artifacts(self, revision: str) -> dict[str, tuple[str, ...]]:
        """What ``record_artifacts`` recorded for ``revision``, by workload."""
        ...

    def pin(self, workload: str | None, revision: str, reason: str = "") -> None:
        """Hold one workload, or the fleet (``None``), at ``revision`` (replacing an earlier
        pin of it); never fenced (like a suspension), recorded in the events history in the
        same write."""
        ...

    def unpin(self, workload: str | None) -> bool:
        """Lift a pin (and record it in the events); ``False`` when there was none."""
        ...

    def pins(self) -> dict[str, Pin]:
        """The pins in force, by workload; the key ``FLEET_WIDE`` pins the whole fleet."""
        ...

    def record_vm_history(
        self,
        vm: str,
        kind: str,
        detail: str,
        *,
        healthy: bool | None = None,
        term: int | None = None,
    ) -> None:
        """Append to ``vm``'s history (``VMHistoryEntry``), keeping its newest
        ``VM_HISTORY_KEPT`` entries. Never fenced, never bumps the version (like events)."""
        ...

    def vm_history(self, vm: str, limit: int = VM_HISTORY_KEPT) -> list[VMHistoryEntry]:
        """The newest entries of ``vm``'s history, newest first."""
        ...

    def attempted_revision(self) -> RevisionRecord | None: ...

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None:
        """Append to the history; never fenced, never bumps the version."""
        ...

    def events(self, limit: int = 50) -> list[Event]:
        """The newest events, newest first."""
        ...

    def suspend(self, workload: str | None, reason: str = "") -> None:
        """Suspend one workload, or the fleet (``None``): the daemon leaves it as it runs.
        Recorded in the events history with the suspension, in one write."""
        ...

    def resume(self, workload: str | None) -> bool:
        """Lift a suspension (and record it in the events); ``False`` when there was none."""
        ...

    def suspensions(self) -> dict[str, str]: ...

    def rollouts(self) -> dict[str, RolloutState]:
        """Each workload's last rollout (``planning.rollout``), by workload."""
        ...

    def put_rollout(self, state: RolloutState) -> None:
        """Fenced: store a workload's rollout (the leader's); never bumps the version."""
        ...

    def switch_rollout(self, switch: RolloutSwitch) -> None:
        """An operator's promote or abort, replacing the workload's earlier one; never fenced
        (like a suspension), recorded in the events history in the same write."""
        ...

    def rollout_switches(self) -> dict[str, RolloutSwitch]: ...

    def enqueue(self, messages: Sequence[OutboxMessage]) -> int:
        """Fenced, one transaction: add each message whose ``key`` the outbox has never held
        (pending, delivered or abandoned alike), due at once; returns how many were added. A
        second leader enqueueing what the first did adds nothing. Never bumps the version."""
        ...

    def due_messages(self, now: float, limit: int = 100) -> list[OutboxEntry]:
        """Pending messages to attempt at ``now``: for each destination only its oldest pending
        message (each destination gets its messages in order), and only if it is due
        (``next_attempt_at <= now``); oldest first, at most ``limit``."""
        ...

    def settle_message(
        self, entry: int, *, delivered: bool, error: str = "", retry_at: float | None = None
    ) -> None:
        """Fenced: the outcome of an attempt at a pending message. Delivered: done. Not
        delivered: one more failed attempt with ``error`` (credentials redacted), attempted
        again at ``retry_at``, or abandoned when ``retry_at`` is ``None``. Never bumps the
        version; settling a message that is no longer pending changes nothing."""
        ...

    def outbox(self, limit: int = 50) -> list[OutboxEntry]:
        """The newest messages in any state, newest first."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Closes it: a store is used as ``with open_...(...) as store:``."""
        ...
