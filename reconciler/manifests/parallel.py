"""The loader's second core: half of a large first load done in a forked child process.

    load_fleet ──▶ ``in_child(work)`` ──▶ (child) parse + schema / compile half the items
               └─▶ (parent) the other half, then ``Pending.result()`` ──▶ CompileCache
    CompileCache.save ──▶ ``detached(write)`` ──▶ (grandchild) the cache file, after we exit

A first load of a large revision (thousands of files or workloads nobody parsed or compiled
before) is CPU-bound and pure, and a CI runner or a daemon host has more than one core. The
child does exactly what the parent would have done for its half and hands back what the
``CompileCache`` would have learnt (``marshal``-ed through a pipe; compiled workloads as one
``pickle`` inside it: bytes from our own child, never from a file); the parent then finds
those entries as if an earlier process had left them. Nothing the child learns is trusted
beyond that: an item the child could not do (a problem reported, a value that is not plain
data, a child that died) is simply done again by the parent, which reports every problem
itself, in its own order. So the outcome, and every message, is the one of a serial load.

Only above a size threshold (small fleets do not pay for a fork), only where ``os.fork``
exists, and only in a single-threaded process: forking a process with other threads can
inherit a lock one of them held (the daemon's threads never reach here with a large first
load in flight, but this is checked rather than assumed).

``detached`` is the other use of a fork: the compile cache of a large first load takes most of
a second to encode and write, and nobody waits for it, so it is written by a process that
outlives the command (as ``git gc --auto`` detaches), atomically, for the next run.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import threading
from collections.abc import Callable
from typing import Any


class Pending:
    """A forked child's result; ``result`` waits for it, ``close`` abandons it."""

    def __init__(self, pid: int, stream: int) -> None:
        self.pid = pid
        self.stream = stream
        self._done = False
        self._code = -1

    def result(self) -> Any | None:
        """What the child's function returned, or None when the child failed in any way (the
        caller then does the work itself)."""
        if self._done:
            return None
        chunks: list[bytes] = []
        try:
            while chunk := os.read(self.stream, 1 << 20):
                chunks.append(chunk)
        except OSError:
            chunks = []
        finally:
            self._finish()
            code = self._code
        if code != 0 or not chunks:
            return None
        try:
            return marshal.loads(b"".join(chunks))
        except (ValueError, EOFError, TypeError):
            return None

    def close(self) -> None:
        """Stop the child if it still runs (the parent gave up on the load)."""
        if not self._done:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self.stream)
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(self.pid, 0)
            self._code = os.waitstatus_to_exitcode(status)


def can_fork() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1 and (os.cpu_count() or 1) > 1


def in_child(work: Callable[[], Any]) -> Pending | None:
    """Run ``work`` in a forked child; None when this process should not fork (then the caller
    does everything itself). ``work`` must return plain data (``marshal``)."""

    def send(write: int) -> None:
        view = memoryview(marshal.dumps(work()))
        while view:
            view = view[os.write(write, view) :]

    return _forked(send)


def detached(work: Callable[[], object]) -> Pending | None:
    """Run ``work`` in a process that this one does not wait for when it exits (a grandchild,
    in its own session, with stdin, stdout and stderr on ``/dev/null``, so that a caller who
    reads this process's output to its end does not wait for it either); None when this process
    should not fork. ``Pending.result`` waits for it all the same (and returns None): for a
    later write that must not land before it."""

    def start(_write: int) -> None:
        # The child is gone at once; the grandchild holds the write end until it exits: that
        # is the EOF ``Pending.result`` waits for.
        if os.fork() == 0:
            os.setsid()
            quiet = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(quiet, fd)
            work()

    return _forked(start)


def _forked(child: Callable[[int], None]) -> Pending | None:
    """Fork; the child runs ``child`` with the write end of a pipe and exits (0 when it
    returned, 1 on any failure: the caller then does the work itself, or goes without it),
    never returning into the caller's stack. None when this process should not fork."""
    if not can_fork():
        return None
    read, write = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return None
    if pid == 0:
        code = 1
        try:
            os.close(read)
            child(write)
            code = 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    return Pending(pid, read)
