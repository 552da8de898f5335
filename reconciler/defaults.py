"""Where a host keeps what reconciler reads by default: the state directory and the name of the
age key that opens the fleet's secrets.

Read by the CLI before every command (``cli.environment``), by ``state`` and by ``secrets``.
Kept apart from those packages on purpose: naming a default must not import a database driver
or a cipher library, so that a command that needs neither (``diff`` of a fleet without
secrets) does not pay for them at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

AGE_KEY_ENV = "SOPS_AGE_KEY_FILE"
"""The variable naming the age identity (the one ``sops`` itself reads)."""
AGE_KEY_FILE = "age-key.txt"
"""The age identity's file in the state directory, when no option or variable names one."""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$RECONCILER_STATE_DIR``, else the user's state directory (``$XDG_STATE_HOME/reconciler``,
    ``~/.local/state/reconciler``)."""
    env = os.environ if environ is None else environ
    if env.get("RECONCILER_STATE_DIR"):
        return Path(env["RECONCILER_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(base).expanduser() / "reconciler"
