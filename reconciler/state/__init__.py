"""The state store: what runs (observed VMs), which revisions were applied and attempted, and a
version number that grows with every write so a saved plan can tell the world moved.

``StateStore`` is the Protocol the rest of the code sees and ``open_state_store`` the one way to
open a state directory's store (SQLite, the embedded default); no code outside this package
names an implementation. The execution layer writes it; ``diff`` and ``status`` read it.
"""

from reconciler.model import FLEET_WIDE
from reconciler.state.paths import default_state_dir
from reconciler.state.protocol import Event, Intent, RevisionRecord, StateStore
from reconciler.state.sqlite import open_state_store

__all__ = [
    "FLEET_WIDE",
    "Event",
    "Intent",
    "RevisionRecord",
    "StateStore",
    "default_state_dir",
    "open_state_store",
]
