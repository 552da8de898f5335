"""The state directory and its files kept private to their owner. Where the directory is
(``--state-dir``, else ``RECONCILER_STATE_DIR``, else the user's state directory) is
``reconciler.defaults.default_state_dir``."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.errors import StateError

# The state directory holds env values, events, the API token and every VM's console: nobody
# but its owner may read it. Modes are checked at every start, not only at creation, because a
# directory made by an older release (0755) or by hand must not stay open.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_state_dir(path: Path) -> list[str]:
    """Create ``path`` private (0700), or make an existing one private; refuse one that belongs
    to another user. Returns what was tightened, for a warning."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.geteuid():
            raise StateError(
                f"the state directory {path} belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.geteuid()}); use a --state-dir of your own"
            )
        tightened = []
        if info.st_mode & 0o077:
            os.chmod(path, PRIVATE_DIR_MODE)
            tightened.append(f"{path} ({info.st_mode & 0o777:o} -> 700)")
        return tightened
    except OSError as exc:
        raise StateError(
            f"cannot open the state store in {path}: {exc.strerror}; "
            "check --state-dir and its permissions"
        ) from exc


def private_file(path: Path, *, create: bool = True) -> list[str]:
    """Make ``path`` 0600 (creating it empty when ``create``); returns what was tightened.

    Path-based on purpose: closing any descriptor of a file drops every POSIX lock this process
    holds on it, and SQLite locks its files that way, so opening a store file that another
    connection of this process uses (the daemon's threads each have one) would corrupt the
    store. ``create=False`` is for SQLite's ``-wal`` and ``-shm``, which the last connection to
    close deletes: recreating one behind SQLite's back leaves a store nobody can open."""
    if create:
        try:
            # O_EXCL: only a file made just now, which nobody can hold a lock on yet.
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
            return []
        except FileExistsError:
            pass
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, PRIVATE_FILE_MODE)
            return [f"{path} ({mode:o} -> 600)"]
    except FileNotFoundError:
        pass  # a companion file that SQLite removed meanwhile
    return []
