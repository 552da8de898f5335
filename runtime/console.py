"""Reading the guest init's console markers (``@@reconciler {...}`` lines, see guest/README.md)
from a VM's console log. Every VM runtime judges guest health from these, never from the VMM
process alone: a VMM that runs a guest whose kernel panicked is not a healthy VM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "@@reconciler "


def read_markers(console_log: Path) -> list[dict[str, Any]]:
    """Every well-formed marker of the log, in order; a missing log has none. The markers of
    bytes rotated out of the log (``<log>.markers``, see ``console_log.py``) come first."""
    text = ""
    for part in (console_log.with_name(f"{console_log.name}.markers"), console_log):
        try:
            text += part.read_text(errors="replace")
        except FileNotFoundError:
            continue
        if text and not text.endswith("\n"):
            text += "\n"
    if not text:
        return []
    markers: list[dict[str, Any]] = []
    for line in text.splitlines():
        start = line.find(MARKER)
        if start < 0:
            continue
        try:
            value = json.loads(line[start + len(MARKER) :])
        except ValueError:
            continue  # a line cut by the console or interleaved with kernel output
        if isinstance(value, dict) and "event" in value:
            markers.append(value)
    return markers


def last_event(markers: list[dict[str, Any]], *events: str) -> dict[str, Any] | None:
    matching = [marker for marker in markers if str(marker["event"]) in events]
    return matching[-1] if matching else None
