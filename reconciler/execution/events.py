"""What the executor reports while it works: small typed records, rendered to text at the edge.

    Executor, health, volumes ──ExecutionEvent──▶ Reporter (a callback)
        ├─ reconciler apply: ``print_event`` (one line per event on stdout)
        └─ the daemon's cycle: one log line per event, ``vm`` and ``event`` as fields

The effectful code says *what happened* (``kind``, ``vm`` and the facts of that kind); only
``ExecutionEvent.text`` decides how it reads, so the CLI, the log and tests agree on one
wording, and a consumer (a test, a future event stream) can match on fields instead of prose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from reconciler.model import short_digest


class EventKind(StrEnum):
    INTENT_RESUMED = "intent-resumed"  # an action a killed reconciler left open
    ORPHAN_REMOVED = "orphan-removed"  # a network device or namespace nobody recorded
    ACTION = "action"  # an action of the plan begins
    HEALTH = "health"  # the verdict on a VM's health
    ROLLBACK = "rollback"  # a VM goes back to the artifact it ran healthy
    ROLLBACK_IMPOSSIBLE = "rollback-impossible"  # its previous artifact left the cache
    VOLUME_GROWN = "volume-grown"
    VOLUME_LARGER = "volume-larger"  # declared smaller than it is: volumes never shrink
    VOLUME_DELETED = "volume-deleted"  # pruned with reclaimPolicy delete
    VOLUME_RETAINED = "volume-retained"  # pruned with reclaimPolicy retain
    VM_STOPPED_FOR_RESTORE = "vm-stopped-for-restore"
    PHASE = "phase"  # how long one phase of bringing a VM up took (the daemon's timeline)


@dataclass(frozen=True)
class ExecutionEvent:
    """One thing the executor did or learnt. ``detail`` is the free text of its kind: the
    action's reason, the health verdict's why, the device's name."""

    kind: EventKind
    vm: str | None = None
    action: str | None = None  # ACTION, INTENT_RESUMED: the action type's value
    detail: str = ""
    healthy: bool | None = None  # HEALTH
    artifact: str | None = None  # ROLLBACK: the digest gone back to
    volume: str | None = None  # VOLUME_*: the volume's name
    size_mib: int | None = None  # VOLUME_GROWN, VOLUME_LARGER: the declared size
    phase: str | None = None  # PHASE: build, stop, vmm-start, boot, workload, probe
    seconds: float | None = None  # PHASE: how long it took

    def text(self) -> str:
        """The one rendering of this event as a line of text."""
        kind, vm = self.kind, self.vm or "-"
        volume = f"volume {vm}/{self.volume}"
        match kind:
            case EventKind.INTENT_RESUMED:
                return f"resuming after an interrupted {self.action} of {vm}"
            case EventKind.ORPHAN_REMOVED:
                return f"removed orphaned network device or namespace {self.detail}"
            case EventKind.ACTION:
                return f"{self.action or '':<8} {vm}: {self.detail}"
            case EventKind.HEALTH:
                return f"{'healthy' if self.healthy else 'UNHEALTHY':<8} {vm}: {self.detail}"
            case EventKind.ROLLBACK:
                return f"rollback {vm}: back to artifact {short_digest(self.artifact)}"
            case EventKind.ROLLBACK_IMPOSSIBLE:
                return f"cannot roll back {vm}: its previous artifact is no longer cached"
            case EventKind.VOLUME_GROWN:
                return f"{volume}: grown to {self.size_mib} MiB"
            case EventKind.VOLUME_LARGER:
                return (
                    f"{volume}: kept at its larger size "
                    f"(declared {self.size_mib} MiB; volumes never shrink)"
                )
            case EventKind.VOLUME_DELETED:
                return f"{volume}: deleted (reclaimPolicy delete)"
            case EventKind.VOLUME_RETAINED:
                return (
                    f"{volume}: kept (reclaimPolicy retain); "
                    f"remove it with `reconciler volumes rm {vm}/{self.volume}`"
                )
            case EventKind.VM_STOPPED_FOR_RESTORE:
                return f"stopping {vm}: a volume is restored only while its VM is stopped"
            case EventKind.PHASE:
                more = f" ({self.detail})" if self.detail else ""
                return f"{'phase':<8} {vm}: {self.phase} {self.seconds or 0.0:.3f} s{more}"

    def fields(self) -> dict[str, object]:
        """The structured fields of a log line about this event (``vm``, ``event``, ...)."""
        found: dict[str, object] = {"event": str(self.kind)}
        for key in ("vm", "action", "healthy", "volume", "phase", "seconds"):
            value = getattr(self, key)
            if value is not None:
                found[key] = value
        return found


Reporter = Callable[[ExecutionEvent], None]


def print_event(event: ExecutionEvent) -> None:
    """The reporter of one-shot commands (``reconciler apply``): a line on stdout. Phase
    timings are the daemon's timeline (its events and metrics), not part of apply's output."""
    if event.kind is not EventKind.PHASE:
        print(event.text())


def ignore_event(event: ExecutionEvent) -> None:
    """A reporter for callers that have nowhere to show events."""
