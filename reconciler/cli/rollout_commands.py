"""``reconciler promote WORKLOAD`` and ``reconciler abort WORKLOAD``: the operator's switches on
a progressive rollout (``planning.rollout``).

    CLI ──switch_rollout (unfenced, recorded in the events)──▶ state store ◀── the leader's
                                                                  cycle reads it and acts

Like a suspension, a switch is the operator's intent, not fleet state: it is written whichever
replica leads, and names the version of the rollout it was given for, so it never carries over
to a later revision's rollout.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from reconciler.cli.options import add_state_option, store_location
from reconciler.errors import EXIT_OK, ConfigError
from reconciler.model import RolloutCommand, RolloutPhase, RolloutSwitch
from reconciler.planning.rollout import ACTIVE
from reconciler.state import open_state_store

_HELP = {
    RolloutCommand.PROMOTE: "let a canary rollout go on to every replica now (no more soak)",
    RolloutCommand.ABORT: "roll a rollout back to the previous version and hold it there",
}


def register(commands: Any) -> None:
    for command in RolloutCommand:
        parser = commands.add_parser(command.value, help=_HELP[command])
        add_state_option(parser)
        parser.add_argument("workload")
        parser.add_argument("--url", default=None, help="the daemon's URL (default: the leader)")
        parser.set_defaults(handler=run_switch, rollout_command=command)


def run_switch(args: argparse.Namespace) -> int:
    command: RolloutCommand = args.rollout_command
    with open_state_store(store_location(args), existing=True) as store:
        state = store.rollouts().get(args.workload)
        if state is None or state.phase not in ACTIVE:
            shown = f" (its last one is {state.phase.value})" if state is not None else ""
            raise ConfigError(f"{args.workload} has no rollout in progress{shown}")
        if command is RolloutCommand.PROMOTE and state.phase is not RolloutPhase.CANARY:
            raise ConfigError(f"{args.workload} is promoted already")
        store.switch_rollout(RolloutSwitch(args.workload, command, state.version, time.time()))
    done = "promoted" if command is RolloutCommand.PROMOTE else "aborted"
    print(f"{args.workload}: rollout {done}; the daemon acts on it in its next cycle")
    # Imported here: the HTTP client is loaded only when a daemon runs. Without the nudge the
    # switch would wait for the next poll (30 s by default).
    from reconciler.cli.daemon_commands import nudge_leader  # noqa: PLC0415

    nudge_leader(args, f"reconciler {command.value} {args.workload}")
    return EXIT_OK
