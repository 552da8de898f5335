"""``history``, ``rollback``, ``unpin`` and ``describe``: what the fleet ran, going back to it,
and one VM seen whole.

    StateStore revisions + their artifacts ──▶ ``history [WORKLOAD]``
    ``rollback [--to REV] [--workload W]`` ──pin (unfenced, in the events)──▶ StateStore
        ◀── the leader's cycle reads the pins every cycle and converges onto them
    ``unpin [--workload W]`` ──lifts the pin──▶ the head runs again
    StateStore + console log + artifact cache (+ the repository) ──▶ ``describe VM``

A pin is the operator's intent, like a suspension: written whichever replica leads, never by
the fleet repository, and only ever to a revision this fleet applied before (so it was
verified and ran healthy once). The Git history stays the source of truth: a pin is shown by
``status``, the API and the page, and lasts until ``unpin``.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Any

from reconciler.cli.build_commands import add_cache_option, cache_dir
from reconciler.cli.options import (
    add_repo_options,
    add_state_option,
    revision_loader,
    state_dir,
    store_location,
)
from reconciler.daemon.leader_file import running_leader
from reconciler.errors import EXIT_OK, ConfigError, ReconcilerError
from reconciler.execution.status import (
    VMDescription,
    describe_vm,
    render_description,
    vm_revision,
)
from reconciler.formatting import short_sha
from reconciler.model import RevisionOutcome, short_digest
from reconciler.state import RevisionRecord, StateStore, open_state_store

HISTORY_SCANNED = 1000
"""How many revision records ``rollback`` and ``history`` look through."""


def register(commands: Any) -> None:
    history = commands.add_parser(
        "history", help="the revisions applied and attempted, with their artifacts"
    )
    add_state_option(history)
    history.add_argument("workload", nargs="?", default=None, help="only this workload's")
    history.add_argument("--limit", type=_count, default=20, help="revisions shown (default 20)")
    history.add_argument("--format", choices=["table", "json"], default="table")
    history.set_defaults(handler=run_history)

    rollback = commands.add_parser(
        "rollback",
        help="pin the fleet (or one workload) to an earlier applied revision until `unpin`",
    )
    add_state_option(rollback)
    rollback.add_argument(
        "--to",
        default=None,
        metavar="REV",
        help="an applied revision (a SHA or its prefix; default: the one applied before the "
        "current one)",
    )
    rollback.add_argument("--workload", default=None, help="pin this workload only")
    rollback.add_argument("--reason", default="", help="shown in status and the events")
    rollback.add_argument("--url", default=None, help="the daemon's URL (default: the leader)")
    rollback.set_defaults(handler=run_rollback)

    unpin = commands.add_parser("unpin", help="lift a rollback: follow the head again")
    add_state_option(unpin)
    unpin.add_argument("--workload", default=None, help="the workload's pin (default: fleet's)")
    unpin.add_argument("--url", default=None, help="the daemon's URL (default: the leader)")
    unpin.set_defaults(handler=run_unpin)

    describe = commands.add_parser(
        "describe", help="one VM: manifest, revision, artifact, build log, health, console"
    )
    add_repo_options(describe)
    add_state_option(describe)
    add_cache_option(describe)
    describe.add_argument("vm")
    describe.add_argument("--format", choices=["text", "json"], default="text")
    describe.set_defaults(handler=run_describe)


# -- history ----------------------------------------------------------------------------------


def run_history(args: argparse.Namespace) -> int:
    with open_state_store(store_location(args), existing=True) as store:
        records = store.revisions(HISTORY_SCANNED)
        rows = [(r, store.revision_artifacts(r.revision)) for r in records]
    if args.workload is not None:
        known = any(args.workload in artifacts for _, artifacts in rows)
        if not known:
            raise ConfigError(f"no applied revision ran a workload named {args.workload!r}")
        rows = [
            (r, a) for r, a in rows if r.outcome != RevisionOutcome.APPLIED or args.workload in a
        ]
    rows = rows[: args.limit]
    if args.format == "json":
        listed = [
            {
                "revision": r.revision,
                "outcome": r.outcome,
                "at": r.at,
                "message": r.message,
                "artifacts": {w: list(d) for w, d in sorted(a.items())}
                if args.workload is None
                else {args.workload: list(a.get(args.workload, ()))},
            }
            for r, a in rows
        ]
        print(json.dumps(listed, indent=2))
        return EXIT_OK
    if not rows:
        print("no revision was attempted yet")
        return EXIT_OK
    print(f"{'WHEN':<19} {'REVISION':<12} {'OUTCOME':<8} ARTIFACTS / MESSAGE")
    for record, recorded in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.at))
        artifacts = (
            recorded
            if args.workload is None
            else {args.workload: recorded[args.workload]}
            if args.workload in recorded
            else {}
        )
        ran = "  ".join(
            f"{w}={','.join(short_digest(d) for d in digests)}"
            for w, digests in sorted(artifacts.items())
        )
        detail = " ".join(part for part in (ran, record.message) if part) or "-"
        print(f"{when:<19} {short_sha(record.revision):<12} {record.outcome:<8} {detail}")
    return EXIT_OK


# -- rollback and unpin -----------------------------------------------------------------------


def applied_revisions(store: StateStore) -> list[RevisionRecord]:
    """The applied revisions, newest first, each once (its newest application)."""
    seen: set[str] = set()
    applied = []
    for record in store.revisions(HISTORY_SCANNED):
        if record.outcome == RevisionOutcome.APPLIED and record.revision not in seen:
            seen.add(record.revision)
            applied.append(record)
    return applied


def rollback_target(store: StateStore, to: str | None, workload: str | None) -> str:
    """The full SHA ``rollback`` pins: ``to`` (an applied revision, or an unambiguous prefix of
    one), or the revision applied before the current one; for a workload, the newest earlier
    one that ran other artifacts of it. ``ConfigError`` for anything else: a pin never names a
    revision this fleet did not apply."""
    applied = applied_revisions(store)
    if not applied:
        raise ConfigError("no revision was applied yet: there is nothing to roll back to")
    if to is not None:
        wanted = to.strip().lower()
        matches = [r.revision for r in applied if wanted and r.revision.startswith(wanted)]
        if len(matches) != 1:
            why = "matches several" if matches else "is not"
            raise ConfigError(
                f"{to[:70]!r} {why} an applied revision; `reconciler history` lists them"
            )
        revision = matches[0]
    else:
        current, earlier = applied[0], applied[1:]
        if workload is not None:
            running = store.revision_artifacts(current.revision).get(workload)
            differs = [
                r
                for r in earlier
                if store.revision_artifacts(r.revision).get(workload) not in (None, running)
            ]
            earlier = differs or earlier
        if not earlier:
            raise ConfigError(
                f"only {short_sha(current.revision)} was applied: there is nothing earlier"
            )
        revision = earlier[0].revision
    if workload is not None and workload not in store.revision_artifacts(revision):
        raise ConfigError(f"{short_sha(revision)} ran no workload named {workload!r}")
    return revision


def run_rollback(args: argparse.Namespace) -> int:
    with open_state_store(store_location(args), existing=True) as store:
        revision = rollback_target(store, args.to, args.workload)
        store.pin(args.workload, revision, args.reason)
    what = f"workload {args.workload}" if args.workload else "the fleet"
    print(
        f"pinned {what} at {short_sha(revision)}: the daemon converges onto it and stays there, "
        f"whatever is committed, until `reconciler unpin"
        f"{' --workload ' + args.workload if args.workload else ''}`"
    )
    _nudge(args, "rollback")
    return EXIT_OK


def run_unpin(args: argparse.Namespace) -> int:
    with open_state_store(store_location(args), existing=True) as store:
        if not store.unpin(args.workload):
            raise ConfigError(f"{args.workload or 'the fleet'} is not pinned")
    what = f"workload {args.workload}" if args.workload else "the fleet"
    print(f"unpinned {what}: the daemon follows the head again")
    _nudge(args, "unpinned")
    return EXIT_OK


def _count(text: str) -> int:
    """``--limit``: a positive number (a negative one would cut rows off the end)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _nudge(args: argparse.Namespace, reason: str) -> None:
    """Ask a running daemon to act now; it would at its next poll anyway."""
    if running_leader(state_dir(args)) is None:
        return
    # Imported here: the HTTP client is loaded only when a daemon runs.
    from reconciler.cli.daemon_commands import nudge_leader  # noqa: PLC0415

    nudge_leader(args, reason)


# -- describe ---------------------------------------------------------------------------------


def run_describe(args: argparse.Namespace) -> int:
    description = describe_from_cli(args)
    if args.format == "json":
        print(json.dumps(description, indent=2))
    else:
        print(render_description(description), end="")
    return EXIT_OK


def describe_from_cli(args: argparse.Namespace) -> VMDescription:
    """``describe``: reads the store, the VM's console log and the artifact cache, and the
    repository for the manifest; writes nothing."""
    with open_state_store(store_location(args), existing=True) as store:
        vm = store.observed().vms.get(args.vm)
        revision = vm_revision(store, vm.workload)[0] if vm is not None else None
        desired, root, problem = None, None, None
        if revision is not None:
            try:
                loader = revision_loader(args, decrypt=False)
                desired = loader.load(revision)
                root = loader.source.checkout(revision) / args.path
            except ReconcilerError as err:  # the rest of the description stands without it
                problem = str(err)
        description = describe_vm(
            store,
            args.vm,
            state_dir=state_dir(args),
            cache_dir=cache_dir(args),
            host=socket.gethostname(),
            desired=desired,
            manifest_root=root,
        )
    if problem is not None:
        description["manifest_error"] = problem
    return description
