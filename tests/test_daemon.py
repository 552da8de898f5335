"""``reconciler daemon`` as a user runs it: real daemon processes, a real fleet repository, real
host-process VMs (the echo server under bubblewrap), the file lease, and the HTTP view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemons import (
    address_of,
    daemons,
    fleet_text,
    healthy_names,
    supervisor_counts,
    vms_by_name,
)
from support.daemons import fleet_repo as make_fleet_repo
from support.process_fleet import echo
from support.repo import FleetRepo
from support.waiting import eventually, free_port

pytestmark = [pytest.mark.root, pytest.mark.slow]

FAST_LEASE = ["--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5"]


def make_repo(tmp_path: Path, workloads: dict[str, int]) -> FleetRepo:
    return make_fleet_repo(tmp_path / "fleet", workloads)


def reconciler(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_commits_converge_bad_revisions_are_refused_and_drift_is_healed(tmp_path: Path) -> None:
    ports = {"alpha": free_port(), "beta": free_port()}
    repo = make_repo(tmp_path, {"alpha": ports["alpha"]})
    state = tmp_path / "state"
    # Polling is slow on purpose: convergence below comes from the file watch.
    with daemons(repo.path, state, tmp_path, 1, ["--poll-interval", "300"]) as (daemon,):
        eventually(lambda: healthy_names(daemon.status()) == {"alpha-0"}, 120, "first converge")
        first = repo.git("rev-parse", "HEAD").strip()
        assert daemon.status()["applied_revision"] == first

        # A commit converges with no further command (file watch).
        repo.write("fleet.yaml", fleet_text(ports))
        second = repo.commit("add beta")
        eventually(
            lambda: (
                daemon.status()["applied_revision"] == second
                and healthy_names(daemon.status()) == {"alpha-0", "beta-0"}
            ),
            120,
            "the second commit converging",
        )
        assert echo(ports["beta"], address_of(daemon.status(), "beta-0")) == b"ping\n"

        # A broken revision is refused; the last good one keeps running and the error shows.
        repo.write("fleet.yaml", fleet_text(ports) + "  replicas: [oops\n")
        broken = repo.commit("broken yaml")
        status = eventually(
            lambda: (s := daemon.status())["attempted_revision"] == broken and s,
            60,
            "the broken revision being attempted",
        )
        assert status["applied_revision"] == second
        assert status["last_error"]
        assert broken[:12] in status["daemon"]["last_error"]
        assert daemon.metric("reconciler_last_reconcile_error") == 1.0
        assert echo(ports["alpha"], address_of(daemon.status(), "alpha-0")) == b"ping\n"
        cli_status = json.loads(
            reconciler("status", "--state-dir", str(state), "--format", "json").stdout
        )
        assert cli_status["attempted_revision"] == broken
        assert cli_status["last_error"]
        # While a daemon manages the state directory, a one-off apply is refused.
        refused = reconciler("apply", "--repo", str(repo.path), "--state-dir", str(state))
        assert refused.returncode == 1
        assert "manages this state directory" in refused.stderr

        # Drift: a VM killed by hand is restored (reconcile --now instead of the slow poll).
        alpha = vms_by_name(daemon.status())["alpha-0"]
        os.killpg(int(alpha["pid"]), signal.SIGKILL)
        result = reconciler("reconcile", "--now", "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        eventually(
            lambda: (
                (vm := vms_by_name(daemon.status())["alpha-0"])["pid"] != alpha["pid"]
                and vm["healthy"]
            ),
            60,
            "the killed VM being restored",
        )
        assert echo(ports["alpha"], address_of(daemon.status(), "alpha-0")) == b"ping\n"

        # Suspend: a suspended workload is left as it runs while its revision moves on.
        assert (
            reconciler(
                "suspend", "beta", "--state-dir", str(state), "--reason", "debugging"
            ).returncode
            == 0
        )
        assert daemon.status()["suspended"]["workloads"] == ["beta"]

        # The fixing commit converges.
        repo.write("fleet.yaml", fleet_text(ports, env={"GREETING": "fixed"}))
        fixed = repo.commit("fix")
        status = eventually(
            lambda: (s := daemon.status())["applied_revision"] == fixed and s,
            120,
            "the fixing commit converging",
        )
        assert status["last_error"] is None
        assert daemon.metric("reconciler_last_reconcile_error") == 0.0
        assert supervisor_counts(state) == {"alpha-0": 1, "beta-0": 1}
        # beta was suspended: it still runs the old settings.
        assert "GREETING" not in json.dumps(vms_by_name(status)["beta-0"])
        assert reconciler("resume", "beta", "--state-dir", str(state)).returncode == 0
        events = reconciler("events", "--state-dir", str(state)).stdout
        assert "revision-failed" in events
        assert "suspended" in events


def test_two_daemons_on_the_file_lease_one_acts_and_the_other_takes_over(
    tmp_path: Path,
) -> None:
    port = free_port()
    repo = make_repo(tmp_path, {"alpha": port})
    state = tmp_path / "state"
    with daemons(
        repo.path, state, tmp_path, 2, ["--poll-interval", "2", "--poll-jitter", "0"]
    ) as pair:
        eventually(lambda: all(d.serving() for d in pair), 60, "both daemons serving")
        eventually(lambda: sum(d.is_leader() for d in pair) == 1, 30, "one leader")
        leader = next(d for d in pair if d.is_leader())
        follower = next(d for d in pair if d is not leader)
        eventually(lambda: healthy_names(leader.status()) == {"alpha-0"}, 120, "converge")
        time.sleep(3)  # several cycles: still exactly one leader, and it is the same one
        assert [d.is_leader() for d in pair] == [d is leader for d in pair]
        assert follower.status()["leader"]["holder"] == leader.name
        refused = reconciler("reconcile", "--now", "--state-dir", str(state), "--url", follower.url)
        assert refused.returncode == 1
        assert f"the leader is {leader.name}" in refused.stderr
        term = leader.status()["leader"]["term"]

        leader.signal(signal.SIGKILL)
        killed = time.monotonic()
        eventually(follower.is_leader, 30, "the follower taking over")
        takeover = time.monotonic() - killed
        status = follower.status()
        assert status["leader"]["term"] > term
        assert healthy_names(status) == {"alpha-0"}
        time.sleep(3)
        assert supervisor_counts(state) == {"alpha-0": 1}, "a VM was duplicated"
        assert echo(port, address_of(status, "alpha-0")) == b"ping\n"
        print(f"file lease takeover after kill -9: {takeover:.2f} s")


def test_graceful_stop_hands_over_at_once(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, {"alpha": free_port()})
    state = tmp_path / "state"
    with daemons(repo.path, state, tmp_path, 2) as pair:
        eventually(lambda: sum(d.is_leader() for d in pair) == 1, 60, "one leader")
        leader = next(d for d in pair if d.is_leader())
        follower = next(d for d in pair if d is not leader)
        eventually(lambda: healthy_names(leader.status()) == {"alpha-0"}, 120, "converge")
        leader.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert leader.process.wait(timeout=60) == 0
        eventually(follower.is_leader, 30, "the follower taking over")
        print(f"takeover after SIGTERM: {time.monotonic() - stopped:.2f} s")
        assert '"stepped-down"' not in leader.log() or "shutting down" in leader.log()
        assert healthy_names(follower.status()) == {"alpha-0"}


def test_only_signed_revisions_are_applied(tmp_path: Path) -> None:
    key = tmp_path / "deploy-key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy", "-f", str(key)],
        check=True,
    )
    ports = {"alpha": free_port()}
    repo = make_repo(tmp_path, ports)
    signing = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")
    repo.git(*signing, "commit", "-q", "--amend", "-S", "--no-edit")
    signed = repo.git("rev-parse", "HEAD").strip()
    state = tmp_path / "state"
    trust = ["--trusted-key", f"{key}.pub", "--poll-interval", "300"]
    with daemons(repo.path, state, tmp_path, 1, trust) as (daemon,):
        eventually(lambda: daemon.status()["applied_revision"] == signed, 120, "signed head")
        assert healthy_names(daemon.status()) == {"alpha-0"}

        ports["beta"] = free_port()
        repo.write("fleet.yaml", fleet_text(ports))
        unsigned = repo.commit("unsigned: add beta")
        status = eventually(
            lambda: (s := daemon.status())["attempted_revision"] == unsigned and s,
            60,
            "the unsigned head being refused",
        )
        assert "is not signed" in status["last_error"]
        assert status["applied_revision"] == signed
        assert healthy_names(status) == {"alpha-0"}  # the last good revision keeps running

        repo.git(*signing, "commit", "-q", "--amend", "-S", "--no-edit")
        resigned = repo.git("rev-parse", "HEAD").strip()
        eventually(
            lambda: (
                daemon.status()["applied_revision"] == resigned
                and healthy_names(daemon.status()) == {"alpha-0", "beta-0"}
            ),
            120,
            "the signed fix converging",
        )


def test_a_newer_revision_supersedes_a_rollout_waiting_for_health(tmp_path: Path) -> None:
    ports = {"alpha": free_port(), "beta": free_port()}
    repo = make_repo(tmp_path, {"alpha": ports["alpha"]})
    state = tmp_path / "state"
    with daemons(repo.path, state, tmp_path, 1, ["--poll-interval", "300"]) as (daemon,):
        eventually(lambda: healthy_names(daemon.status()) == {"alpha-0"}, 120, "first converge")
        # beta's health check probes a port nothing listens on: it would wait 120 s, then fail.
        wrong = free_port()
        broken_health = fleet_text(ports).replace(
            f"port: {ports['beta']}, startPeriodSeconds", f"port: {wrong}, startPeriodSeconds"
        )
        repo.write("fleet.yaml", broken_health)
        broken = repo.commit("beta with a wrong health port")
        eventually(
            lambda: "beta-0" in vms_by_name(daemon.status()), 60, "the rollout waiting for beta"
        )
        repo.write("fleet.yaml", fleet_text(ports))
        fixed = repo.commit("beta: the right health port")
        status = eventually(
            lambda: (
                (s := daemon.status())["applied_revision"] == fixed
                and healthy_names(s) == {"alpha-0", "beta-0"}
                and s
            ),
            100,
            "the fix converging",
        )
        events = daemon.get("/api/events")
        superseded = [e for e in events if e["kind"] == "revision-superseded"]
        assert superseded, events
        assert superseded[0]["subject"] == broken[:12]
        assert status["last_error"] is None
        assert supervisor_counts(state) == {"alpha-0": 1, "beta-0": 1}
