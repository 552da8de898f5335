"""What ``diff`` adds for a review: the working tree as the head (``--worktree``), the
expected disruption in the Markdown plan (``--disruption-budget``), and where the VMs go on the
live hosts of a multi-host store.

    diff --worktree ──▶ WorktreeSource (reconciler.source.worktree) around the loader's source
    diff --format markdown ──▶ vm.timeline events (state store) ──▶ planning.disruption
                                                                ──▶ render_markdown(plan, estimate)
    diff --store postgresql://... ──▶ hosts() + assignments() ──fleet_hosts──▶ LiveHosts
                                                                ──▶ pipeline (planning.placed)

The measured start-to-healthy times are read from the command's store (``--store``, else
``RECONCILER_STORE``, else SQLite in the state directory); the SQLite one only when its
directory exists: a CI job reviewing a pull request has none and says "not measured yet", and
no command creates a state directory just to read it.

Placement needs the host registry, which only the PostgreSQL store keeps: with the SQLite store
(or none) a plan is not placed, exactly as before. A PostgreSQL store with no host registered
yet (daemons that share it only to elect a leader) is not placed either, and the plan says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from reconciler.cli.environment import read_environment
from reconciler.cli.options import state_dir, store_location
from reconciler.errors import ConfigError
from reconciler.model import Plan
from reconciler.pipeline import RevisionLoader
from reconciler.planning.disruption import (
    DEFAULT_BUDGET_SECONDS,
    estimate_disruption,
    start_to_healthy_samples,
)
from reconciler.render import RENDERERS, render_markdown
from reconciler.source.git import GitSource
from reconciler.source.worktree import WORKTREE, WorktreeSource

if TYPE_CHECKING:
    from reconciler.planning.placed import LiveHosts
from reconciler.state.hosts import HOST_GRACE_SECONDS, grace_problem

TIMELINE_EVENTS_READ = 2000  # the newest events scanned for measurements
NOT_PLACED = (
    "placement not shown: no host is registered in the store yet "
    "(daemons register with --host; `reconciler hosts` lists them)"
)


def add_worktree_option(parser: Any) -> None:
    parser.add_argument(
        "--worktree",
        action="store_true",
        help="read the uncommitted working tree of --repo (tracked and untracked, not ignored "
        "files) instead of a revision; diff: against --base REV or the live fleet",
    )


def add_review_options(parser: Any, command: str) -> None:
    if command == "diff":
        add_worktree_option(parser)
    parser.add_argument(
        "--disruption-budget",
        type=_seconds,
        default=DEFAULT_BUDGET_SECONDS,
        metavar="SECONDS",
        help="Markdown plan: warn when a workload would run below full capacity longer than "
        f"this (default {DEFAULT_BUDGET_SECONDS:g})",
    )


def add_placement_options(parser: Any) -> None:
    parser.add_argument(
        "--host-grace-seconds",
        type=float,
        default=HOST_GRACE_SECONDS,
        metavar="S",
        help="with a PostgreSQL --store: a host silent for longer than this counts as lost and "
        f"gets no VM (default {HOST_GRACE_SECONDS:g}, as `reconciler hosts`)",
    )


def place_on_live_hosts(args: argparse.Namespace) -> tuple[LiveHosts | None, str | None]:
    """What to place the plan on, or why it is not placed (a warning for the plan)."""
    live = live_hosts(args)
    if live is not None and not live.hosts:
        return None, NOT_PLACED
    return live, None


def live_hosts(args: argparse.Namespace) -> LiveHosts | None:
    """The live hosts to place the plan on: the registry and the current assignments of a
    PostgreSQL store (no hosts when none is registered); None with the SQLite store (one host:
    nothing to place)."""
    grace: float = args.host_grace_seconds
    problem = grace_problem(grace)
    if problem is not None:
        raise ConfigError(problem)
    if getattr(args, "store", None) is None and read_environment().store is None:
        return None  # the state directory's SQLite store: one host (and no store to import)
    # Imported here: the store's modules are no concern of a plan without one.
    from reconciler.state.location import SQLITE, open_host_registry  # noqa: PLC0415

    location = store_location(args)
    if location.kind == SQLITE:
        return None
    with open_host_registry(location) as registry:
        records = registry.hosts()
        current = assigned_hosts(registry.assignments()) if records else {}
    # Imported here: placement is only a multi-host store's, and ``diff`` starts in every PR.
    from reconciler.fleet_hosts import placement_hosts  # noqa: PLC0415
    from reconciler.planning.placed import LiveHosts  # noqa: PLC0415

    return LiveHosts(placement_hosts(records, grace), current)


def assigned_hosts(assignments: Mapping[str, object]) -> dict[str, str]:
    """VM -> host out of the store's assignments (VM -> record), whatever the record: a
    ``(host, term)`` tuple or a record with a ``host``. The host is all a plan reads of them;
    the term and the revision that placed a VM are the leader's business."""
    return {str(vm): _host_of(record) for vm, record in sorted(assignments.items())}


def _host_of(record: object) -> str:
    host = getattr(record, "host", None)
    if host is None and isinstance(record, tuple):
        host = record[0]
    return str(host)


def with_worktree(args: argparse.Namespace, loader: RevisionLoader) -> RevisionLoader:
    """With ``--worktree``: ``loader`` reading the working tree as its head revision."""
    if not getattr(args, "worktree", False):
        return loader
    if getattr(args, "head", None) is not None or args.rev is not None:
        raise ConfigError("--worktree is the head: give --base REV (or nothing), not --head/--rev")
    if not isinstance(loader.source, GitSource):
        raise ConfigError(
            "--worktree cannot be verified with --trusted-key: uncommitted files carry no "
            "signature; commit and sign, or drop --trusted-key for this review"
        )
    source = WorktreeSource(loader.source, state_dir(args) / "git")
    args.worktree_source = source  # closed by ``close_worktree`` when the command is done
    loader.source = source
    if getattr(args, "base", None) is not None:
        args.head = WORKTREE
    else:
        args.rev = WORKTREE
    return loader


def close_worktree(args: argparse.Namespace) -> None:
    """Remove the working tree's export, if ``with_worktree`` made one. (A killed command's
    export is removed by a later one: ``source.worktree`` prunes those of dead processes.)"""
    source: WorktreeSource | None = getattr(args, "worktree_source", None)
    if source is not None:
        source.close()


def render_plan(args: argparse.Namespace, plan: Plan) -> str:
    """The plan in ``--format``; Markdown with the expected disruption."""
    if args.format != "markdown":
        return RENDERERS[args.format](plan)
    estimate = estimate_disruption(plan, measured_start_to_healthy(args), args.disruption_budget)
    return render_markdown(plan, estimate)


def measured_start_to_healthy(args: argparse.Namespace) -> dict[str, list[float]]:
    """Workload -> the newest start-to-healthy times the daemon recorded, newest first."""
    from reconciler.state import open_state_store  # noqa: PLC0415 (as in ``live_hosts``)
    from reconciler.state.location import SQLITE  # noqa: PLC0415

    location = store_location(args)  # --store / RECONCILER_STORE, as every other command
    if location.kind == SQLITE and not location.state_dir.is_dir():
        return {}
    with open_state_store(location) as store:
        events = store.events(TIMELINE_EVENTS_READ)
    return start_to_healthy_samples((e.kind, e.message) for e in events)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    return value
