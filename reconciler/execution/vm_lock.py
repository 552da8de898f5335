"""One VM's start or stop at a time on this host, across every reconciler sharing the state
directory.

    Executor ──vm_lock(state_dir, name)──▶ <state-dir>/vm-locks/<name>.lock (flock)
             └─ fence check, runtime start/stop, inside the lock

The failure it prevents: a leader paused (SIGSTOP, a stuck disk) in the middle of starting a VM
wakes after a successor took over. The successor saw the VM recorded but not running and
started it; the old leader, already past its fence check, launches a second one and overwrites
the pid file, and the first runs on unseen. A runtime's ``start`` adopts a VM that already runs,
but only if its check and its launch are not interleaved with another process's: under this
lock they are not. Whoever takes the lock second checks its fence again and, still entitled to
act, finds the VM running and adopts it.

The lock files live beside, not inside, the VM directories: a removed VM's directory goes, and
an ``flock`` on an unlinked file would serialise nothing with the next one. The kernel drops an
``flock`` when its holder dies, so a killed reconciler never leaves a VM locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from reconciler.errors import VMRuntimeError

LOCK_DIR = "vm-locks"
DEFAULT_TIMEOUT = 60.0
"""Longer than any start or stop takes (a stop waits out a 10 s grace period), short enough
that a reconciler stuck behind a frozen peer gives up with an error and retries next cycle."""


@contextlib.contextmanager
def vm_lock(
    state_dir: Path,
    name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold ``name``'s lock; raise ``VMRuntimeError`` when another holder keeps it past
    ``timeout`` seconds."""
    directory = state_dir / LOCK_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if monotonic() >= deadline:
                    raise VMRuntimeError(
                        f"{name}: another reconciler on this host has been starting or stopping "
                        f"it for more than {timeout:g} s; the next cycle tries again"
                    ) from None
                sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
