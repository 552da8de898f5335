"""``apply`` and ``status``: converge this host once, and show what runs.

``apply`` makes the plan exactly as ``diff`` does (same pipeline), or takes a saved plan and
refuses it when the revision or the observed state moved since it was made; then the executor
builds, starts, stops and waits for health. Exit 0 when the fleet converged and is healthy.
With ``--trusted-key`` only a commit signed by a trusted key is read at all, and a revision
that does not descend from the applied one is refused unless ``--allow-non-descendant``.
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
)
from reconciler.cli.watch import printed, watch
from reconciler.daemon.leader_file import running_leader
from reconciler.errors import EXIT_ERROR, EXIT_OK, ConfigError, LeadershipError, PlanError
from reconciler.execution.events import print_event
from reconciler.execution.status import describe_pin, describe_rollout, fleet_status
from reconciler.formatting import format_duration, short_sha
from reconciler.model import Plan, RevisionOutcome, short_digest
from reconciler.pipeline import plan_against_observed
from reconciler.render import render_text
from reconciler.source.history import require_descendant
from reconciler.state import FLEET_WIDE


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


def run_status(args: argparse.Namespace) -> int:
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
    status = fleet_status(
        observed,
        applied,
        attempted,
        suspended,
        state_dir=state_dir(args),
        rollouts=rollouts,
        pins=pins,
    )
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
    print(
        f"{'NAME':<14} {'STATE':<8} {'HEALTHY':<8} {'ADDRESS':<15} {'PID':<8} "
        f"{'RUNTIME':<8} {'ARTIFACT':<13} {'UPTIME':>8} {'RESTARTS':>8}  LAST HEALTH"
    )
    for vm in vms:
        print(
            f"{vm['name']:<14} {vm['state']:<8} {'yes' if vm['healthy'] else 'no':<8} "
            f"{vm['address'] or '-':<15} {vm['pid'] or '-'!s:<8} {vm['runtime']:<8} "
            f"{short_digest(str(vm['artifact'])):<13} {format_duration(vm['uptime_seconds']):>8} "
            f"{vm['restarts']:>8}  {vm['detail']}"
        )
        for line in vm["console_tail"]:
            print(f"  | {line}")  # the console's last words of a VM that is not healthy
    return EXIT_OK
