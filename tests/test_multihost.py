"""A fleet across three hosts on one PostgreSQL store: the leader places, each host's agent
converges its share, a lost host's VMs come back on the others, and a host that wakes after
its epoch ended stops its stale VMs before anything else.

Three real daemons (``--host host-a|b|c``), each with its own state directory and its own
network namespace holding its bridge (the fleet's one bridge name and pool, as three machines
would have it; routing between hosts is not needed here, as nothing crosses hosts), sharing one
PostgreSQL store and lease over its UNIX socket. VMs are process-runtime echo servers. What
each host runs is read from the store and from the host's processes, and each VM is asked for
an echo from inside its host's namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from support.daemons import supervisor_counts
from support.process_fleet import ECHO, echo_workload, fleet_document, network_yaml, new_pool
from support.repo import FleetRepo
from support.waiting import eventually

from reconciler.state.hosts import HEARTBEAT_SECONDS
from runtime.network import scope_for

pytestmark = [pytest.mark.postgres, pytest.mark.root]

HOSTS = ("host-a", "host-b", "host-c")
PORT = 7311
GRACE = 6.0
BRIDGE, CIDR = new_pool()
FLEET = fleet_document("multihost", network_yaml(BRIDGE, CIDR))


def web(replicas: int) -> str:
    return FLEET + echo_workload("web", PORT).replace("replicas: 1", f"replicas: {replicas}")


class HostDaemon:
    """``reconciler daemon --host NAME`` inside the host's network namespace."""

    def __init__(  # noqa: PLR0917
        self, name: str, netns: str, repo: Path, state: Path, dsn: str, logs: Path
    ) -> None:
        self.name, self.netns, self.state = name, netns, state
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("a")
        argv = [
            "nsenter",
            f"--net=/run/netns/{netns}",
            sys.executable,
            "-m",
            "reconciler",
            "daemon",
            "--repo",
            str(repo),
            "--state-dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
            "--id",
            name,
            "--log-format",
            "json",
            "--store",
            dsn,
            "--lease",
            dsn,
            "--host",
            name,
            "--host-grace-seconds",
            str(GRACE),
        ]
        # nsenter execs the daemon: the pid is the daemon's.
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def echo(self, address: str) -> bytes:
        """An echo from the VM at ``address``, asked from inside this host."""
        script = (
            "import socket,sys\n"
            f"c = socket.create_connection(({address!r}, {PORT}), timeout=5)\n"
            "c.sendall(b'ping\\n'); sys.stdout.buffer.write(c.recv(16))\n"
        )
        done = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-c", script],
            capture_output=True,
            timeout=20,
            check=False,
        )
        return done.stdout


def kill_vms(state: Path) -> None:
    """Kill every process VM of a host's state directory (they outlive their daemon)."""
    for pidfile in (state / "vms").glob("*/process.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(query).fetchall())  # type: ignore[arg-type]


def registered(dsn: str) -> int:
    try:
        return len(rows(dsn, "SELECT name FROM hosts"))
    except psycopg.errors.UndefinedTable:
        return 0  # no daemon migrated the store yet


def running_on(dsn: str) -> dict[str, dict[str, str]]:
    """Host -> its healthy running VMs (name -> address), as the hosts report them."""
    found: dict[str, dict[str, str]] = {}
    query = "SELECT host, name, address FROM vms WHERE state = 'running' AND healthy"
    for host, name, address in rows(dsn, query):
        found.setdefault(str(host), {})[str(name)] = str(address)
    return found


@dataclass
class Cluster:
    repo: FleetRepo
    daemons: dict[str, HostDaemon]
    dsn: str

    def deploy(self) -> dict[str, dict[str, str]]:
        """Commit ``web`` at 3 replicas; host -> its VMs once one runs healthy on each."""
        self.repo.write("fleet.yaml", web(3))
        self.repo.commit("web at 3 replicas")
        return eventually(
            lambda: (
                (placed := running_on(self.dsn))
                and sorted(len(vms) for vms in placed.values()) == [1, 1, 1]
                and placed
            ),
            180,
            "one web replica runs healthy on each host",
        )

    def follower(self) -> str:
        ((holder,),) = rows(self.dsn, "SELECT holder FROM reconciler_leases")
        return next(h for h in HOSTS if h != str(holder))

    def settled(self, live: Iterable[str]) -> dict[str, str] | None:
        """VM -> host once every web replica runs healthy exactly once across the ``live``
        hosts, as they report it and as their processes say."""
        reported = running_on(self.dsn)
        where: dict[str, str] = {}
        for host in live:
            processes = supervisor_counts(self.daemons[host].state)
            for name in reported.get(host, {}):
                if name in where or processes.get(name) != 1:
                    return None
                where[name] = host
            if set(processes) - set(reported.get(host, {})):
                return None  # a process its host does not report (a stale copy still up)
        return where if set(where) == {"web-0", "web-1", "web-2"} else None

    def ended(self, host: str) -> bool:
        return rows(self.dsn, f"SELECT ended FROM hosts WHERE name = '{host}'") == [(True,)]


@pytest.fixture
def cluster(tmp_path: Path, lease_dsn: str) -> Iterator[Cluster]:
    """The three hosts, registered, on a fleet that has no VM yet."""
    tag = uuid.uuid4().hex[:4]
    namespaces = {name: f"rcmh{tag}-{name[-1]}" for name in HOSTS}
    states = {name: tmp_path / f"state-{name}" for name in HOSTS}
    files = {"fleet.yaml": FLEET, "echo/echo.c": ECHO.read_text()}
    repo = FleetRepo.create(tmp_path / "fleet", files)
    started: dict[str, HostDaemon] = {}
    try:
        for name, netns in namespaces.items():
            subprocess.run(["ip", "netns", "add", netns], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            started[name] = HostDaemon(name, netns, repo.path, states[name], lease_dsn, tmp_path)
        eventually(lambda: registered(lease_dsn) == 3, 60, "the three hosts register")
        yield Cluster(repo, started, lease_dsn)
    finally:
        for daemon in started.values():
            daemon.stop()
        for state in states.values():
            kill_vms(state)
        # The hosts' namespaces, and each VM's own (named by its host's scope).
        scopes = tuple(f"rc{scope_for(str(state.resolve()))}-" for state in states.values())
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        for line in listed.stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(scopes) or name in namespaces.values():
                subprocess.run(["ip", "netns", "del", name], check=False)


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
