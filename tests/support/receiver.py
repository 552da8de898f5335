"""A local HTTP receiver for tests of what reconciler sends out (notifications, commit
statuses): the standard library's server in a thread, recording every request.

    with Receiver() as hooks:            # or Receiver(port) to come up later on a known port
        ... post to hooks.url("/hook") ...
        assert hooks.requests[0].json() == {...}
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from support.waiting import free_port


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
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in list(self.requests) if path is None or r.path == path)

    def start(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command, self.path, dict(self.headers.items()), self.rfile.read(length)
                )
                receiver.started.set()
                if receiver.hold is not None:
                    receiver.hold.wait(30)
                receiver.requests.append(request)
                status = (
                    receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                )
                body = receiver.answer(request)
                self.send_response(status)
                for key, value in receiver.extra_headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            if self.hold is not None:
                self.hold.set()
            self._server.shutdown()
            self._server.server_close()
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
