"""The multi-host scenario on real QEMU microVMs: ``web`` at 3 replicas, built as a microvm
image of the C echo server, lands one replica per host and each answers from its host; when a
host's daemon and its VMs are killed (``kill -9``), its VM boots again on another host and every
VM runs exactly once.

The hosts are ``support.multihost_cluster``'s three real daemons, each in its own network
namespace and state directory (with the session's kernels), sharing one PostgreSQL store and
lease. The other multi-host tests use process VMs for speed; this one shows the same placement
and recovery hold for the QEMU runtime, so it stays lean: one deployment, one host loss.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.multihost_cluster import HOSTS, kill_vms, qemu_counts, running_on, three_hosts, web
from support.waiting import eventually

pytestmark = [pytest.mark.qemu, pytest.mark.postgres, pytest.mark.root]


def test_qemu_replicas_spread_over_hosts_and_a_lost_host_s_vm_boots_elsewhere(
    tmp_path: Path, lease_dsn: str, session_state: Path
) -> None:
    with three_hosts(tmp_path, lease_dsn, kernels=session_state / "kernels") as cluster:
        placed = cluster.deploy(web(3, qemu=True))
        assert sorted(placed) == sorted(HOSTS)
        for host, vms in placed.items():
            ((name, address),) = vms.items()
            # A QEMU guest of this host, and nothing else there, answers from the host.
            assert qemu_counts(cluster.daemons[host].state) == {name: 1}, host
            assert cluster.daemons[host].echo(address) == b"ping\n", (host, name)

        victim = cluster.follower()  # the leader stays: no election in the way
        (lost_vm,) = placed[victim]
        daemon = cluster.daemons[victim]
        daemon.signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
        kill_vms(daemon.state)
        live = [h for h in HOSTS if h != victim]
        # Each VM healthy exactly once over the live hosts, one QEMU each, nothing stale.
        where = eventually(
            lambda: cluster.settled(live), 240, "the lost VM boots healthy on another host"
        )
        assert where[lost_vm] in live
        assert cluster.ended(victim)
        assert not qemu_counts(daemon.state)
        running = running_on(cluster.dsn)
        for vm, host in where.items():
            assert cluster.daemons[host].echo(running[host][vm]) == b"ping\n", (host, vm)
