"""The ``StateStore`` Protocol: the seam between the control plane and its persistence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reconciler.model import ObservedFleet, ObservedVM


@dataclass(frozen=True)
class RevisionRecord:
    revision: str
    outcome: str  # "applied" | "failed"
    message: str
    at: float  # seconds since the epoch


class StateStore(Protocol):
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
        """Record an attempt at a revision; ``applied`` ones become the applied revision."""
        ...

    def applied_revision(self) -> RevisionRecord | None: ...

    def attempted_revision(self) -> RevisionRecord | None: ...

    def close(self) -> None: ...
