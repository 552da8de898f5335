"""``leader.json`` in the state directory: how commands on this host find the leading daemon.

The leader writes it when it claims a term; ``reconciler reconcile --now``, ``status`` and
``apply`` read it. It is a hint, never a lock: a file whose process is gone means no daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LEADER_FILE = "leader.json"
TOKEN_FILE = "api-token"


def write_leader(state_dir: Path, entry: dict[str, Any]) -> None:
    path = state_dir / LEADER_FILE
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(entry))
    os.replace(staging, path)


def running_leader(state_dir: Path) -> dict[str, Any] | None:
    """The leader's entry (``holder``, ``term``, ``url``, ``pid``) when its process lives."""
    try:
        entry = json.loads((state_dir / LEADER_FILE).read_text())
        pid = int(entry["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by somebody else
    return dict(entry)
