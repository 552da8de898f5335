"""The "nothing to do" rows of a plan (``Plan.noops``), most of them kept as runs.

    planning.diff ──NoopRun(workload, reason, ordinals)──▶ NoopRows ──▶ model.Plan.noops
                                                                     ├─▶ render.json_format
                                                                     └─▶ every other reader

A comparison of two revisions of 10,000 workloads has some 100,000 no-op rows: per workload,
replicas ``0..n-1`` "up to date", alike but for the VM's name. Making a ``VMAction`` for each
cost a comparison that changes one workload a fifth of its time, and the JSON renderer then
looked at every one of them again to find that they are alike. ``NoopRows`` keeps such a run as
one record: it reads as the tuple of actions it stands for (iteration, length, indexing and
equality are those of that tuple), and the JSON renderer writes a run's rows from one encoded
row (``runs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from reconciler.model import ActionType, Disruption, VMAction, vm_name


@dataclass(frozen=True)
class NoopRun:
    """Replicas ``ordinals`` of ``workload``, each left alone for ``reason``."""

    workload: str
    reason: str
    ordinals: range

    def template(self) -> VMAction:
        """The row of the run's first replica (or of replica 0 when the run is empty); the
        others differ from it only in the VM's name."""
        first = self.ordinals[0] if self.ordinals else 0
        return noop(vm_name(self.workload, first), self.workload, self.reason)

    def actions(self) -> Iterator[VMAction]:
        # Copies of one record with the VM's name filled in: the frozen dataclass's
        # ``__init__`` (a guarded ``__setattr__`` per field) costs five times as much.
        fields = vars(self.template())
        new = object.__new__
        for ordinal in self.ordinals:
            action = new(VMAction)
            slots = action.__dict__
            slots.update(fields)
            slots["vm"] = vm_name(self.workload, ordinal)
            yield action


def noop(vm: str, workload: str, reason: str) -> VMAction:
    return VMAction(
        action=ActionType.NOOP, vm=vm, workload=workload, disruption=Disruption.NONE, reason=reason
    )


class NoopRows(Sequence[VMAction]):
    """The tuple of ``VMAction`` that ``parts`` (single actions and runs, in order) stand for,
    without making the runs' actions until they are read."""

    __slots__ = ("_length", "_rows", "runs")

    def __init__(self, parts: Iterable[VMAction | NoopRun] = ()) -> None:
        self.runs: tuple[VMAction | NoopRun, ...] = tuple(parts)
        self._length = sum(
            len(part.ordinals) if isinstance(part, NoopRun) else 1 for part in self.runs
        )
        self._rows: tuple[VMAction, ...] | None = None

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[VMAction]:
        if self._rows is not None:
            yield from self._rows
            return
        for part in self.runs:
            if isinstance(part, NoopRun):
                yield from part.actions()
            else:
                yield part

    @overload
    def __getitem__(self, index: int) -> VMAction: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[VMAction, ...]: ...

    def __getitem__(self, index: int | slice) -> VMAction | tuple[VMAction, ...]:
        return self.rows()[index]

    def rows(self) -> tuple[VMAction, ...]:
        """Every row made (once), for random access."""
        if self._rows is None:
            self._rows = tuple(iter(self))
        return self._rows

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NoopRows):
            return self.rows() == other.rows()
        if isinstance(other, tuple):
            return self.rows() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.rows())

    def __repr__(self) -> str:
        return f"NoopRows({self.rows()!r})"

    def __reduce__(self) -> tuple[type[NoopRows], tuple[tuple[VMAction | NoopRun, ...]]]:
        return (NoopRows, (self.runs,))


def all_rows(noops: Sequence[VMAction]) -> Sequence[VMAction | NoopRun]:
    """``noops`` as single actions and runs: a ``NoopRows``'s own parts, any other sequence's
    actions one by one."""
    return noops.runs if isinstance(noops, NoopRows) else noops
