"""What an operator does to a fleet of hosts, and sees: ``hosts drain`` moves a host's VMs
elsewhere, wave by wave as the rollout policy allows, while the service keeps answering; a
leader killed with SIGKILL in the middle of a rollout across hosts is replaced by one that
finishes it, with the held-back replicas still on the previous revision, no VM twice and no
orphan; a wave whose VMs never get healthy goes back to the previous version where it ran.

The hosts are ``support.multihost_cluster``'s: three real daemons, each in its own network
namespace and state directory, sharing one PostgreSQL store and lease; VMs are process-runtime
echo servers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemons import supervisor_counts
from support.multihost_cluster import HOSTS, WEB_VMS, Cluster, rows, running_on, three_hosts, web
from support.waiting import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.root]


@pytest.fixture
def cluster(tmp_path: Path, lease_dsn: str) -> Iterator[Cluster]:
    """The three hosts, registered, on a fleet that has no VM yet."""
    with three_hosts(tmp_path, lease_dsn) as started:
        yield started


def reconciler(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def actions(log: str) -> list[tuple[str, str]]:
    """(action, VM) of every action the leader's cycles report in a daemon's JSON log, in
    order (its lines carry the term; the host's agent's do not)."""
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "action" and "term" in record:
            found.append((str(record.get("action")), str(record.get("vm"))))
    return found


def service(cluster: Cluster) -> tuple[int, bool]:
    """The web VMs (stand-ins too) the hosts report running healthy, and whether the service
    answers: a client tries them one after another, as a load balancer would, until one of
    them echoes (asked from inside its host)."""
    reported = [
        (host, address)
        for host, vms in sorted(running_on(cluster.dsn).items())
        for name, address in sorted(vms.items())
        if name.startswith("web-")
    ]
    answered = any(cluster.daemons[host].echo(address) == b"ping\n" for host, address in reported)
    return len(reported), answered


def assigned_revisions(cluster: Cluster) -> dict[str, str]:
    return {
        str(vm): str(revision)
        for vm, revision in rows(cluster.dsn, "SELECT vm, revision FROM assignments")
    }


def rollout_phase(cluster: Cluster) -> str | None:
    found = rows(cluster.dsn, "SELECT state FROM rollouts WHERE workload = 'web'")
    return json.loads(str(found[0][0])).get("phase") if found else None


def test_a_drained_host_s_vm_moves_wave_by_wave_while_the_service_answers(
    cluster: Cluster,
) -> None:
    # maxSurge 1, maxUnavailable 0: the new copy runs, healthy, before the old one goes.
    surged = web(3, extra_deploy="    rollout: {maxSurge: 1, maxUnavailable: 0}\n")
    placed = cluster.deploy(surged)
    drained = cluster.follower()
    (moved,) = placed[drained]
    leader = cluster.daemons[cluster.leader()]
    offset = len(leader.log())

    done = reconciler("hosts", "drain", drained, "--store", cluster.dsn)
    assert (done.returncode, done.stderr) == (0, "")
    assert "the leader moves its VMs to other hosts" in done.stdout

    others = [h for h in HOSTS if h != drained]
    polls: list[tuple[int, bool]] = []
    started = time.monotonic()
    where = None
    while where is None:
        assert time.monotonic() - started < 180, "the drained host's VM did not move"
        polls.append(service(cluster))
        settled = cluster.settled(others)
        if settled is not None and not supervisor_counts(cluster.daemons[drained].state):
            where = settled
    assert where[moved] in others
    # The service answered at every poll, and never had fewer replicas up than its 3.
    assert all(answered for _, answered in polls)
    assert min(up for up, _ in polls) >= 3, polls
    assert max(up for up, _ in polls) == 4  # the stand-in served while the VM moved
    # Wave by wave: the stand-in on the new host, then the VM, then the stand-in goes.
    stand_in = f"{moved}-surge"
    moves = [a for a in actions(leader.log()[offset:]) if a[1] in (moved, stand_in)]
    assert moves == [("create", stand_in), ("restart", moved), ("delete", stand_in)]
    held = f"SELECT count(*) FROM assignments WHERE host = '{drained}'"
    assert rows(cluster.dsn, held) == [(0,)]
    ((host,),) = rows(cluster.dsn, f"SELECT host FROM assignments WHERE vm = '{moved}'")
    assert host == where[moved]
    print(f"drain: {moved} {drained} -> {where[moved]}, {len(polls)} polls")


def test_a_leader_killed_mid_rollout_is_replaced_by_one_that_finishes_it(
    cluster: Cluster,
) -> None:
    policy = "    rollout: {canary: 1, autoPromote: false}\n"
    cluster.deploy(web(3, extra_deploy=policy, extra_env=', VERSION: "1"'))
    before = cluster.repo.git("rev-parse", "HEAD").strip()
    cluster.repo.write("fleet.yaml", web(3, extra_deploy=policy, extra_env=', VERSION: "2"'))
    cluster.repo.commit("web version 2")
    head = cluster.repo.git("rev-parse", "HEAD").strip()

    def canary_runs() -> bool:
        revisions = assigned_revisions(cluster)
        canaries = [vm for vm, revision in revisions.items() if revision == head]
        healthy = {vm for vms in running_on(cluster.dsn).values() for vm in vms}
        return rollout_phase(cluster) == "canary" and len(canaries) == 1 and canaries[0] in healthy

    eventually(canary_runs, 180, "the canary runs the new version, healthy")
    revisions = assigned_revisions(cluster)
    ((old_term,),) = rows(cluster.dsn, "SELECT term FROM reconciler_leases")
    killed = cluster.leader()
    (lost_vm,) = running_on(cluster.dsn)[killed]
    cluster.daemons[killed].signal(signal.SIGKILL)  # its VMs keep running: a crash
    cluster.daemons[killed].process.wait(timeout=10)
    others = [h for h in HOSTS if h != killed]

    def new_leader() -> bool:
        ((holder, term),) = rows(cluster.dsn, "SELECT holder, term FROM reconciler_leases")
        return str(holder) != killed and int(str(term)) > int(str(old_term))

    eventually(new_leader, 120, "another daemon leads")
    # The killed leader's host is lost: its VM runs on the others, on the revision it ran
    # (the held-back replicas stay on the previous one; the rollout waits for its promotion).
    eventually(lambda: cluster.settled(others), 180, "the web VMs run on the other hosts")
    moved = assigned_revisions(cluster)
    assert moved[lost_vm] == revisions[lost_vm]  # the revision it ran survived the failover
    assert sorted(moved.values()) == sorted([head, before, before]), moved
    ((settings,),) = rows(
        cluster.dsn, f"SELECT settings FROM vms WHERE name = '{lost_vm}' AND host != '{killed}'"
    )
    version = '"1"' if revisions[lost_vm] == before else '"2"'
    assert json.loads(str(settings))["deploy.env.VERSION"] == version  # and runs its version
    assert rollout_phase(cluster) == "canary"

    # Its supervisor starts it again: it stops its stale copy first, and follows.
    what = "a held-back replica" if revisions[lost_vm] == before else "the canary"
    print(f"leader {killed} killed mid-rollout; its {lost_vm} ({what}) moved on its revision")
    cluster.daemons[killed] = cluster.daemons[killed].restarted()
    done = reconciler("promote", "web", "--store", cluster.dsn)
    assert done.returncode == 0, done.stderr

    def finished() -> dict[str, str] | None:
        settled = cluster.settled(HOSTS)
        done = rollout_phase(cluster) == "complete"
        on_head = set(assigned_revisions(cluster).values()) == {head}
        return settled if done and on_head else None

    where = eventually(finished, 240, "the new leader finishes the rollout, each VM once")
    assert set(where) == WEB_VMS
    last = "SELECT revision FROM revisions WHERE outcome = 'applied' ORDER BY id DESC LIMIT 1"
    assert rows(cluster.dsn, last) == [(head,)]
    # No orphan: every process of every host is a VM its host reports.
    for host in HOSTS:
        assert set(supervisor_counts(cluster.daemons[host].state)) == set(
            running_on(cluster.dsn).get(host, {})
        )


def test_a_wave_that_does_not_get_healthy_goes_back_to_the_previous_version(
    cluster: Cluster,
) -> None:
    quick = web(3).replace("startPeriodSeconds: 30", "startPeriodSeconds: 5")
    cluster.deploy(quick)
    before = cluster.repo.git("rev-parse", "HEAD").strip()
    # The new version listens on another port than its health check asks: never healthy.
    cluster.repo.write("fleet.yaml", quick.replace('ECHO_PORT: "7311"', 'ECHO_PORT: "7399"'))
    cluster.repo.commit("web listens on the wrong port")
    head = cluster.repo.git("rev-parse", "HEAD").strip()

    def failed() -> str | None:
        found = rows(
            cluster.dsn,
            f"SELECT message FROM revisions WHERE revision = '{head}' AND outcome = 'failed'",
        )
        return str(found[0][0]) if found else None

    message = eventually(failed, 300, "the broken revision is recorded failed")
    assert "rolled back web-0" in message, message
    # Its first wave went back where it ran, on the previous revision; no later wave ran.
    eventually(
        lambda: set(assigned_revisions(cluster).values()) == {before},
        120,
        "every VM assigned the previous revision",
    )
    where = eventually(lambda: cluster.settled(HOSTS), 120, "each VM runs once, healthy")
    for host, vms in running_on(cluster.dsn).items():
        for name, address in vms.items():
            assert cluster.daemons[host].echo(address) == b"ping\n", (host, name)
    assert set(where) == WEB_VMS
