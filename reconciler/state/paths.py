"""Where the state directory is: ``--state-dir``, else ``RECONCILER_STATE_DIR``, else the
user's state directory (``$XDG_STATE_HOME/reconciler``, ``~/.local/state/reconciler``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("RECONCILER_STATE_DIR"):
        return Path(env["RECONCILER_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(base).expanduser() / "reconciler"
