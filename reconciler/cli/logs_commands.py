"""``logs`` and ``console``: see inside a VM.

``logs VM [-f] [--since D] [--tail N]`` prints the VM's console (kernel and workload output), as
``nomad alloc logs`` does. When a daemon leads the state directory it asks it
(``GET /api/vms/NAME/logs`` with the API token, streamed, scrubbed by the daemon's redactor);
otherwise it reads the console log files itself (``execution.console_logs``), masking the VM's
env values as the daemon would. ``--since`` is resolved on the host's time index of the log
(``runtime/console_log.py``): it shows every line written since, and possibly a few older ones.

``console VM`` joins the terminal to a QEMU VM's serial console (``runtime/console_attach.py``);
Ctrl-] detaches. Process VMs have no console (their output is the log), and Firecracker's
serial console is its standard output, captured to the log, with no input: both are refused
with a pointer to ``logs``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from reconciler.cli.daemon_commands import TOKEN_OPENER, leader_endpoint
from reconciler.cli.options import add_state_option, state_dir, store_location
from reconciler.daemon.console_view import parse_duration, parse_tail
from reconciler.daemon.leader_file import running_leader
from reconciler.daemon.redaction import Redactor, env_values
from reconciler.errors import EXIT_OK, ConfigError, LeadershipError
from reconciler.execution.console_logs import StateDirConsoleLogs, checked_name
from reconciler.execution.vms import vm_dir
from reconciler.model import RuntimeKind
from reconciler.redact import redact_url
from reconciler.state import open_state_store
from runtime.console_attach import ESCAPE_NAME, attach
from runtime.qemu.argv import CONSOLE_SOCKET


def register(commands: Any) -> None:
    logs = commands.add_parser(
        "logs", help="print a VM's console (kernel and workload output); -f follows it"
    )
    add_state_option(logs)
    logs.add_argument("vm", metavar="VM", help="the VM's name, e.g. web-0")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "--since", type=parse_duration, metavar="DURATION", help="only lines since (10m, 1h30m)"
    )
    logs.add_argument("--tail", type=parse_tail, metavar="N", help="only the last N lines")
    logs.add_argument(
        "--url", default=None, help="ask this daemon (default: the one leading the state dir)"
    )
    logs.set_defaults(handler=run_logs)

    console = commands.add_parser(
        "console", help=f"attach to a QEMU VM's serial console (detach with {ESCAPE_NAME})"
    )
    add_state_option(console)
    console.add_argument("vm", metavar="VM", help="the VM's name, e.g. web-0")
    console.set_defaults(handler=run_console)


def _write(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()  # followed logs must show as they come


def run_logs(args: argparse.Namespace) -> int:
    name = checked_name(args.vm)
    if args.url is not None or running_leader(state_dir(args)) is not None:
        _write(_from_daemon(args, name))
        return EXIT_OK
    directory = state_dir(args)
    logs = StateDirConsoleLogs(directory)
    if not logs.exists(name):
        raise ConfigError(
            f"no console log for a VM named {name!r} in {directory} "
            "(`reconciler status` lists the VMs)"
        )
    redactor = Redactor(_env_values(args, name))
    since = None if args.since is None else time.time() - args.since
    lines = logs.lines(name, since=since, tail=args.tail, follow=args.follow)
    _write(redactor.text(line) for line in lines)
    return EXIT_OK


def _env_values(args: argparse.Namespace, name: str) -> list[str]:
    store = open_state_store(store_location(args), existing=True)
    try:
        vm = store.observed().vms.get(name)
    finally:
        store.close()
    return env_values(vm.settings) if vm is not None else []


def _from_daemon(args: argparse.Namespace, name: str) -> Iterable[str]:
    url, token, shown = leader_endpoint(args)
    query = {"follow": "1" if args.follow else "0"}
    if args.since is not None:
        query["since"] = f"{args.since:g}"
    if args.tail is not None:
        query["tail"] = str(args.tail)
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/vms/{urllib.parse.quote(name)}/logs?"
        + urllib.parse.urlencode(query),
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        # A followed stream may stay quiet for long: no read timeout then.
        response = TOKEN_OPENER.open(request, timeout=None if args.follow else 30)
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError, RecursionError):
                reason = exc.reason
        if exc.code == 404:
            raise ConfigError(f"{reason} (the daemon at {shown})") from exc
        if 300 <= exc.code < 400:
            target = redact_url(exc.headers.get("Location") or "elsewhere")
            reason = f"it redirects to {target}; not followed, so the token goes nowhere else"
        raise LeadershipError(f"the daemon at {shown} refused: {reason}") from exc
    except OSError as exc:
        raise LeadershipError(f"cannot reach the daemon at {shown}: {exc}") from exc
    with response:
        try:
            for raw in response:
                yield raw.decode("utf-8", "replace").rstrip("\n")
        except OSError as exc:
            raise LeadershipError(f"the daemon at {shown} ended the stream: {exc}") from exc


def run_console(args: argparse.Namespace) -> int:
    name = checked_name(args.vm)
    directory = state_dir(args)
    store = open_state_store(store_location(args), existing=True)
    try:
        vm = store.observed().vms.get(name)
    finally:
        store.close()
    if vm is None:
        raise ConfigError(f"no VM named {name!r} in {directory} (`reconciler status` lists them)")
    if vm.runtime is RuntimeKind.PROCESS:
        raise ConfigError(
            f"{name} is a host process (runtime process): it has no serial console; its output "
            f"is its log: `reconciler logs -f {name}`"
        )
    if vm.runtime is not RuntimeKind.QEMU:
        raise ConfigError(
            f"{name} runs under {vm.runtime.value}, whose serial console is the VMM's output, "
            f"captured to the log and taking no input here: `reconciler logs -f {name}`"
        )
    print(
        f"attached to {name}'s serial console; detach with {ESCAPE_NAME}",
        file=sys.stderr,
        flush=True,
    )
    how = attach(vm_dir(directory, name) / CONSOLE_SOCKET, sys.stdin.fileno(), sys.stdout.fileno())
    said = "detached from" if how == "detached" else "the VM closed the console of"
    print(f"\r\n{said} {name}", file=sys.stderr)
    return EXIT_OK
