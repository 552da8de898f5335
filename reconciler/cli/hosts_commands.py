"""``hosts``: the fleet's hosts as the registry of the shared PostgreSQL store sees them, and the
operator's switches on one of them.

    PostgresStateStore.hosts() ──fleet_hosts.placement_hosts(grace)──▶ table | JSON
    ``hosts cordon|uncordon|drain NAME`` ──set_host_flag (unfenced, in the events)──▶ registry

Cordon and drain are the operator's switches, like suspensions and pins: they are written
whichever replica leads, or when none does (a host is often cordoned *because* something is
wrong), and are never fenced. Fencing keeps a deposed leader's decisions out of the store; a
switch is not a leader's decision, and the leader reads it at every placement. ``uncordon``
clears both switches: the host takes VMs again. ``drain`` only sets the switch: the leader's
next cycle moves the draining host's VMs to other hosts, wave by wave as each workload's rollout
policy allows (``execution.fleet_host``, ``planning.placement.move_plan``), so the command
returns at once and ``hosts`` shows the host's VM count fall to 0.

The SQLite store is one host and has no registry: every ``hosts`` command refuses it in one
line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from reconciler.cli.options import add_state_option, store_location
from reconciler.errors import EXIT_OK, ConfigError
from reconciler.fleet_hosts import host_facts
from reconciler.formatting import aligned_columns, format_duration
from reconciler.state.hosts import HOST_GRACE_SECONDS, HostRecord, grace_problem
from reconciler.state.location import open_host_registry

LIST = "list"
# action -> (cordoned, draining, what the operator reads afterwards)
SWITCHES: dict[str, tuple[bool | None, bool | None, str]] = {
    "cordon": (True, None, "cordoned: it takes no new VM; the VMs it runs stay"),
    "uncordon": (False, False, "uncordoned: it takes VMs again"),
    "drain": (
        None,
        True,
        "marked draining: it takes no new VM, and the leader moves its VMs to other hosts, "
        "wave by wave as each workload's rollout policy allows",
    ),
}


def register(commands: Any) -> None:
    hosts = commands.add_parser(
        "hosts",
        help="the fleet's hosts (PostgreSQL store): capacity, health, VMs; "
        "cordon, uncordon or drain one",
        description="Without an action: list the hosts. `hosts cordon NAME`: no new VM there; "
        "`hosts uncordon NAME`: takes VMs again; "
        "`hosts drain NAME`: its VMs move to other hosts, wave by wave.",
    )
    add_state_option(hosts)
    hosts.add_argument(
        "action", nargs="?", default=LIST, choices=(LIST, *SWITCHES), help="default: list"
    )
    hosts.add_argument("name", nargs="?", default=None, metavar="NAME", help="the host")
    hosts.add_argument("--format", choices=["table", "json"], default="table")
    hosts.add_argument(
        "--host-grace-seconds",
        type=float,
        default=HOST_GRACE_SECONDS,
        metavar="S",
        help=f"a host silent for longer than this is shown lost (default {HOST_GRACE_SECONDS:g})",
    )
    hosts.set_defaults(handler=run_hosts)


def run_hosts(args: argparse.Namespace) -> int:
    if args.action == LIST:
        if args.name is not None:
            raise ConfigError(f"hosts: unexpected {args.name!r}; an action comes first")
        return _list(args)
    if args.name is None:
        raise ConfigError(f"hosts {args.action} needs the host's NAME")
    cordoned, draining, said = SWITCHES[args.action]
    with open_host_registry(store_location(args)) as registry:
        registry.set_host_flag(args.name, cordoned=cordoned, draining=draining)
    print(f"{args.name} {said}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    grace: float = args.host_grace_seconds
    problem = grace_problem(grace)
    if problem is not None:
        raise ConfigError(problem)
    with open_host_registry(store_location(args)) as registry:
        records = registry.hosts()
    rows = [host_row(record, grace) for record in records]
    if args.format == "json":
        print(json.dumps({"grace_seconds": grace, "hosts": rows}, indent=2))
        return EXIT_OK
    if not rows:
        print("no host registered: start `reconciler daemon --store postgresql://... --host NAME`")
        return EXIT_OK
    print(render_table(rows))
    return EXIT_OK


def host_row(record: HostRecord, grace: float) -> dict[str, Any]:
    facts = host_facts(record, grace)
    registered = record.registration
    return {
        "name": record.name,
        "state": facts.state,
        "epoch": record.epoch,
        "vcpus": registered.vcpus,
        "memory_mib": registered.memory_mib,
        "disk_mib": registered.disk_mib,
        "runtimes": sorted(runtime.value for runtime in registered.runtimes),
        "kvm": registered.kvm,
        "labels": dict(sorted(registered.labels.items())),
        "cordoned": record.cordoned,
        "draining": record.draining,
        "lost": facts.lost,
        "heartbeat_age_seconds": round(record.heartbeat_age, 3),
        "registered_at": record.registered_at,
        "heartbeat_at": record.heartbeat_at,
        "vms": record.vms,
    }


COLUMNS = (
    "NAME",
    "STATE",
    "EPOCH",
    "VCPUS",
    "MEMORY",
    "DISK",
    "RUNTIMES",
    "LABELS",
    "HEARTBEAT",
    "VMS",
)


def render_table(rows: list[dict[str, Any]]) -> str:
    cells = [
        [
            str(row["name"]),
            str(row["state"]),
            str(row["epoch"]),
            str(row["vcpus"]),
            f"{row['memory_mib']}Mi",
            f"{row['disk_mib']}Mi",
            ",".join(row["runtimes"]) + ("+kvm" if row["kvm"] else "") or "-",
            ",".join(f"{k}={v}" for k, v in row["labels"].items()) or "-",
            format_duration(row["heartbeat_age_seconds"]) + " ago",
            str(row["vms"]),
        ]
        for row in rows
    ]
    return aligned_columns(COLUMNS, cells)
