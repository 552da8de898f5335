"""The operator server's transport: accepts connections, reads whole requests under a deadline,
and answers complete ones on a small bounded pool of threads.

    clients ──TCP──▶ acceptor thread (selectors, non-blocking)
                        │ buffers each connection's request: headers, then Content-Length bytes
                        │ refuses: 408 past the deadline, 431 oversized headers, 503 when busy
                        ▼ complete requests only
                     worker pool (``workers`` threads) ──answer(sock, address, raw)──▶ http_api

Why not ``ThreadingHTTPServer``: it starts one thread per connection with no cap, and its
timeout is per ``recv``, so a client that trickles a byte every few seconds (slowloris) holds a
thread forever, and a few hundred such clients starve ``/healthz`` and the webhooks. Here:

- a connection only costs a buffer while its request arrives, never a thread;
- the whole request (request line, headers and body) must arrive within ``request_deadline``
  seconds of the accept, however it is trickled;
- the request line and headers are at most ``max_header_bytes`` and ``max_header_lines``;
- at most ``max_pending`` connections may be sending at once: a new one evicts the oldest (a
  real client sends its request in milliseconds, so the oldest is the one trickling);
- at most ``max_queued`` complete requests wait for or occupy a worker; past that the answer
  is 503 at once, and a worker spends at most ``write_timeout`` seconds on a slow reader.

One request per connection (``Connection: close``): the operator's clients (probes, Prometheus,
``reconciler reconcile``, webhook senders) open a connection per request anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger("reconciler.http")

Answer = Callable[[socket.socket, tuple[str, int], bytes], None]
"""Writes the response to a complete request (``raw``: request line, headers and body)."""


@dataclass(frozen=True)
class Limits:
    request_deadline: float = 10.0
    max_header_bytes: int = 16 << 10
    max_header_lines: int = 100
    max_body_bytes: int = 1 << 20
    # A body over the limit is read and dropped up to this size, so that the client reads the
    # 413 instead of a connection reset; anything larger is cut off at once.
    drain_limit_bytes: int = 32 << 20
    max_pending: int = 256
    workers: int = 8
    max_queued: int = 64
    write_timeout: float = 10.0


@dataclass(eq=False)
class _Pending:
    """A connection whose request has not fully arrived yet (acceptor thread only)."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    header_end: int | None = None
    body_needed: int = 0
    body_seen: int = 0
    keep_body: bool = True


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = (json.dumps({"error": message}) + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _header_end(buffer: bytearray) -> int | None:
    """Where the body starts; bare ``\\n`` line endings are accepted as ``http.server`` does."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else None


def _body_length(head: bytes) -> int | None:
    """The Content-Length the handler will read, 0 when it reads none (no header, a chunked
    body it refuses with 411), None when the header is malformed (it answers 400)."""
    length: int | None = 0
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return 0
        if name == b"content-length" and length == 0:
            text = value.strip()
            length = int(text) if text.isdigit() else None
    return length


class ConnectionServer:
    """Binds ``host:port``; ``start()`` serves in a daemon thread until ``close()``."""

    def __init__(self, host: str, port: int, answer: Answer, limits: Limits | None = None) -> None:
        self._answer = answer
        self.limits = limits or Limits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # create_server sets SO_REUSEADDR: a restarted daemon rebinds while old connections
        # sit in TIME_WAIT. A backlog well above max_pending lets a burst wait in the kernel.
        self._listener = socket.create_server((host, port), family=family, backlog=1024)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="http-worker")
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._in_workers: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        else:
            self._close_listener()
        # Requests already answering finish (bounded by write_timeout); queued ones are dropped.
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._queued_lock:
            leftovers, self._in_workers = self._in_workers, set()
        for sock in leftovers:
            sock.close()

    # -- acceptor thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _events in self._selector.select(self._select_timeout()):
                    if key.data is None:
                        self._accept()
                    else:
                        self._receive(key.data)
                self._expire(time.monotonic())
        except Exception:  # the operator server must not die silently; the daemon goes on
            log.exception("the HTTP acceptor stopped")
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)
            self._close_listener()

    def _close_listener(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._selector.close()
        self._listener.close()

    def _select_timeout(self) -> float:
        if not self._pending:
            return 0.2
        oldest = next(iter(self._pending.values()))
        return max(0.0, min(0.2, oldest.deadline - time.monotonic()))

    def _accept(self) -> None:
        for _ in range(64):  # a burst is taken in rounds so reads are not starved
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: wait for the next round
                log.warning("cannot accept a connection: %s", exc)
                return
            sock.setblocking(False)
            if len(self._pending) >= self.limits.max_pending:
                _, oldest = self._pending.popitem(last=False)
                self._refuse(oldest, 503, "Service Unavailable", "too many connections")
            pending = _Pending(
                sock,
                (str(address[0]), int(address[1])),
                time.monotonic() + self.limits.request_deadline,
            )
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _receive(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._forget(pending)
            self._drop(pending)
            return
        if not data:  # the client gave up before finishing its request
            self._forget(pending)
            self._drop(pending)
            return
        limits = self.limits
        if pending.header_end is None:
            pending.buffer += data
            end = _header_end(pending.buffer)
            if end is None:
                if len(pending.buffer) > limits.max_header_bytes:
                    self._forget(pending)
                    self._refuse(
                        pending, 431, "Request Header Fields Too Large", "headers over the limit"
                    )
                return
            head = bytes(pending.buffer[:end])
            if end > limits.max_header_bytes or head.count(b"\n") > limits.max_header_lines + 1:
                self._forget(pending)
                self._refuse(
                    pending, 431, "Request Header Fields Too Large", "headers over the limit"
                )
                return
            pending.header_end = end
            pending.body_seen = len(pending.buffer) - end
            length = _body_length(head) or 0  # None: malformed, the handler answers 400
            if length > limits.max_body_bytes:
                # Read and dropped; the handler answers 413 from the headers alone.
                pending.keep_body = False
                length = min(length, limits.drain_limit_bytes)
                del pending.buffer[end:]
            pending.body_needed = length
            if pending.body_seen < length and b"\nexpect: 100-continue" in head.lower():
                # curl waits a second for this before it sends a body over 1 KiB.
                with contextlib.suppress(OSError):
                    pending.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            pending.body_seen += len(data)
            if pending.keep_body:
                pending.buffer += data
        if pending.body_seen >= pending.body_needed:
            self._forget(pending)
            if pending.keep_body:
                del pending.buffer[pending.header_end + pending.body_needed :]
            self._dispatch(pending)

    def _expire(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            self._forget(oldest)
            self._refuse(
                oldest,
                408,
                "Request Timeout",
                f"the request did not arrive within {self.limits.request_deadline:g} s",
            )

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.sock)

    def _refuse(self, pending: _Pending, status: int, reason: str, message: str) -> None:
        """Best effort, never blocking: a client that reads nothing just loses the answer."""
        with contextlib.suppress(OSError):
            pending.sock.send(_refusal(status, reason, message))
        log.debug("%s refused: %d %s", pending.address[0], status, message)
        self._drop(pending)

    def _drop(self, pending: _Pending) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.sock)
        pending.sock.close()

    def _dispatch(self, pending: _Pending) -> None:
        with self._queued_lock:
            busy = self._queued >= self.limits.max_queued
            if not busy:
                self._queued += 1
                self._in_workers.add(pending.sock)
        if busy:
            self._refuse(pending, 503, "Service Unavailable", "the server is busy; retry")
            return
        try:
            self._pool.submit(self._work, pending.sock, pending.address, bytes(pending.buffer))
        except RuntimeError:  # the pool is shutting down
            self._release(pending.sock)
            pending.sock.close()

    # -- worker threads -------------------------------------------------------------------------

    def _work(self, sock: socket.socket, address: tuple[str, int], raw: bytes) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(self.limits.write_timeout)
            self._answer(sock, address, raw)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        except Exception:  # a bug in answering one request must not kill the worker
            log.exception("answering %s failed", address[0])
        finally:
            self._release(sock)
            sock.close()

    def _release(self, sock: socket.socket) -> None:
        with self._queued_lock:
            self._queued -= 1
            self._in_workers.discard(sock)
