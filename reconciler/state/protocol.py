"""The ``StateStore`` Protocol: the seam between the control plane and its persistence.

    execution (observer, executor, health) ──writes (fenced)──▶ StateStore ◀──reads── status,
    daemon (revisions, events; claims its term)                                 diff, the view

Every implementation keeps the same promises, checked by one contract suite run against each
(``tests/test_store_contract.py``): the version moves on every write of VMs, intents and
revisions and on nothing else; fenced writes are refused, inside the write, when the fence is no
longer valid or a newer term has claimed the store; events and suspensions are never fenced;
credentials are never stored in messages. ``SQLiteStateStore`` is the embedded default and the
only one ``open_state_store`` makes today.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from reconciler.leadership.fence import Fence
from reconciler.model import ObservedFleet, ObservedVM


@dataclass(frozen=True)
class RevisionRecord:
    revision: str
    outcome: str  # "applied" | "failed"
    message: str
    at: float  # seconds since the epoch


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
