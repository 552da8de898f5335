"""Three ``reconciler daemon`` processes on the PostgreSQL lease (a real server, a database per
test): one acts, a killed leader is replaced, and a leader paused past its lease is fenced.

Lease timings are short (3 s lease, 2 s renew deadline, 0.5 s retry) so takeovers happen within
a test; the default timings are measured by ``bench/bench_daemon.py``."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from support.daemons import (
    Daemon,
    daemons,
    fleet_text,
    healthy_names,
    leader_among,
    supervisor_counts,
)
from support.daemons import fleet_repo as make_fleet_repo
from support.repo import FleetRepo
from support.waiting import eventually, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.root, pytest.mark.slow]

FAST_LEASE = ["--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5"]


def make_repo(tmp_path: Path, ports: dict[str, int]) -> FleetRepo:
    return make_fleet_repo(tmp_path / "fleet", ports)


def the_leader(group: list[Daemon]) -> Daemon:
    leaders = [d for d in group if d.is_leader()]
    assert len(leaders) == 1, f"{len(leaders)} leaders"
    return leaders[0]


def test_three_daemons_one_leader_and_takeover_after_kill(tmp_path: Path, lease_dsn: str) -> None:
    repo = make_repo(tmp_path, {"alpha": free_port()})
    state = tmp_path / "state"
    with daemons(repo.path, state, tmp_path, 3, ["--lease", lease_dsn, *FAST_LEASE]) as group:
        eventually(lambda: sum(d.is_leader() for d in group) == 1, 60, "one leader")
        leader = the_leader(group)
        eventually(lambda: healthy_names(leader.status()) == {"alpha-0"}, 120, "converge")
        terms = [leader.status()["leader"]["term"]]
        alive = list(group)
        for _ in range(2):
            leader = the_leader(alive)
            leader.signal(signal.SIGKILL)
            alive.remove(leader)
            new = eventually(lambda: leader_among(alive), 60, "takeover")
            terms.append(new.status()["leader"]["term"])
            for follower in alive:
                # A follower learns of the takeover at its next lease read (retry period).
                eventually(
                    lambda f=follower, n=new.name: f.status()["leader"]["holder"] == n,
                    30,
                    f"{follower.name} names the new leader",
                )
        assert terms == sorted(set(terms)), f"terms must only grow: {terms}"
        time.sleep(2)
        assert supervisor_counts(state) == {"alpha-0": 1}
        assert healthy_names(the_leader(alive).status()) == {"alpha-0"}


def test_a_leader_paused_past_its_lease_is_fenced_and_steps_down(
    tmp_path: Path, lease_dsn: str
) -> None:
    ports = {"alpha": free_port()}
    repo = make_repo(tmp_path, ports)
    state = tmp_path / "state"
    with daemons(repo.path, state, tmp_path, 3, ["--lease", lease_dsn, *FAST_LEASE]) as group:
        eventually(lambda: sum(d.is_leader() for d in group) == 1, 60, "one leader")
        leader = the_leader(group)
        eventually(lambda: healthy_names(leader.status()) == {"alpha-0"}, 120, "converge")
        old_term = leader.status()["leader"]["term"]

        # A rollout whose VM needs 8 s to get healthy: pause the leader in the middle of it.
        repo.write("fleet.yaml", fleet_text(ports, slow={"slow": free_port()}))
        repo.commit("a slow VM")
        eventually(
            lambda: any(vm["name"] == "slow-0" for vm in leader.status()["vms"]),
            60,
            "the leader starting the slow VM",
        )
        leader.signal(signal.SIGSTOP)
        others = [d for d in group if d is not leader]
        new = eventually(lambda: leader_among(others), 60, "takeover")
        assert new.status()["leader"]["term"] > old_term
        time.sleep(4)  # well past the paused leader's 3 s lease
        leader.signal(signal.SIGCONT)

        # It wakes inside its health wait; its next write is refused and it steps down.
        eventually(
            lambda: (leader.metric("reconciler_fenced_writes_total") or 0) >= 1,
            60,
            "a refused write",
        )
        eventually(lambda: not leader.is_leader(), 30, "the paused leader stepping down")
        assert "stepped down" in leader.log()
        assert the_leader(group) is new
        eventually(
            lambda: healthy_names(new.status()) == {"alpha-0", "slow-0"},
            60,
            "the new leader healthy",
        )
        time.sleep(2)
        assert supervisor_counts(state) == {"alpha-0": 1, "slow-0": 1}, "a VM ran twice"
        events = {e["kind"] for e in new.get("/api/events")}
        assert {"elected", "stepped-down"} <= events


def test_sigterm_hands_the_postgres_lease_over_at_once(tmp_path: Path, lease_dsn: str) -> None:
    repo = make_repo(tmp_path, {"alpha": free_port()})
    state = tmp_path / "state"
    # The default 15 s lease: only the release on SIGTERM can make the takeover fast.
    with daemons(repo.path, state, tmp_path, 2, ["--lease", lease_dsn]) as group:
        eventually(lambda: sum(d.is_leader() for d in group) == 1, 60, "one leader")
        leader = the_leader(group)
        follower = next(d for d in group if d is not leader)
        # No cycle in flight: SIGTERM waits for one to finish, which is not the hand-over.
        eventually(lambda: healthy_names(leader.status()) == {"alpha-0"}, 120, "converge")
        leader.signal(signal.SIGTERM)
        stopped = time.monotonic()
        eventually(follower.is_leader, 30, "the follower taking over")
        took = time.monotonic() - stopped
        assert took < 12, f"took {took:.1f} s: the lease was not released, it expired"
        print(f"PostgreSQL lease takeover after SIGTERM: {took:.2f} s")
