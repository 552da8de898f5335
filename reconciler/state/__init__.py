"""The state store: what runs (observed VMs), which revisions were applied and attempted, and a
version number that grows with every write so a saved plan can tell the world moved.

``StateStore`` is the Protocol the rest of the code sees and ``open_state_store`` the one way to
open a store: a state directory's (SQLite, the embedded default) or, given a ``StoreLocation``
with a ``postgresql://`` URL, the PostgreSQL store the hosts of a fleet share; no code outside
this package names an implementation. The execution layer writes it; ``diff`` and ``status``
read it.

The names below are imported when first used (PEP 562 ``__getattr__``), so that a module that
needs one constant of ``state.hosts`` (``diff``'s options) does not load the store's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reconciler.defaults import default_state_dir
from reconciler.model import FLEET_WIDE

if TYPE_CHECKING:
    from reconciler.state.location import LeaseBinding, StoreLocation, open_state_store
    from reconciler.state.protocol import (
        Event,
        Intent,
        Pin,
        RevisionRecord,
        StateStore,
        VMHistoryEntry,
    )

_LAZY = {
    "LeaseBinding": "location",
    "StoreLocation": "location",
    "open_state_store": "location",
    "Event": "protocol",
    "Intent": "protocol",
    "Pin": "protocol",
    "RevisionRecord": "protocol",
    "StateStore": "protocol",
    "VMHistoryEntry": "protocol",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "FLEET_WIDE",
    "Event",
    "Intent",
    "LeaseBinding",
    "Pin",
    "RevisionRecord",
    "StateStore",
    "StoreLocation",
    "VMHistoryEntry",
    "default_state_dir",
    "open_state_store",
]
