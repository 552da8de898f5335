"""``validate``, ``diff`` and ``plan``: read a fleet at a revision and say what would change.

Exit codes follow Terraform's ``-detailed-exitcode``: 0 no changes, 2 changes, 1 error.

With a PostgreSQL ``--store`` the plan is placed on the live hosts (``plan_review.live_hosts``):
it shows where each VM goes and the moves between hosts, and a plan that does not fit them is
refused in one line (``planning.placed.CapacityError``, exit 1) before anything is rendered or
saved.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.cli.options import add_repo_options, add_state_option, revision_loader
from reconciler.cli.plan_review import (
    add_placement_options,
    add_review_options,
    add_worktree_option,
    close_worktree,
    place_on_live_hosts,
    render_plan,
    with_worktree,
)
from reconciler.errors import EXIT_CHANGES, EXIT_OK, ConfigError
from reconciler.model import Plan
from reconciler.pipeline import plan_against_observed, plan_between
from reconciler.planning import DeletionGuardError
from reconciler.render import RENDERERS, render_json


def register(commands: Any) -> None:
    validate = commands.add_parser(
        "validate", help="check a fleet revision without touching anything"
    )
    add_repo_options(validate)
    add_state_option(validate)
    validate.add_argument("--rev", default=None, help="revision to check (default: the ref)")
    add_worktree_option(validate)
    validate.set_defaults(handler=run_validate)

    for name, help_text in (
        ("diff", "show what applying a revision would change (exit 0 none, 2 changes, 1 error)"),
        ("plan", "like diff, and save the plan for a later apply with -o"),
    ):
        sub = commands.add_parser(name, help=help_text)
        add_repo_options(sub)
        add_state_option(sub)
        sub.add_argument(
            "--rev", default=None, help="revision to compare with the live fleet (default: ref)"
        )
        sub.add_argument("--base", default=None, help="compare two revisions: the base")
        sub.add_argument("--head", default=None, help="with --base: the head (default: ref)")
        sub.add_argument("--format", choices=sorted(RENDERERS), default="text")
        sub.add_argument(
            "--force-deletions",
            action="store_true",
            help="plan as apply --force-deletions would: lift the Fleet's maxDeletions "
            "(never a workload's preventDestroy)",
        )
        add_review_options(sub, name)
        add_placement_options(sub)
        if name == "plan":
            sub.add_argument(
                "-o", "--out", type=Path, required=True, help="write the plan as JSON here"
            )
        sub.set_defaults(handler=run_diff)


def run_validate(args: argparse.Namespace) -> int:
    loader = with_worktree(args, revision_loader(args, decrypt=False))
    try:
        desired = loader.load(args.rev)
    finally:
        close_worktree(args)
    print(
        f"ok: fleet {desired.fleet.name!r} at {desired.revision or 'the working tree'}: "
        f"{len(desired.workloads)} workloads, {len(desired.vms)} VMs, "
        f"{len(desired.artifacts)} artifacts"
    )
    return EXIT_OK


def make_plan(args: argparse.Namespace) -> Plan:
    if args.head is not None and args.base is None:
        raise ConfigError("--head needs --base (or use --rev to compare with the live fleet)")
    if args.base is not None and args.rev is not None:
        raise ConfigError("use either --rev (against the live fleet) or --base/--head, not both")
    # The live hosts first: a store that cannot be read fails before any checkout.
    hosts, not_placed = place_on_live_hosts(args)
    loader = with_worktree(args, revision_loader(args))
    force = args.force_deletions
    if args.base is not None:
        plan = plan_between(loader, args.base, args.head, force_deletions=force, hosts=hosts)
    else:
        from reconciler.cli.host import open_host  # noqa: PLC0415 (runtimes: the live fleet only)

        host = open_host(args)
        try:
            observed = host.observe()
            plan = plan_against_observed(
                loader, args.rev, observed, force_deletions=force, hosts=hosts
            )[1]
        finally:
            host.close()
    if not_placed is not None:
        plan = replace(plan, warnings=(*plan.warnings, not_placed))
    return plan


def run_diff(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except DeletionGuardError as refused:
        # The reviewer sees what would happen and why it will not; the plan is not saved.
        sys.stdout.write(render_plan(args, refused.plan))
        raise
    finally:
        close_worktree(args)
    sys.stdout.write(render_plan(args, plan))
    out: Path | None = getattr(args, "out", None)
    if out is not None:
        _write_plan(out, plan)
        print(f"plan saved to {out}", file=sys.stderr)
    # A move between hosts is a change too (a stop there, a start here), even in a plan whose
    # VMs are otherwise unchanged (a draining host).
    moves = plan.placement is not None and bool(plan.placement.moves)
    return EXIT_CHANGES if plan.has_changes or moves else EXIT_OK


def _write_plan(path: Path, plan: Plan) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(render_json(plan))
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the plan to {path}: {exc.strerror}") from exc
