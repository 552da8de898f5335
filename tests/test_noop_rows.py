"""``NoopRows``: runs of no-op rows read as the tuple of actions they stand for."""

from __future__ import annotations

import pickle

from reconciler.model import ActionType, Disruption, VMAction
from reconciler.noop_rows import NoopRows, NoopRun, noop


def spelled(workload: str, reason: str, ordinals: range) -> list[VMAction]:
    return [noop(f"{workload}-{o}", workload, reason) for o in ordinals]


def test_rows_read_as_the_tuple_they_stand_for() -> None:
    single = noop("db-4", "db", "up to date")
    rows = NoopRows(
        [NoopRun("web", "up to date", range(3)), single, NoopRun("api", "suspended", range(2, 4))]
    )
    expected = (
        *spelled("web", "up to date", range(3)),
        single,
        *spelled("api", "suspended", range(2, 4)),
    )
    assert len(rows) == 6
    assert tuple(rows) == expected
    assert rows == expected
    assert expected == rows
    assert rows[0] == noop("web-0", "web", "up to date")
    assert rows[-1].vm == "api-3"
    assert rows[1:3] == expected[1:3]
    assert hash(rows) == hash(expected)
    assert rows == NoopRows(expected)  # the same rows, kept another way
    assert rows != NoopRows(expected[:-1])
    assert list(reversed(rows)) == list(reversed(expected))
    assert rows.index(single) == 3
    assert single in rows
    assert all(
        a.action is ActionType.NOOP and a.disruption is Disruption.NONE and not a.changes
        for a in rows
    )


def test_empty_runs_add_no_rows() -> None:
    rows = NoopRows([NoopRun("web", "up to date", range(0))])
    assert len(rows) == 0
    assert not rows
    assert tuple(rows) == ()
    assert NoopRows() == ()


def test_rows_survive_pickling_as_runs() -> None:
    rows = NoopRows([NoopRun("web", "up to date", range(100_000))])
    copy = pickle.loads(pickle.dumps(rows))
    assert isinstance(copy, NoopRows)
    assert copy.runs == rows.runs
    assert copy == rows
    assert len(pickle.dumps(rows)) < 1_000  # the run, not 100,000 actions
