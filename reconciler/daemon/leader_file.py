"""``leader.json`` in the state directory: how commands on this host find the leading daemon.

The leader writes it when it claims a term; ``reconciler reconcile --now``, ``status`` and
``apply`` read it. It is a hint, never a lock: a file whose process is gone means no daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict

LEADER_FILE = "leader.json"
TOKEN_FILE = "api-token"


class LeaderEntry(TypedDict):
    holder: str  # the leading replica's identity
    term: int
    url: str  # where its HTTP API listens
    pid: int  # its process, on this host


def _entry(raw: object) -> LeaderEntry:
    """A ``LeaderEntry`` from parsed JSON; ``ValueError`` (or ``KeyError``, ``TypeError``)
    when the file is not one: it is written by another process, maybe another release."""
    if not isinstance(raw, dict):
        raise TypeError("not an object")
    return LeaderEntry(
        holder=str(raw["holder"]), term=int(raw["term"]), url=str(raw["url"]), pid=int(raw["pid"])
    )


def write_leader(state_dir: Path, entry: LeaderEntry) -> None:
    path = state_dir / LEADER_FILE
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(entry))
    os.replace(staging, path)


def running_leader(state_dir: Path) -> LeaderEntry | None:
    """The leader's entry when its process lives."""
    try:
        entry = _entry(json.loads((state_dir / LEADER_FILE).read_text()))
        pid = entry["pid"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by somebody else
    return entry
