"""Benchmark: a fleet of hosts on one PostgreSQL store (issue #11, "Speed").

Parts (``--part``, default all; each prints Markdown, ``--out`` collects them):

* ``placement``: 10,000 VMs over 100 hosts (``bench_placement``'s generated fleet): CPU of the
  first placement, and the VMs moved when one host is lost (must be that host's only).
* ``cycle``: the leader's no-op cycle with 100 hosts x 100 VMs in the store (10,000 VMs,
  every one assigned, reported running and healthy by its live host). Measured: the plan phase
  of ``ReconcileCycle._plan`` as a leader on a PostgreSQL store runs it
  (``FleetHost.refresh``, which is ``observe``: ``hosts()``, ``fleet_observed()``,
  ``assignments()``; then ``rollouts()``, ``rollout_switches()``, ``gate``, ``diff``,
  ``FleetHost.with_moves``: ``hosts()``, ``assignments()``, ``place``; ``suspensions()``,
  ``check_deletions``) plus the loop's ``FleetHost.host_lost()`` check (``hosts()``,
  ``assignments()``). CPU of this process (``time.process_time``: decoding rows, planning,
  placement; not the server's), wall time, and database round trips counted from libpq's
  protocol trace (one ``ReadyForQuery`` per round trip) with the bytes the server sent.
  Not measured: git, the loading of the revision (cached by the daemon), the agents' side.
* ``store``: intents (begin + complete) and ``put_vm`` per second, SQLite against PostgreSQL on
  ``bench_store``'s workload, each with and without a leader's fence (term check).
* ``hostloss`` (root): three real daemons (``--host host-a|b|c``, each in its own network
  namespace, process-runtime echo VMs, 6 replicas), the default grace (30 s) and heartbeat
  (2 s). ``--trials`` times: kill -9 a follower host's daemon and its VMs (the machine dies),
  time until the leader ended its epoch and until every VM runs healthy exactly once on the
  two live hosts; then the host comes back (a new daemon) for the next trial.
* ``failover`` (root): in the same three-host cluster, kill -9 the leader host's daemon
  (its VMs keep running) ``--rounds`` times; time until another host's daemon holds the lease
  (PostgreSQL lease, default timings 15/10/2 s), then the killed one restarts.

Needs the local PostgreSQL (``deploy/start-postgres.sh``; ``$RECONCILER_TEST_POSTGRES`` is a
superuser DSN, default its Unix socket); scratch databases are created and dropped.

Usage: ``sudo .venv/bin/python bench/bench_multihost.py [--part P] [--trials 10] [--rounds 10]
[--out bench/results/multihost.md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests"), str(PROJECT / "bench")]

import bench_placement  # noqa: E402
import bench_store  # noqa: E402
import psycopg  # noqa: E402
from support.daemons import kill_vms, supervisor_counts  # noqa: E402
from support.fakes import fleet, running, workload  # noqa: E402
from support.multihost_cluster import remove_host_namespaces  # noqa: E402
from support.process_fleet import (  # noqa: E402
    ECHO,
    echo_workload,
    fleet_document,
    network_yaml,
    new_pool,
)
from support.repo import FleetRepo  # noqa: E402
from support.waiting import eventually  # noqa: E402

from reconciler.execution.fleet_host import FleetHost  # noqa: E402
from reconciler.fleet_hosts import placement_hosts  # noqa: E402
from reconciler.leadership.fence import Fence  # noqa: E402
from reconciler.model import RuntimeKind  # noqa: E402
from reconciler.planning import check_deletions, diff, suspend_plan  # noqa: E402
from reconciler.planning.placement import demands_of, place  # noqa: E402
from reconciler.planning.rollout import gate  # noqa: E402
from reconciler.state import StoreLocation, open_state_store  # noqa: E402
from reconciler.state.hosts import HOST_GRACE_SECONDS, HostRegistration  # noqa: E402
from reconciler.state.postgres import PostgresStateStore  # noqa: E402


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):.1f} s, p99 {p99:.1f} s, "
        f"min {ordered[0]:.1f} s, max {ordered[-1]:.1f} s (n={len(ordered)})"
    )


# -- placement ---------------------------------------------------------------------------------


def part_placement(runs: int) -> list[str]:
    hosts, demands = bench_placement.fleet(100, 1000, 10)
    first_cpu, first = bench_placement.cpu(runs, lambda: place(demands, hosts, {}))
    victim = hosts[len(hosts) // 2].name
    on_victim = sorted(vm for vm, h in first.assignments.items() if h == victim)
    lost_hosts = [replace(h, lost=h.name == victim) for h in hosts]
    lost_cpu, lost = bench_placement.cpu(
        runs, lambda: place(demands, lost_hosts, first.assignments)
    )
    moved = sorted(m.vm for m in lost.moves)
    changed = sorted(vm for vm, h in first.assignments.items() if lost.assignments[vm] != h)
    only = moved == on_victim == changed
    return [
        "## Placement: 10,000 VMs over 100 hosts",
        "",
        f"`bench_placement`'s fleet, median CPU of {runs} runs.",
        "",
        f"- first placement: {first_cpu:.3f} s CPU (target <= 1 s: "
        f"{'met' if first_cpu <= 1 else 'missed'})",
        f"- one host lost: {lost_cpu:.3f} s CPU; {len(moved)} VMs moved, {len(on_victim)} ran on "
        f"the lost host, {len(changed)} changed host "
        f"({'only the lost host' if only else 'NOT only the lost host'}'s)",
        "",
    ]


# -- the leader's no-op cycle ------------------------------------------------------------------


@contextlib.contextmanager
def traced(conn: psycopg.Connection[Any]) -> Iterator[list[int]]:
    """libpq's protocol trace of ``conn`` while in the block: [round trips, bytes the server
    sent], one round trip per ``ReadyForQuery``, filled in when the block ends."""
    counts = [0, 0]
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            yield counts
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        for line in trace.read().decode(errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) > 3 and fields[1] == "B":
                counts[1] += int(fields[2])
                counts[0] += fields[3].startswith("ReadyForQuery")


def part_cycle(runs: int, hosts: int, per_host: int) -> list[str]:
    names = [f"host-{i:03d}" for i in range(hosts)]
    desired = fleet(*(workload(f"w{w:03d}", replicas=hosts) for w in range(per_host)))
    vms = running(desired).vms
    with bench_store.scratch_database() as dsn:
        leader = PostgresStateStore(dsn, host=names[0])
        epochs: dict[str, int] = {}
        for name in names:
            epochs[name] = leader.register_host(
                HostRegistration(
                    name,
                    vcpus=64,
                    memory_mib=131072,
                    disk_mib=1_000_000,
                    runtimes=frozenset(RuntimeKind),
                    kvm=True,
                )
            )
        facts = placement_hosts(leader.hosts(), HOST_GRACE_SECONDS)
        placed = place(demands_of(desired), facts, {}).require_fit().assignments
        setup = time.monotonic()
        for name in names:
            with PostgresStateStore(dsn, host=name) as store:
                for vm in sorted(v for v, h in placed.items() if h == name):
                    store.put_vm(vms[vm])
        leader.claim_term(Fence(1, renew_deadline=3600))
        leader.record_revision(desired.revision or "", outcome="applied")
        leader.confirm_assignments({vm: (h, desired.revision or "") for vm, h in placed.items()})
        setup = time.monotonic() - setup
        host = FleetHost(leader, lambda records: placement_hosts(records, HOST_GRACE_SECONDS))

        def heartbeats() -> None:  # not measured: the hosts' own writes
            for name in names:
                leader.heartbeat(name, epochs[name])

        def plan_phase() -> int:
            observed = host.refresh()
            gated = gate(
                desired, observed, leader.rollouts(), leader.rollout_switches(), time.time()
            )
            plan = diff(gated.desired, observed)
            plan = host.with_moves(plan, gated.desired, observed)
            plan = suspend_plan(plan, leader.suspensions())
            plan = check_deletions(plan, gated.desired, observed)
            assert not host.host_lost()
            assert len(observed.vms) == len(vms), len(observed.vms)
            return len(plan.actions)

        heartbeats()
        plan_phase()  # the first under the term confirms the assignments; not a no-op cycle
        cpu, wall, trips, received = [], [], [], []
        for _ in range(runs):
            heartbeats()
            started, started_cpu = time.perf_counter(), time.process_time()
            actions = plan_phase()
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
            assert actions == 0, f"not a no-op cycle: {actions} actions"
            heartbeats()
            conn = leader._conn  # the handle's own connection, as the cycle uses it
            assert conn is not None
            with traced(conn) as counted:
                plan_phase()
            trips.append(counted[0])
            received.append(counted[1])
        leader.close()
    return [
        f"## The leader's no-op cycle: {hosts} hosts x {per_host} VMs in the store",
        "",
        f"{len(vms):,} VMs ({per_host} workloads x {hosts} replicas, placed by `place`), each "
        "reported running and healthy by its host, assigned, every host live; one leader "
        f"handle over the Unix socket (store filled in {setup:.0f} s). Median of {runs} cycles "
        "after the first (which confirms the assignments under the new term).",
        "",
        "| per no-op cycle | median | max |",
        "|---|---:|---:|",
        f"| CPU of the leader process (plan phase + host_lost) | "
        f"{statistics.median(cpu):.3f} s | {max(cpu):.3f} s |",
        f"| wall time | {statistics.median(wall):.3f} s | {max(wall):.3f} s |",
        f"| database round trips | {statistics.median(trips):.0f} | {max(trips)} |",
        f"| bytes from the server | {statistics.median(received) / 1e6:.1f} MB | "
        f"{max(received) / 1e6:.1f} MB |",
        "",
    ]


# -- store throughput --------------------------------------------------------------------------


def part_store(runs: int, ops: int) -> list[str]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fenced in (False, True):
            label = "fenced" if fenced else "no fence"
            with open_state_store(Path(tmp) / f"state-{label}") as store:
                if fenced:
                    store.claim_term(Fence(1, renew_deadline=3600))
                results[f"SQLite, {label}"] = bench_store.measure(store, runs, ops)
            with bench_store.scratch_database() as dsn:
                location = StoreLocation(Path(tmp), url=dsn, host="bench")
                with open_state_store(location) as store:
                    if fenced:
                        store.claim_term(Fence(1, renew_deadline=3600))
                    results[f"PostgreSQL, {label}"] = bench_store.measure(store, runs, ops)
    stores = list(results)
    lines = [
        "## Store throughput",
        "",
        f"`bench_store`'s workload, {ops} operations a round, median of {runs} rounds, one "
        "handle, operations per second (the fence: a leader's term checked in every write).",
        "",
        "| operation | " + " | ".join(stores) + " |",
        "|---|" + "---:|" * len(stores),
    ]
    for metric in ("intents (begin + complete) / s", "put_vm / s"):
        cells = " | ".join(f"{results[s][metric]:,.0f}" for s in stores)
        lines.append(f"| {metric} | {cells} |")
    return [*lines, ""]


# -- real daemons on three hosts ---------------------------------------------------------------

HOSTS = ("host-a", "host-b", "host-c")
PORT = 7311
REPLICAS = 6


class HostDaemon:
    """``reconciler daemon --host NAME`` in the host's network namespace, default timings (the
    test harness's, with the grace period left at its default)."""

    def __init__(self, name: str, netns: str, repo: Path, state: Path, dsn: str) -> None:
        self.name, self.netns, self.repo, self.state, self.dsn = name, netns, repo, state, dsn
        self._log = (state.parent / f"{name}.log").open("a")
        argv = [
            *("nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "reconciler"),
            *("daemon", "--repo", str(repo), "--state-dir", str(state)),
            *("--listen", "127.0.0.1:0", "--id", name, "--log-format", "json"),
            *("--store", dsn, "--lease", dsn, "--host", name),
        ]
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(query).fetchall())  # type: ignore[arg-type]


def running_on(dsn: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    try:
        query = "SELECT host, name FROM vms WHERE state = 'running' AND healthy"
        for host, name in rows(dsn, query):
            found.setdefault(str(host), set()).add(str(name))
    except psycopg.errors.UndefinedTable:
        pass  # no daemon migrated the store yet
    return found


def settled(dsn: str, daemons: dict[str, HostDaemon], live: list[str]) -> bool:
    """Every web VM healthy exactly once across ``live``, as they report it and as their
    processes say (the harness's ``Cluster.settled``)."""
    reported = running_on(dsn)
    seen: list[str] = []
    for host in live:
        processes = supervisor_counts(daemons[host].state)
        names = reported.get(host, set())
        if any(processes.get(n) != 1 for n in names) or set(processes) - names:
            return False
        seen += names
    return sorted(seen) == sorted(f"web-{i}" for i in range(REPLICAS))


def leader_of(dsn: str) -> str | None:
    found = rows(dsn, "SELECT holder FROM reconciler_leases WHERE expires_at > clock_timestamp()")
    return str(found[0][0]) if found else None


def host_row(dsn: str, name: str) -> tuple[int, bool]:
    ((epoch, ended),) = rows(dsn, f"SELECT epoch, ended FROM hosts WHERE name = '{name}'")
    return int(epoch), bool(ended)


@contextlib.contextmanager
def three_hosts(
    scratch: Path, dsn: str
) -> Iterator[tuple[dict[str, HostDaemon], Callable[..., HostDaemon]]]:
    tag = uuid.uuid4().hex[:4]
    namespaces = {name: f"rcmb{tag}-{name[-1]}" for name in HOSTS}
    states = {name: scratch / f"state-{name}" for name in HOSTS}
    bridge, cidr = new_pool()
    document = fleet_document("multihost", network_yaml(bridge, cidr))
    web = echo_workload("web", PORT).replace("replicas: 1", f"replicas: {REPLICAS}")
    repo = FleetRepo.create(
        scratch / "fleet", {"fleet.yaml": document + web, "echo/echo.c": ECHO.read_text()}
    )
    daemons: dict[str, HostDaemon] = {}

    def start(name: str) -> HostDaemon:
        daemons[name] = HostDaemon(name, namespaces[name], repo.path, states[name], dsn)
        return daemons[name]

    try:
        for name, netns in namespaces.items():
            subprocess.run(["ip", "netns", "add", netns], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            start(name)
        eventually(lambda: settled(dsn, daemons, list(HOSTS)), 300, "the fleet runs")
        yield daemons, start
    finally:
        for daemon in daemons.values():
            daemon.stop()
        for state in states.values():
            kill_vms(state)
        remove_host_namespaces(states.values(), namespaces.values())


def part_hostloss(scratch: Path, trials: int, rounds: int) -> list[str]:
    ended_after: list[float] = []
    recovered_after: list[float] = []
    takeovers: list[float] = []
    lines: list[str] = []
    with bench_store.scratch_database() as dsn, three_hosts(scratch, dsn) as (daemons, start):
        try:
            for trial in range(trials):
                # Every host back and reporting only what runs (a restarted host's rows of
                # its killed VMs are gone), so the victim's VMs are the ones it holds.
                eventually(lambda: settled(dsn, daemons, list(HOSTS)), 300, "settled")
                leader = eventually(lambda: leader_of(dsn), 60, "a leader")
                placed = running_on(dsn)
                held = [str(h) for (h,) in rows(dsn, "SELECT host FROM assignments")]
                victim = max((h for h in HOSTS if h != leader), key=held.count)
                epoch, _ = host_row(dsn, victim)
                daemons[victim].kill()
                kill_vms(daemons[victim].state)
                killed = time.monotonic()
                live = [h for h in HOSTS if h != victim]
                ended_at = None
                while time.monotonic() - killed < 600:
                    if ended_at is None and host_row(dsn, victim) == (epoch, True):
                        ended_at = time.monotonic() - killed
                    if ended_at is not None and settled(dsn, daemons, live):
                        break
                    time.sleep(0.2)
                else:
                    raise AssertionError(f"trial {trial}: the fleet did not recover")
                recovered_after.append(time.monotonic() - killed)
                ended_after.append(ended_at)
                print(
                    f"trial {trial}: {victim} ({len(placed.get(victim, ()))} VMs) ended after "
                    f"{ended_at:.1f} s, recovered after {recovered_after[-1]:.1f} s",
                    flush=True,
                )
                start(victim)
                eventually(
                    lambda v=victim, e=epoch: host_row(dsn, v)[0] > e and not host_row(dsn, v)[1],
                    120,
                    "the host back",
                )
            for round_ in range(rounds):
                leader = eventually(lambda: leader_of(dsn), 60, "a leader")
                eventually(lambda: settled(dsn, daemons, list(HOSTS)), 300, "settled")
                daemons[leader].kill()  # its VMs keep running
                killed = time.monotonic()
                eventually(
                    lambda old=leader: (now := leader_of(dsn)) is not None and now != old,
                    120,
                    "a takeover",
                )
                takeovers.append(time.monotonic() - killed)
                print(f"failover {round_}: {takeovers[-1]:.1f} s", flush=True)
                start(leader)
        except BaseException as exc:
            lines.append(f"(stopped early: {type(exc).__name__}: {str(exc)[:200]})")
            if not isinstance(exc, Exception):
                raise
    out = [
        "## Host loss and leader failover: three real daemons",
        "",
        "Three daemons (`--host host-a|b|c`, each in its own network namespace), "
        f"{REPLICAS} process-runtime echo VMs, default grace 30 s, heartbeat 2 s, PostgreSQL "
        "store and lease (15/10/2 s) over the Unix socket.",
        "",
    ]
    if recovered_after:
        out += [
            "Kill -9 of a follower host's daemon and its VMs, then the host comes back:",
            "",
            f"- its epoch ended by the leader after: {summary(ended_after)}",
            f"- every VM healthy exactly once on the live hosts after: {summary(recovered_after)}",
            "",
        ]
    if takeovers:
        out += [
            "Kill -9 of the leader host's daemon (its VMs keep running), then it restarts:",
            "",
            f"- another host's daemon holds the lease after: {summary(takeovers)}",
            "",
        ]
    return out + lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("placement", "cycle", "store", "hostloss")
    parser.add_argument(
        "--part", default=",".join(parts), help="comma-separated, of " + ", ".join(parts)
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ops", type=int, default=500)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10, help="leader failovers (hostloss)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = args.part.split(",")
    if set(chosen) - set(parts):
        parser.error(f"--part: choose from {', '.join(parts)}")
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({bench_placement.cpu_model()}), Python {platform.python_version()}, psycopg "
        f"{psycopg.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    for part in chosen:
        if part == "placement":
            lines += part_placement(args.runs)
        elif part == "cycle":
            lines += part_cycle(args.runs, 100, 100)
        elif part == "store":
            lines += part_store(args.runs, args.ops)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-multihost-") as scratch:
                lines += part_hostloss(Path(scratch), args.trials, args.rounds)
        # Written after every part: a later part that fails keeps the earlier figures.
        text = "\n".join([*lines, f"Load average after {part}: {os.getloadavg()[0]:.1f}."]) + "\n"
        print(text, flush=True)
        if args.out:
            args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
