"""History, rollback and pins, on the cycle with the fakes of the project's own seams.

A fleet pinned at an earlier applied revision converges onto it whatever the head is, heals
drift there, and follows the head again only once unpinned; a workload pin holds one workload
while the rest of the fleet follows the head. ``rollback_target`` picks what ``reconciler
rollback`` pins. The real daemon with the process runtime doing the same is at the end
(``test_rollback_converges_and_stays_until_unpin``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from support.daemons import Daemon, daemons, fleet_repo, vms_by_name
from support.fakes import FakeHost, FakeLoader, FakeSource, MemoryStateStore, fleet, workload
from support.process_fleet import echo
from support.repo import FleetRepo
from support.waiting import eventually, free_port
from test_daemon import reconciler

from reconciler.cli.history_commands import rollback_target, run_history
from reconciler.daemon.cycle import CycleResult, Outcome, ReconcileCycle
from reconciler.errors import BuildError, ConfigError, PlanError
from reconciler.execution.status import describe_pin, fleet_status
from reconciler.leadership.fence import Fence
from reconciler.model import DesiredFleet, NotificationEvent, VMState
from reconciler.notify import Notice
from reconciler.pipeline import PinnedWorkload, pin_workloads
from reconciler.state import FLEET_WIDE


def _web(version: str, replicas: int = 2) -> DesiredFleet:
    return fleet(workload("web", replicas=replicas, env={"VERSION": version}))


def _two(web: str, api: str) -> DesiredFleet:
    return fleet(
        workload("web", env={"VERSION": web}, source=f"web {web}"),
        workload("api", env={"VERSION": api}, source=f"api {api}"),
    )


@dataclass
class World:
    source: FakeSource = field(default_factory=FakeSource)
    host: FakeHost = field(default_factory=FakeHost)
    fence: Fence = field(default_factory=lambda: Fence(1, renew_deadline=3600))
    events: list[tuple[str, str, str]] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    cycle: ReconcileCycle | None = None

    def __post_init__(self) -> None:
        self.cycle = ReconcileCycle(
            FakeLoader(self.source),
            self.host,
            cache_dir=self.source.repo_path,
            event=lambda kind, subject, message: self.events.append((kind, subject, message)),
            notify=self.notices.append,
        )
        self.host.store.claim_term(self.fence)

    @property
    def store(self) -> MemoryStateStore:
        return self.host.store

    def reconcile(self) -> CycleResult:
        assert self.cycle is not None
        return self.cycle.reconcile(self.fence, ["test"])

    def apply(self, desired: DesiredFleet) -> str:
        sha = self.source.commit(desired)
        result = self.reconcile()
        assert result.converged_to == sha, result.error
        return sha

    def versions(self) -> dict[str, str]:
        return {
            name: json.loads(vm.settings["deploy.env.VERSION"])
            for name, vm in self.store.observed().vms.items()
        }


def test_a_pinned_fleet_converges_back_heals_and_ignores_new_commits_until_unpinned() -> None:
    world = World()
    v1 = world.apply(_web("1"))
    v2 = world.apply(_web("2"))
    assert world.versions() == {"web-0": "2", "web-1": "2"}

    world.store.pin(None, v1, "v2 leaks memory")
    result = world.reconcile()
    assert (result.outcome, result.converged_to, result.head) == (Outcome.APPLIED, v1, v2)
    assert world.versions() == {"web-0": "1", "web-1": "1"}
    applied = world.store.applied_revision()
    assert applied is not None
    assert (applied.revision, applied.message) == (v1, "rollback: pinned")
    assert ("rollback", v1[:12], f"the fleet runs {v1[:12]} again") in world.events
    (notice,) = [n for n in world.notices if n.event is NotificationEvent.ROLLBACK]
    assert notice.revision == v1
    assert notice.key == f"revision-rollback:{v2}:{v1}"

    # New commits do not move it, and it says so.
    v3 = world.source.commit(_web("3"))
    result = world.reconcile()
    assert (result.outcome, result.converged_to, result.head) == (Outcome.NO_CHANGES, v1, v3)
    assert world.versions() == {"web-0": "1", "web-1": "1"}
    assert [n for n in world.notices if n.event is NotificationEvent.ROLLBACK] == [notice]
    status = fleet_status(world.store.observed(), None, None, {}, pins=world.store.pins())
    assert describe_pin(status["pins"][0], head=v3) == (
        f"the fleet: pinned at {v1[:12]} (head is {v3[:12]}): v2 leaks memory; "
        "`reconciler unpin` lifts it"
    )

    # Drift is healed at the pinned version.
    vm = world.store.observed().vms["web-1"]
    world.store.put_vm(replace(vm, state=VMState.MISSING, pid=None))
    result = world.reconcile()
    assert (result.outcome, result.converged_to) == (Outcome.APPLIED, v1)
    assert world.versions() == {"web-0": "1", "web-1": "1"}

    # Unpinned, the head runs again (it descends from the pinned revision).
    assert world.store.unpin(None)
    result = world.reconcile()
    assert (result.outcome, result.converged_to, result.newly_applied) == (
        Outcome.APPLIED,
        v3,
        True,
    )
    assert world.versions() == {"web-0": "3", "web-1": "3"}
    history = [(r.revision, r.outcome) for r in world.store.revisions()]
    assert history == [(v3, "applied"), (v1, "applied"), (v2, "applied"), (v1, "applied")]
    digests = {vm.artifact_digest for vm in world.store.observed().vms.values()}
    assert world.store.revision_artifacts(v3) == {"web": tuple(sorted(digests))}


def test_a_pinned_revision_that_fails_is_reported_and_nothing_else_runs() -> None:
    world = World()
    v1 = world.apply(_web("1"))
    v2 = world.apply(_web("2"))
    world.store.pin(None, v1)
    world.host.converge_error = BuildError("the compiler is gone")
    result = world.reconcile()
    assert (result.outcome, result.converged_to) == (Outcome.FAILED, None)
    assert result.error == f"pinned at {v1[:12]}: the compiler is gone"
    assert world.versions() == {"web-0": "2", "web-1": "2"}
    applied = world.store.applied_revision()
    assert applied is not None
    assert applied.revision == v2  # not rolled back until it converged


def test_a_workload_pin_holds_one_workload_while_the_rest_follows_the_head() -> None:
    world = World()
    v1 = world.apply(_two("1", "1"))
    world.apply(_two("2", "2"))
    world.store.pin("web", v1)
    result = world.reconcile()
    assert result.outcome is Outcome.APPLIED
    assert world.versions() == {"web-0": "1", "api-0": "2"}
    head = world.source.commit(_two("3", "3"))
    result = world.reconcile()
    assert (result.converged_to, result.newly_applied) == (head, True)
    assert world.versions() == {"web-0": "1", "api-0": "3"}
    # The head's history records what ran: web's pinned artifact.
    web = world.store.observed().vms["web-0"].artifact_digest
    assert world.store.revision_artifacts(head)["web"] == (web,)
    world.store.unpin("web")
    world.reconcile()
    assert world.versions() == {"web-0": "3", "api-0": "3"}


def test_pin_workloads_takes_the_workload_and_its_source_from_the_pinned_revision() -> None:
    old, new = _two("1", "1"), _two("2", "2")
    composed = pin_workloads(new, {"web": PinnedWorkload("web", old, Path("/trees/old"))})
    assert composed.workloads["api"] == new.workloads["api"]
    assert composed.workloads["web"].deploy == old.workloads["web"].deploy
    assert composed.workloads["web"].source.path == "/trees/old/services/web"
    assert composed.vms["web-0"].artifact == old.vms["web-0"].artifact
    assert composed.vms["api-0"] == new.vms["api-0"]
    assert pin_workloads(new, {}) is new
    gone = fleet(workload("api"))
    with pytest.raises(PlanError, match="which does not declare it; unpin it"):
        pin_workloads(new, {"web": PinnedWorkload("web", gone, Path("/trees/old"))})
    # A workload the head deleted comes back while it is pinned.
    back = pin_workloads(gone, {"web": PinnedWorkload("web", old, Path("/t"))})
    assert sorted(back.workloads) == ["api", "web"]


def test_rollback_picks_an_applied_revision_and_nothing_else() -> None:
    world = World()
    v1 = world.apply(_two("1", "1"))
    v2 = world.apply(_two("1", "2"))  # web unchanged
    v3 = world.apply(_two("1", "3"))
    store = world.store
    assert rollback_target(store, None, None) == v2
    # A workload goes back to the newest revision that ran other artifacts of it.
    assert rollback_target(store, None, "api") == v2
    world.apply(_two("2", "4"))
    assert rollback_target(store, None, "web") == v3
    assert rollback_target(store, v1[:8], None) == v1
    assert rollback_target(store, v1.upper(), "web") == v1
    failed = world.source.commit(BuildError("no"))
    world.reconcile()
    with pytest.raises(ConfigError, match="is not an applied revision"):
        rollback_target(store, failed, None)
    with pytest.raises(ConfigError, match="is not an applied revision"):
        rollback_target(store, "", None)
    with pytest.raises(ConfigError, match="ran no workload named 'db'"):
        rollback_target(store, v1, "db")
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback_target(MemoryStateStore(), None, None)
    assert FLEET_WIDE not in store.pins()  # choosing pins nothing


def test_history_lists_attempts_with_their_artifacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World()
    v1 = world.apply(_two("1", "1"))
    world.source.commit(BuildError("the compiler is gone"))
    world.reconcile()
    store = world.store
    args = argparse.Namespace(workload="web", limit=10, format="json")

    class Opened:
        def __enter__(self) -> MemoryStateStore:
            return store

        def __exit__(self, *exc: object) -> None:
            pass

    monkey = pytest.MonkeyPatch()
    with monkey.context() as patch:
        patch.setattr(
            "reconciler.cli.history_commands.open_state_store", lambda where, **_: Opened()
        )
        patch.setattr("reconciler.cli.history_commands.store_location", lambda args: None)
        run_history(args)
        listed = json.loads(capsys.readouterr().out)
        assert [(r["revision"], r["outcome"]) for r in listed] == [
            (world.source.head, "failed"),
            (v1, "applied"),
        ]
        web = store.observed().vms["web-0"].artifact_digest
        assert listed[1]["artifacts"] == {"web": [web]}
        run_history(argparse.Namespace(workload=None, limit=10, format="table"))
        table = capsys.readouterr().out
        assert f"{v1[:12]}" in table
        assert "failed" in table
        assert "the compiler is gone" in table
        with pytest.raises(ConfigError, match="no applied revision ran a workload named 'db'"):
            run_history(argparse.Namespace(workload="db", limit=10, format="table"))


# -- the real daemon ---------------------------------------------------------------------------


def _release(repo: FleetRepo, version: str) -> str:
    """A commit whose echo server source differs: a new artifact."""
    repo.write("echo/echo.c", repo.read("echo/echo.c") + f"/* release {version} */\n")
    return repo.commit(f"release {version}")


@pytest.mark.root
@pytest.mark.slow
def test_rollback_converges_and_stays_until_unpin(tmp_path: Path) -> None:
    port = free_port()
    repo = fleet_repo(tmp_path / "fleet", {"alpha": port})
    state = tmp_path / "state"
    cli = ["--state-dir", str(state)]

    def running(daemon: Daemon) -> dict[str, Any] | None:
        vm = vms_by_name(daemon.status()).get("alpha-0")
        return vm if vm is not None and vm["healthy"] and vm["state"] == "running" else None

    def converged(daemon: Daemon, revision: str) -> dict[str, Any] | None:
        status = daemon.status()
        vm = running(daemon)
        return vm if status["applied_revision"] == revision and vm else None

    polling = ["--poll-interval", "2", "--poll-jitter", "0"]
    with daemons(repo.path, state, tmp_path, 1, polling) as (daemon,):
        v1 = repo.git("rev-parse", "HEAD").strip()
        first = eventually(lambda: converged(daemon, v1), 120, "the first converge")["artifact"]
        v2 = _release(repo, "2")
        second = eventually(lambda: converged(daemon, v2), 120, "v2 converging")["artifact"]
        assert second != first

        listed = json.loads(reconciler("history", "alpha", "--format", "json", *cli).stdout)
        assert [(r["revision"], r["artifacts"]["alpha"]) for r in listed[:2]] == [
            (v2, [second]),
            (v1, [first]),
        ]

        # rollback (to the revision before the applied one) converges back to v1's artifact.
        done = reconciler("rollback", "--reason", "v2 misbehaves", *cli)
        assert done.returncode == 0, done.stderr
        assert f"pinned the fleet at {v1[:12]}" in done.stdout
        vm = eventually(
            lambda: (vm := converged(daemon, v1)) and vm["artifact"] == first and vm,
            120,
            "the rollback converging",
        )
        assert echo(port, str(vm["address"])) == b"ping\n"

        # New commits do not move the pinned fleet; status says so.
        v3 = _release(repo, "3")
        eventually(lambda: daemon.status()["daemon"]["head"] == v3, 60, "the daemon seeing v3")
        eventually(lambda: daemon.status()["daemon"]["head"] == v3, 60, "another cycle on v3")
        status = daemon.status()
        assert status["applied_revision"] == v1
        assert vms_by_name(status)["alpha-0"]["artifact"] == first
        assert [(p["workload"], p["revision"]) for p in status["pins"]] == [(None, v1)]
        page = daemon.get("/")
        assert f"pinned at {v1[:12]} (head is {v3[:12]})" in page
        shown = reconciler("status", *cli).stdout
        assert f"the fleet: pinned at {v1[:12]}: v2 misbehaves" in shown

        # A pinned fleet still heals drift: a VM killed by hand comes back at v1.
        os.killpg(int(vm["pid"]), signal.SIGKILL)
        healed = eventually(
            lambda: (again := running(daemon)) and again["pid"] != vm["pid"] and again,
            120,
            "the killed VM coming back",
        )
        assert healed["artifact"] == first

        # describe: the CLI, the API and the page's panel say the same.
        described = reconciler(
            "describe", "alpha-0", "--repo", str(repo.path), "--format", "json", *cli
        )
        assert described.returncode == 0, described.stderr
        about = json.loads(described.stdout)
        assert (about["revision"], about["pinned"], about["artifact"]) == (v1, True, first)
        assert about["manifest"]["file"] == "fleet.yaml"
        line = about["manifest"]["line"]
        assert "metadata: {name: alpha}" in repo.read("fleet.yaml").splitlines()[line - 1]
        assert any("alpha" in line for line in about["build_log"]), about["build_log"]
        assert about["probes"]
        assert about["probes"][0]["healthy"] is True
        assert about["last_term"] is not None
        assert about["host"] == socket.gethostname()
        api = daemon.get("/api/vms/alpha-0")
        assert (api["revision"], api["artifact"], api["build_log"]) == (v1, first, [])
        panel = daemon.get("/?vm=alpha-0")
        assert 'id="vm-panel" data-vm="alpha-0"' in panel
        assert 'data-pinned="true"' in panel

        # unpin: the head runs again.
        assert reconciler("unpin", *cli).returncode == 0
        third = eventually(lambda: converged(daemon, v3), 120, "v3 converging after unpin")
        assert third["artifact"] not in (first, second)
        events = reconciler("events", *cli).stdout
        assert "pinned" in events
        assert "rollback" in events
        assert "unpinned" in events
