"""What the daemon exposes, end to end: a real ``Daemon`` (real git source, SQLite state store,
file lease, HTTP server on a free port) whose repository URL carries credentials and whose VM
has a secret env value; and the ``reconcile --now`` client against servers that try to lure its
bearer token elsewhere (a redirect to another port, a proxy from the environment)."""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.main import main
from reconciler.daemon.logs import PlainFormatter, RedactingFilter, configure_logging
from reconciler.daemon.redaction import Redactor
from reconciler.daemon.settings import ApiSettings, DaemonSettings, SourceSettings
from reconciler.leadership.fence import Fence
from reconciler.model import ObservedVM, RuntimeKind, Target, VMState, canonical_json
from reconciler.state import open_state_store

USER_SECRET = "s3cret"
ENV_SECRET = "TOPSECRET"
# Port 9 (discard) is closed here: git's fetch fails at once, quoting the remote.
REPO = f"https://user:{USER_SECRET}@127.0.0.1:9/org/fleet.git"
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "api-token-for-tests"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Any]:
    from reconciler.daemon.loop import open_daemon

    settings = DaemonSettings(
        source=SourceSettings(repo=REPO, watch=False),
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        api=ApiSettings(listen="127.0.0.1:0", token=TOKEN),
    )
    (tmp_path / "state").mkdir()
    store = open_state_store(tmp_path / "state")
    store.put_vm(
        ObservedVM(
            name="api-0",
            workload="api",
            fleet="prod",
            runtime=RuntimeKind.PROCESS,
            target=Target.EXECUTABLE,
            artifact_digest="sha256:0",
            artifact_inputs={},
            settings={"deploy.env.API_KEY": canonical_json(ENV_SECRET), "deploy.vcpus": "1"},
            state=VMState.FAILED,
            healthy=False,
            detail=f"exited 1: bad API_KEY={ENV_SECRET} for {REPO}",
        )
    )
    store.close()
    with open_daemon(settings) as running:
        running.server.start()
        yield running


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as err:
        with err:
            body = err.read()
    return body


def test_no_answer_event_or_log_line_shows_a_credential_or_secret(
    daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The handler the CLI installs: the daemon's redactor behind a RedactingFilter.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter())
    handler.addFilter(RedactingFilter(daemon.redactor))
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        # A real cycle: the fetch of the unreachable remote fails and is logged and shown.
        daemon._run_cycle(Fence(1, renew_deadline=60), ["test"])
        # Writers that quote the remote or the secret: events and revision messages.
        daemon._event("revision-failed", SHA[:12], f"cannot fetch {REPO}: {ENV_SECRET}")
        daemon.host.store.record_revision(SHA, outcome="failed", message=f"git: {REPO} refused")
        logging.getLogger("reconciler.daemon").warning(
            "fetch %s failed with %s", REPO, ENV_SECRET, extra={"remote": REPO}
        )
        try:
            raise RuntimeError(f"boom {REPO} {ENV_SECRET}")
        except RuntimeError:
            logging.getLogger("reconciler.daemon").exception("crashed")
    finally:
        root.removeHandler(handler)

    base = daemon.server.url
    paths = ("/", "/healthz", "/readyz", "/metrics", "/api/status", "/api/events?limit=1000")
    answers = {path: _get(base + path).decode() for path in paths}
    status = json.loads(answers["/api/status"])
    assert status["last_error"]  # the failed revision is shown ...
    assert status["vms"][0]["detail"].startswith("exited 1: bad API_KEY=***")  # ... scrubbed
    assert "127.0.0.1:9/org/fleet.git" in status["daemon"]["repo"]
    events = json.loads(answers["/api/events?limit=1000"])
    assert any(e["kind"] == "revision-failed" for e in events)
    stored = open_state_store(daemon.settings.state_dir)
    try:
        stored_text = json.dumps([e.__dict__ for e in stored.events(1000)]) + str(
            stored.attempted_revision()
        )
    finally:
        stored.close()
    logged = stream.getvalue()
    assert "crashed" in logged
    assert "boom https://***@" in logged  # the traceback is there, scrubbed
    for where, text in [*answers.items(), ("events", stored_text), ("log", logged)]:
        assert USER_SECRET not in text, where
        assert ENV_SECRET not in text, where
        assert TOKEN not in text, where


# -- reconcile --now never hands its token to anyone but the daemon -------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Records each request's Authorization header; ``redirect`` answers 302 to it."""

    seen: list[str | None]
    redirect: str | None

    def do_GET(self) -> None:
        # A followed 302 turns urllib's POST into a GET that still carries the headers.
        self.do_POST()

    def do_POST(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if type(self).redirect:
            self.send_response(302)
            self.send_header("Location", str(type(self).redirect))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"accepted": true}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _recorder(redirect: str | None = None) -> tuple[HTTPServer, type[_Recorder]]:
    handler = type("Recorder", (_Recorder,), {"seen": [], "redirect": redirect})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    return server, handler


def _url(server: HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_reconcile_now_does_not_follow_a_redirect_with_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, target_log = _recorder()
    lure, lure_log = _recorder(redirect=_url(target) + "/api/reconcile")
    monkeypatch.setenv("RECONCILER_API_TOKEN", TOKEN)
    try:
        code = main(["reconcile", "--now", "--url", _url(lure), "--state-dir", str(tmp_path)])
    finally:
        lure.shutdown()
        target.shutdown()
        lure.server_close()
        target.server_close()
    assert code == 1
    assert lure_log.seen == [f"Bearer {TOKEN}"]  # the daemon's own address gets it ...
    assert target_log.seen == []  # ... the redirect target never sees a request
    err = capsys.readouterr().err
    assert "redirects to" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_reconcile_now_ignores_proxy_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_side, daemon_log = _recorder()
    proxy, proxy_log = _recorder()
    monkeypatch.setenv("RECONCILER_API_TOKEN", TOKEN)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, _url(proxy))
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.install_opener(None)  # urlopen's shared opener reads the proxies anew
    try:
        code = main(
            ["reconcile", "--now", "--url", _url(daemon_side), "--state-dir", str(tmp_path)]
        )
    finally:
        for server in (daemon_side, proxy):
            server.shutdown()
            server.server_close()
    assert code == 0, capsys.readouterr().err
    assert daemon_log.seen == [f"Bearer {TOKEN}"]
    assert proxy_log.seen == []


def test_reconcile_now_refuses_other_schemes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECONCILER_API_TOKEN", TOKEN)
    url = f"file://user:{USER_SECRET}@localhost/etc/passwd"
    assert main(["reconcile", "--now", "--url", url, "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "http://" in err
    assert USER_SECRET not in err


def test_configure_logging_scrubs_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    redactor = Redactor()
    try:
        configure_logging("json", 1, redactor=redactor)
        redactor.remember([ENV_SECRET])  # learnt after start-up: masked from then on
        logging.getLogger("reconciler.test").warning(
            "fetch %s: %s", REPO, ENV_SECRET, extra={"remote": REPO}
        )
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "fetch https://***@127.0.0.1:9/org/fleet.git: ***"
    assert line["remote"] == "https://***@127.0.0.1:9/org/fleet.git"
