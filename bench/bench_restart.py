"""Benchmark: commit → healthy for a restart (an env change), with the daemon's file watch.

Two replicas of one echo server, each in its own daemon and fleet: a host-process VM (the
``executable`` target under the ``process`` runtime) and a QEMU microVM (the ``unikernel``
target, TCG here). Each round commits an env change to the fleet repository and waits, reading
``/api/status`` every 5 ms, until the VM runs the new revision, restarted and healthy. The
daemon's own timeline of the round (its ``timeline`` event: trigger, fetch, load, plan, build,
stop, network, vmm-start, boot, workload, probe) is printed with it; a daemon without one
(an older version, run for the "before" figures) shows none.

Usage: ``sudo .venv/bin/python bench/bench_restart.py [--rounds N] [--part process|microvm]
[--out bench/results/restart.md]`` (root: bridges, TAPs, network namespaces; QEMU for the
microVM part; the Debian kernel is fetched once into the test cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]  # the project, and the test kit

from support.daemons import Daemon  # noqa: E402
from support.kernel import register_kernel  # noqa: E402
from support.process_fleet import (  # noqa: E402
    ECHO,
    fleet_document,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.repo import FleetRepo  # noqa: E402
from support.waiting import eventually, free_port  # noqa: E402

WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: echo}}
spec:
  source: {{path: echo, language: c, entrypoint: echo.c}}
  build: {{targets: [{targets}]}}
  deploy:
    target: {target}
    runtime: {runtime}
    replicas: 1
    memoryMiB: 128
    env: {{ECHO_PORT: "{port}", ROUND: "{round}"}}
    health: {{type: tcp, port: {port}, timeoutSeconds: 2, startPeriodSeconds: 120}}
"""

KINDS = {
    "process": {"targets": "executable", "target": "executable", "runtime": "process"},
    "microvm": {"targets": "executable, unikernel", "target": "unikernel", "runtime": "qemu"},
}


def fleet_yaml(kind: str, network: str, port: int, round_: int) -> str:
    return fleet_document("restart-bench", network) + WORKLOAD.format(
        port=port, round=round_, **KINDS[kind]
    )


def the_vm(daemon: Daemon) -> dict[str, Any]:
    status = daemon.status()
    vms: list[dict[str, Any]] = status["vms"]
    return {"applied": status["applied_revision"], **(vms[0] if vms else {})}


NONE = "(no timeline)"


def timeline_of(daemon: Daemon, revision: str) -> str:
    events = daemon.get("/api/events?limit=20")
    for event in events.get("events", events) if isinstance(events, dict) else events:
        if event.get("kind") == "timeline" and revision.startswith(str(event.get("subject"))):
            return str(event.get("message"))
    return NONE


def run_kind(kind: str, rounds: int, scratch: Path) -> list[str]:
    bridge, cidr = new_pool()
    port = 7007 if kind == "microvm" else free_port()
    work = scratch / kind
    state = work / "state"
    if kind == "microvm":
        register_kernel(state)
    network = network_yaml(bridge, cidr)
    repo = FleetRepo.create(
        work / "fleet",
        {"fleet.yaml": fleet_yaml(kind, network, port, 0), "echo/echo.c": ECHO.read_text()},
    )
    daemon = Daemon(repo.path, state, work, "d0", ["--cache-dir", str(work / "cache")])
    lines = []
    times = []
    try:
        eventually(lambda: the_vm(daemon).get("healthy"), 600, f"the {kind} VM healthy")
        for round_ in range(1, rounds + 1):
            restarts = the_vm(daemon)["restarts"]
            repo.write("fleet.yaml", fleet_yaml(kind, network, port, round_))
            committed = time.monotonic()
            repo.commit(f"ROUND={round_}")
            head = repo.git("rev-parse", "HEAD")
            while True:
                vm = the_vm(daemon)
                if vm["applied"] == head and vm["healthy"] and vm["restarts"] > restarts:
                    break
                assert time.monotonic() - committed < 300, f"round {round_} never got healthy"
                time.sleep(0.005)
            elapsed = time.monotonic() - committed
            times.append(elapsed)
            # The event is written once the cycle ends, a moment after the status says healthy.
            deadline = time.monotonic() + 2
            while (timeline := timeline_of(daemon, head)) == NONE and time.monotonic() < deadline:
                time.sleep(0.05)
            lines.append(f"  - {elapsed:.2f} s: {timeline}")
    finally:
        daemon.stop()
        remove_deployment(state, bridge)
    head = (
        f"- {kind} ({KINDS[kind]['target']} on {KINDS[kind]['runtime']}): median "
        f"{statistics.median(times):.2f} s, min {min(times):.2f} s, max {max(times):.2f} s "
        f"(n={len(times)})"
    )
    return [head, *lines]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=sorted(KINDS), action="append")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; QEMU under TCG.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as scratch:
        for kind in args.part or ["process", "microvm"]:
            lines += run_kind(kind, args.rounds, Path(scratch))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
