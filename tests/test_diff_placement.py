"""``diff`` and ``plan`` placed on the live hosts of a PostgreSQL store: where each VM goes
(``+ web-2 on host-b``), moves between hosts as their own lines, the room each host keeps, and
a plan that does not fit refused in one line (exit 1) before anything is shown or saved.

The first part renders placed plans against golden files (text, Markdown, JSON) without a
database; the second runs the command as a reviewer does, against a real PostgreSQL store with
three registered hosts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import fleet, running, workload
from support.repo import FleetRepo

from reconciler.cli.plan_review import assigned_hosts
from reconciler.leadership.fence import Fence
from reconciler.model import Plan, RuntimeKind
from reconciler.planning import diff
from reconciler.planning.placed import CapacityError, LiveHosts, place_plan
from reconciler.planning.placement import HostFacts
from reconciler.render import RENDERERS
from reconciler.state.hosts import HostRegistration
from reconciler.state.postgres import PostgresStateStore

GOLDEN = Path(__file__).parent / "golden"
ALL = frozenset(RuntimeKind)


def host(name: str, memory: int = 4096, **flags: bool) -> HostFacts:
    return HostFacts(name, 4, memory, runtimes=ALL, kvm=True, **flags)


def _placed_plan(**host_b: bool) -> Plan:
    """The renderers' sample plan (web scaled to 3, db rebuilt, old deleted), placed on three
    hosts where web-0 and db-0 run on host-a, web-1 on host-b and old-0 on host-c."""
    before = fleet(
        workload("web", replicas=2, env={"GREETING": "hello"}, depends_on=["db"]),
        workload("db"),
        workload("old"),
        revision="a" * 40,
    )
    after = fleet(
        workload("web", replicas=3, env={"GREETING": "hi | there"}, depends_on=["db"]),
        workload("db", source="v2"),
        revision="b" * 40,
    )
    plan = diff(after, running(before), base=before)
    current = {"web-0": "host-a", "db-0": "host-a", "web-1": "host-b", "old-0": "host-c"}
    live = LiveHosts([host("host-a"), host("host-b", **host_b), host("host-c")], current)
    return place_plan(plan, after, live)


@pytest.mark.parametrize(("fmt", "suffix"), [("text", "txt"), ("markdown", "md"), ("json", "json")])
def test_placed_plan_matches_golden_file(fmt: str, suffix: str) -> None:
    rendered = RENDERERS[fmt](_placed_plan(draining=True))
    golden = GOLDEN / f"plan-placed.{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run UPDATE_GOLDEN=1 pytest {__file__} to refresh"


def test_a_placed_plan_names_hosts_moves_and_room() -> None:
    text = RENDERERS["text"](_placed_plan(draining=True))
    assert "  + web-2 on host-c" in text
    assert "  > web-1 moves host-b -> host-c (host-b is draining)" in text
    assert "  - old-0 leaves host-c" in text
    assert "  + vm 'web-2' (workload web) on host-c" in text  # the action names its host
    assert "  - vm 'old-0' (workload old) on host-c" in text
    assert "Placement on the live hosts (3 hosts, 1 draining):" in text
    assert "  = db-0, web-0 stay on their hosts" in text
    assert "host-b 16 vCPU / 4096 MiB (draining: takes no new VM)" in text
    assert text.rstrip().endswith("1 to delete, 1 to move between hosts.")

    md = RENDERERS["markdown"](_placed_plan(draining=True))
    assert "| `>` | `web-1` | host-c | moves from host-b: host-b is draining |" in md
    assert "| `+` | `web-2` | host-c | new |" in md


def test_without_a_move_nothing_moves_and_the_json_round_trips() -> None:
    plan = _placed_plan()
    assert plan.placement is not None
    assert plan.placement.moves == ()
    assert plan.placement.host_of("web-1") == "host-b"  # stability: it stays
    data = json.loads(RENDERERS["json"](plan))
    assert data["placement"]["assignments"] == {
        "db-0": "host-a",
        "web-0": "host-a",
        "web-1": "host-b",
        "web-2": "host-c",
    }
    assert data["placement"]["new"] == ["web-2"]
    assert data["placement"]["released"] == {"old-0": "host-c"}
    # A saved placed plan reads back as it was made (``apply`` reads saved plans).
    assert Plan.from_dict(data) == plan


def test_an_unplaced_plan_has_no_placement_anywhere() -> None:
    plan = replace(_placed_plan(), placement=None)
    assert "placement" not in json.loads(RENDERERS["json"](plan))
    assert "Placement" not in RENDERERS["text"](plan)
    assert "Placement" not in RENDERERS["markdown"](plan)


def test_a_plan_that_does_not_fit_is_refused_in_one_line() -> None:
    desired = fleet(workload("web", replicas=3, memory_mib=1024), revision="b" * 40)
    plan = diff(desired, running(fleet(revision="a" * 40)))
    live = LiveHosts([host("host-a", memory=1536), host("host-b", memory=512)])
    with pytest.raises(CapacityError) as refused:
        place_plan(plan, desired, live)
    assert refused.value.lines() == [str(refused.value)]  # one line
    assert str(refused.value) == (
        "the plan does not fit the fleet's hosts (memory: 3072 MiB wanted, 2048 MiB on the "
        "schedulable hosts): workload web: web-1 needs 1 vCPU / 1024 MiB; "
        "largest free slot: host-b 16 vCPU / 512 MiB (2 hosts); and 1 more VM; "
        "nothing was changed"
    )


def test_assignments_are_read_in_either_record_shape() -> None:
    class Assignment:  # the shape with the revision that placed the VM
        def __init__(self, host: str, revision: str, term: int) -> None:
            self.host, self.revision, self.term = host, revision, term

    assert assigned_hosts({"web-1": ("host-b", 3), "web-0": ("host-a", 2)}) == {
        "web-0": "host-a",
        "web-1": "host-b",
    }
    assert assigned_hosts({"web-0": Assignment("host-c", "a" * 40, 4)}) == {"web-0": "host-c"}


# -- the command against a real PostgreSQL store -----------------------------------------------


def registration(name: str) -> HostRegistration:
    # 768 MiB each: fleet-example's four VMs (3 x 256 + 128 MiB) fit with room for a few more.
    return HostRegistration(
        name=name,
        vcpus=1,
        memory_mib=768,
        disk_mib=10_000,
        runtimes=frozenset({RuntimeKind.QEMU, RuntimeKind.PROCESS}),
    )


@pytest.fixture
def store(lease_dsn: str) -> Iterator[PostgresStateStore]:
    """Three registered hosts; the leader placed commit A's VMs on host-a and host-c."""
    opened = PostgresStateStore(lease_dsn, host="host-a")
    for name in ("host-a", "host-b", "host-c"):
        opened.register_host(registration(name))
    opened.claim_term(Fence(1, renew_deadline=60))
    for vm, on in (
        ("report-0", "host-a"),
        ("web-0", "host-a"),
        ("web-1", "host-c"),
        ("echo-0", "host-c"),
    ):
        opened.assign(vm, on)
    yield opened
    opened.close()


def reconciler(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def ab(fleet_repo: FleetRepo) -> tuple[FleetRepo, str, str]:
    """Commit A is fleet-example; commit B scales web to 3 replicas."""
    a = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    return fleet_repo, a, fleet_repo.commit("B: scale web")


@pytest.mark.postgres
def test_diff_places_the_head_on_the_live_hosts(
    ab: tuple[FleetRepo, str, str], state_dir: Path, store: PostgresStateStore, lease_dsn: str
) -> None:
    repo, a, b = ab
    common = ("--repo", str(repo.path), "--state-dir", str(state_dir), "--base", a, "--head", b)
    result = reconciler("diff", *common, "--store", lease_dsn)
    assert result.returncode == 2, result.stderr
    assert "  + web-2 on host-b" in result.stdout  # the empty host: spread and headroom
    assert "  = echo-0, report-0, web-0, web-1 stay on their hosts" in result.stdout
    assert (
        "Room left: host-a 2 vCPU / 256 MiB, host-b 3 vCPU / 512 MiB, host-c 2 vCPU / 384 MiB"
        in result.stdout
    )

    # Drained: host-c's VMs move, each on its own line, and the diff says so from $RECONCILER_STORE.
    store.set_host_flag("host-c", draining=True)
    result = reconciler("diff", *common, "--format", "json", env={"RECONCILER_STORE": lease_dsn})
    assert result.returncode == 2, result.stderr
    moves = json.loads(result.stdout)["placement"]["moves"]
    assert [(m["vm"], m["from"], m["to"], m["reason"]) for m in moves] == [
        ("echo-0", "host-c", "host-a", "host-c is draining"),
        ("web-1", "host-c", "host-b", "host-c is draining"),
    ]
    text = reconciler("diff", *common, "--store", lease_dsn).stdout
    assert "  > web-1 moves host-c -> host-b (host-c is draining)" in text
    # Moves alone are changes: the same revision on both sides still exits 2.
    same = ("--repo", str(repo.path), "--state-dir", str(state_dir), "--base", a, "--head", a)
    result = reconciler("diff", *same, "--store", lease_dsn)
    assert result.returncode == 2, result.stderr
    assert "No VM changes; VMs move between hosts (below)." in result.stdout
    assert "  > echo-0 moves host-c -> host-b (host-c is draining)" in result.stdout

    # Without a store (SQLite), the same diff is the unplaced review it always was.
    plain = reconciler("diff", *common, "--store", "sqlite")
    assert plain.returncode == 2, plain.stderr
    assert "Placement" not in plain.stdout
    assert " on host-" not in plain.stdout


@pytest.mark.postgres
def test_a_head_that_needs_more_memory_than_the_hosts_have_is_refused(
    fleet_repo: FleetRepo, state_dir: Path, store: PostgresStateStore, lease_dsn: str
) -> None:
    a = fleet_repo.git("rev-parse", "HEAD")
    fleet_repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 8")
    big = fleet_repo.commit("C: web at 8 replicas, more memory than the three hosts have")
    before = store.assignments()
    out = state_dir.parent / "plan.json"
    common = ("--repo", str(fleet_repo.path), "--state-dir", str(state_dir), "--store", lease_dsn)
    for command in (("diff",), ("plan", "-o", str(out))):
        result = reconciler(*command, *common, "--base", a, "--head", big)
        assert result.returncode == 1, result.stdout
        assert result.stdout == ""  # refused before anything is shown
        assert re.fullmatch(
            r"error: the plan does not fit the fleet's hosts \(memory: 2432 MiB wanted, "
            r"2304 MiB on the schedulable hosts\): workload web: web-\d needs "
            r"1 vCPU / 256 MiB; largest free slot: host-\w \d vCPU / 128 MiB \(3 hosts\); "
            r"(and \d+ more VMs?; )?nothing was changed\n",
            result.stderr,
        ), result.stderr
    assert not out.exists()
    assert store.assignments() == before


@pytest.mark.postgres
def test_a_store_without_hosts_says_the_plan_is_not_placed(
    ab: tuple[FleetRepo, str, str], state_dir: Path, lease_dsn: str
) -> None:
    repo, a, b = ab
    PostgresStateStore(lease_dsn, host="host-a").close()  # the schema, and no host registered
    result = reconciler(
        "diff", "--repo", str(repo.path), "--state-dir", str(state_dir), "--store", lease_dsn,
        "--base", a, "--head", b,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Warning: placement not shown: no host is registered in the store yet" in result.stdout
    assert "  + vm 'web-2' (workload web)\n" in result.stdout
