"""Options shared by several commands, and turning them into the objects the commands use."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reconciler.pipeline import RevisionLoader
from reconciler.source import open_source
from reconciler.state import default_state_dir


def add_repo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo",
        default=".",
        help="fleet repository: a local path or a git URL (default: the current directory)",
    )
    parser.add_argument(
        "--path", default="", help="sub-directory of the repository holding the manifests"
    )
    parser.add_argument(
        "--ref", default=None, help="branch or tag to follow (default: HEAD / the default branch)"
    )


def add_state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory (default: $RECONCILER_STATE_DIR or ~/.local/state/reconciler)",
    )


def state_dir(args: argparse.Namespace) -> Path:
    chosen: Path | None = getattr(args, "state_dir", None)
    return chosen if chosen is not None else default_state_dir(os.environ)


def revision_loader(args: argparse.Namespace) -> RevisionLoader:
    source = open_source(args.repo, ref=args.ref, cache_dir=state_dir(args) / "git")
    return RevisionLoader(source=source, subpath=args.path)
