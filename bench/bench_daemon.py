"""Benchmark: the daemon as an operator runs it (root; host-process VMs, so it scales here).

Parts (``--part``, default all):

* ``trigger``: time from ``git commit`` to the new VM healthy, for the polling trigger (default
  30 s interval and 5 s jitter, file watch off) and for the file watch and the webhook;
* ``idle``: the daemon's CPU and RSS while it watches 100 healthy VMs (default poll interval),
  sampled from ``/proc`` over ``--idle-seconds``;
* ``file-failover``: two daemons on the file lease; kill -9 the leader ``--rounds`` times (the
  killed one restarts as a follower); time until the other says it leads;
* ``pg-failover`` (needs ``--postgres DSN``, a database the benchmark may use): three daemons on
  the PostgreSQL lease with the default timings (15/10/2 s); kill -9 the leader ``--rounds``
  times, then SIGTERM it; then SIGSTOP the leader in the middle of a rollout for longer than its
  lease, SIGCONT it, and count the writes its fence refused.

Every part checks that no VM runs twice. Results go to ``--out`` as Markdown.

Usage: ``sudo .venv/bin/python bench/bench_daemon.py [--part P] [--postgres DSN] [--out F]``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]  # the project, and the test kit

from support.daemons import (  # noqa: E402
    Daemon,
    fleet_repo,
    fleet_text,
    healthy_names,
    kill_vms,
    supervisor_counts,
)
from support.repo import FleetRepo  # noqa: E402
from support.waiting import eventually, free_port  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
        f"max {max(values):.2f} s (n={len(values)})"
    )


def new_repo(scratch: Path, workloads: dict[str, int]) -> FleetRepo:
    return fleet_repo(scratch / "fleet", workloads)


def timed(probe: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    eventually(probe, timeout, what)
    return time.monotonic() - started


def no_duplicates(state: Path) -> None:
    counts = supervisor_counts(state)
    duplicated = {name: n for name, n in counts.items() if n > 1}
    assert not duplicated, f"VMs running twice: {duplicated}"


def part_trigger(scratch: Path) -> list[str]:
    lines = ["### Commit to healthy", ""]
    for mode, extra in (
        ("polling (30 s + up to 5 s jitter)", ["--no-watch"]),
        ("file watch", []),
        ("webhook (generic, HMAC)", ["--no-watch", "--webhook-secret-file", "SECRET"]),
    ):
        work = scratch / mode.split()[0]
        ports = {"w0": free_port()}
        repo = new_repo(work, ports)
        secret_file = work / "secret"
        secret_file.write_text("bench-secret\n")
        argv = [str(secret_file) if a == "SECRET" else a for a in extra]
        state = work / "state"
        daemon = Daemon(repo.path, state, work, "d0", argv)
        times = []
        try:
            eventually(lambda d=daemon: healthy_names(d.status()) == {"w0-0"}, 120, "converge")
            for round_ in range(1, 4):
                ports[f"w{round_}"] = free_port()
                repo.write("fleet.yaml", fleet_text(ports))
                committed = time.monotonic()
                repo.commit(f"add w{round_}")
                if "webhook" in mode:
                    body = json.dumps({"reason": f"push w{round_}"}).encode()
                    signature = hmac.new(b"bench-secret", body, hashlib.sha256).hexdigest()
                    request = urllib.request.Request(
                        daemon.url + "/webhook/generic",
                        data=body,
                        method="POST",
                        headers={"X-Reconciler-Signature": f"sha256={signature}"},
                    )
                    urllib.request.urlopen(request, timeout=5).close()
                wanted = {f"{name}-0" for name in ports}
                eventually(
                    lambda d=daemon, w=wanted: healthy_names(d.status()) == w, 120, "healthy"
                )
                times.append(time.monotonic() - committed)
            no_duplicates(state)
        finally:
            daemon.stop()
            kill_vms(state)
        lines.append(f"- {mode}: " + ", ".join(f"{t:.2f} s" for t in times))
    return [*lines, ""]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def part_idle(scratch: Path, seconds: float) -> list[str]:
    ports = {f"w{i:03d}": free_port() for i in range(100)}
    repo = new_repo(scratch / "idle", ports)
    state = scratch / "idle" / "state"
    daemon = Daemon(repo.path, state, scratch / "idle", "d0")
    try:
        converge = timed(lambda: len(healthy_names(daemon.status())) == 100, 900, "100 VMs healthy")
        time.sleep(5)
        pid = daemon.process.pid
        cpu0, wall0 = proc_cpu_seconds(pid), time.monotonic()
        rss = []
        while time.monotonic() - wall0 < seconds:
            rss.append(proc_rss_mib(pid))
            time.sleep(1)
        cpu = proc_cpu_seconds(pid) - cpu0
        wall = time.monotonic() - wall0
        no_duplicates(state)
    finally:
        daemon.stop()
        kill_vms(state)
    return [
        "### Idle daemon watching 100 VMs (process runtime, poll every 30 s)",
        "",
        f"- converge 100 VMs from nothing: {converge:.1f} s",
        f"- CPU over {wall:.0f} s idle: {cpu:.2f} s ({100 * cpu / wall:.2f} % of one core)",
        f"- RSS: median {statistics.median(rss):.1f} MiB, max {max(rss):.1f} MiB",
        "",
    ]


def failover_rounds(
    repo: FleetRepo, state: Path, logs: Path, *, count: int, extra: list[str], rounds: int
) -> tuple[list[float], float]:
    """kill -9 the leader ``rounds`` times; then SIGTERM it once. Returns both timings."""
    daemons = [Daemon(repo.path, state, logs, f"d{i}", extra) for i in range(count)]
    takeovers: list[float] = []
    try:
        eventually(lambda: sum(d.is_leader() for d in daemons) == 1, 120, "one leader")
        leader = next(d for d in daemons if d.is_leader())
        eventually(lambda: len(healthy_names(leader.status())) == 1, 120, "converge")
        for round_ in range(rounds + 1):
            leader = next(d for d in daemons if d.is_leader())
            others = [d for d in daemons if d is not leader]
            graceful = round_ == rounds
            leader.signal(signal.SIGTERM if graceful else signal.SIGKILL)
            started = time.monotonic()
            eventually(lambda o=others: any(d.is_leader() for d in o), 120, "a takeover")
            elapsed = time.monotonic() - started
            if graceful:
                leader.stop()
                no_duplicates(state)
                return takeovers, elapsed
            takeovers.append(elapsed)
            leader.stop()
            no_duplicates(state)
            replacement = Daemon(repo.path, state, logs, f"{leader.name}r{round_}", extra)
            daemons[daemons.index(leader)] = replacement
            eventually(replacement.serving, 60, "the replacement serving")
        raise AssertionError("unreachable")
    finally:
        for daemon in daemons:
            daemon.stop()
        kill_vms(state)


def part_file_failover(scratch: Path, rounds: int) -> list[str]:
    repo = new_repo(scratch / "file", {"w0": free_port()})
    takeovers, graceful = failover_rounds(
        repo, scratch / "file" / "state", scratch / "file", count=2, extra=[], rounds=rounds
    )
    return [
        "### File lease, two daemons on one state directory",
        "",
        f"- takeover after kill -9 of the leader: {summary(takeovers)}",
        f"- takeover after SIGTERM of the leader: {graceful:.2f} s",
        "",
    ]


def part_pg_failover(scratch: Path, dsn: str, rounds: int) -> list[str]:
    repo = new_repo(scratch / "pg", {"w0": free_port()})
    state = scratch / "pg" / "state"
    extra = ["--lease", dsn]
    takeovers, graceful = failover_rounds(
        repo, state, scratch / "pg", count=3, extra=extra, rounds=rounds
    )
    fenced, stale_lines = part_pg_sigstop(scratch, dsn)
    return [
        "### PostgreSQL lease, three daemons, default timings (15 s lease, 10 s renew, 2 s retry)",
        "",
        f"- takeover after kill -9 of the leader: {summary(takeovers)} (target p99 <= 20 s)",
        f"- takeover after SIGTERM of the leader: {graceful:.2f} s",
        f"- SIGSTOP of the leader mid-rollout, past its lease, then SIGCONT: {fenced}",
        *stale_lines,
        "",
    ]


def part_pg_sigstop(scratch: Path, dsn: str) -> tuple[str, list[str]]:
    work = scratch / "pg-stop"
    ports = {"w0": free_port()}
    repo = new_repo(work, ports)
    state = work / "state"
    daemons = [Daemon(repo.path, state, work, f"s{i}", ["--lease", dsn]) for i in range(3)]
    try:
        eventually(lambda: sum(d.is_leader() for d in daemons) == 1, 120, "one leader")
        leader = next(d for d in daemons if d.is_leader())
        eventually(lambda: len(healthy_names(leader.status())) == 1, 120, "converge")
        repo.write("fleet.yaml", fleet_text(ports, slow={"slow": free_port()}))
        repo.commit("a VM that takes 8 s to get healthy")
        eventually(
            lambda: any(vm["name"] == "slow-0" for vm in leader.status()["vms"]),
            60,
            "the leader starting the slow VM",
        )
        leader.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        others = [d for d in daemons if d is not leader]
        eventually(lambda: any(d.is_leader() for d in others), 60, "a takeover")
        takeover = time.monotonic() - stopped
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))  # past the 15 s lease
        leader.signal(signal.SIGCONT)
        eventually(lambda: not leader.is_leader(), 30, "the stopped leader stepping down")
        time.sleep(10)  # let its rollout wake up and try to write
        refused = leader.metric("reconciler_fenced_writes_total") or 0
        new_leader = next(d for d in others if d.is_leader())
        eventually(lambda: healthy_names(new_leader.status()) == {"w0-0", "slow-0"}, 60, "healthy")
        no_duplicates(state)
        stale = [
            line
            for line in leader.log().splitlines()
            if "fencing refused" in line or "stepped down" in line
        ]
    finally:
        for daemon in daemons:
            daemon.stop()
        kill_vms(state)
    return (
        f"takeover {takeover:.2f} s after SIGSTOP; the old leader's fence refused "
        f"{refused:.0f} write(s)/action(s); no VM duplicated or orphaned",
        ["", "  Old leader's log after SIGCONT:", "", *[f"      {line}" for line in stale[:8]]],
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--part", choices=["all", "trigger", "idle", "file-failover", "pg-failover"], default="all"
    )
    parser.add_argument("--postgres", default=None, help="DSN of a database to use")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=120)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    lines = [
        "## Daemon benchmarks",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
    ]
    try:
        if args.part in ("all", "trigger"):
            lines += part_trigger(scratch)
        if args.part in ("all", "idle"):
            lines += part_idle(scratch, args.idle_seconds)
        if args.part in ("all", "file-failover"):
            lines += part_file_failover(scratch, args.rounds)
        if args.part in ("all", "pg-failover"):
            if not args.postgres:
                parser.error("pg-failover needs --postgres DSN")
            lines += part_pg_failover(scratch, args.postgres, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
