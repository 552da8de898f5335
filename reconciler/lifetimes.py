"""``with`` for everything that holds a resource (pure; the bottom layer).

Stores, leases, the network and the host each own something that must be let go (a database
connection, a lock, a netlink socket): :class:`ClosedOnExit` gives every one of them the same
``with open_...(...) as x:`` lifetime over its own ``close``, so no caller needs a
``try``/``finally`` of its own.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosedOnExit:
    """Mixin: leaving a ``with`` block calls ``close()``, whatever ended the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
