"""One QMP connection to a VM's QEMU, on an asyncio event loop of its own.

    driver.stop / snapshot / volume pause ──qmp_connection(socket)──▶ QEMU's QMP socket

qemu.qmp's synchronous client drives its asyncio client on the calling thread's current event
loop, creating and registering one when the thread has none, and nothing ever closes that loop.
The reconciler talks QMP from several threads (the reconcile loop, a stop run in a worker,
short-lived HTTP handler threads): each left a loop with its self-pipe open behind it. Here each
connection gets a fresh loop, closed with the connection. Nothing else in the reconciler uses
asyncio, so the thread's current loop is simply cleared afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

QMP_FAILURES = (OSError, EOFError, QMPError)
"""What a connection or a command raises when QEMU is gone, busy or refuses."""


@contextlib.contextmanager
def qmp_connection(
    socket: Path,
    *,
    timeout: float,
    retry_for: float = 0.0,
    on_refused: Callable[[Exception], Exception] | None = None,
) -> Iterator[QEMUMonitorProtocol]:
    """A negotiated QMP connection to ``socket``; connecting is retried for ``retry_for``
    seconds, and a connection that cannot be made raises ``on_refused(error)`` when given (the
    error itself otherwise). Closed, with its event loop, on leaving."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the client picks the thread's current loop up
    try:
        deadline = time.monotonic() + retry_for
        while True:
            monitor = QEMUMonitorProtocol(str(socket))
            monitor.settimeout(timeout)
            try:
                monitor.connect(negotiate=True)
                break
            except QMP_FAILURES as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if on_refused is not None:
                    raise on_refused(exc) from exc
                raise
        try:
            yield monitor
        finally:
            # After "quit" QEMU hangs up first; closing then reports the end of the stream.
            with contextlib.suppress(*QMP_FAILURES):
                monitor.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()
