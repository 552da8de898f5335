"""Benchmark: state store throughput, SQLite (the embedded default) against PostgreSQL, same
workload, same run.

Measured per store, each the median of ``--runs`` rounds of ``--ops`` operations on one handle
holding a leader's fence (every write is fenced, as the daemon's are):

* intents: ``begin_intent`` + ``complete_intent`` pairs per second (two durable commits each,
  what the executor pays around every VM action);
* observed-state writes: ``put_vm`` per second (one durable commit each);
* ``observed()`` reads of a 100-VM host per second.

PostgreSQL runs twice: with the term check alone, and with the daemon's PostgreSQL lease in the
same database (the lease row read ``FOR SHARE`` in every write).

Needs the local PostgreSQL (``deploy/start-postgres.sh``); ``$RECONCILER_TEST_POSTGRES`` is a
superuser DSN (default: the Unix socket). A scratch database is created and dropped.

Usage: ``.venv/bin/python bench/bench_store.py [--ops 500] [--runs 5] [--out
bench/results/store.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402
from support.fakes import fleet, running, workload  # noqa: E402

from reconciler.leadership import LeaseSettings  # noqa: E402
from reconciler.leadership.fence import Fence  # noqa: E402
from reconciler.leadership.postgres_lease import PostgresLease  # noqa: E402
from reconciler.state import LeaseBinding, StateStore, StoreLocation, open_state_store  # noqa: E402

ADMIN = os.environ.get("RECONCILER_TEST_POSTGRES", "host=/var/run/postgresql dbname=postgres")
TEMPLATE = next(iter(running(fleet(workload("web"))).vms.values()))


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"reconciler_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(ADMIN, dbname=name)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def rate(runs: int, ops: int, round_: Callable[[int], None]) -> float:
    """Median operations per second over ``runs`` rounds."""
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        round_(ops)
        rates.append(ops / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(store: StateStore, runs: int, ops: int) -> dict[str, float]:
    def intents(n: int) -> None:
        for i in range(n):
            store.complete_intent(store.begin_intent(f"web-{i % 100}", "create"))

    def puts(n: int) -> None:
        for i in range(n):
            store.put_vm(replace(TEMPLATE, name=f"web-{i % 100}", pid=i))

    def reads(n: int) -> None:
        for _ in range(n):
            store.observed()

    puts(100)  # a host of 100 VMs for the reads
    return {
        "intents (begin + complete) / s": rate(runs, ops, intents),
        "put_vm / s": rate(runs, ops, puts),
        "observed() of 100 VMs / s": rate(runs, max(10, ops // 5), reads),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "store.md")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open_state_store(Path(tmp) / "state") as store:
            store.claim_term(Fence(1, renew_deadline=3600))
            results["SQLite (WAL, synchronous=FULL)"] = measure(store, args.runs, args.ops)
        with scratch_database() as dsn:
            location = StoreLocation(Path(tmp), url=dsn, host="bench")
            with open_state_store(location) as store:
                store.claim_term(Fence(1, renew_deadline=3600))
                results["PostgreSQL, term check"] = measure(store, args.runs, args.ops)
        with (
            scratch_database() as dsn,
            PostgresLease(dsn, holder="bench", settings=LeaseSettings(3600, 3000, 2)) as lease,
        ):
            term = lease.try_acquire()
            assert term is not None
            bound = LeaseBinding(dsn, holder="bench")
            with open_state_store(
                StoreLocation(Path(tmp), url=dsn, host="bench", lease=bound)
            ) as store:
                store.claim_term(Fence(term, renew_deadline=3600))
                results["PostgreSQL, term + lease row"] = measure(store, args.runs, args.ops)
        with psycopg.connect(ADMIN) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            server = row[0] if row else "?"
            row = conn.execute("SHOW synchronous_commit").fetchone()
            sync = row[0] if row else "?"
    stores = list(results)
    metrics = list(results[stores[0]])
    lines = [
        "# State store throughput: SQLite and PostgreSQL",
        "",
        f"`bench/bench_store.py --ops {args.ops} --runs {args.runs}` on {platform.machine()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}; PostgreSQL {server} on the same machine over its Unix "
        f"socket (synchronous_commit={sync}), psycopg {psycopg.__version__}. One handle, "
        "every write fenced by a leader's term, one after the other (no concurrency). "
        "Medians of the runs, operations per second.",
        "",
        "| operation | " + " | ".join(stores) + " |",
        "|---|" + "---:|" * len(stores),
    ]
    for metric in metrics:
        cells = " | ".join(f"{results[s][metric]:,.0f}" for s in stores)
        lines.append(f"| {metric} | {cells} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    existing = args.out.read_text() if args.out.exists() else ""
    marker = "\n## Reading"
    reading = existing[existing.index(marker) :] if marker in existing else ""
    args.out.write_text(text + reading)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
