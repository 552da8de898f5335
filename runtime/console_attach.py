"""``reconciler console VM``: the operator's terminal joined to a VM's serial console.

    terminal (raw mode) ◀──bytes──▶ <vm dir>/console.sock ◀──▶ QEMU chardev ◀──▶ guest ttyS0

QEMU serves the console as a UNIX socket chardev (``runtime/qemu/argv.py``: ``server=on,
wait=off``, and ``logfile=`` keeps writing ``console.log`` for health and ``logs``), so joining
it needs no new QEMU option and no restart: connect, then copy bytes both ways until the
operator types the escape key (Ctrl-], as telnet does) or QEMU closes the socket. QEMU accepts
one client at a time; a second ``console`` waits until the first detaches.

The terminal is put in raw mode when it is one (every key, Ctrl-C included, goes to the guest)
and restored on every way out. Without a terminal (a pipe) bytes are copied as they come; at
the end of the input the console stays attached, reading, until the escape byte or the VM ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from reconciler.errors import VMRuntimeError

ESCAPE = 0x1D  # Ctrl-]
ESCAPE_NAME = "Ctrl-]"


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise VMRuntimeError(
            f"cannot reach the console socket {path}: {exc.strerror or exc}; is the VM running?"
        ) from exc
    sock.setblocking(False)
    return sock


def attach(path: Path, stdin: int, stdout: int) -> str:
    """Copy bytes between ``stdin``/``stdout`` and the console socket at ``path`` until the
    escape byte (returns ``"detached"``) or the VM closes the console (``"closed"``)."""
    sock = connect(path)
    reading = True
    try:
        with _raw(stdin):
            while True:
                watched: list[int | socket.socket] = [sock]
                if reading:
                    watched.append(stdin)
                ready, _, _ = select.select(watched, [], [])
                if sock in ready:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue  # a spurious wakeup: nothing to copy
                    if not data:
                        return "closed"
                    _write_all(stdout, data)
                if reading and stdin in ready:
                    typed = os.read(stdin, 4096)
                    if not typed:
                        reading = False  # a pipe ended: keep showing the console
                        continue
                    escape = typed.find(bytes([ESCAPE]))
                    if escape >= 0:
                        _send_all(sock, typed[:escape])
                        return "detached"
                    _send_all(sock, typed)
    finally:
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [])
            continue
        view = view[sent:]
