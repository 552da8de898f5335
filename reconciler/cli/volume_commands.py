"""``reconciler volumes ls|rm|snapshot|restore``: the volumes of this host's VMs.

Volumes are declared in manifests (``deploy.volumes``) and made by ``apply``; these commands
look after what a manifest cannot say: which disks a prune kept (``reclaimPolicy: retain``) and
removing them, and copies taken and put back by hand (``execution/volumes.py`` does the work).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from reconciler.cli.host import open_host
from reconciler.cli.options import add_state_option, state_dir
from reconciler.daemon.leader_file import running_leader
from reconciler.errors import EXIT_OK, LeadershipError
from reconciler.execution import volumes
from runtime.volumes import list_snapshots


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "volumes", help="list, remove, snapshot and restore the volumes of this host's VMs"
    )
    sub = parser.add_subparsers(dest="volumes_command", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("ls", help="volumes and their snapshots, with sizes and times")
    add_state_option(ls)
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(handler=run_ls)

    rm = sub.add_parser("rm", help="delete a volume that no VM declares any more (its data!)")
    add_state_option(rm)
    rm.add_argument("volume", metavar="VM/NAME")
    rm.set_defaults(handler=run_rm)

    snap = sub.add_parser(
        "snapshot", help="copy a volume, consistent: its VM is paused while it is copied"
    )
    add_state_option(snap)
    snap.add_argument("volume", metavar="VM/NAME")
    snap.set_defaults(handler=run_snapshot)

    restore = sub.add_parser(
        "restore",
        help="put a snapshot back (stops the VM; the next apply starts it on the restored data)",
    )
    add_state_option(restore)
    restore.add_argument("volume", metavar="VM/NAME")
    restore.add_argument("--snapshot", default=None, help="which one (default: the latest)")
    restore.set_defaults(handler=run_restore)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}"


def run_ls(args: argparse.Namespace) -> int:
    directory = state_dir(args)
    with open_host(args) as host:
        found = volumes.rows(directory, host.store)
    snapshots = list_snapshots(directory)
    if args.format == "json":
        data = {
            "volumes": [
                {
                    "vm": r.info.vm,
                    "name": r.info.name,
                    "kind": "directory" if r.info.directory else "disk",
                    "path": str(r.info.path),
                    "size_bytes": r.info.size_bytes,
                    "used_bytes": r.info.used_bytes,
                    "modified": r.info.modified,
                    "attached": r.attached,
                    "reclaim_policy": r.reclaim_policy,
                    "vm_state": r.vm_state,
                }
                for r in found
            ],
            "snapshots": [
                {
                    "vm": s.vm,
                    "name": s.name,
                    "snapshot": s.stamp,
                    "size_bytes": s.size_bytes,
                    "used_bytes": s.used_bytes,
                    "taken": s.taken,
                }
                for s in snapshots
            ],
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"{'VOLUME':<28} {'KIND':<9} {'SIZE MiB':>9} {'USED MiB':>9} {'MODIFIED':<19}  STATUS")
    for r in found:
        status = (
            f"in use by {r.info.vm} ({r.vm_state}), reclaimPolicy {r.reclaim_policy}"
            if r.attached
            else "not declared by any VM: kept until `reconciler volumes rm`"
        )
        print(
            f"{r.info.vm + '/' + r.info.name:<28} "
            f"{'directory' if r.info.directory else 'disk':<9} {_mib(r.info.size_bytes):>9} "
            f"{_mib(r.info.used_bytes):>9} {_when(r.info.modified):<19}  {status}"
        )
    if snapshots:
        print()
        print(f"{'SNAPSHOT OF':<28} {'SNAPSHOT':<24} {'SIZE MiB':>9} {'USED MiB':>9}  TAKEN")
        for s in snapshots:
            print(
                f"{s.vm + '/' + s.name:<28} {s.stamp:<24} {_mib(s.size_bytes):>9} "
                f"{_mib(s.used_bytes):>9}  {_when(s.taken)}"
            )
    return EXIT_OK


def _refuse_under_daemon(args: argparse.Namespace, what: str) -> None:
    leader = running_leader(state_dir(args))
    if leader is not None:
        raise LeadershipError(
            f"the daemon {leader['holder']} (term {leader['term']}) manages this state "
            f"directory; suspend the workload before you {what}, or stop the daemon"
        )


def run_rm(args: argparse.Namespace) -> int:
    with open_host(args) as host:
        removed = volumes.remove(state_dir(args), host.store, args.volume)
    print(f"removed volume {args.volume} ({', '.join(p.name for p in removed)})")
    return EXIT_OK


def run_snapshot(args: argparse.Namespace) -> int:
    with open_host(args) as host:
        taken, how = volumes.snapshot(state_dir(args), host.store, host.runtimes, args.volume)
    print(
        f"snapshot {taken.stamp} of {args.volume}: {_mib(taken.used_bytes)} MiB used of "
        f"{_mib(taken.size_bytes)} MiB ({how} while copying)"
    )
    return EXIT_OK


def run_restore(args: argparse.Namespace) -> int:
    _refuse_under_daemon(args, "restore a volume")
    with open_host(args) as host:
        picked = volumes.restore(
            state_dir(args), host.store, host.runtimes, args.volume, args.snapshot
        )
    print(
        f"restored {args.volume} from snapshot {picked.stamp}; "
        "`reconciler apply` starts its VM again"
    )
    return EXIT_OK
