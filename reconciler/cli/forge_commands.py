"""``pr-comment``: post a plan on a pull (merge) request, or update the one posted before.

    reconciler diff --base A --head B --format markdown > plan.md
    RECONCILER_FORGE_TOKEN=... reconciler pr-comment --provider github ... --body-file plan.md

The CI jobs in ``deploy/ci/`` run it after ``diff``. The token comes from
``$RECONCILER_FORGE_TOKEN`` only, never from an argument (arguments show in ``ps`` and in CI
logs). One comment per request: the first line of the comment is a hidden marker, and the next
run edits that comment instead of adding another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reconciler.cli.environment import FORGE_TOKEN_ENV, read_environment
from reconciler.errors import EXIT_OK, ConfigError
from reconciler.forge import COMMENT_MARKER, PROVIDERS, open_forge

MAX_BODY_BYTES = 4 * 1024 * 1024

DEFAULT_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}


def register(commands: Any) -> None:
    sub = commands.add_parser(
        "pr-comment",
        help="post a plan as the pull request's comment, or update the one posted before "
        f"(token from ${FORGE_TOKEN_ENV})",
    )
    sub.add_argument("--provider", choices=PROVIDERS, required=True)
    sub.add_argument(
        "--api-url",
        default=None,
        help="API base URL (default: https://api.github.com or https://gitlab.com/api/v4; "
        "GitHub Enterprise: https://HOST/api/v3, self-managed GitLab: https://HOST/api/v4)",
    )
    sub.add_argument(
        "--repository",
        required=True,
        help="GitHub: OWNER/NAME; GitLab: the project id or its GROUP/NAME path",
    )
    sub.add_argument(
        "--pr", type=int, required=True, help="pull request number (GitLab: merge request iid)"
    )
    sub.add_argument(
        "--body-file", type=Path, required=True, help="the comment (Markdown); - for stdin"
    )
    sub.add_argument(
        "--marker",
        default=COMMENT_MARKER,
        help=f"hidden first line that finds the comment to update (default: {COMMENT_MARKER}); "
        "give each job posting to one request its own",
    )
    sub.set_defaults(handler=run_pr_comment)


def run_pr_comment(args: argparse.Namespace) -> int:
    token = read_environment().forge_token
    if not token:
        raise ConfigError(
            f"${FORGE_TOKEN_ENV} is not set: give the forge API token in that variable "
            "(never as an argument)"
        )
    body = _read_body(args.body_file)
    forge = open_forge(
        args.provider, args.api_url or DEFAULT_API[args.provider], args.repository, token
    )
    outcome = forge.upsert_pr_comment(args.pr, body, args.marker)
    kind = "pull request" if args.provider == "github" else "merge request"
    print(f"{outcome} the plan comment on {args.provider} {kind} #{args.pr}")
    return EXIT_OK


def _read_body(path: Path) -> str:
    try:
        raw = (
            sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
            if str(path) == "-"
            else _read_limited(path, MAX_BODY_BYTES + 1)
        )
    except OSError as exc:
        raise ConfigError(f"cannot read the comment body {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BODY_BYTES:
        raise ConfigError(f"the comment body {path} is larger than {MAX_BODY_BYTES} bytes")
    text = raw.decode("utf-8", "replace")
    if not text.strip():
        raise ConfigError(f"the comment body {path} is empty; did the diff step fail?")
    return text


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit)
