"""The state store: what runs (observed VMs), which revisions were applied and attempted, and a
version number that grows with every write so a saved plan can tell the world moved.

``StateStore`` is the Protocol the rest of the code sees and ``open_state_store`` the one way to
open a store: a state directory's (SQLite, the embedded default) or, given a ``StoreLocation``
with a ``postgresql://`` URL, the PostgreSQL store the hosts of a fleet share; no code outside
this package names an implementation. The execution layer writes it; ``diff`` and ``status``
read it.
"""

from reconciler.defaults import default_state_dir
from reconciler.model import FLEET_WIDE
from reconciler.state.location import LeaseBinding, StoreLocation, open_state_store
from reconciler.state.protocol import Event, Intent, Pin, RevisionRecord, StateStore, VMHistoryEntry

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
