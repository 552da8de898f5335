"""``apply`` and ``status``: converge this host once, and show what runs.

``apply`` makes the plan exactly as ``diff`` does (same pipeline), or takes a saved plan and
refuses it when the revision or the observed state moved since it was made; then the executor
builds, starts, stops and waits for health. Exit 0 when the fleet converged and is healthy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from builders.cache import ArtifactCache
from builders.kernels import KernelRegistry
from builders.matrix import MatrixBuilder
from reconciler.cli.build_commands import add_cache_option, cache_dir
from reconciler.cli.host import open_host
from reconciler.cli.options import add_repo_options, add_state_option, revision_loader
from reconciler.errors import EXIT_ERROR, EXIT_OK, PlanError
from reconciler.execution.executor import Executor
from reconciler.model import Plan, short_digest
from reconciler.pipeline import plan_against_observed
from reconciler.render import render_text
from runtime.network import Network, scope_for


def register(commands: Any) -> None:
    apply = commands.add_parser("apply", help="converge this host to a revision, once")
    add_repo_options(apply)
    add_state_option(apply)
    add_cache_option(apply)
    apply.add_argument("--rev", default=None, help="revision to apply (default: the ref)")
    apply.add_argument("plan", nargs="?", type=Path, help="a plan saved by `reconciler plan -o`")
    apply.set_defaults(handler=run_apply)

    status = commands.add_parser("status", help="show the VMs that run and the revisions")
    add_state_option(status)
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(handler=run_status)


def _saved_plan(path: Path) -> Plan:
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot read the saved plan {path}: {exc}") from exc


def run_apply(args: argparse.Namespace) -> int:
    loader = revision_loader(args)
    host = open_host(args)
    try:
        saved = _saved_plan(args.plan) if args.plan is not None else None
        revision = loader.resolve(saved.head if saved is not None else args.rev)
        observed = host.observe()
        desired, plan = plan_against_observed(loader, revision, observed)
        if saved is not None:
            if saved.observed_version != observed.version:
                raise PlanError(
                    f"the fleet changed since {args.plan} was made (state version "
                    f"{saved.observed_version} -> {observed.version}); make a new plan"
                )
            if saved.actions != plan.actions:
                raise PlanError(f"{args.plan} no longer matches the revision; make a new plan")
        print(render_text(plan), end="")
        if not plan.has_changes:
            host.store.record_revision(revision, outcome="applied")
            return EXIT_OK
        network = Network(
            desired.fleet.network,
            host.state_dir / "state.db",
            scope=scope_for(str(host.state_dir.resolve())),
        )
        builder = MatrixBuilder(
            loader.source.checkout(revision),
            ArtifactCache(cache_dir(args)),
            KernelRegistry(host.state_dir / "kernels"),
        )
        executor = Executor(host.store, host.state_dir, builder, host.runtimes, network)
        report = executor.apply(plan, desired)
        network.close()
        if not report.ok:
            for vm, why in sorted(report.unhealthy.items()):
                print(f"unhealthy {vm}: {why}")
            if report.rolled_back:
                print(f"rolled back to the last healthy artifact: {', '.join(report.rolled_back)}")
            return EXIT_ERROR
        print(f"applied {revision[:12]}: {len(report.applied)} actions, all VMs healthy")
        return EXIT_OK
    finally:
        host.close()


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_status(args: argparse.Namespace) -> int:
    host = open_host(args)
    try:
        observed = host.observe()
        applied = host.store.applied_revision()
        attempted = host.store.attempted_revision()
    finally:
        host.close()
    now = time.time()
    vms = [
        {
            "name": vm.name,
            "workload": vm.workload,
            "state": vm.state.value,
            "healthy": bool(vm.healthy),
            "address": vm.address,
            "pid": vm.pid,
            "artifact": vm.artifact_digest,
            "runtime": vm.runtime.value,
            "detail": vm.detail,
            "uptime_seconds": round(now - vm.started_at, 1)
            if vm.started_at and vm.state.value == "running"
            else None,
            "restarts": vm.restarts,
        }
        for vm in observed.vms.values()
    ]
    if args.format == "json":
        print(
            json.dumps(
                {
                    "applied_revision": applied.revision if applied else None,
                    "attempted_revision": attempted.revision if attempted else None,
                    "last_error": attempted.message
                    if attempted and attempted.outcome == "failed"
                    else None,
                    "vms": vms,
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"applied revision:   {applied.revision if applied else '-'}")
    if attempted is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempted.at))
        print(
            f"attempted revision: {attempted.revision} ({attempted.outcome} at {when})"
            + (f": {attempted.message}" if attempted.outcome == "failed" else "")
        )
    print(
        f"{'NAME':<14} {'STATE':<8} {'HEALTHY':<8} {'ADDRESS':<15} {'PID':<8} "
        f"{'RUNTIME':<8} {'ARTIFACT':<13} {'UPTIME':>8} {'RESTARTS':>8}  LAST HEALTH"
    )
    for vm in vms:
        print(
            f"{vm['name']:<14} {vm['state']:<8} {'yes' if vm['healthy'] else 'no':<8} "
            f"{vm['address'] or '-':<15} {vm['pid'] or '-'!s:<8} {vm['runtime']:<8} "
            f"{short_digest(str(vm['artifact'])):<13} {_duration(vm['uptime_seconds']):>8} "
            f"{vm['restarts']:>8}  {vm['detail']}"
        )
    return EXIT_OK
