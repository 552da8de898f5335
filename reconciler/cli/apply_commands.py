"""``apply`` and ``status``: converge this host once, and show what runs.

``apply`` makes the plan exactly as ``diff`` does (same pipeline), or takes a saved plan and
refuses it when the revision or the observed state moved since it was made; then the executor
builds, starts, stops and waits for health. Exit 0 when the fleet converged and is healthy.
With ``--trusted-key`` only a commit signed by a trusted key is read at all, and a revision
that does not descend from the applied one is refused unless ``--allow-non-descendant``.

``status`` on a store with a host registry (PostgreSQL) adds the host dimension
(``execution.host_status``): a hosts section, and every live host's VMs with their host rather
than only this machine's. On SQLite it is as it always was.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from reconciler.cli.build_commands import add_cache_option, cache_dir
from reconciler.cli.host import open_host
from reconciler.cli.options import (
    add_history_option,
    add_repo_options,
    add_state_option,
    revision_loader,
    state_dir,
    store_location,
)
from reconciler.cli.watch import printed, watch
from reconciler.daemon.leader_file import running_leader
from reconciler.errors import EXIT_ERROR, EXIT_OK, ConfigError, LeadershipError, PlanError
from reconciler.execution.events import print_event
from reconciler.execution.host_status import Judge, fleet_hosts, registry_of, vm_statuses
from reconciler.execution.status import (
    HostStatus,
    describe_pin,
    describe_rollout,
    fleet_status,
)
from reconciler.fleet_hosts import placement_hosts
from reconciler.formatting import aligned_columns, format_duration, short_sha
from reconciler.model import Plan, RevisionOutcome, short_digest
from reconciler.pipeline import plan_against_observed
from reconciler.render import render_text
from reconciler.source.history import require_descendant
from reconciler.state import FLEET_WIDE
from reconciler.state.hosts import HOST_GRACE_SECONDS, grace_problem


def register(commands: Any) -> None:
    apply = commands.add_parser("apply", help="converge this host to a revision, once")
    add_repo_options(apply)
    add_state_option(apply)
    add_cache_option(apply)
    add_history_option(apply)
    apply.add_argument("--rev", default=None, help="revision to apply (default: the ref)")
    apply.add_argument("plan", nargs="?", type=Path, help="a plan saved by `reconciler plan -o`")
    apply.add_argument(
        "--force-deletions",
        action="store_true",
        help="apply a plan that deletes more VMs than the Fleet's maxDeletions allows "
        "(never one that deletes a workload's preventDestroy VMs)",
    )
    apply.set_defaults(handler=run_apply)

    status = commands.add_parser("status", help="show the VMs that run and the revisions")
    add_state_option(status)
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.add_argument(
        "--watch", action="store_true", help="refresh until Ctrl-C (in place on a terminal)"
    )
    status.add_argument("--interval", type=float, default=2.0, help="--watch: seconds")
    status.add_argument(
        "--host-grace-seconds",
        type=float,
        default=HOST_GRACE_SECONDS,
        metavar="S",
        help="PostgreSQL store: a host silent for longer than this is shown lost "
        f"(default {HOST_GRACE_SECONDS:g})",
    )
    status.set_defaults(handler=run_status)


def _saved_plan(path: Path) -> Plan:
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot read the saved plan {path}: {exc}") from exc


def run_apply(args: argparse.Namespace) -> int:
    leader = running_leader(state_dir(args))
    if leader is not None:
        raise LeadershipError(
            f"the daemon {leader['holder']} (term {leader['term']}) manages this state directory; "
            "commit to the fleet repository, or run `reconciler reconcile --now`"
        )
    loader = revision_loader(args, create_digest_key=True)
    with open_host(args) as host:
        saved = _saved_plan(args.plan) if args.plan is not None else None
        revision = loader.resolve(saved.head if saved is not None else args.rev)
        applied = host.store.applied_revision()
        require_descendant(
            loader.source,
            applied.revision if applied else None,
            revision,
            allow=args.allow_non_descendant,
        )
        observed = host.observe()
        desired, plan = plan_against_observed(
            loader, revision, observed, force_deletions=args.force_deletions
        )
        if saved is not None:
            if saved.observed_version != observed.version:
                raise PlanError(
                    f"the fleet changed since {args.plan} was made (state version "
                    f"{saved.observed_version} -> {observed.version}); make a new plan"
                )
            if saved.actions != plan.actions:
                raise PlanError(f"{args.plan} no longer matches the revision; make a new plan")
        # Only now, with the saved plan checked against what it saw, does this run act.
        host.refresh()
        print(render_text(plan), end="")
        if not plan.has_changes:
            host.store.record_revision(revision, outcome=RevisionOutcome.APPLIED)
            return EXIT_OK
        report = host.converge(
            plan, desired, loader.source.checkout(revision), cache_dir(args), on_event=print_event
        )
        if not report.ok:
            for vm, why in sorted(report.unhealthy.items()):
                print(f"unhealthy {vm}: {why}")
            if report.rolled_back:
                print(f"rolled back to the last healthy artifact: {', '.join(report.rolled_back)}")
            return EXIT_ERROR
        print(f"applied {short_sha(revision)}: {len(report.applied)} actions, all VMs healthy")
        return EXIT_OK


def _judge(args: argparse.Namespace) -> Judge:
    grace: float = getattr(args, "host_grace_seconds", HOST_GRACE_SECONDS)
    return lambda records: placement_hosts(records, grace)


HOST_COLUMNS = ("HOST", "STATE", "VMS", "VCPUS", "MEMORY", "HEARTBEAT")


def render_hosts(hosts: list[HostStatus]) -> str:
    """The hosts section of ``status``: allocation is what the VMs a host reports were given,
    out of what it registered."""
    if not hosts:
        return "hosts:              none registered"
    cells = [
        [
            host["name"],
            host["state"],
            str(host["vms"]),
            f"{host['vcpus_allocated']}/{host['vcpus']}",
            f"{host['memory_allocated_mib']}/{host['memory_mib']}Mi",
            format_duration(host["heartbeat_age_seconds"]) + " ago",
        ]
        for host in hosts
    ]
    return aligned_columns(HOST_COLUMNS, cells)


def run_status(args: argparse.Namespace) -> int:
    problem = grace_problem(getattr(args, "host_grace_seconds", HOST_GRACE_SECONDS))
    if problem is not None:
        raise ConfigError(problem)
    if getattr(args, "watch", False):
        if args.interval <= 0:
            raise ConfigError("--interval must be more than 0 seconds")
        return watch(lambda: printed(lambda: _status_once(args)), args.interval)
    return _status_once(args)


def _status_once(args: argparse.Namespace) -> int:
    leader = running_leader(state_dir(args))
    with open_host(args) as host:
        # Reading: observe without recording (with a daemon leading, only it may write).
        observed = host.observe()
        applied = host.store.applied_revision()
        attempted = host.store.attempted_revision()
        suspended = host.store.suspensions()
        rollouts = host.store.rollouts()
        pins = host.store.pins()
        registry = registry_of(host.store)
        local = store_location(args).host
        hosts = (
            None
            if registry is None
            else fleet_hosts(registry, _judge(args), local=(local, observed))
        )
    status = fleet_status(
        observed,
        applied,
        attempted,
        suspended,
        state_dir=state_dir(args),
        rollouts=rollouts,
        pins=pins,
    )
    if hosts is not None:
        # A fleet across hosts: every live host's VMs, each with its host, not only this one's.
        status["vms"] = vm_statuses(hosts, time.time(), local=local, state_dir=state_dir(args))
        status["hosts"] = hosts.hosts
    vms = status["vms"]
    if args.format == "json":
        shown = {
            **status,
            "leader": {"holder": leader["holder"], "term": leader["term"], "url": leader["url"]}
            if leader
            else None,
        }
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    if leader:
        print(
            f"daemon:             {leader['holder']} leads, term {leader['term']}, {leader['url']}"
        )
    if suspended:
        print(
            "suspended:          "
            + ", ".join(
                ("the whole fleet" if w == FLEET_WIDE else w) + (f" ({why})" if why else "")
                for w, why in sorted(suspended.items())
            )
        )
    for rollout in status["rollouts"]:
        print(f"rollout:            {describe_rollout(rollout)}")
    for pin in status["pins"]:
        print(f"pinned:             {describe_pin(pin)}")
    print(f"applied revision:   {applied.revision if applied else '-'}")
    if attempted is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempted.at))
        print(
            f"attempted revision: {attempted.revision} ({attempted.outcome} at {when})"
            + (f": {attempted.message}" if attempted.outcome == RevisionOutcome.FAILED else "")
        )
    if hosts is not None:
        print(render_hosts(hosts.hosts))
    # The HOST column only where there are hosts: a single host's table stays as it was.
    host_column = (lambda vm: f"{vm.get('host', '-'):<14} ") if hosts is not None else None
    print(
        f"{'NAME':<14} "
        + (f"{'HOST':<14} " if host_column else "")
        + f"{'STATE':<8} {'HEALTHY':<8} {'ADDRESS':<15} {'PID':<8} "
        f"{'RUNTIME':<8} {'ARTIFACT':<13} {'UPTIME':>8} {'RESTARTS':>8}  LAST HEALTH"
    )
    for vm in vms:
        print(
            f"{vm['name']:<14} "
            + (host_column(vm) if host_column else "")
            + f"{vm['state']:<8} {'yes' if vm['healthy'] else 'no':<8} "
            f"{vm['address'] or '-':<15} {vm['pid'] or '-'!s:<8} {vm['runtime']:<8} "
            f"{short_digest(str(vm['artifact'])):<13} {format_duration(vm['uptime_seconds']):>8} "
            f"{vm['restarts']:>8}  {vm['detail']}"
        )
        for line in vm["console_tail"]:
            print(f"  | {line}")  # the console's last words of a VM that is not healthy
    return EXIT_OK
