"""Settings, logging and what the daemon shows humans: one logging configuration whose JSON
lines carry a cycle's ``revision``, ``term`` and ``vm`` as fields, executor events rendered once,
one duration and one revision spelling for the CLI and the page, settings with one default each,
and a ``Daemon`` whose construction touches nothing.

Runs against the fakes of the project's own seams (``FakeHost``, ``FakeSource``, ``FakeLoader``):
no root, no git, no runtime.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakes import FakeHost, FakeLoader, FakeSource, fleet, workload

from reconciler.cli import apply_commands
from reconciler.cli.environment import read_environment
from reconciler.cli.main import build_parser
from reconciler.daemon import status_page
from reconciler.daemon.cycle import ReconcileCycle
from reconciler.daemon.leader_file import running_leader, write_leader
from reconciler.daemon.logs import configure_logging, log_redactor
from reconciler.daemon.loop import Daemon
from reconciler.daemon.settings import (
    ApiSettings,
    DaemonSettings,
    LeaderSettings,
    PollingSettings,
    SourceSettings,
)
from reconciler.execution.events import EventKind, ExecutionEvent
from reconciler.formatting import format_duration, short_sha
from reconciler.leadership import LeaseHolder, LeaseSettings
from reconciler.leadership.fence import Fence
from reconciler.log_context import log_fields
from reconciler.model import RestartPolicy, health_check_of


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """The CLI's logging configuration, in JSON; yields a function that returns the lines."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    configure_logging("json", 0, level=logging.INFO)
    written = io.StringIO()
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)  # the handler as configured, writing where the test reads

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in written.getvalue().splitlines() if line]

    try:
        yield lines
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_every_log_line_of_a_cycle_carries_its_revision_term_and_vm(json_logs: Any) -> None:
    source, host = FakeSource(), FakeHost()
    cycle = ReconcileCycle(FakeLoader(source), host, cache_dir=source.repo_path)
    fence = Fence(7, renew_deadline=3600)
    host.store.claim_term(fence)
    head = source.commit(fleet(workload("web", replicas=2)))
    with log_fields(term=fence.term):  # as the daemon's worker runs a cycle
        cycle.reconcile(fence, ["test"])
    lines = json_logs()
    actions = [line for line in lines if line.get("event") == EventKind.ACTION]
    assert {line["vm"] for line in actions} == {"web-0", "web-1"}
    for line in actions:
        assert (line["revision"], line["term"], line["action"]) == (short_sha(head), 7, "create")
        assert line["msg"] == f"create   {line['vm']}: not running"
    applying = next(line for line in lines if line["msg"].startswith("applying"))
    assert (applying["revision"], applying["term"]) == (short_sha(head), 7)
    assert "vm" not in applying  # a VM's field ends with its action
    ended = next(line for line in lines if line["msg"].startswith("cycle "))
    assert (ended["term"], ended["outcome"]) == (7, "applied")


def test_fields_of_the_context_are_scrubbed_like_the_message(json_logs: Any) -> None:
    log_redactor().remember(["s3cr3t-value"])
    with log_fields(revision="abc", vm="web-0", note="token s3cr3t-value"):
        logging.getLogger("reconciler.test").warning("saw s3cr3t-value")
    [line] = json_logs()
    assert (line["revision"], line["vm"]) == ("abc", "web-0")
    assert "s3cr3t-value" not in json.dumps(line)


def test_one_shot_commands_use_the_same_logging_configuration() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        args = build_parser().parse_args(["status"])
        configure_logging(getattr(args, "log_format", "plain"), 0, level=logging.WARNING)
        assert root.level == logging.WARNING
        daemon_args = build_parser().parse_args(["daemon", "--log-format", "json"])
        assert daemon_args.log_level == logging.INFO  # a service says what it does
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_executor_events_render_once_with_their_fields() -> None:
    health = ExecutionEvent(EventKind.HEALTH, "web-0", healthy=False, detail="tcp refused")
    assert health.text() == "UNHEALTHY web-0: tcp refused"
    assert health.fields() == {"event": "health", "vm": "web-0", "healthy": False}
    rollback = ExecutionEvent(EventKind.ROLLBACK, "web-1", artifact="sha256:" + "ab" * 32)
    assert rollback.text() == "rollback web-1: back to artifact " + "ab" * 6
    for kind in EventKind:  # every kind has a rendering
        assert ExecutionEvent(kind, "vm-0").text()


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (5, "0m05s"), (3725, "1h02m"), (86400 + 7200, "1d02h"), (3 * 86400, "3d00h")],
)
def test_the_cli_and_the_status_page_print_the_same_uptime(
    seconds: float | None, shown: str
) -> None:
    # Both render through the one formatter (they used to disagree past a day).
    assert apply_commands.format_duration is status_page.format_duration is format_duration
    status = {
        "applied_revision": "0123456789abcdef0123",
        "attempted_revision": None,
        "vms": [{"name": "web-0", "healthy": True, "uptime_seconds": seconds}],
    }
    page = status_page.page_context(status, [], now=0.0)
    assert page["vms"][0]["uptime"] == shown == format_duration(seconds)
    assert page["applied"]["short"] == short_sha("0123456789abcdef0123") == "0123456789ab"


def test_settings_defaults_are_written_once() -> None:
    args = build_parser().parse_args(["daemon"])
    assert args.listen == ApiSettings().listen
    assert (args.poll_interval, args.poll_jitter) == (
        PollingSettings().interval,
        PollingSettings().jitter,
    )
    timing = LeaseSettings()
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (
        timing.duration,
        timing.renew_deadline,
        timing.retry,
    )
    assert args.lease is None  # the environment, then LeaderSettings, decide


def test_the_environment_is_read_in_one_place(tmp_path: Path) -> None:
    env = read_environment(
        {
            "RECONCILER_STATE_DIR": str(tmp_path),
            "RECONCILER_CACHE_DIR": "",
            "RECONCILER_LEASE": "postgresql://u:pw@db/x",
            "RECONCILER_API_TOKEN": "tok",
        }
    )
    assert (env.state_dir, env.cache_dir, env.api_token) == (tmp_path, None, "tok")
    assert env.lease == "postgresql://u:pw@db/x"
    assert "pw@" not in repr(env)
    assert "tok" not in repr(env)


class _IdleLease:
    """A ``Lease`` nobody ever acquires (the daemon is only built here, never run)."""

    holder = "replica-a"
    settings = LeaseSettings()

    def try_acquire(self) -> int | None:
        return None

    def renew(self, term: int) -> bool:
        return False

    def release(self, term: int) -> None:
        pass

    def current(self) -> LeaseHolder | None:
        return None

    def wait_for_change(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def test_building_a_daemon_does_no_io(tmp_path: Path) -> None:
    state = tmp_path / "state"  # does not exist: any write would fail or create it
    settings = DaemonSettings(
        source=SourceSettings(repo="fake"),
        state_dir=state,
        cache_dir=tmp_path / "cache",
        api=ApiSettings(listen="127.0.0.1:0"),
        lease=LeaderSettings(identity="replica-a"),
    )
    daemon = Daemon(
        settings,
        host=FakeHost(),
        source=FakeSource(),
        lease=_IdleLease(),
        token="t",
    )
    assert not state.exists()
    assert not (tmp_path / "cache").exists()
    assert daemon.view._leader()["me"] == "replica-a"


def test_the_leader_entry_is_typed_and_checked(tmp_path: Path) -> None:
    write_leader(
        tmp_path, {"holder": "a", "term": 3, "url": "http://127.0.0.1:1", "pid": os.getpid()}
    )
    assert running_leader(tmp_path) == {
        "holder": "a",
        "term": 3,
        "url": "http://127.0.0.1:1",
        "pid": os.getpid(),
    }
    (tmp_path / "leader.json").write_text('{"holder": "a", "term": "x", "url": 1, "pid": 1}')
    assert running_leader(tmp_path) is None
    (tmp_path / "leader.json").write_text("[1, 2]")
    assert running_leader(tmp_path) is None


def test_the_health_check_and_restart_policy_stay_typed_from_manifest_to_probe() -> None:
    desired = fleet(workload("web"))
    settings = desired.vms["web-0"].settings
    declared = desired.workloads["web"].deploy
    assert health_check_of(settings) == declared.health
    assert isinstance(declared.restart_policy, RestartPolicy)
