"""Fields that every log line of a unit of work carries, without passing them around.

    daemon cycle ──log_fields(term=…)──▶ revision step ──log_fields(revision=…)──▶ executor
        ──log_fields(vm=…)──▶ any ``logging`` call ──ContextFilter (on the handler)──▶ fields

A cycle's lines say which ``term`` and ``revision`` they belong to, and an action's which
``vm``, whichever module logs them: the JSON formatter writes them as fields, the plain one as
``key=value``. Context variables rather than a ``LoggerAdapter`` because the lines come from
modules that know nothing of the cycle (the executor, health checks, builders); each thread
starts with no fields, so the HTTP threads never borrow the worker's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

# An immutable empty default: the one default object is shared by every context.
_FIELDS: ContextVar[Mapping[str, object]] = ContextVar(
    "reconciler_log_fields", default=MappingProxyType({})
)


@contextmanager
def log_fields(**fields: object) -> Iterator[None]:
    """Add ``fields`` to every log record made inside the block (inner values win)."""
    token = _FIELDS.set({**_FIELDS.get(), **fields})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def current_fields() -> Mapping[str, object]:
    return _FIELDS.get()


class ContextFilter(logging.Filter):
    """Copies the current fields onto each record; a field passed with ``extra=`` wins.

    On the handler, like any filter that must see the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _FIELDS.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True
