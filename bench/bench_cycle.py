"""Benchmark: one no-op reconcile cycle of the daemon with 1,000 observed VMs.

The fleet repository holds 10 workloads of 100 replicas each on the ``process`` runtime. The
state store records all 1,000 VMs as running and healthy, each backed by a live process that the
process runtime recognises as its VM (a ``sleep`` whose argv names the VM's directory), so the
observer does the real work: pid file, ``/proc`` checks and console log per VM. The cycle then
resolves the head, loads the (cached) desired fleet, diffs and finds nothing to do.

Reported: CPU time (user + system of this process; ``git rev-parse`` runs in a child and is
listed apart) and wall time per cycle, median and max over ``--cycles`` cycles after one
warm-up. Target: <= 100 ms CPU per no-op cycle, git fetch excluded (a local repository has none).

Usage: ``.venv/bin/python bench/bench_cycle.py [--vms 1000] [--out bench/results/daemon.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from reconciler.daemon.cycle import ReconcileCycle  # noqa: E402
from reconciler.execution.host import open_host_at  # noqa: E402
from reconciler.execution.vms import vm_dir  # noqa: E402
from reconciler.leadership.fence import Fence  # noqa: E402
from reconciler.pipeline import RevisionLoader  # noqa: E402
from reconciler.planning import observed_from_desired  # noqa: E402
from reconciler.source import open_source  # noqa: E402

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {name: bench}
"""
WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {name: w%d}
spec:
  source: {path: echo, language: c, entrypoint: echo.c}
  build: {targets: [executable]}
  deploy:
    runtime: process
    replicas: %d
    env: {ECHO_PORT: "7007"}
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    workloads = 10
    replicas = args.vms // workloads
    scratch = Path(tempfile.mkdtemp(prefix="bench-cycle-"))
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        repo = scratch / "fleet"
        (repo / "echo").mkdir(parents=True)
        shutil.copy(PROJECT / "fleet-example" / "services" / "echo" / "echo.c", repo / "echo")
        (repo / "fleet.yaml").write_text(
            FLEET + "".join(WORKLOAD % (i, replicas) for i in range(workloads))
        )
        git(repo, "init", "-q", "-b", "main")
        git(repo, "-c", "user.name=b", "-c", "user.email=b@b", "add", "-A")
        git(repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench")
        state = scratch / "state"
        host = open_host_at(state)
        source = open_source(str(repo), ref=None, cache_dir=state / "git", fetch=False)
        loader = RevisionLoader(source=source)
        head = loader.resolve(None)
        desired = loader.load(head)
        for vm in observed_from_desired(desired).vms.values():
            directory = vm_dir(state, vm.name)
            directory.mkdir(parents=True)
            (directory / "console.log").write_text('@@reconciler {"event": "started"}\n')
            # A live process whose argv names the VM directory: the runtime's own liveness test.
            sleeper = subprocess.Popen(
                ["bash", "-c", f'exec -a "{directory}/init" sleep 86400'],
                start_new_session=True,
            )
            sleepers.append(sleeper)
            (directory / "process.pid").write_text(f"{sleeper.pid}\n")
            host.store.put_vm(replace(vm, pid=sleeper.pid, started_at=time.time()))
        host.store.record_revision(head, outcome="applied")
        time.sleep(0.5)  # let every sleeper exec
        cycle = ReconcileCycle(loader, host, state / "artifacts")
        fence = Fence(1, renew_deadline=3600)
        host.store.claim_term(fence)
        first = cycle.run(fence)
        assert first.outcome == "no_changes", first
        cpu_ms, wall_ms, child_ms = [], [], []
        for _ in range(args.cycles):
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu, wall = time.process_time(), time.perf_counter()
            result = cycle.run(fence)
            cpu_ms.append((time.process_time() - cpu) * 1000)
            wall_ms.append((time.perf_counter() - wall) * 1000)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            child_ms.append(
                (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) * 1000
            )
            assert result.outcome == "no_changes", result
        host.close()
    finally:
        for sleeper in sleepers:
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        f"### No-op reconcile cycle, {args.vms} observed VMs "
        f"({args.cycles} cycles after a warm-up)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| | median | max |",
        "|---|---|---|",
        f"| CPU of the daemon process (ms) | {statistics.median(cpu_ms):.1f} | {max(cpu_ms):.1f} |",
        f"| CPU of `git rev-parse` children (ms) | {statistics.median(child_ms):.1f} "
        f"| {max(child_ms):.1f} |",
        f"| wall time (ms) | {statistics.median(wall_ms):.1f} | {max(wall_ms):.1f} |",
        "",
        "Target: <= 100 ms CPU per no-op cycle (git fetch excluded).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
