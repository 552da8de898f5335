"""Opening this machine's host (state store, runtimes) for a command, from its options."""

from __future__ import annotations

import argparse

from reconciler.cli.options import state_dir, store_location
from reconciler.execution.host import LocalHost, open_host_at

__all__ = ["LocalHost", "open_host"]


def open_host(args: argparse.Namespace) -> LocalHost:
    return open_host_at(state_dir(args), store_location(args))
