"""Parser and dispatch for ``reconciler``; see ``main``."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from reconciler import __version__
from reconciler.cli import fleet_commands
from reconciler.daemon.logs import LOG_FORMATS, configure_logging
from reconciler.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, ConfigError, ReconcilerError


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which ``diff`` reserves for "changes": raise instead."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


# Commands that read a fleet revision and nothing else. Invoked by name, only their module is
# loaded: a pull request's `diff` starts without importing the runtimes, builders or daemon.
FLEET_COMMANDS = frozenset({"validate", "diff", "plan"})


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given ``argv`` naming a fleet command, of that module's
    commands alone (the rest would only cost imports)."""
    parser = _Parser(
        prog="reconciler",
        description="GitOps for microVM fleets: converge VMs onto the manifests in a Git repo.",
    )
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    fleet_commands.register(commands)
    if argv is not None and _command_of(argv) in FLEET_COMMANDS:
        return parser
    from reconciler.cli import (  # noqa: PLC0415 (see FLEET_COMMANDS)
        apply_commands,
        build_commands,
        check_command,
        daemon_commands,
        forge_commands,
        history_commands,
        hosts_commands,
        logs_commands,
        rollout_commands,
        volume_commands,
    )

    build_commands.register(commands)
    check_command.register(commands)
    apply_commands.register(commands)
    daemon_commands.register(commands)
    forge_commands.register(commands)
    history_commands.register(commands)
    hosts_commands.register(commands)
    logs_commands.register(commands)
    rollout_commands.register(commands)
    volume_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        configure_logging(
            getattr(args, "log_format", LOG_FORMATS[0]),
            args.verbose,
            level=getattr(args, "log_level", logging.WARNING),
            keep_foreign=True,
        )
        code: int = args.handler(args)
        return code
    except ReconcilerError as err:
        lines = err.lines()
        for line in lines[:-1]:
            print(line, file=sys.stderr)
        last = lines[-1]
        print(last if last.startswith("error:") else f"error: {last}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `reconciler status | head`: the reader has what it wanted. Point stdout at /dev/null
        # so the interpreter's final flush does not fail again with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def entrypoint() -> NoReturn:
    # Everything the reconciler writes (state, artifacts, VM directories, logs) is its owner's
    # alone; a path that another identity must read is opened up explicitly where it is made.
    os.umask(0o077)
    code = main()
    if threading.active_count() == 1:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, having done what it would have done that
    anybody could notice: the exit handlers (logging's flush and ``weakref.finalize`` among
    them) and the flush of the standard streams.

    The teardown frees every object one by one: after a diff of 10,000 workloads, millions of
    them, a fifth of a second of the command's time, where the kernel takes the pages back at
    once. Only for a process with no other thread left, which the teardown would wait for."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # ``reconciler diff | head``: the reader has what it wanted
            code = code or EXIT_BROKEN_PIPE
        except (OSError, ValueError):  # a stream closed or gone: nothing left to write to
            pass
    os._exit(code)
