"""The daemon's HTTP layer against an in-memory ``DaemonView``: a real ``OperatorServer`` on a
free port, spoken to with ``urllib.request`` (endpoints, status codes, the token rules, webhook
signatures and the metrics text)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.daemon.http_api import TOKEN_REQUIRED, OperatorServer, host_allowed
from reconciler.daemon.http_server import Limits
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.redaction import Redactor, env_values
from reconciler.daemon.webhooks import (
    MAX_JSON_DEPTH,
    MalformedBody,
    WebhookRejected,
    parse_json,
    verify_delivery,
)
from reconciler.errors import LeadershipError, ReconcilerError

TOKEN = "s3cret-token"
SECRET = b"webhook-secret"
SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


class FakeView:
    """An in-memory DaemonView: canned status and events, and a record of what was asked."""

    def __init__(self) -> None:
        self.is_ready = (True, "leading with term 3")
        self.reconciles: list[str] = []
        self.suspended: dict[str | None, str] = {}
        self.fail_with: Exception | None = None
        self.event_log = [
            {
                "id": i,
                "at": 1_700_000_000.0 + i,
                "kind": "applied",
                "subject": "fleet",
                "message": f"event {i}",
                "term": 3,
            }
            for i in range(2000, 0, -1)
        ]
        self.status_doc: dict[str, Any] = {
            "fleet": "demo",
            "applied_revision": SHA,
            "attempted_revision": SHA,
            "attempted_outcome": "applied",
            "attempted_at": 1_700_000_000.0,
            "last_error": None,
            "vms": [
                {
                    "name": "web-0",
                    "workload": "web",
                    "state": "running",
                    "healthy": True,
                    "address": "10.0.0.2",
                    "pid": 1234,
                    "artifact": "sha256:abc",
                    "runtime": "qemu",
                    "detail": "http 200",
                    "uptime_seconds": 125.0,
                    "restarts": 0,
                }
            ],
            "leader": {"is_leader": True, "term": 3, "holder": "d0"},
            "daemon": {"id": "d0", "started_at": 1_700_000_000.0, "last_error": None},
            "suspended": {"fleet": False, "workloads": []},
        }

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def status(self) -> dict[str, Any]:
        self._maybe_fail()
        return self.status_doc

    def ready(self) -> tuple[bool, str]:
        return self.is_ready

    def events(self, limit: int) -> list[dict[str, Any]]:
        self._maybe_fail()
        return self.event_log[:limit]

    def request_reconcile(self, reason: str) -> None:
        self._maybe_fail()
        self.reconciles.append(reason)

    def suspend(self, workload: str | None, reason: str) -> None:
        self._maybe_fail()
        self.suspended[workload] = reason

    def resume(self, workload: str | None) -> None:
        self._maybe_fail()
        if workload not in self.suspended:
            raise ReconcilerError(f"{workload or 'the fleet'} is not suspended")
        del self.suspended[workload]


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()

    def get(self, path: str) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path)
        return status, body

    def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, headers, body = self.request(method, path, **kwargs)
        assert headers["Content-Type"] == "application/json", (path, headers)
        return status, json.loads(body)

    def post(
        self, path: str, payload: Any = None, token: str | None = TOKEN
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(payload if payload is not None else {}).encode()
        return self.json("POST", path, body=body, headers=headers)


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
def metrics() -> DaemonMetrics:
    return DaemonMetrics()


@pytest.fixture(scope="module")
def token_server() -> Iterator[OperatorServer]:
    """One server for the module (starting and stopping costs a poll interval); each test
    swaps in its own fresh view and metrics."""
    server = OperatorServer(
        FakeView(), DaemonMetrics(), listen="127.0.0.1:0", token=TOKEN, webhook_secret=SECRET
    )
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def open_server() -> Iterator[OperatorServer]:
    """A server started without a token or webhook secret."""
    server = OperatorServer(
        FakeView(), DaemonMetrics(), listen="127.0.0.1:0", token=None, webhook_secret=None
    )
    server.start()
    yield server
    server.close()


@pytest.fixture
def client(token_server: OperatorServer, view: FakeView, metrics: DaemonMetrics) -> Client:
    token_server.view, token_server.metrics = view, metrics
    return Client(token_server.url)


@pytest.fixture
def open_client(open_server: OperatorServer, view: FakeView, metrics: DaemonMetrics) -> Client:
    open_server.view, open_server.metrics = view, metrics
    return Client(open_server.url)


# -- lifecycle ------------------------------------------------------------------------------------


def test_port_zero_binds_a_real_port_and_close_stops_serving(
    view: FakeView, metrics: DaemonMetrics
) -> None:
    server = OperatorServer(view, metrics, listen="127.0.0.1:0", token=None, webhook_secret=None)
    server.start()
    url = server.url
    assert url.startswith("http://127.0.0.1:")
    assert not url.endswith(":0")
    assert Client(url).get("/healthz") == (200, b"ok\n")
    server.close()
    with pytest.raises(OSError, match="refused"):
        urllib.request.urlopen(url + "/healthz", timeout=5)
    server.close()  # closing twice is harmless


def test_a_busy_port_is_one_clear_error(view: FakeView, metrics: DaemonMetrics) -> None:
    from reconciler.errors import ConfigError

    first = OperatorServer(view, metrics, listen="127.0.0.1:0", token=None, webhook_secret=None)
    first.start()
    try:
        port = first.url.rsplit(":", 1)[1]
        second = OperatorServer(
            view, metrics, listen=f"127.0.0.1:{port}", token=None, webhook_secret=None
        )
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            second.start()
    finally:
        first.close()


def test_a_bad_listen_address_is_a_config_error(view: FakeView, metrics: DaemonMetrics) -> None:
    from reconciler.errors import ConfigError

    with pytest.raises(ConfigError, match="HOST:PORT"):
        OperatorServer(view, metrics, listen="localhost", token=None, webhook_secret=None)


# -- probes, status, events -----------------------------------------------------------------------


def test_healthz(client: Client) -> None:
    assert client.get("/healthz") == (200, b"ok\n")


def test_readyz_follows_the_view(client: Client, view: FakeView) -> None:
    assert client.get("/readyz") == (200, b"leading with term 3\n")
    view.is_ready = (False, "leading; the first cycle has not finished")
    assert client.get("/readyz") == (503, b"leading; the first cycle has not finished\n")


def test_status_is_the_views_json_with_the_leader(client: Client) -> None:
    status, body = client.json("GET", "/api/status")
    assert status == 200
    assert body["leader"] == {"is_leader": True, "term": 3, "holder": "d0"}
    assert body["applied_revision"] == SHA
    assert body["vms"][0]["name"] == "web-0"


def test_events_limit(client: Client) -> None:
    status, body = client.json("GET", "/api/events")
    assert status == 200
    assert len(body) == 50
    assert body[0]["id"] == 2000  # newest first, as the view gives them
    assert len(client.json("GET", "/api/events?limit=3")[1]) == 3
    assert len(client.json("GET", "/api/events?limit=1000")[1]) == 1000
    for bad in ("abc", "0", "-1", "1001", "", "2.5"):
        status, body = client.json("GET", f"/api/events?limit={bad}")
        assert status == 400, bad
        assert "limit" in body["error"]


def test_view_failures_on_reads(client: Client, view: FakeView) -> None:
    view.fail_with = ReconcilerError("the state store is locked")
    assert client.json("GET", "/api/status") == (503, {"error": "the state store is locked"})
    view.fail_with = RuntimeError("boom: secret internals")
    status, body = client.json("GET", "/api/events")
    assert status == 500
    assert "boom" not in body["error"]
    assert "Traceback" not in body["error"]


def test_unknown_path_and_wrong_method(client: Client) -> None:
    status, body = client.json("GET", "/nope")
    assert status == 404
    assert "/nope" in body["error"]
    status, headers, raw = client.request("POST", "/api/status", body=b"{}")
    assert status == 405
    assert json.loads(raw) == {"error": "POST is not allowed on /api/status"}
    assert headers["Allow"] == "GET, HEAD"
    status, headers, _ = client.request("GET", "/api/reconcile")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert client.request("DELETE", "/api/suspend")[0] == 405
    assert client.request("PUT", "/webhook/github")[0] == 405


def test_head_gives_headers_without_a_body(client: Client) -> None:
    status, headers, body = client.request("HEAD", "/healthz")
    assert status == 200
    assert headers["Content-Length"] == "3"
    assert body == b""


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_text_has_every_metric(client: Client, metrics: DaemonMetrics) -> None:
    metrics.observe_cycle(1.5, "applied")
    metrics.observe_cycle(0.01, "no_changes")
    metrics.set_revisions("aaa111", "bbb222", failed=True)
    metrics.set_vms([("running", True), ("running", True), ("stopped", None)])
    metrics.count_builds(built=2, cached=3, failed=1)
    metrics.set_leader(True, 7)
    metrics.count_fenced()
    metrics.set_suspended(True, ["web"])
    status, headers, raw = client.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    expected = [
        'reconciler_reconcile_duration_seconds_count{outcome="applied"} 1.0',
        'reconciler_reconcile_duration_seconds_bucket{le="2.5",outcome="applied"} 1.0',
        'reconciler_reconcile_total{outcome="applied"} 1.0',
        'reconciler_reconcile_total{outcome="no_changes"} 1.0',
        'reconciler_reconcile_total{outcome="failed"} 0.0',
        'reconciler_applied_revision_info{revision="aaa111"} 1.0',
        'reconciler_attempted_revision_info{revision="bbb222"} 1.0',
        "reconciler_last_reconcile_error 1.0",
        'reconciler_vms{healthy="true",state="running"} 2.0',
        'reconciler_vms{healthy="unknown",state="stopped"} 1.0',
        'reconciler_builds_total{result="built"} 2.0',
        'reconciler_builds_total{result="cached"} 3.0',
        'reconciler_builds_total{result="failed"} 1.0',
        "reconciler_artifact_cache_hits_total 3.0",
        "reconciler_leader 1.0",
        "reconciler_lease_term 7.0",
        "reconciler_fenced_writes_total 1.0",
        'reconciler_suspended{workload="*"} 1.0',
        'reconciler_suspended{workload="web"} 1.0',
    ]
    lines = set(text.splitlines())
    assert [line for line in expected if line not in lines] == []


def test_metrics_keep_only_current_label_sets(metrics: DaemonMetrics) -> None:
    metrics.set_revisions("old", "old", failed=True)
    metrics.set_revisions("new", None, failed=False)
    metrics.set_vms([("running", False)])
    metrics.set_vms([("running", True)])
    metrics.set_suspended(True, ["web"])
    metrics.set_suspended(False, [])
    metrics.set_leader(False, 8)
    text = metrics.render()[0].decode()
    assert 'revision="old"' not in text
    assert 'reconciler_applied_revision_info{revision="new"} 1.0' in text
    assert "reconciler_attempted_revision_info{" not in text
    assert "reconciler_last_reconcile_error 0.0" in text
    assert 'healthy="false"' not in text
    assert "reconciler_suspended{" not in text
    assert "reconciler_leader 0.0" in text
    assert "reconciler_lease_term 8.0" in text


def test_each_metrics_instance_has_its_own_registry() -> None:
    first, second = DaemonMetrics(), DaemonMetrics()
    first.count_fenced()
    assert "reconciler_fenced_writes_total 1.0" in first.render()[0].decode()
    assert "reconciler_fenced_writes_total 0.0" in second.render()[0].decode()


# -- state-changing endpoints ---------------------------------------------------------------------


def test_reconcile_with_the_token(client: Client, view: FakeView) -> None:
    status, body = client.post("/api/reconcile", {"reason": "reconciler reconcile --now"})
    assert status == 202
    assert body == {"accepted": True, "reason": "reconciler reconcile --now"}
    assert client.post("/api/reconcile")[0] == 202
    assert view.reconciles == ["reconciler reconcile --now", "api"]


def test_suspend_and_resume(client: Client, view: FakeView) -> None:
    status, body = client.post("/api/suspend", {"workload": "web", "reason": "incident 42"})
    assert (status, body) == (200, {"suspended": "web", "reason": "incident 42"})
    assert client.post("/api/suspend", {})[0] == 200
    assert view.suspended == {"web": "incident 42", None: ""}
    assert client.post("/api/resume", {"workload": "web"}) == (200, {"resumed": "web"})
    assert client.post("/api/resume") == (200, {"resumed": "fleet"})
    assert view.suspended == {}


def test_token_rules(client: Client, view: FakeView) -> None:
    for path in ("/api/reconcile", "/api/suspend", "/api/resume"):
        status, body = client.post(path, {}, token=None)
        assert status == 401, path
        assert "bearer token" in body["error"]
        assert client.post(path, {}, token="wrong")[0] == 401
        assert client.post(path, {}, token=TOKEN[:-1])[0] == 401
    status, headers, _ = client.request(
        "POST", "/api/reconcile", body=b"{}", headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert view.reconciles == []
    assert view.suspended == {}


def test_without_a_token_state_changes_are_disabled(open_client: Client, view: FakeView) -> None:
    for path in ("/api/reconcile", "/api/suspend", "/api/resume"):
        assert open_client.post(path, {}) == (403, {"error": TOKEN_REQUIRED})
        assert open_client.post(path, {}, token=None) == (403, {"error": TOKEN_REQUIRED})
    assert view.reconciles == []
    assert open_client.get("/healthz")[0] == 200  # reads stay open


def test_view_errors_on_commands(client: Client, view: FakeView) -> None:
    view.fail_with = LeadershipError("this replica does not lead; the leader is d1 (term 4)")
    assert client.post("/api/reconcile") == (
        409,
        {"error": "this replica does not lead; the leader is d1 (term 4)"},
    )
    view.fail_with = None
    assert client.post("/api/resume", {"workload": "db"}) == (
        400,
        {"error": "db is not suspended"},
    )
    view.fail_with = KeyError("internal detail")
    status, body = client.post("/api/suspend", {"workload": "web"})
    assert status == 500
    assert "internal detail" not in body["error"]


def test_bad_command_bodies(client: Client) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for body in (b"not json", b"[1, 2]", b'{"workload": 3}', b'{"workload": ""}', b'{"reason": 1}'):
        status, payload = client.json("POST", "/api/suspend", body=body, headers=headers)
        assert status == 400, body
        assert payload["error"]


def test_oversized_body_is_refused(client: Client) -> None:
    status, _, raw = client.request(
        "POST",
        "/webhook/generic",
        body=b"x" * ((1 << 20) + 1),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 413
    assert "1 MiB" in json.loads(raw)["error"]


# -- webhooks -------------------------------------------------------------------------------------


def _sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


PUSH = json.dumps({"ref": "refs/heads/main", "after": SHA}).encode()


def test_github_push_triggers(client: Client, view: FakeView) -> None:
    status, body = client.json(
        "POST",
        "/webhook/github",
        body=PUSH,
        headers={"X-Hub-Signature-256": _sign(PUSH), "X-GitHub-Event": "push"},
    )
    assert status == 202
    assert body == {"accepted": True, "reason": "github push to refs/heads/main (a1b2c3d)"}
    assert view.reconciles == ["github push to refs/heads/main (a1b2c3d)"]


def test_github_ping_is_accepted_without_triggering(client: Client, view: FakeView) -> None:
    ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 42}).encode()
    status, body = client.json(
        "POST",
        "/webhook/github",
        body=ping,
        headers={"X-Hub-Signature-256": _sign(ping), "X-GitHub-Event": "ping"},
    )
    assert (status, body["accepted"]) == (200, False)
    assert "ping" in body["reason"]
    assert view.reconciles == []


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({"X-GitHub-Event": "push"}, 401, "missing X-Hub-Signature-256"),
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": _sign(PUSH, b"other")},
            401,
            "does not match",
        ),
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha1=" + "0" * 40},
            401,
            "sha256=",
        ),
        ({"X-Hub-Signature-256": _sign(PUSH)}, 400, "missing X-GitHub-Event"),
    ],
)
def test_github_bad_deliveries(
    client: Client, view: FakeView, headers: dict[str, str], status: int, message: str
) -> None:
    got, body = client.json("POST", "/webhook/github", body=PUSH, headers=headers)
    assert got == status
    assert message in body["error"]
    assert view.reconciles == []


def test_github_signature_covers_the_exact_body(client: Client, view: FakeView) -> None:
    tampered = PUSH.replace(b"main", b"evil")
    status, _ = client.json(
        "POST",
        "/webhook/github",
        body=tampered,
        headers={"X-Hub-Signature-256": _sign(PUSH), "X-GitHub-Event": "push"},
    )
    assert status == 401
    assert view.reconciles == []


def test_gitlab_token(client: Client, view: FakeView) -> None:
    body = json.dumps(
        {"ref": "refs/heads/main", "checkout_sha": SHA, "after": SHA, "object_kind": "push"}
    ).encode()
    status, payload = client.json(
        "POST",
        "/webhook/gitlab",
        body=body,
        headers={"X-Gitlab-Token": SECRET.decode(), "X-Gitlab-Event": "Push Hook"},
    )
    assert (status, payload["reason"]) == (202, "gitlab push to refs/heads/main (a1b2c3d)")
    for headers in (
        {"X-Gitlab-Event": "Push Hook"},
        {"X-Gitlab-Token": "wrong", "X-Gitlab-Event": "Push Hook"},
        {"X-Gitlab-Token": SECRET.decode() + "x", "X-Gitlab-Event": "Push Hook"},
    ):
        assert client.json("POST", "/webhook/gitlab", body=body, headers=headers)[0] == 401
    missing_event = {"X-Gitlab-Token": SECRET.decode()}
    assert client.json("POST", "/webhook/gitlab", body=body, headers=missing_event)[0] == 400
    assert view.reconciles == ["gitlab push to refs/heads/main (a1b2c3d)"]


def test_generic_signature(client: Client, view: FakeView) -> None:
    body = json.dumps({"reason": "image rebuilt"}).encode()
    good = {"X-Reconciler-Signature": _sign(body)}
    status, payload = client.json("POST", "/webhook/generic", body=body, headers=good)
    assert (status, payload["reason"]) == (202, "generic webhook: image rebuilt")
    bad = {"X-Reconciler-Signature": _sign(body, b"nope")}
    assert client.json("POST", "/webhook/generic", body=body, headers=bad)[0] == 401
    assert client.json("POST", "/webhook/generic", body=body)[0] == 401
    # A GitHub-style header does not sign a generic delivery.
    other = {"X-Hub-Signature-256": _sign(body)}
    assert client.json("POST", "/webhook/generic", body=body, headers=other)[0] == 401
    assert view.reconciles == ["generic webhook: image rebuilt"]


def test_webhook_on_a_follower_is_a_conflict(client: Client, view: FakeView) -> None:
    view.fail_with = LeadershipError("this replica does not lead; the leader is d1 (term 4)")
    headers = {"X-Hub-Signature-256": _sign(PUSH), "X-GitHub-Event": "push"}
    status, body = client.json("POST", "/webhook/github", body=PUSH, headers=headers)
    assert status == 409
    assert "d1" in body["error"]


def test_webhooks_disabled_without_a_secret(open_client: Client) -> None:
    headers = {"X-Hub-Signature-256": _sign(PUSH), "X-GitHub-Event": "push"}
    for kind in ("github", "gitlab", "generic"):
        status, body = open_client.json("POST", f"/webhook/{kind}", body=PUSH, headers=headers)
        assert (status, body) == (404, {"error": "webhooks are disabled"})


def test_verify_delivery_directly() -> None:
    headers = {"x-hub-signature-256": _sign(PUSH), "x-github-event": "push"}
    delivery = verify_delivery("github", headers, PUSH, SECRET)
    assert delivery.trigger
    assert delivery.reason == "github push to refs/heads/main (a1b2c3d)"
    big = b"{}" + b" " * (1 << 20)
    with pytest.raises(WebhookRejected) as rejected:
        verify_delivery("generic", {"X-Reconciler-Signature": _sign(big)}, big, SECRET)
    assert rejected.value.status == 413
    # Payload text is cleaned to one line before it reaches logs.
    nasty = json.dumps({"ref": "refs/heads/main\nFAKE LOG LINE", "after": SHA}).encode()
    headers = {"X-Hub-Signature-256": _sign(nasty), "X-GitHub-Event": "push"}
    assert "\n" not in verify_delivery("github", headers, nasty, SECRET).reason


# -- the page over plain HTTP (the browser test checks what a user sees) ------------------------


def test_status_page_is_html_without_scripts(client: Client) -> None:
    status, headers, body = client.request("GET", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = body.decode()
    assert '<meta http-equiv="refresh" content="5">' in html
    assert '<tr data-vm="web-0"' in html
    assert "<script" not in html


# -- hardening: the transport (slowloris, deadlines, limits, a bounded pool) ----------------------


def _port(server: OperatorServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _raw(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read the whole answer (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_two_hundred_trickling_connections_do_not_stop_healthz(
    token_server: OperatorServer, view: FakeView, metrics: DaemonMetrics
) -> None:
    token_server.view, token_server.metrics = view, metrics
    port = _port(token_server)
    tricklers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    try:
        for conn in tricklers:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for round_ in range(3):
            for conn in tricklers:
                conn.sendall(b"a")  # still sending: a thread-per-connection server holds 200
            started = time.monotonic()
            assert Client(token_server.url).get("/healthz") == (200, b"ok\n"), round_
            assert time.monotonic() - started < 2
    finally:
        for conn in tricklers:
            conn.close()


def test_the_oldest_unfinished_connection_makes_room_for_a_new_one(view: FakeView) -> None:
    server = OperatorServer(
        view,
        DaemonMetrics(),
        listen="127.0.0.1:0",
        token=None,
        webhook_secret=None,
        limits=Limits(max_pending=5),
    )
    server.start()
    try:
        port = _port(server)
        tricklers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        for conn in tricklers:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert Client(server.url).get("/healthz") == (200, b"ok\n")
        # The first connections were evicted (with a 503 they may read), the newest still wait.
        assert _status_of(tricklers[0].recv(4096)) == 503
        for conn in tricklers:
            conn.close()
    finally:
        server.close()


def test_a_trickled_request_is_cut_off_at_the_whole_request_deadline(view: FakeView) -> None:
    server = OperatorServer(
        view,
        DaemonMetrics(),
        listen="127.0.0.1:0",
        token=None,
        webhook_secret=None,
        limits=Limits(request_deadline=1.0),
    )
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as conn:
            started = time.monotonic()
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            answer = b""
            # A byte every 0.2 s: each recv is quick, only a deadline on the whole request ends it.
            for _ in range(50):
                try:
                    conn.sendall(b"X")
                except OSError:
                    break
                conn.settimeout(0.2)
                try:
                    answer = conn.recv(4096)
                except TimeoutError:
                    continue
                break
            elapsed = time.monotonic() - started
        assert _status_of(answer) == 408
        assert b"within 1 s" in answer
        assert 0.9 < elapsed < 3
    finally:
        server.close()


def test_headers_are_bounded_in_size_and_count(client: Client) -> None:
    port = int(client.url.rsplit(":", 1)[1])
    huge = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n"
    assert _status_of(_raw(port, huge)) == 431
    many = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    assert _status_of(_raw(port, many + b"\r\n")) == 431
    assert _status_of(_raw(port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 200


def test_a_full_pool_answers_503_at_once(view: FakeView) -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowView(FakeView):
        def status(self) -> dict[str, Any]:
            entered.set()
            release.wait(10)
            return super().status()

    server = OperatorServer(
        SlowView(),
        DaemonMetrics(),
        listen="127.0.0.1:0",
        token=None,
        webhook_secret=None,
        limits=Limits(workers=1, max_queued=1),
    )
    server.start()
    slow = threading.Thread(target=Client(server.url).get, args=("/api/status",))
    try:
        slow.start()
        assert entered.wait(5)
        started = time.monotonic()
        assert Client(server.url).get("/healthz")[0] == 503
        assert time.monotonic() - started < 2
    finally:
        release.set()
        slow.join(10)
        server.close()


def test_a_bad_content_length_is_400(client: Client) -> None:
    port = int(client.url.rsplit(":", 1)[1])
    for length in (b"abc", b"-1", b"1e3"):
        request = b"POST /api/reconcile HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n"
        assert _status_of(_raw(port, request)) == 400, length
    short = b"POST /api/reconcile HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(short)
        conn.shutdown(socket.SHUT_WR)  # the client gives up: no answer owed, no thread held
        assert conn.recv(4096) == b""


# -- hardening: malformed bodies are a 400 with one line, never a 500 or a traceback --------------

NESTED = b"[" * 10_000 + b"]" * 10_000
NESTED_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000


@pytest.mark.parametrize("body", [NESTED, NESTED_OBJECT, b"\xff{", b'{"a": tru'])
def test_signed_malformed_webhook_bodies_are_400_without_a_traceback(
    client: Client, view: FakeView, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    deliveries = {
        "github": {"X-Hub-Signature-256": _sign(body), "X-GitHub-Event": "push"},
        "gitlab": {"X-Gitlab-Token": SECRET.decode(), "X-Gitlab-Event": "Push Hook"},
        "generic": {"X-Reconciler-Signature": _sign(body)},
    }
    for kind, headers in deliveries.items():
        status, payload = client.json("POST", f"/webhook/{kind}", body=body, headers=headers)
        assert status == 400, kind
        assert "\n" not in payload["error"]
    status, payload = client.json(
        "POST", "/api/suspend", body=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 400
    assert view.reconciles == []
    assert view.suspended == {}
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text


def test_parse_json_limits_depth() -> None:
    assert parse_json(b'{"a": [[1]]}') == {"a": [[1]]}
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(MalformedBody, match="nests deeper"):
        parse_json(deep)
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(ok) is not None
    with pytest.raises(MalformedBody, match="not UTF-8"):
        parse_json(b"\xff")


# -- hardening: Host names (DNS rebinding) --------------------------------------------------------


def test_a_foreign_host_name_is_refused(client: Client) -> None:
    port = int(client.url.rsplit(":", 1)[1])
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost:1"):
        status, _, raw = client.request("GET", "/api/status", headers={"Host": host})
        assert status == 421, host
        assert "--allowed-host" in json.loads(raw)["error"]
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "localhost",
        f"[::1]:{port}",
        "10.1.2.3",
    ):
        assert client.request("GET", "/healthz", headers={"Host": host})[0] == 200, host
    # Webhooks and commands too: the check comes before any route.
    assert client.post("/api/reconcile", {}, token=TOKEN)[0] == 202
    status, _, _ = client.request(
        "POST",
        "/api/reconcile",
        body=b"{}",
        headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 421


def test_allowed_host_names(view: FakeView) -> None:
    server = OperatorServer(
        view,
        DaemonMetrics(),
        listen="127.0.0.1:0",
        token=None,
        webhook_secret=None,
        allowed_hosts=["Reconciler.Example.org"],
    )
    server.start()
    try:
        port = _port(server)
        client = Client(server.url)
        good = {"Host": f"reconciler.example.org:{port}"}
        assert client.request("GET", "/healthz", headers=good)[0] == 200
        assert client.request("GET", "/healthz", headers={"Host": "other.example.org"})[0] == 421
    finally:
        server.close()


def test_host_allowed_parses_every_form() -> None:
    names = frozenset({"fleet.example"})
    assert host_allowed("fleet.example", names, 9180)
    assert host_allowed("FLEET.example.:9180", names, 9180)
    assert host_allowed("[::1]:9180", names, 9180)
    assert host_allowed("192.0.2.1", names, 9180)
    assert not host_allowed("fleet.example:80", names, 9180)
    assert not host_allowed("[::1", names, 9180)
    assert not host_allowed("[::1]x", names, 9180)
    assert not host_allowed("", names, 9180)
    assert not host_allowed("a:b:c", names, 9180)
    assert not host_allowed("localhost.evil", names, 9180)


def test_allowed_host_option_is_validated(tmp_path: Path) -> None:
    from reconciler.daemon.settings import ApiSettings, DaemonSettings, SourceSettings
    from reconciler.errors import ConfigError

    source = SourceSettings(repo=".")
    DaemonSettings(
        source, tmp_path, tmp_path, api=ApiSettings(allowed_hosts=("fleet.example.org",))
    ).validated()
    for bad in ("evil.example:80", "a b", "", "http://x"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            DaemonSettings(
                source, tmp_path, tmp_path, api=ApiSettings(allowed_hosts=(bad,))
            ).validated()


# -- hardening: what unauthenticated readers see --------------------------------------------------


def test_answers_are_scrubbed_of_credentials_and_secret_values(
    token_server: OperatorServer, view: FakeView, metrics: DaemonMetrics
) -> None:
    leaky = "https://user:s3cret@git.example/fleet.git"
    view.status_doc["daemon"]["repo"] = f"the remote {leaky}"
    view.status_doc["last_error"] = f"cannot fetch {leaky}: TOPSECRET rejected"
    view.status_doc["vms"][0]["detail"] = "exited: API_KEY=TOPSECRET"
    view.status_doc["vms"][0]["env"] = {"API_KEY": "TOPSECRET", "N": "1"}
    view.status_doc["leader"]["lease_error"] = "cannot connect: host=db password=hunter2 user=x"
    view.event_log[0]["message"] = f"fetch {leaky} failed"
    view.is_ready = (False, "lease error at postgresql://admin:hunter2@db/leases")
    token_server.view, token_server.metrics = view, metrics
    token_server.redactor.remember(["TOPSECRET"])
    client = Client(token_server.url)
    bodies = [client.get(path)[1] for path in ("/", "/api/status", "/api/events", "/readyz")]
    for body in bodies:
        text = body.decode()
        for secret in ("s3cret", "TOPSECRET", "hunter2", "user:"):
            assert secret not in text
    status = json.loads(bodies[1])
    assert status["vms"][0]["env"] == {"API_KEY": "***", "N": "***"}  # keys only
    assert status["daemon"]["repo"] == "the remote https://***@git.example/fleet.git"
    assert TOKEN not in b"".join(bodies).decode()


def test_redactor_masks_by_value_and_by_key() -> None:
    redactor = Redactor(["TOPSECRET", "ab"])  # too short to mask inside text
    assert redactor.text("x TOPSECRET y ab") == "x *** y ab"
    data = {
        "token": "t",
        "webhook_secret": None,
        "settings": {"deploy.env.KEY": '"v"', "deploy.vcpus": "1"},
        "list": ["https://u:p@h/x", 3, True],
    }
    assert redactor.json(data) == {
        "token": "***",
        "webhook_secret": None,
        "settings": {"deploy.env.KEY": "***", "deploy.vcpus": "1"},
        "list": ["https://***@h/x", 3, True],
    }
    settings = {
        "deploy.env.A": '"TOPSECRET"',
        "deploy.env.PORT": '"8080"',  # short, not named secret: masking it garbles addresses
        "deploy.env.API_KEY": '"k3y!"',  # short but named secret
        "deploy.env.N": "12345678",
        "x": '"not an env value"',
    }
    assert env_values(settings) == ["TOPSECRET", "k3y!", "12345678"]


def test_expect_100_continue_is_answered_before_the_body(client: Client, view: FakeView) -> None:
    port = int(client.url.rsplit(":", 1)[1])
    body = json.dumps({"reason": "x" * 2000}).encode()
    head = (
        f"POST /api/reconcile HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(head)
        assert conn.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert _status_of(answer) == 202
    assert answer.count(b"100 Continue") == 0
    assert len(view.reconciles) == 1


def test_settings_keep_secrets_out_of_repr(tmp_path: Path) -> None:
    from reconciler.daemon.settings import (
        ApiSettings,
        DaemonSettings,
        LeaderSettings,
        SourceSettings,
    )

    settings = DaemonSettings(
        source=SourceSettings(repo="."),
        state_dir=tmp_path,
        cache_dir=tmp_path,
        api=ApiSettings(token="TOPSECRET-TOKEN", webhook_secret=b"TOPSECRET-HOOK"),
        lease=LeaderSettings("postgresql://admin:hunter2@db/leases"),
    )
    assert "hunter2" not in repr(settings)
    assert "TOPSECRET" not in repr(settings)
