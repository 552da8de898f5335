"""Row decoders shared by the SQLite and PostgreSQL stores.

Both stores select the same columns in the same order, so one function per record turns a row
into the model's value; values go through ``str`` first because SQLite hands back whatever type
a column was written with, while psycopg hands back Python numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from reconciler.model import ObservedVM, RuntimeKind, Target, VMState
from reconciler.state.protocol import OutboxEntry, OutboxMessage, OutboxState, VMHistoryEntry

OUTBOX_COLUMNS = (
    "id, key, destination, kind, body, state, attempts, created_at, next_attempt_at, last_error"
)


def vm_from_row(row: Sequence[object]) -> ObservedVM:
    (name, fleet, workload, runtime, target, digest, inputs, settings) = row[:8]
    state, healthy, pid, address, detail, started_at, restarts = row[8:]
    return ObservedVM(
        name=str(name),
        workload=str(workload),
        fleet=str(fleet),
        runtime=RuntimeKind(str(runtime)),
        target=Target(str(target)),
        artifact_digest=str(digest),
        artifact_inputs=json.loads(str(inputs)),
        settings=json.loads(str(settings)),
        state=VMState(str(state)),
        healthy=None if healthy is None else bool(healthy),
        pid=None if pid is None else int(str(pid)),
        address=None if address is None else str(address),
        detail=str(detail),
        started_at=None if started_at is None else float(str(started_at)),
        restarts=int(str(restarts or 0)),
    )


def outbox_entry_from_row(row: Sequence[object]) -> OutboxEntry:
    (entry, key, destination, kind, body, state, attempts, created, due, error) = row
    return OutboxEntry(
        id=int(str(entry)),
        message=OutboxMessage(str(key), str(destination), str(kind), str(body)),
        state=OutboxState(str(state)),
        attempts=int(str(attempts)),
        created_at=float(str(created)),
        next_attempt_at=float(str(due)),
        last_error=str(error),
    )


def history_from_row(row: Sequence[object]) -> VMHistoryEntry:
    vm, at, kind, detail, healthy, term = row
    return VMHistoryEntry(
        vm=str(vm),
        at=float(str(at)),
        kind=str(kind),
        detail=str(detail),
        healthy=None if healthy is None else bool(healthy),
        term=None if term is None else int(str(term)),
    )
