"""How a revision, a duration and a table read to a human: one spelling for every command and page.

``reconciler status``, the daemon's status page, its log lines and events all show a commit as
``short_sha`` and an uptime as ``format_duration``, so an operator comparing the terminal with
the browser reads the same text. Pure; imported from every layer that shows something.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SHORT_SHA = 12  # long enough to be unique in any real fleet repository, short enough to read


def short_sha(revision: object) -> str:
    """The first ``SHORT_SHA`` characters of a commit; ``-`` for none."""
    return str(revision)[:SHORT_SHA] if revision else "-"


def format_duration(seconds: object) -> str:
    """``4m05s``, ``3h07m``, ``2d05h``: the two largest units; ``-`` for no (or no valid)
    duration. Accepts whatever a JSON status holds, so callers need not check it first."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def aligned_columns(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``header`` and ``rows`` as left-aligned columns two spaces apart, without trailing
    blanks: the tables of ``reconciler hosts`` and ``reconciler status``."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
