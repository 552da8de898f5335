"""Three "hosts" on one machine sharing one PostgreSQL store: the harness of the multi-host
daemon tests (``test_multihost.py``, ``test_multihost_ops.py``).

Three real daemons (``--host host-a|b|c``), each with its own state directory and its own
network namespace holding its bridge (the fleet's one bridge name and pool, as three machines
would have it; routing between hosts is not needed here), sharing one PostgreSQL store and
lease over its UNIX socket. VMs are process-runtime echo servers, or QEMU microVMs of the same
server (``web(..., qemu=True)``, with the kernels given to ``three_hosts``). What each host runs
is read from the store and from the host's processes, and each VM is asked for an echo from
inside its host's namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from runtime.network import scope_for
from support.daemons import signal_daemon, stop_daemon, supervisor_counts
from support.process_fleet import ECHO, echo_workload, fleet_document, network_yaml, new_pool
from support.repo import FleetRepo
from support.waiting import eventually

HOSTS = ("host-a", "host-b", "host-c")
PORT = 7311
GRACE = 6.0
BRIDGE, CIDR = new_pool()
# host-lost notices go to an endpoint whose URL is never set: the outbox shows what was sent.
NOTIFY = "notifications: [{name: ops, format: generic, events: [host-lost], url: {env: OPS}}]"
FLEET = fleet_document("multihost", network_yaml(BRIDGE, CIDR)[:-1] + f", {NOTIFY}}}")
WEB_VMS = frozenset({"web-0", "web-1", "web-2"})


def web(replicas: int, *, extra_deploy: str = "", extra_env: str = "", qemu: bool = False) -> str:
    """The fleet with ``web`` (the echo server) at ``replicas``; ``extra_deploy`` adds lines
    under ``deploy`` (a rollout policy), ``extra_env`` continues its env map. ``qemu``: each
    replica is a microvm image of the server booted by QEMU, not a process."""
    # A QEMU guest may boot slowly (TCG on a busy CI host): a long start period, so that a slow
    # boot is waited for rather than taken for a broken VM.
    health = f"{{type: tcp, port: {PORT}, startPeriodSeconds: 150}}" if qemu else None
    workload = echo_workload(
        "web", PORT, extra_deploy=extra_deploy, extra_env=extra_env, health=health
    ).replace("replicas: 1", f"replicas: {replicas}")
    if qemu:
        workload = workload.replace("targets: [executable]", "targets: [microvm]").replace(
            "runtime: process", "target: microvm\n    runtime: qemu\n    memoryMiB: 128"
        )
    return FLEET + workload


class HostDaemon:
    """``reconciler daemon --host NAME`` inside the host's network namespace."""

    def __init__(  # noqa: PLR0917
        self, name: str, netns: str, repo: Path, state: Path, dsn: str, logs: Path
    ) -> None:
        self.name, self.netns, self.state = name, netns, state
        self.repo, self.dsn, self.logs = repo, dsn, logs
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

    def restarted(self) -> HostDaemon:
        """The same host's daemon started again (as its supervisor would after a crash)."""
        self.stop()
        return HostDaemon(self.name, self.netns, self.repo, self.state, self.dsn, self.logs)

    def signal(self, sig: int) -> None:
        signal_daemon(self.process, sig)

    def stop(self) -> None:
        stop_daemon(self.process, timeout=60)
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


def qemu_counts(state: Path) -> dict[str, int]:
    """How many QEMUs run each VM of a host's state directory (found by the VM directory on
    their command line, as the runtime finds them): more than one is a duplicate."""
    counts: dict[str, int] = {}
    for _, name in _qemus(state):
        counts[name] = counts.get(name, 0) + 1
    return counts


def _qemus(state: Path) -> Iterator[tuple[int, str]]:
    prefix = str(state / "vms") + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if not Path(argv[0]).name.startswith("qemu-system"):
            continue
        mention = next((arg for arg in argv if prefix in arg), None)
        if mention is not None:
            yield int(proc.name), mention.split(prefix, 1)[1].split("/")[0]


def kill_vms(state: Path) -> None:
    """Kill every VM of a host's state directory, process or QEMU (they outlive their daemon);
    a QEMU is also found by its command line, in case it never wrote its pid file."""
    pids = [*(state / "vms").glob("*/process.pid"), *(state / "vms").glob("*/qemu.pid")]
    for pidfile in pids:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    for pid, _ in _qemus(state):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


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
    namespaces: dict[str, str] = field(default_factory=dict)

    def deploy(self, fleet_yaml: str | None = None) -> dict[str, dict[str, str]]:
        """Commit ``web`` at 3 replicas (or ``fleet_yaml``); host -> its VMs once one runs
        healthy on each."""
        self.repo.write("fleet.yaml", fleet_yaml or web(3))
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

    def leader(self) -> str:
        ((holder,),) = rows(self.dsn, "SELECT holder FROM reconciler_leases")
        return str(holder)

    def follower(self) -> str:
        leader = self.leader()
        return next(h for h in HOSTS if h != leader)

    def settled(self, live: Iterable[str], vms: Iterable[str] = WEB_VMS) -> dict[str, str] | None:
        """VM -> host once every VM of ``vms`` runs healthy exactly once across the ``live``
        hosts, as they report it and as their processes say, and nothing else runs there."""
        reported = running_on(self.dsn)
        where: dict[str, str] = {}
        for host in live:
            state = self.daemons[host].state
            processes = supervisor_counts(state)
            for name, count in qemu_counts(state).items():
                processes[name] = processes.get(name, 0) + count
            for name in reported.get(host, {}):
                if name in where or processes.get(name) != 1:
                    return None
                where[name] = host
            if set(processes) - set(reported.get(host, {})):
                return None  # a process its host does not report (a stale copy still up)
        return where if set(where) == set(vms) else None

    def ended(self, host: str) -> bool:
        return rows(self.dsn, f"SELECT ended FROM hosts WHERE name = '{host}'") == [(True,)]


@contextlib.contextmanager
def three_hosts(tmp_path: Path, dsn: str, *, kernels: Path | None = None) -> Iterator[Cluster]:
    """The three hosts, registered, on a fleet that has no VM yet; everything they started
    (daemons, process and QEMU VMs, namespaces) is gone afterwards. ``kernels``: a kernel
    registry copied into every host's state directory, for the fleets that build images."""
    tag = uuid.uuid4().hex[:4]
    namespaces = {name: f"rcmh{tag}-{name[-1]}" for name in HOSTS}
    states = {name: tmp_path / f"state-{name}" for name in HOSTS}
    files = {"fleet.yaml": FLEET, "echo/echo.c": ECHO.read_text()}
    repo = FleetRepo.create(tmp_path / "fleet", files)
    started: dict[str, HostDaemon] = {}
    cluster = Cluster(repo, started, dsn, namespaces)
    try:
        for name, netns in namespaces.items():
            subprocess.run(["ip", "netns", "add", netns], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            if kernels is not None:
                shutil.copytree(kernels, states[name] / "kernels")
            started[name] = HostDaemon(name, netns, repo.path, states[name], dsn, tmp_path)
        eventually(lambda: registered(dsn) == 3, 60, "the three hosts register")
        yield cluster
    finally:
        for daemon in cluster.daemons.values():
            daemon.stop()
        for state in states.values():
            kill_vms(state)
        remove_host_namespaces(states.values(), namespaces.values())


def remove_host_namespaces(states: Iterable[Path], hosts: Iterable[str]) -> None:
    """Delete the hosts' network namespaces, and each VM's own (named by its host's scope)."""
    scopes = tuple(f"rc{scope_for(str(state.resolve()))}-" for state in states)
    names = set(hosts)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(scopes) or name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
