"""A local HTTP receiver for tests of what reconciler sends out (notifications, commit
statuses): the standard library's server in a thread, recording every request.

    with Receiver() as hooks:            # or Receiver(port) to come up later on a known port
        ... post to hooks.url("/hook") ...
        assert hooks.requests[0].json() == {...}

``serve`` and ``reply`` are the server underneath, shared with the forge stand-in
(``support.forge_server``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from support.waiting import free_port


def serve(handle: Callable[[BaseHTTPRequestHandler], None], port: int = 0) -> ThreadingHTTPServer:
    """A quiet server on 127.0.0.1:``port`` (0: any free port) that calls ``handle`` for every
    request, whatever its method, from a daemon thread; end it with ``stop``."""

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            handle(self)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def reply(
    h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str] = {}
) -> None:
    """Answer ``status`` with ``body`` as JSON, plus ``headers``."""
    h.send_response(status)
    for key, value in headers.items():
        h.send_header(key, value)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """A header by name, in any case (clients spell them differently)."""
        found = {k.lower(): v for k, v in self.headers.items()}
        return found.get(name.lower())


class Receiver:
    """Answers ``statuses`` in turn (the last one from then on); ``hold``, when set, is waited
    on before answering (a slow endpoint)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        statuses: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
        hold: threading.Event | None = None,
        answer: Callable[[Request], bytes] = lambda request: b"ok",
    ) -> None:
        self.port = port or free_port()
        self.requests: list[Request] = []
        self.statuses = list(statuses)
        self.extra_headers = headers or {}
        self.hold = hold
        self.answer = answer
        self.started = threading.Event()  # a request arrived (and is held, with ``hold``)
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in list(self.requests) if path is None or r.path == path)

    def start(self) -> Self:
        self._server = serve(self._handle, self.port)
        return self

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        request = Request(h.command, h.path, dict(h.headers.items()), h.rfile.read(length))
        self.started.set()
        if self.hold is not None:
            self.hold.wait(30)
        self.requests.append(request)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        reply(h, status, self.answer(request), self.extra_headers)

    def stop(self) -> None:
        if self._server is not None:
            if self.hold is not None:
                self.hold.set()
            stop(self._server)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
