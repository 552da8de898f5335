"""The daemon's HTTP endpoints: probes, metrics, the JSON API, webhooks and the status page.

    Prometheus, kubelet/systemd probes, operators, GitHub/GitLab
        │ HTTP (http_server.ConnectionServer: whole requests under a deadline, bounded workers)
        ▼
    OperatorServer ──Host check──▶ route ──reads/asks──▶ DaemonView (daemon.loop.Daemon)
                   ──render()───▶ DaemonMetrics          every answer scrubbed by a Redactor

This layer only reads the ``DaemonView`` and the metrics: it never opens the state store, git or
a runtime, so it can be tested with an in-memory view. State-changing endpoints need
``Authorization: Bearer <token>``; without a configured token they are disabled. Webhooks need a
configured secret and are verified by ``webhooks.verify_delivery``.

    GET  /healthz  /readyz  /metrics  /api/status  /api/events?limit=N  /api/hosts  /
    GET  /api/vms/NAME  /?vm=NAME   one VM whole (``describe``; its console and build log: token)
    GET  /api/vms/NAME/logs?follow=1&since=10m&tail=N       (bearer token; chunked stream)
    POST /api/reconcile  /api/suspend  /api/resume          (bearer token)
    POST /webhook/github  /webhook/gitlab  /webhook/generic  (signature or token)

Threat model: reads are unauthenticated, so what they show is scrubbed (``redaction``: URL
credentials, secret values such as env values, secret-named keys). A web page on any site can
make a browser on the operator's machine send requests here, and by DNS rebinding read the
answers under its own name: every request whose ``Host`` is not an IP address, ``localhost``,
the listen name or an ``--allowed-host`` name is refused with 421. Malformed requests (bodies
that are not JSON or nest too deep, bad lengths, oversized or trickled headers) get a 4xx with
one line, never a 500 or a traceback.

Console logs are the guest's own output, so they need the token (a workload may print what it
should not) and every line is scrubbed like any other answer. They are streamed with chunked
transfer encoding, one chunk per batch of lines; a follow holds a worker thread, so at most
``max(1, workers // 4)`` streams run at once (503 past that), and a stream ends when its
client goes away or the server closes.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from reconciler.daemon.console_view import ConsoleLogs, parse_duration, parse_tail
from reconciler.daemon.http_server import ConnectionServer, Limits
from reconciler.daemon.metrics import DaemonMetrics, host_gauges
from reconciler.daemon.redaction import Redactor
from reconciler.daemon.status_page import EVENTS_SHOWN, render_page
from reconciler.daemon.view import DaemonView, DescribesVMs, ShowsHosts
from reconciler.daemon.webhooks import (
    KINDS,
    MAX_BODY_BYTES,
    MalformedBody,
    WebhookRejected,
    parse_json,
    verify_delivery,
)
from reconciler.errors import ConfigError, LeadershipError, ReconcilerError

log = logging.getLogger("reconciler.http")

EVENTS_DEFAULT = 50
EVENTS_MAX = 1000
TOKEN_REQUIRED = "state-changing endpoints are disabled: start the daemon with a token"
WEBHOOKS_DISABLED = "webhooks are disabled"
JSON_TYPE = "application/json"
# The status page loads nothing from anywhere and runs no script; say so to the browser.
PAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
LOGS_PATH = re.compile(r"/api/vms/([^/]{1,100})/logs")
VM_PATH = re.compile(r"/api/vms/([^/]{1,100})")
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    # A streamed body (sent chunked after ``body``): given ``gone()``, which says the client
    # went away or the server is closing, it yields the chunks.
    stream: Callable[[Callable[[], bool]], Iterator[bytes]] | None = None


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    return Response(status, body, JSON_TYPE, dict(headers or {}))


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


def text_response(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode(), "text/plain; charset=utf-8")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]  # names in lower case
    body: bytes


Route = Callable[[Request], Response]


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9180`` for IPv6) into a host and a port; port 0 picks one."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT, not {listen!r}")
    return host, int(port)


def host_allowed(header: str, names: Iterable[str], port: int) -> bool:
    """Whether a ``Host`` header names this daemon: any IP address (no DNS name, so no
    rebinding), ``localhost`` or one of ``names``, with this ``port`` if it has one."""
    value = header.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return False
        given_port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, given_port = value.partition(":")
    else:
        host, given_port = value, None
    if given_port is not None and (not given_port.isdigit() or int(given_port) != port):
        return False
    host = host.rstrip(".")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or host in {name.lower().rstrip(".") for name in names}
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OperatorServer:
    """The daemon's HTTP server. ``start()`` binds and serves in a daemon thread."""

    def __init__(
        self,
        view: DaemonView,
        metrics: DaemonMetrics,
        *,
        listen: str = "127.0.0.1:9180",
        token: str | None,
        webhook_secret: bytes | None,
        allowed_hosts: Iterable[str] = (),
        redactor: Redactor | None = None,
        limits: Limits | None = None,
        console_logs: ConsoleLogs | None = None,
    ) -> None:
        self.view = view
        self.console_logs = console_logs
        self.metrics = metrics
        self.listen = listen
        self._host, self._port = parse_listen(listen)
        self._token = token or None
        self._webhook_secret = webhook_secret or None
        names = {name.strip().lower() for name in allowed_hosts if name.strip()}
        if not _is_ip(self._host):
            names.add(self._host.lower())  # --listen myhost:9180 serves under that name
        self._allowed_names = frozenset(names)
        self.redactor = redactor or Redactor()
        # The secrets this server holds are masked wherever they might be echoed.
        self.redactor.remember(
            [
                s
                for s in (
                    token,
                    webhook_secret.decode("utf-8", "replace") if webhook_secret else None,
                )
                if s
            ]
        )
        self._limits = limits or Limits(max_body_bytes=MAX_BODY_BYTES)
        self._server: ConnectionServer | None = None
        self._streams = threading.BoundedSemaphore(max(1, self._limits.workers // 4))
        self._routes: dict[str, dict[str, Route]] = {
            "/": {"GET": self._page},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/api/status": {"GET": self._status},
            "/api/events": {"GET": self._events},
            "/api/hosts": {"GET": self._hosts},
            "/api/reconcile": {"POST": self._reconcile},
            "/api/suspend": {"POST": self._suspend},
            "/api/resume": {"POST": self._resume},
            **{f"/webhook/{kind}": {"POST": self._webhook} for kind in KINDS},
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the operator server is already started")
        try:
            server = ConnectionServer(self._host, self._port, self._answer, self._limits)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.listen}: {exc.strerror or exc}; "
                "choose another --listen address"
            ) from exc
        self._server = server
        self._port = server.address[1]  # the real port when listen asked for port 0
        server.start()

    @property
    def url(self) -> str:
        """The bound address (the real port when ``listen`` asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the operator server is not started")
        host, port = self._server.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _answer(self, sock: socket.socket, address: tuple[str, int], raw: bytes) -> None:
        """Answer one complete request (a worker thread of the transport)."""
        _Handler(sock, address, self, raw)

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Route one request and turn failures into JSON errors; never raises."""
        host = request.headers.get("host")
        if host is not None and not host_allowed(host, self._allowed_names, self._port):
            shown = self.redactor.text(" ".join(host.split())[:100])
            return error_response(
                421,
                f"this daemon is not served under the name {shown!r}: use its address, or start "
                "it with --allowed-host NAME",
            )
        methods = self._routes.get(request.path)
        if methods is None and LOGS_PATH.fullmatch(request.path):
            methods = {"GET": self._logs}
        if methods is None and VM_PATH.fullmatch(request.path):
            methods = {"GET": self._vm}
        if methods is None:
            return error_response(404, f"no such endpoint: {request.path}")
        route = methods.get(request.method)
        if route is None and request.method == "HEAD":
            route = methods.get("GET")
        if route is None:
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            return error_response(
                405, f"{request.method} is not allowed on {request.path}", {"Allow": allowed}
            )
        try:
            return route(request)
        except LeadershipError as err:
            return error_response(409, self.redactor.text(str(err)))
        except ReconcilerError as err:
            # A GET failed on the daemon's side (the store did not answer): not the client's
            # fault. A POST was refused for what it asked (unknown workload, not suspended).
            status = 503 if request.method in ("GET", "HEAD") else 400
            return error_response(status, self.redactor.text(str(err)))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, "internal error; the daemon's log has the details")

    # -- read-only endpoints ----------------------------------------------------------------------

    def _healthz(self, _request: Request) -> Response:
        return text_response(200, "ok")

    def _readyz(self, _request: Request) -> Response:
        ready, reason = self.view.ready()
        reason = self.redactor.text(reason) if reason else ("ready" if ready else "not ready")
        return text_response(200 if ready else 503, reason)

    def _metrics(self, _request: Request) -> Response:
        # The hosts' gauges are read at each scrape, on a follower too: after the leader's
        # cycles only, a scrape between two polls would show a host that joined as missing.
        if isinstance(self.view, ShowsHosts):
            try:
                answer = self.view.hosts()
            except ReconcilerError as exc:  # the store is down: the last gauges stay
                log.warning("metrics: cannot read the hosts: %s", self.redactor.text(str(exc)))
            else:
                if answer is not None:
                    self.metrics.set_hosts(host_gauges(answer["hosts"]))
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)

    def _status(self, _request: Request) -> Response:
        return json_response(200, self.redactor.json(self.view.status()))

    def _events(self, request: Request) -> Response:
        values = request.query.get("limit", [])
        limit = EVENTS_DEFAULT
        if values:
            raw = values[-1].strip()
            if not raw.isdigit() or not 1 <= int(raw) <= EVENTS_MAX:
                return error_response(
                    400, f"limit must be an integer from 1 to {EVENTS_MAX}, not {values[-1]!r}"
                )
            limit = int(raw)
        return json_response(200, self.redactor.json(self.view.events(limit)))

    def _hosts(self, _request: Request) -> Response:
        """``GET /api/hosts``: the fleet's hosts, as ``/api/status`` lists them."""
        answer = self.view.hosts() if isinstance(self.view, ShowsHosts) else None
        if answer is None:
            return error_response(
                404,
                "no host registry: this daemon's state store is SQLite, one host; hosts "
                "register in a shared PostgreSQL store (--store postgresql://...)",
            )
        return json_response(200, self.redactor.json(answer))

    def _describe(self, request: Request, name: str) -> dict[str, Any] | None:
        """The VM's description, scrubbed; its console and build log (guest and build output,
        which may print what they should not) only for a request with the token."""
        if not isinstance(self.view, DescribesVMs):
            return None
        described = dict(self.view.describe_vm(name))
        if self._authorize(request) is not None:
            described["console_tail"], described["build_log"] = [], []
        scrubbed: dict[str, Any] = self.redactor.json(described)
        return scrubbed

    def _vm(self, request: Request) -> Response:
        """``GET /api/vms/NAME``: ``reconciler describe NAME`` as JSON."""
        match = VM_PATH.fullmatch(request.path)
        assert match is not None
        try:
            described = self._describe(request, urllib.parse.unquote(match.group(1)))
        except ConfigError as err:  # not a VM name, or no such VM
            return error_response(404, self.redactor.text(str(err)))
        if described is None:
            return error_response(404, "this daemon does not describe VMs")
        return json_response(200, described)

    def _page(self, request: Request) -> Response:
        name = (request.query.get("vm") or [""])[-1]
        try:
            vm = self._describe(request, name) if name else None
        except ConfigError as err:
            vm = {"error": self.redactor.text(str(err))}
        html = render_page(
            self.redactor.json(self.view.status()),
            self.redactor.json(self.view.events(EVENTS_SHOWN)),
            vm=vm,
        )
        return Response(
            200,
            html.encode(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": PAGE_POLICY},
        )

    def _logs(self, request: Request) -> Response:
        """``GET /api/vms/NAME/logs``: the VM's console, scrubbed, streamed (token needed)."""
        refused = self._authorize(request)
        if refused is not None:
            return refused
        match = LOGS_PATH.fullmatch(request.path)
        assert match is not None
        name = urllib.parse.unquote(match.group(1))
        if self.console_logs is None or not self.console_logs.exists(name):
            shown = self.redactor.text(" ".join(name.split())[:70])
            return error_response(404, f"no console log for a VM named {shown!r} on this host")
        try:
            since = self._query_value(request, "since", parse_duration)
            tail = self._query_value(request, "tail", parse_tail)
        except ConfigError as err:
            return error_response(400, str(err))
        follow = (request.query.get("follow") or ["0"])[-1].strip().lower() in TRUE_WORDS
        if not self._streams.acquire(blocking=False):
            return error_response(503, "too many console streams at once; try again later")
        logs = self.console_logs
        redactor = self.redactor

        def chunks(gone: Callable[[], bool]) -> Iterator[bytes]:
            lines = logs.lines(
                name,
                since=None if since is None else time.time() - since,
                tail=tail,
                follow=follow,
                stop=lambda: gone() or self._server is None,
            )
            batch: list[str] = []
            for line in lines:
                batch.append(redactor.text(line) + "\n")
                if len(batch) >= 256 or follow:
                    yield "".join(batch).encode()
                    batch = []
            if batch:
                yield "".join(batch).encode()

        def stream(gone: Callable[[], bool]) -> Iterator[bytes]:
            return _Released(chunks(gone), self._streams.release)

        return Response(200, b"", "text/plain; charset=utf-8", stream=stream)

    @staticmethod
    def _query_value(request: Request, key: str, parse: Callable[[str], Any]) -> Any:
        values = request.query.get(key)
        return parse(values[-1]) if values and values[-1].strip() else None

    # -- state-changing endpoints -----------------------------------------------------------------

    def _authorize(self, request: Request) -> Response | None:
        """None when the request carries the token; else the error to answer with."""
        if self._token is None:
            return error_response(403, TOKEN_REQUIRED)
        header = request.headers.get("authorization") or ""
        scheme, _, given = header.strip().partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="reconciler"'}
        if scheme.lower() != "bearer" or not given.strip():
            return error_response(
                401, "missing bearer token: send Authorization: Bearer <token>", challenge
            )
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            return error_response(401, "wrong bearer token", challenge)
        return None

    def _command(self, request: Request) -> tuple[Response | None, str | None, str]:
        """Authorise and parse ``{"workload": ..., "reason": ...}``: (error, workload, reason)."""
        refused = self._authorize(request)
        if refused is not None:
            return refused, None, ""
        try:
            payload = parse_json(request.body) if request.body.strip() else {}
        except MalformedBody as exc:
            return error_response(400, str(exc)), None, ""
        if not isinstance(payload, dict):
            return error_response(400, "the body must be a JSON object"), None, ""
        workload = payload.get("workload")
        reason = payload.get("reason", "")
        if workload is not None and (not isinstance(workload, str) or not workload.strip()):
            return error_response(400, '"workload" must be a non-empty string'), None, ""
        if not isinstance(reason, str):
            return error_response(400, '"reason" must be a string'), None, ""
        return None, workload.strip() if workload else None, " ".join(reason.split())[:500]

    def _reconcile(self, request: Request) -> Response:
        refused, _workload, reason = self._command(request)
        if refused is not None:
            return refused
        why = reason or "api"
        self.view.request_reconcile(why)
        return json_response(202, {"accepted": True, "reason": why})

    def _suspend(self, request: Request) -> Response:
        refused, workload, reason = self._command(request)
        if refused is not None:
            return refused
        self.view.suspend(workload, reason)
        return json_response(200, {"suspended": workload or "fleet", "reason": reason})

    def _resume(self, request: Request) -> Response:
        refused, workload, _reason = self._command(request)
        if refused is not None:
            return refused
        self.view.resume(workload)
        return json_response(200, {"resumed": workload or "fleet"})

    def _webhook(self, request: Request) -> Response:
        if self._webhook_secret is None:
            return error_response(404, WEBHOOKS_DISABLED)
        kind = request.path.rsplit("/", 1)[-1]
        try:
            delivery = verify_delivery(kind, request.headers, request.body, self._webhook_secret)
        except WebhookRejected as rejected:
            log.info("webhook %s rejected (%d): %s", kind, rejected.status, rejected.reason)
            return error_response(rejected.status, rejected.reason)
        if not delivery.trigger:
            log.info("webhook: %s", delivery.reason)
            return json_response(200, {"accepted": False, "reason": delivery.reason})
        self.view.request_reconcile(delivery.reason)
        log.info("webhook: %s", delivery.reason, extra={"trigger": "webhook"})
        return json_response(202, {"accepted": True, "reason": delivery.reason})


class _Released(Iterator[bytes]):
    """A stream's chunks; ``close()`` (the handler's, on every way out, started or not) gives
    its slot back once."""

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        release, self._release = self._release, None
        if release is not None:
            release()


class _SocketWriter(io.BufferedIOBase):
    """What ``BaseHTTPRequestHandler`` writes to: straight to the socket, nothing buffered."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


class _Handler(BaseHTTPRequestHandler):
    """Parses one complete request (already read by the transport, under its deadline and
    limits) with the standard library's parser, and writes the answer."""

    server_version = "reconciler"
    sys_version = ""

    def __init__(
        self, sock: socket.socket, address: tuple[str, int], operator: OperatorServer, raw: bytes
    ) -> None:
        # Not socketserver's constructor: the request is already in memory.
        self.request = self.connection = sock
        self.client_address = address
        self.operator = operator
        self.rfile = io.BytesIO(raw)
        self.wfile = _SocketWriter(sock)
        self.close_connection = True
        # OSError: the client went away (a probe timing out); nothing to tell it any more.
        with contextlib.suppress(OSError):
            self.handle()

    def handle_expect_100(self) -> bool:
        return True  # the transport said 100 Continue before it read the body

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_OPTIONS(self) -> None:
        self._serve("OPTIONS")

    def _serve(self, method: str) -> None:
        started = time.monotonic()
        self.close_connection = True  # one request per connection (see http_server)
        split = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        if isinstance(body, Response):
            response = body
        else:
            request = Request(
                method=method,
                path=split.path,
                query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
            )
            response = self.operator.handle(request)
        self._send(response, head=method == "HEAD")
        log.debug(
            "%s %s %d %d bytes %.1f ms from %s",
            method,
            split.path,
            response.status,
            len(response.body),
            (time.monotonic() - started) * 1000,
            self.client_address[0],
        )

    def _read_body(self) -> bytes | Response:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            if self.headers.get("Transfer-Encoding"):
                return error_response(411, "send the body with a Content-Length")
            return b""
        text = length_header.strip()
        if not text.isdigit():
            return error_response(400, f"bad Content-Length {length_header[:40]!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            # The transport read and dropped the body, so the client reads this answer.
            return error_response(413, f"body of {length} bytes is over the 1 MiB limit")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            return error_response(400, "the body is shorter than its Content-Length")
        return body

    def _send(self, response: Response, *, head: bool) -> None:
        if response.stream is not None:
            self._send_stream(response, response.stream, head=head)
            return
        self._send_head(response, "Content-Length", str(len(response.body)))
        if not head:
            self.wfile.write(response.body)

    def _send_head(self, response: Response, length_header: str, length: str) -> None:
        """Status line and headers, the same for a whole body and a stream but for how its
        length is told."""
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header(length_header, length)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()

    def _send_stream(
        self,
        response: Response,
        stream: Callable[[Callable[[], bool]], Iterator[bytes]],
        *,
        head: bool,
    ) -> None:
        chunks = stream(self._client_gone)
        try:
            self._send_head(response, "Transfer-Encoding", "chunked")
            if head:
                return
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # releases the stream's slot even when the client went away

    def _client_gone(self) -> bool:
        """Whether the client closed its end (it sends nothing after its request)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _serve logs one line per request, with its duration

    def log_message(self, format: str, *args: Any) -> None:
        # Malformed requests (scanners, TLS handshakes on the plain port) end up here.
        log.debug("%s " + format, self.client_address[0], *args)
