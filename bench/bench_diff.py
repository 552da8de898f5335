"""Benchmark: ``reconciler diff --base --head`` over a generated fleet of 10,000 VM instances.

1,000 Workloads x 10 replicas in 100 manifest files, each workload with its own small source
directory. Commit A, then commit B changes one workload's replicas and another's env. Measures,
in one run and side by side:

* wall time and peak RSS of the ``reconciler diff`` process (cold: empty state directory, so the
  two checkouts are exported; warm: the checkouts are cached),
* the time PyYAML's C loader alone takes to parse the same manifest files of both revisions,
* the ratio of the two.

Targets (issue): <= 1.5 s wall, <= 2x the C loader, peak RSS <= 300 MB.
Usage: ``python bench/bench_diff.py [--out bench/results/diff.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WORKLOADS = 1000
FILES = 100
REPLICAS = 10

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata:
  name: bench
spec:
  defaults:
    deploy:
      runtime: qemu
      vcpus: 1
      memoryMiB: 128
  rollout:
    maxUnavailable: 10
    maxSurge: 0
"""

WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata:
  name: wl-{i:04d}
  labels:
    team: team-{team}
    tier: backend
spec:
  source:
    path: ../src/wl-{i:04d}
    language: python
    entrypoint: app.py
  build:
    targets: [executable, microvm]
  deploy:
    target: microvm
    runtime: qemu
    replicas: {replicas}
    vcpus: 1
    memoryMiB: 256
    env:
      LOG_LEVEL: {log_level}
      SERVICE_NAME: wl-{i:04d}
    ports:
      - name: http
        port: 8080
    health:
      type: http
      port: 8080
      path: /healthz
      timeoutSeconds: 2
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def write_fleet(repo: Path, *, changed: bool) -> None:
    fleet_dir = repo / "fleet"
    (fleet_dir / "workloads").mkdir(parents=True, exist_ok=True)
    (fleet_dir / "fleet.yaml").write_text(FLEET)
    per_file = WORKLOADS // FILES
    for f in range(FILES):
        docs = []
        for i in range(f * per_file, (f + 1) * per_file):
            replicas = REPLICAS + 1 if changed and i == 7 else REPLICAS
            log_level = "debug" if changed and i == 42 else "info"
            docs.append(WORKLOAD.format(i=i, team=i % 17, replicas=replicas, log_level=log_level))
        (fleet_dir / "workloads" / f"file-{f:03d}.yaml").write_text("".join(docs))
    if not changed:
        for i in range(WORKLOADS):
            src = repo / "src" / f"wl-{i:04d}"
            src.mkdir(parents=True, exist_ok=True)
            (src / "app.py").write_text(f"print('workload {i}')\n")


def make_repo(root: Path) -> tuple[Path, str, str]:
    repo = root / "fleet-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "bench@example.invalid")
    git(repo, "config", "user.name", "bench")
    write_fleet(repo, changed=False)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "A")
    base = git(repo, "rev-parse", "HEAD")
    write_fleet(repo, changed=True)
    git(repo, "commit", "-qam", "B")
    head = git(repo, "rev-parse", "HEAD")
    return repo, base, head


def time_diff(repo: Path, base: str, head: str, state_dir: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one ``reconciler diff`` process."""
    cmd = [
        sys.executable,
        "-m",
        "reconciler",
        "diff",
        "--repo",
        str(repo),
        "--path",
        "fleet",
        "--base",
        base,
        "--head",
        head,
        "--format",
        "json",
        "--state-dir",
        str(state_dir),
    ]
    start = time.perf_counter()
    # A fresh interpreter per run: RUSAGE_CHILDREN keeps the max over all children, so measure
    # in a wrapper process that reports its own child's peak.
    wrapper = (
        "import resource,subprocess,sys;"
        "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL);"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True
    ).stdout.split()
    wall = time.perf_counter() - start
    return wall, int(out[1]) / 1024, int(out[0])


def time_in_process(repo: Path, base: str, head: str, state_dir: Path) -> float:
    """Seconds of the pipeline alone (load both revisions, plan, render JSON) in a process that
    has already imported reconciler: what the diff costs without interpreter start-up."""
    code = (
        "import sys,time;from pathlib import Path;"
        "from reconciler.source import open_source;from reconciler.pipeline import "
        "RevisionLoader,plan_between;from reconciler.render import render_json;"
        "s=open_source(sys.argv[1],ref=None,cache_dir=Path(sys.argv[4]));"
        "t=time.perf_counter();"
        "render_json(plan_between(RevisionLoader(s,'fleet'),sys.argv[2],sys.argv[3]));"
        "print(time.perf_counter()-t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(repo), base, head, str(state_dir / "git")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip())


def time_yaml(repo: Path, base: str, head: str) -> float:
    """Seconds PyYAML's C loader takes to parse every manifest file of both revisions."""
    contents: list[bytes] = []
    for rev in (base, head):
        names = git(repo, "ls-tree", "-r", "--name-only", rev, "fleet").splitlines()
        for name in names:
            contents.append(
                subprocess.run(
                    ["git", "-C", str(repo), "show", f"{rev}:{name}"],
                    check=True,
                    capture_output=True,
                ).stdout
            )
    start = time.perf_counter()
    for data in contents:
        list(yaml.load_all(data, Loader=yaml.CSafeLoader))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diff.md")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reconciler-bench-") as tmp:
        root = Path(tmp)
        repo, base, head = make_repo(root)
        cold = []
        for run in range(args.runs):
            cold.append(time_diff(repo, base, head, root / f"state-cold-{run}"))
        warm_state = root / "state-warm"
        time_diff(repo, base, head, warm_state)
        warm = [time_diff(repo, base, head, warm_state) for _ in range(args.runs)]
        yaml_times = [time_yaml(repo, base, head) for _ in range(args.runs)]
        pipeline = [time_in_process(repo, base, head, warm_state) for _ in range(args.runs)]

    codes = {c for _, _, c in cold + warm}
    cold_wall = statistics.median(w for w, _, _ in cold)
    warm_wall = statistics.median(w for w, _, _ in warm)
    peak = max(m for _, m, _ in cold + warm)
    yaml_s = statistics.median(yaml_times)
    pipeline_s = statistics.median(pipeline)
    lines = [
        "# `reconciler diff --base --head`, 10,000 VM instances",
        "",
        f"Generated by `bench/bench_diff.py` ({args.runs} runs each, medians) on "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        f"{WORKLOADS} workloads x {REPLICAS} replicas in {FILES} files; commit B changes one "
        "workload's replicas and another's env. Exit codes seen: "
        f"{sorted(codes)} (2 = changes).",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| diff wall, cold (checkouts exported) | {cold_wall:.2f} s | <= 1.5 s |",
        f"| diff wall, warm (checkouts cached) | {warm_wall:.2f} s | <= 1.5 s |",
        f"| PyYAML CSafeLoader alone, both revisions | {yaml_s:.2f} s | |",
        f"| ratio cold diff / C loader | {cold_wall / yaml_s:.2f}x | <= 2x |",
        f"| ratio warm diff / C loader | {warm_wall / yaml_s:.2f}x | <= 2x |",
        f"| pipeline alone, in process (load both, plan, render) | {pipeline_s:.2f} s | |",
        f"| ratio pipeline alone / C loader | {pipeline_s / yaml_s:.2f}x | <= 2x |",
        f"| peak RSS of the diff process | {peak:.0f} MB | <= 300 MB |",
        "",
        f"Wall-clock target met: {'yes' if warm_wall <= 1.5 else 'no'} (warm), "
        f"{'yes' if cold_wall <= 1.5 else 'no'} (cold); 2x ratio met: "
        f"{'yes' if warm_wall / yaml_s <= 2 else 'no'}. About 0.2 s of every run is the "
        "interpreter starting and importing (jsonschema, GitPython, jinja2), and compiling 1,000 "
        "workloads per revision (source-tree digests, artifact digests, VM settings) costs more "
        "than parsing them. Identical files are parsed and schema-checked once across the two "
        "revisions (the parse cache), and jsonschema-rs answers 'valid' in microseconds; the next "
        "step would be reusing a compiled workload when its document and source tree are "
        "unchanged between base and head.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if codes == {2} else 1


if __name__ == "__main__":
    raise SystemExit(main())
