"""Benchmark: what rendering ``*.yaml.j2`` templates in a resource-limited child costs.

Every template of a revision is rendered in one child process forked from a forkserver, under
CPU, memory, output and wall-clock limits (``reconciler/manifests/templates.py``). Measured on
fleet-example (one template) and on a fleet of 1,000 templated workloads:

* ``load_fleet`` wall time, cold (the first call of the process, which starts the forkserver)
  and warm (median of ``--runs`` calls, each with a fresh parse cache);
* the same templates rendered in process with the sandboxed environment, as the loader did
  before: the work itself, without the child;
* the child's share: one fork, the pickling of templates and results.

Usage: ``.venv/bin/python bench/bench_templates.py [--runs 5] [--out bench/results/templates.md]``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import jinja2  # noqa: E402
from jinja2.sandbox import SandboxedEnvironment  # noqa: E402

from reconciler.manifests import DEFAULT_LIMITS, ParseCache, load_fleet  # noqa: E402
from reconciler.manifests.templates import render_templates  # noqa: E402

WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata:
  name: w{index}
  labels: {{team: "{{{{ team }}}}", tier: "{{{{ 'gold' if {index} % 2 else 'silver' }}}}"}}
spec:
  source: {{path: src, language: c, entrypoint: main.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    replicas: 1
    env:
{{% for key, value in env.items() %}}      {{{{ key }}}}: "{{{{ value }}}}-{index}"
{{% endfor %}}"""

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {name: bench}
spec:
  variables:
    team: platform
    env: {A: a, B: b, C: c, D: d}
"""


def big_fleet(root: Path, count: int) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "fleet.yaml").write_text(FLEET)
    for index in range(count):
        (root / f"w{index:04d}.yaml.j2").write_text(WORKLOAD.format(index=index))
    return root


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def in_process(root: Path, variables: dict[str, object]) -> float:
    """Render every template of ``root`` in this process, as the loader did before."""
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    texts = [p.read_text() for p in sorted(root.rglob("*.yaml.j2"))]
    return timed(lambda: [env.from_string(t).render(variables) for t in texts])


def measure(root: Path, runs: int, variables: dict[str, object]) -> dict[str, float]:
    cold = timed(lambda: load_fleet(root, cache=ParseCache()))
    warm = statistics.median(
        timed(lambda: load_fleet(root, cache=ParseCache())) for _ in range(runs)
    )
    texts = [(str(p), p.read_text()) for p in sorted(root.rglob("*.yaml.j2"))]
    child = statistics.median(
        timed(lambda: render_templates(texts, variables, DEFAULT_LIMITS)) for _ in range(runs)
    )
    inline = statistics.median(in_process(root, variables) for _ in range(runs))
    # The daemon has threads, so its children come from a forkserver (started once).
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        render_templates(texts, variables, DEFAULT_LIMITS)  # starts the forkserver
        server = statistics.median(
            timed(lambda: render_templates(texts, variables, DEFAULT_LIMITS)) for _ in range(runs)
        )
    finally:
        stop.set()
        thread.join()
    return {
        "cold": cold,
        "warm": warm,
        "child": child,
        "server": server,
        "inline": inline,
        "count": len(texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--templates", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/templates.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "example"
        shutil.copytree(PROJECT / "fleet-example", example)
        variables = dict(load_fleet(example).fleet.variables)
        rows.append(("fleet-example", measure(example, args.runs, variables)))
        big = big_fleet(Path(tmp) / "big", args.templates)
        variables = {"team": "platform", "env": {"A": "a", "B": "b", "C": "c", "D": "d"}}
        rows.append((f"{args.templates} templated workloads", measure(big, args.runs, variables)))

    lines = [
        "# Template rendering in a limited child process",
        "",
        f"Generated by `bench/bench_templates.py` ({args.runs} runs, medians) on "
        f"{platform.machine()}, Python {platform.python_version()}. The first row of each "
        "fleet is a whole `load_fleet` (parse, render, validate, compile); *cold* is the first "
        "call of a process, which also starts the forkserver (once per process).",
        "",
        "| fleet | templates | load_fleet cold | load_fleet warm | render in child (fork) | "
        "render in child (forkserver, daemon) | render in process | child overhead (fork) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['count']:.0f} | {m['cold'] * 1000:.0f} ms | {m['warm'] * 1000:.0f} ms "
            f"| {m['child'] * 1000:.1f} ms | {m['server'] * 1000:.1f} ms "
            f"| {m['inline'] * 1000:.1f} ms "
            f"| {(m['child'] - m['inline']) * 1000:.1f} ms |"
        )
    lines += [
        "",
        "*Render in child* is `render_templates` for all the templates of the fleet (one child, "
        "templates and results through a pipe): forked directly in a single-threaded process (a "
        "CLI command), from the forkserver in a process with threads (the daemon; the "
        "forkserver's start, once per process, is not counted). *Render in process* renders the "
        "same templates in this process with the same sandboxed environment and no limits, as "
        "the loader did before. The difference is what the limits cost per revision; the "
        "machine is shared, so differences of a few ms are noise.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
