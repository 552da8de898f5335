"""What the HTTP layer may read of VM consoles: the seam between ``GET /api/vms/NAME/logs``
and the console logs in the state directory (pure; the implementation is
``reconciler.execution.console_logs``).

    http_api ──ConsoleLogs.lines(name, since, tail, follow)──▶ execution.console_logs
        ──▶ runtime.console_log (rotated files, time index)

Also the parsing of ``--since``/``since=`` durations, shared by the CLI and the API so both
accept the same words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol

from reconciler.errors import ConfigError

TAIL_MAX = 100_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``10m``, ``1h30m``, ``2d`` -> seconds (as ``nomad alloc logs``,
    ``docker logs --since`` and Go's durations read them); anything else is a ``ConfigError``."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ConfigError(f"not a duration: {text[:40]!r} (write 30s, 10m, 1h30m or 2d)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_tail(text: str) -> int:
    value = text.strip()
    if not value.isdigit() or int(value) > TAIL_MAX:
        raise ConfigError(f"tail must be a number of lines from 0 to {TAIL_MAX}, not {text[:40]!r}")
    return int(value)


class ConsoleLogs(Protocol):
    def exists(self, name: str) -> bool:
        """Whether this host has a console log for VM ``name`` (a VM it runs or ran)."""
        ...

    def lines(
        self,
        name: str,
        *,
        since: float | None,
        tail: int | None,
        follow: bool,
        stop: Callable[[], bool],
    ) -> Iterator[str]:
        """The VM's console lines, oldest first: written after the epoch time ``since``, the
        last ``tail``; with ``follow``, then each new line until ``stop()``."""
        ...
