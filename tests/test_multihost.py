"""A fleet across three hosts on one PostgreSQL store: the leader places, each host's agent
converges its share, a lost host's VMs come back on the others, and a host that wakes after
its epoch ended stops its stale VMs before anything else.

The hosts are ``support.multihost_cluster``'s: three real daemons, each in its own network
namespace and state directory, sharing one PostgreSQL store and lease; VMs are process-runtime
echo servers.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemons import supervisor_counts
from support.multihost_cluster import GRACE, HOSTS, Cluster, kill_vms, rows, running_on, three_hosts
from support.waiting import eventually

from reconciler.state.hosts import HEARTBEAT_SECONDS

pytestmark = [pytest.mark.postgres, pytest.mark.root]


@pytest.fixture
def cluster(tmp_path: Path, lease_dsn: str) -> Iterator[Cluster]:
    """The three hosts, registered, on a fleet that has no VM yet."""
    with three_hosts(tmp_path, lease_dsn) as started:
        yield started


def test_replicas_land_one_per_host_and_answer(cluster: Cluster) -> None:
    placed = cluster.deploy()
    assert sorted(placed) == sorted(HOSTS)
    for host, vms in placed.items():
        ((name, address),) = vms.items()
        assert cluster.daemons[host].echo(address) == b"ping\n", (host, name)
    assignments = rows(cluster.dsn, "SELECT vm, host, revision FROM assignments ORDER BY vm")
    assert {(str(vm), str(host)) for vm, host, _ in assignments} == {
        (name, host) for host, vms in placed.items() for name in vms
    }
    head = cluster.repo.git("rev-parse", "HEAD").strip()
    assert {str(revision) for _, _, revision in assignments} == {head}


def test_a_killed_host_s_vms_come_back_on_the_others(cluster: Cluster) -> None:
    placed = cluster.deploy()
    victim = cluster.follower()
    (lost_vm,) = placed[victim]
    daemon = cluster.daemons[victim]
    daemon.signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    kill_vms(daemon.state)
    killed_at = time.monotonic()
    live = [h for h in HOSTS if h != victim]
    where = eventually(lambda: cluster.settled(live), 180, "the lost VM runs on another host")
    recovered = time.monotonic() - killed_at
    assert where[lost_vm] in live
    # Not before the grace period, counted from its last heartbeat (at most one interval ago).
    assert recovered > GRACE - HEARTBEAT_SECONDS
    assert cluster.ended(victim)
    # The operator is told once, for that epoch, of the VM that moved.
    ((key, body),) = rows(cluster.dsn, "SELECT key, body FROM outbox WHERE kind = 'host-lost'")
    assert str(key) == f"host-lost:{victim}:1|ops"
    assert f"its VM {lost_vm} goes to another host" in str(body)
    for host, vms in running_on(cluster.dsn).items():
        for name, address in vms.items() if host in live else ():
            assert cluster.daemons[host].echo(address) == b"ping\n", (host, name)
    print(f"host loss: {lost_vm} healthy on {where[lost_vm]} {recovered:.1f} s after the kill")


def test_a_host_that_wakes_after_its_epoch_ended_stops_its_stale_vms_first(
    cluster: Cluster,
) -> None:
    placed = cluster.deploy()
    sleeper = cluster.follower()
    (moved,) = placed[sleeper]
    daemon = cluster.daemons[sleeper]
    daemon.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    others = [h for h in HOSTS if h != sleeper]
    # Past the grace period the leader ends its epoch and runs its VM elsewhere, while the
    # paused host's copy is still up (nothing on that host can act): two copies answer until
    # it wakes.
    eventually(
        lambda: any(moved in running_on(cluster.dsn).get(h, {}) for h in others),
        180,
        "the paused host's VM runs healthy elsewhere",
    )
    replaced_at = time.monotonic()
    assert cluster.ended(sleeper)
    assert supervisor_counts(daemon.state).get(moved) == 1  # the stale copy, still up
    offset = len(daemon.log())
    daemon.signal(signal.SIGCONT)
    woke_at = time.monotonic()
    eventually(
        lambda: not supervisor_counts(daemon.state), 60, "the woken host stops its stale copy"
    )
    stopped_at = time.monotonic()
    where = eventually(lambda: cluster.settled(HOSTS), 120, "the fleet settles, once each")
    assert set(where) == {"web-0", "web-1", "web-2"}

    after = daemon.log()[offset:]
    stale = after.index("stopped 1 stale VM(s) before anything else")
    registered = after.index(f"host {sleeper} registered with epoch 2")
    assert stale < registered
    # Before the stale stop it acted on nothing: no assignment converged, no VM started.
    assert "converges its assignments" not in after[:stale]
    assert '"action": "create"' not in after[:stale]
    events = rows(cluster.dsn, f"SELECT kind FROM events WHERE subject = '{sleeper}' ORDER BY id")
    kinds = [str(kind) for (kind,) in events]
    assert kinds[-3:] == ["host-lost", "host-stale-stopped", "host-registered"]
    print(
        f"paused host: {moved} replaced {replaced_at - paused_at:.1f} s after the pause; the "
        f"stale copy stopped {stopped_at - woke_at:.1f} s after waking"
    )
