"""``--watch``: show a command's output again and again, in place on a terminal.

    render() ──text──▶ a terminal: ``rich.live.Live`` redraws it in place every interval
                  └──▶ anything else (a pipe, a file): each rendering after the last, separated
                       by a blank line, so a log of the watch reads top to bottom

Ctrl-C ends a watch with exit code 0: it is how a watch is meant to end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from io import StringIO
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from reconciler.errors import EXIT_OK


def printed(command: Callable[[], object]) -> str:
    """What ``command`` prints on stdout, captured (the one-shot command a watch repeats)."""
    buffer = StringIO()
    with redirect_stdout(buffer):
        command()
    return buffer.getvalue()


def watch(
    render: Callable[[], str],
    interval: float,
    *,
    out: TextIO | None = None,
    terminal: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Render every ``interval`` seconds until Ctrl-C; in place when ``out`` is a terminal
    (``terminal`` overrides the guess)."""
    out = sys.stdout if out is None else out
    in_place = out.isatty() if terminal is None else terminal
    try:
        if not in_place:
            while True:
                out.write(render() + "\n")
                out.flush()
                sleep(interval)
        console = Console(file=out, force_terminal=True, highlight=False)
        with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
            while True:
                stamp = time.strftime("%H:%M:%S")
                shown = Text(f"every {interval:g} s, {stamp}; Ctrl-C ends\n\n")
                shown.append(render())
                live.update(shown, refresh=True)
                sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
