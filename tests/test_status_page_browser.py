"""The daemon's status page as a user sees it: served by a real ``OperatorServer`` and loaded in
real headless Chromium (Debian's ``chromium`` package; CI installs it). The DOM that Chromium
built is parsed and checked: VM rows with their health, the leader line, the revisions and the
last error, and that untrusted text stays text.

A missing Chromium is a failure, not a skip: CI has it, and a page nobody renders is untested.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.redaction import Redactor

APPLIED = "0123456789abcdef0123456789abcdef01234567"
ATTEMPTED = "fedcba9876543210fedcba9876543210fedcba98"
ERROR = "workloads/web.yaml:7: $.spec.deploy.replicas: -1 is less than 0 <b>not bold</b>"
XSS = "<script>document.title='owned'</script><img src=x onerror=alert(1)>"
CHROMIUM_TIMEOUT = 60

# Real builds (PyInstaller, mkfs, QEMU) or a real browser: not part of the fast suite.
pytestmark = pytest.mark.slow


class PageView:
    """A DaemonView with canned data for the page: a follower whose last attempt failed."""

    def __init__(self, status: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self._status = status
        self._events = events

    def status(self) -> dict[str, Any]:
        return self._status

    def ready(self) -> tuple[bool, str]:
        return True, "following d1 (term 4)"

    def events(self, limit: int) -> list[dict[str, Any]]:
        return self._events[:limit]

    def request_reconcile(self, reason: str) -> None:
        raise AssertionError("the page is read-only")

    def suspend(self, workload: str | None, reason: str) -> None:
        raise AssertionError("the page is read-only")

    def resume(self, workload: str | None) -> None:
        raise AssertionError("the page is read-only")


def _vm(name: str, healthy: bool | None, state: str = "running", **extra: Any) -> dict[str, Any]:
    vm = {
        "name": name,
        "workload": name.rsplit("-", 1)[0],
        "state": state,
        "healthy": healthy,
        "address": f"10.0.0.{len(name)}",
        "pid": 100,
        "artifact": "sha256:0",
        "runtime": "qemu",
        "detail": "",
        "uptime_seconds": 3725.0,
        "restarts": 0,
    }
    vm.update(extra)
    return vm


FAILING_STATUS: dict[str, Any] = {
    "fleet": "production",
    "applied_revision": APPLIED,
    "attempted_revision": ATTEMPTED,
    "attempted_outcome": "failed",
    "attempted_at": 1_700_000_000.0,
    "last_error": ERROR,
    "vms": [
        _vm("web-0", True, detail="http 200 in 3 ms"),
        _vm("web-1", False, detail=f"http 503 {XSS}", restarts=4),
        _vm("db-0", None, state="stopped", runtime="process", uptime_seconds=None),
    ],
    "leader": {"is_leader": False, "term": 4, "holder": "d1", "me": "d0"},
    "daemon": {"id": "d0", "started_at": 1_700_000_000.0, "last_error": ERROR},
    "suspended": {"fleet": False, "workloads": ["db"]},
}
EVENTS = [
    {
        "id": 3,
        "at": 1_700_000_300.0,
        "kind": "failed",
        "subject": "fedcba987654",
        "message": ERROR,
        "term": 4,
    },
    {"id": 2, "at": 1_700_000_200.0, "kind": "suspended", "subject": "db", "message": "incident"},
    {"id": 1, "at": 1_700_000_100.0, "kind": "elected", "subject": "d1", "message": "term 4"},
]


# -- a small DOM, from the HTML Chromium serialised -----------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # text and children's text, in order

    def text(self) -> str:
        return " ".join("".join(self.texts).split())

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            node
            for node in self.walk()
            if (tag is None or node.tag == tag)
            and all(node.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def by_id(self, element_id: str) -> Node:
        found = [node for node in self.walk() if node.attrs.get("id") == element_id]
        assert len(found) == 1, f"expected one #{element_id}, found {len(found)}"
        return found[0]


class _DomBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node.texts.append(data)


def parse_dom(html: str) -> Node:
    builder = _DomBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# -- Chromium -------------------------------------------------------------------------------------


def chromium_binary() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not installed: install Debian's package with "
            "`apt-get install -y --no-install-recommends chromium` (CI installs it)"
        )
    return binary


def run_chromium(url: str, tmp_path: Path, *extra: str) -> str:
    argv = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *extra,
        url,
    ]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT} s: {exc.stderr!r}")
    assert result.returncode == 0, f"chromium exited {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[OperatorServer] = []

    def start(
        status: dict[str, Any], events: list[dict[str, Any]], secrets: list[str] | None = None
    ) -> str:
        server = OperatorServer(
            PageView(status, events),
            DaemonMetrics(),
            listen="127.0.0.1:0",
            token="t",
            webhook_secret=None,
            redactor=Redactor(secrets or []),
        )
        server.start()
        servers.append(server)
        return server.url + "/"

    yield start
    for server in servers:
        server.close()


def test_status_page_shows_the_fleet_in_chromium(serve: Any, tmp_path: Path) -> None:
    dom = parse_dom(run_chromium(serve(FAILING_STATUS, EVENTS), tmp_path, "--dump-dom"))

    assert dom.find_all("meta", http_equiv="refresh")[0].attrs["content"] == "5"
    assert dom.by_id("fleet").text() == "production"

    rows = {
        row.attrs["data-vm"]: row
        for row in dom.by_id("vms").find_all("tr")
        if "data-vm" in row.attrs
    }
    assert list(rows) == ["db-0", "web-0", "web-1"]  # sorted by name
    assert rows["web-0"].attrs["data-healthy"] == "true"
    assert "healthy" in rows["web-0"].text().split()
    assert "http 200 in 3 ms" in rows["web-0"].text()
    assert rows["web-1"].attrs["data-healthy"] == "false"
    assert "unhealthy" in rows["web-1"].text()
    assert rows["db-0"].attrs["data-healthy"] == "unknown"
    assert rows["db-0"].attrs["data-state"] == "stopped"
    web0 = [cell.text() for cell in rows["web-0"].find_all("td")]
    assert web0 == [
        "web-0",
        "web",
        "running",
        "healthy",
        "10.0.0.5",
        "qemu",
        "1h02m",
        "0",
        "http 200 in 3 ms",
    ]
    assert dom.by_id("vm-counts").text() == "1 of 3 healthy"

    leader = dom.by_id("leader")
    assert (leader.attrs["data-holder"], leader.attrs["data-term"]) == ("d1", "4")
    assert leader.attrs["data-is-leader"] == "false"
    assert "d1 leads, term 4" in leader.text()
    assert "this replica follows" in leader.text()

    applied = dom.by_id("applied-revision")
    assert applied.attrs["data-revision"] == APPLIED
    assert APPLIED[:12] in applied.text()
    attempted = dom.by_id("attempted-revision")
    assert ATTEMPTED[:12] in attempted.text()
    assert attempted.attrs["data-outcome"] == "failed"

    # The error is shown once (the store's and the daemon's copies are the same text), as text.
    last_error = dom.by_id("last-error")
    assert last_error.text().count(ERROR) == 1
    assert last_error.find_all("b") == []
    assert "db" in dom.by_id("suspended").text()

    # Untrusted text (a guest's health detail) never becomes markup.
    assert dom.find_all("script") == []
    assert dom.find_all("img") == []
    assert XSS in rows["web-1"].text()

    events = [row for row in dom.by_id("events").find_all("tr") if "data-event" in row.attrs]
    assert [row.attrs["data-kind"] for row in events] == ["failed", "suspended", "elected"]
    assert "2023-11-14 22:18:20 UTC" in events[0].text()


def test_a_healthy_leader_page_has_no_error_box(serve: Any, tmp_path: Path) -> None:
    status: dict[str, Any] = {
        "applied_revision": APPLIED,
        "attempted_revision": APPLIED,
        "attempted_outcome": "applied",
        "last_error": None,
        "vms": [],
        "leader": {"is_leader": True, "term": 9, "holder": "d0"},
        "daemon": {"id": "d0", "last_error": None},
        "suspended": {"fleet": True, "workloads": []},
    }
    dom = parse_dom(run_chromium(serve(status, []), tmp_path, "--dump-dom"))
    assert dom.find_all(id="last-error") == []
    leader = dom.by_id("leader")
    assert leader.attrs["data-is-leader"] == "true"
    assert "d0 leads, term 9" in leader.text()
    assert "this replica leads" in leader.text()
    assert dom.by_id("vms").text() == "No VMs observed."
    assert dom.by_id("events").text() == "No events yet."
    assert dom.by_id("suspended").attrs["data-fleet"] == "true"
    assert "the whole fleet" in dom.by_id("suspended").text()


def test_chromium_renders_a_screenshot(serve: Any, tmp_path: Path) -> None:
    png = tmp_path / "page.png"
    run_chromium(
        serve(FAILING_STATUS, EVENTS), tmp_path, f"--screenshot={png}", "--window-size=1280,900"
    )
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
    assert len(data) > 10_000  # a rendered page, not a blank image


def test_the_page_shows_no_credential_or_secret(serve: Any, tmp_path: Path) -> None:
    leaky = "https://deploy:s3cret@git.example/org/fleet.git"
    status = {
        **FAILING_STATUS,
        "last_error": f"cannot fetch {leaky}",
        "vms": [_vm("api-0", False, detail="exited: API_TOKEN=TOPSECRET", env={"K": "TOPSECRET"})],
        "daemon": {"id": "d0", "repo": f"the remote {leaky}", "last_error": None},
    }
    events = [{**EVENTS[0], "message": f"fetch {leaky} failed: TOPSECRET"}]
    html = run_chromium(serve(status, events, ["TOPSECRET"]), tmp_path, "--dump-dom")
    dom = parse_dom(html)
    assert "https://***@git.example/org/fleet.git" in dom.by_id("last-error").text()
    assert "API_TOKEN=***" in dom.by_id("vms").text()
    assert "s3cret" not in html
    assert "TOPSECRET" not in html


def test_a_rebound_dns_name_gets_no_page(serve: Any, tmp_path: Path) -> None:
    """DNS rebinding: a page on rebind.example whose name now resolves to the daemon. The
    browser sends ``Host: rebind.example:PORT``, and the daemon refuses to answer it."""
    url = serve(FAILING_STATUS, EVENTS)
    port = url.rsplit(":", 1)[1].rstrip("/")
    html = run_chromium(
        f"http://rebind.example:{port}/",
        tmp_path,
        "--dump-dom",
        "--host-resolver-rules=MAP rebind.example 127.0.0.1",
    )
    assert "production" not in html
    assert "--allowed-host" in html


def _host(name: str, state: str, vms: int, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "epoch": 2,
        "vms": vms,
        "assigned": vms,
        "vcpus_allocated": 2 * vms,
        "vcpus": 8,
        "memory_allocated_mib": 512 * vms,
        "memory_mib": 4096,
        "heartbeat_age_seconds": 61.0 if state == "lost" else 1.0,
        "labels": labels,
    }


def test_a_fleet_across_hosts_shows_its_hosts_in_chromium(serve: Any, tmp_path: Path) -> None:
    # Host names and labels are each host's own word: untrusted, like a guest's health detail.
    status = {
        **FAILING_STATUS,
        "vms": [
            _vm("web-0", True, host="host-a"),
            _vm("web-1", True, host=XSS),
        ],
        "hosts": [
            _host("host-a", "ready", 1, zone="a"),
            _host("host-b", "lost", 2),
            _host(XSS, "cordoned", 1, rack=XSS),
        ],
    }
    dom = parse_dom(run_chromium(serve(status, []), tmp_path, "--dump-dom"))
    rows = {
        row.attrs["data-host"]: row
        for row in dom.by_id("hosts").find_all("tr")
        if "data-host" in row.attrs
    }
    assert list(rows) == ["host-a", "host-b", XSS]
    assert [rows[name].attrs["data-state"] for name in rows] == ["ready", "lost", "cordoned"]
    assert [cell.text() for cell in rows["host-a"].find_all("td")] == [
        "host-a",
        "ready",
        "1",
        "1",
        "2 / 8",
        "512 / 4096 MiB",
        "0m01s ago",
        "zone=a",
    ]
    assert "1m01s ago" in rows["host-b"].text()
    assert dom.by_id("host-counts").attrs["data-lost"] == "1"
    vms = {
        row.attrs["data-vm"]: row
        for row in dom.by_id("vms").find_all("tr")
        if "data-vm" in row.attrs
    }
    assert vms["web-0"].attrs["data-host"] == "host-a"
    assert [cell.text() for cell in vms["web-0"].find_all("td")][:2] == ["web-0", "host-a"]
    assert dom.find_all("script") == []
    assert dom.find_all("img") == []
    assert XSS in rows[XSS].text()
    assert vms["web-1"].attrs["data-host"] == XSS
