"""One VM seen whole (``reconciler describe``, ``GET /api/vms/NAME``, the page's VM panel) and
``status --watch``.

The description is read from a real state directory (the VM's console log with the guest
init's markers), a real artifact cache entry with its build log, and a state store; reading it
writes nothing. The HTTP layer gives the console and the build log (guest and build output)
only to a request with the token. The daemon doing all this for real is in
``test_history_rollback.py``.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.fakes import MemoryStateStore, fleet, running, workload
from test_http_api import TOKEN, Client, FakeView

from builders.cache import ArtifactCache
from reconciler.cli.watch import printed, watch
from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.status_page import render_page
from reconciler.errors import ConfigError
from reconciler.execution.status import describe_vm, render_description
from reconciler.execution.vms import vm_dir
from runtime.console_log import LOG, ConsoleLog

MANIFEST = """\
apiVersion: reconciler.dev/v1
kind: Fleet
metadata: {name: demo}
---
apiVersion: reconciler.dev/v1
kind: Workload
metadata:
  name: web
spec: {}
"""


def _world(tmp_path: Path) -> dict[str, Any]:
    web = replace(workload("web"), declared_in="fleet.yaml")
    desired = fleet(web)
    store = MemoryStateStore(running(desired).vms.values())
    digest = store.observed().vms["web-0"].artifact_digest
    store.record_revision("a" * 40, outcome="applied")
    store.pin("web", "a" * 40, "bad release")
    store.record_vm_history("web-0", "action", "create web-0: not running", term=3)
    store.record_vm_history("web-0", "health", "tcp 8080 open", healthy=True, term=3)
    store.record_vm_history("web-0", "rollback", "back to artifact sha256:0", term=4)
    state = tmp_path / "state"
    directory = vm_dir(state, "web-0")
    directory.mkdir(parents=True)
    ConsoleLog(directory).new_boot(now=1_700_000_000.0)
    (directory / LOG).write_text(
        "[    0.000000] Linux version 6.1\n"
        '@@reconciler {"event":"booted","t":0.5}\n'
        '@@reconciler {"event":"workload-started","pid":57,"t":0.75}\n'
        "listening on 8080\n"
    )
    cache = ArtifactCache(tmp_path / "cache")
    staging = cache.new_staging()
    (staging / "build.log").write_text("cc -O2 echo.c\nbuilt web\n")
    cache.commit(staging, "sha256:" + "c" * 64, {"input_digest": digest, "log": "build.log"})
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "fleet.yaml").write_text(MANIFEST)
    return {"store": store, "state": state, "cache": cache.root, "desired": desired, "root": root}


def test_describe_reads_every_source_and_writes_nothing(tmp_path: Path) -> None:
    world = _world(tmp_path)
    store: MemoryStateStore = world["store"]
    version, events = store.version(), store.events()
    described = describe_vm(
        store,
        "web-0",
        state_dir=world["state"],
        cache_dir=world["cache"],
        host="host-a",
        desired=world["desired"],
        manifest_root=world["root"],
    )
    assert (store.version(), store.events()) == (version, events)
    assert described["host"] == "host-a"
    assert (described["revision"], described["pinned"]) == ("a" * 40, True)
    assert described["manifest"] == {"file": "fleet.yaml", "line": 7}
    assert described["build_log"] == ["cc -O2 echo.c", "built web"]
    assert described["build_log_path"] is not None
    boot = [(m["event"], m["at"], m["detail"]) for m in described["boot"]]
    assert boot == [
        ("booted", 1_700_000_000.5, ""),
        ("workload-started", 1_700_000_000.75, "pid=57"),
    ]
    assert [(p["healthy"], p["detail"]) for p in described["probes"]] == [(True, "tcp 8080 open")]
    assert [a["kind"] for a in described["actions"]] == ["rollback", "action"]
    assert [r["detail"] for r in described["rollbacks"]] == ["back to artifact sha256:0"]
    assert described["last_term"] == 4
    assert described["console_tail"][-1] == "listening on 8080"
    text = render_description(described)
    for expected in (
        "manifest:   fleet.yaml:7",
        "(pinned)",
        "last term:  4",
        "workload-started +0.750s pid=57",
        "built web",
        "listening on 8080",
    ):
        assert expected in text, text


def test_describe_without_a_manifest_or_a_build_log_says_so(tmp_path: Path) -> None:
    world = _world(tmp_path)
    described = describe_vm(
        world["store"], "web-0", state_dir=tmp_path / "empty", cache_dir=tmp_path, host="h"
    )
    assert (described["manifest"], described["build_log_path"]) == (None, None)
    assert (described["boot"], described["console_tail"]) == ([], [])
    described["manifest_error"] = "cannot read the repository"
    text = render_description(described)
    assert "manifest:   unknown (cannot read the repository)" in text
    assert "none kept (the artifact left the cache)" in text


@pytest.mark.parametrize("name", ["db-0", "../../etc", "web-0/../x"])
def test_an_unknown_or_hostile_vm_name_is_one_line(tmp_path: Path, name: str) -> None:
    world = _world(tmp_path)
    with pytest.raises(ConfigError, match="VM"):
        describe_vm(world["store"], name, state_dir=world["state"], cache_dir=tmp_path, host="h")


class DescribingView(FakeView):
    def __init__(self, described: dict[str, Any]) -> None:
        super().__init__()
        self.described = described

    def describe_vm(self, name: str) -> dict[str, Any]:
        if name != self.described["name"]:
            raise ConfigError(f"no VM named {name!r} (`reconciler status` lists them)")
        return self.described


def test_the_api_and_the_page_describe_a_vm_its_output_only_with_the_token(
    tmp_path: Path,
) -> None:
    world = _world(tmp_path)
    described = dict(
        describe_vm(
            world["store"],
            "web-0",
            state_dir=world["state"],
            cache_dir=world["cache"],
            host="host-a",
            desired=world["desired"],
            manifest_root=world["root"],
        )
    )
    described["console_tail"] = ["<script>alert(1)</script>"]
    view = DescribingView(described)
    server = OperatorServer(
        view, DaemonMetrics(), listen="127.0.0.1:0", token=TOKEN, webhook_secret=None
    )
    server.start()
    try:
        client = Client(server.url)
        status, body = client.json("GET", "/api/vms/web-0")
        assert status == 200
        assert (body["artifact"], body["console_tail"], body["build_log"]) == (
            described["artifact"],
            [],
            [],
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, body = client.json("GET", "/api/vms/web-0", headers=auth)
        assert body["build_log"] == ["cc -O2 echo.c", "built web"]
        status, body = client.json("GET", "/api/vms/db-0")
        assert status == 404
        assert "no VM named 'db-0'" in body["error"]
        _, _, page = client.request("GET", "/?vm=web-0", headers=auth)
        html = page.decode()
        assert 'id="vm-panel" data-vm="web-0"' in html
        assert "fleet.yaml:7" in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>" not in html
        _, _, page = client.request("GET", "/?vm=nope")
        assert "no VM named" in page.decode()
        # A view that cannot describe VMs (a follower's test double) answers 404.
        server.view = FakeView()
        status, body = client.json("GET", "/api/vms/web-0")
        assert status == 404
    finally:
        server.close()


def test_the_page_shows_pins_with_the_head() -> None:
    status = dict(FakeView().status_doc)
    status["pins"] = [{"workload": None, "revision": "a" * 40, "reason": "leak", "at": 1.0}]
    status["daemon"] = {**status["daemon"], "head": "b" * 40}
    html = render_page(status, [])
    assert 'id="pins"' in html
    assert f"the fleet: pinned at {'a' * 12} (head is {'b' * 12}): leak" in html


def _interrupted_after(count: int, calls: list[float]) -> Callable[[float], None]:
    """A ``sleep`` that records its calls and is Ctrl-C'd at the ``count``-th."""

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == count:
            raise KeyboardInterrupt

    return sleep


def test_watch_repeats_plainly_off_a_terminal_and_ctrl_c_is_success() -> None:
    out = io.StringIO()
    calls: list[float] = []
    sleep = _interrupted_after(3, calls)
    rendered = iter(f"rendering {n}" for n in range(10))
    assert watch(lambda: next(rendered), 0.5, out=out, sleep=sleep) == 0
    assert out.getvalue() == "rendering 0\nrendering 1\nrendering 2\n"
    assert calls == [0.5, 0.5, 0.5]


def test_watch_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    calls: list[float] = []
    sleep = _interrupted_after(2, calls)
    assert watch(lambda: "web-0 running", 1, out=out, terminal=True, sleep=sleep) == 0
    shown = out.getvalue()
    assert shown.count("web-0 running") >= 2
    assert "\x1b[" in shown  # cursor movement: redrawn over the last rendering
    assert printed(lambda: print("captured")) == "captured\n"


@pytest.mark.root
def test_status_watch_runs_until_ctrl_c_and_exits_0(tmp_path: Path) -> None:
    watching = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            "status",
            "--state-dir",
            str(tmp_path / "state"),
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        watching.send_signal(signal.SIGINT)
        out, err = watching.communicate(timeout=30)
    finally:
        if watching.poll() is None:
            watching.kill()
            watching.wait()
    assert watching.returncode == 0, err
    assert out.count("applied revision:") >= 2, out  # not a terminal: one rendering after another
