"""Command-line interface: argument parsing, and the one place where errors become exit codes.

``main(argv) -> int`` never raises for an expected failure: a ``ReconcilerError`` is printed as
one line (or one line per manifest problem) on stderr and mapped to its exit code.
"""

from reconciler.cli.main import entrypoint, main

__all__ = ["entrypoint", "main"]
