"""VM consoles read from the state directory: ``reconciler logs`` without a daemon, the
daemon's ``GET /api/vms/NAME/logs`` and the last lines that ``status`` shows for an unhealthy VM.

    <state dir>/vms/<name>/console.log(.N) ──runtime.console_log──▶ StateDirConsoleLogs
        ──▶ cli.logs_commands (text), daemon.http_api (a chunked stream), execution.status

A VM name arrives from a URL or a command line: it must be a VM name (a DNS label) before it
becomes a path, so ``../`` and friends never leave ``<state dir>/vms``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.execution.vms import vm_dir
from runtime.console_log import LOG, ConsoleLog

VM_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
STATUS_LINES = 12  # the console lines an unhealthy VM's status carries


def checked_name(name: str) -> str:
    if not VM_NAME.fullmatch(name):
        raise ConfigError(f"not a VM name: {name[:70]!r} (`reconciler status` lists them)")
    return name


class StateDirConsoleLogs:
    """The ``ConsoleLogs`` of the VMs whose directories are under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def log(self, name: str) -> ConsoleLog:
        return ConsoleLog(vm_dir(self.state_dir, checked_name(name)))

    def exists(self, name: str) -> bool:
        if not VM_NAME.fullmatch(name):
            return False
        directory = vm_dir(self.state_dir, name)
        return (directory / LOG).exists() or (directory / f"previous-{LOG}").exists()

    def lines(
        self,
        name: str,
        *,
        since: float | None = None,
        tail: int | None = None,
        follow: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[str]:
        log = self.log(name)
        if follow:
            return log.follow(since=since, tail=tail, stop=stop)
        return iter(log.read(since=since, tail=tail))


def last_lines(state_dir: Path, name: str, count: int = STATUS_LINES) -> list[str]:
    """The last ``count`` non-blank console lines of VM ``name`` (none when it has no log):
    what status shows of an unhealthy VM, kernel messages, the workload's last words and the
    init's exit marker included."""
    if not VM_NAME.fullmatch(name):
        return []
    try:
        lines = ConsoleLog(vm_dir(state_dir, name)).read(tail=count * 2)
    except OSError:
        return []
    return [line for line in lines if line.strip()][-count:]
