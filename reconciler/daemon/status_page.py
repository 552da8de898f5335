"""The daemon's read-only status page (``GET /``): server-rendered HTML, no JavaScript.

    DaemonView.status() + events(50) ──Redactor.json (http_api)──▶ page_context
        ──▶ templates/status.html.j2 ──▶ HTML
    ?vm=NAME: DescribesVMs.describe_vm(NAME) ──▶ the VM's panel (``describe``'s data)

The page is rendered from the same scrubbed status and events that ``/api/status`` and
``/api/events`` answer with (never the store, git or runtimes), shows the same data as
``reconciler status``, refreshes itself every few seconds with a meta tag,
and loads nothing from elsewhere. jinja2 autoescapes every value: VM details, error messages and
event text come from guests, git and manifests, so they are untrusted.

Elements carry stable ids and ``data-`` attributes (``id="leader"``, ``id="last-error"``,
``id="vms"``, ``<tr data-vm="web-0" data-healthy="true">``, ``id="pins"``, ``id="vm-panel"``,
``id="hosts"``, ``<tr data-host="host-a" data-state="ready">``) for tests and scrapers. The
hosts table and the VMs' host column appear only for a fleet across hosts (a status with
``hosts``); host names and labels are the hosts' own word, escaped like everything else.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jinja2

from reconciler.formatting import format_duration, short_sha

EVENTS_SHOWN = 50
REFRESH_SECONDS = 5

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("reconciler.daemon", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,  # a typo in the template fails the tests, not silently
    trim_blocks=True,
    lstrip_blocks=True,
)


def format_time(at: object) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool) or at <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _healthy(value: object) -> str:
    if value is None:
        return "unknown"
    return "true" if value else "false"


def _fleet_name(status: Mapping[str, Any]) -> str | None:
    fleet = status.get("fleet")
    if isinstance(fleet, Mapping):
        fleet = fleet.get("name")
    return str(fleet) if fleet else None


def _pin_text(pin: Mapping[str, Any], head: object) -> str:
    """``execution.status.describe_pin``'s line, from the status JSON (this layer sees only
    the view's payloads)."""
    workload = pin.get("workload")
    text = f"{'workload ' + str(workload) if workload else 'the fleet'}: pinned at "
    text += short_sha(pin.get("revision"))
    if head and head != pin.get("revision"):
        text += f" (head is {short_sha(head)})"
    if pin.get("reason"):
        text += f": {pin['reason']}"
    return text


def _vm_panel(vm: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The VM panel (``?vm=NAME``): ``describe``'s data with times formatted."""
    if vm is None:
        return None
    if "error" in vm:
        return {"error": str(vm["error"])}
    manifest = vm.get("manifest") or {}
    where = str(manifest.get("file") or "")
    if where and manifest.get("line"):
        where += f":{manifest['line']}"

    def entries(key: str) -> list[dict[str, Any]]:
        return [
            {
                "at": format_time(entry.get("at")),
                "kind": entry.get("kind") or "",
                "detail": entry.get("detail") or "",
                "healthy": _healthy(entry.get("healthy")),
                "term": entry.get("term") if entry.get("term") is not None else "",
            }
            for entry in vm.get(key) or []
        ]

    return {
        "error": "",
        "name": str(vm.get("name", "")),
        "workload": vm.get("workload") or "",
        "host": vm.get("host") or "",
        "revision": short_sha(vm.get("revision")),
        "revision_full": vm.get("revision") or "",
        "pinned": bool(vm.get("pinned")),
        "manifest": where or "unknown",
        "artifact": vm.get("artifact") or "",
        "last_term": vm.get("last_term") if vm.get("last_term") is not None else "-",
        "boot": [
            {
                "at": format_time(marker.get("at")),
                "event": marker.get("event") or "",
                "detail": marker.get("detail") or "",
            }
            for marker in vm.get("boot") or []
        ],
        "probes": entries("probes"),
        "actions": entries("actions"),
        "build_log": [str(line) for line in vm.get("build_log") or []],
        "console_tail": [str(line) for line in vm.get("console_tail") or []],
    }


def _hosts(hosts: object) -> list[dict[str, Any]] | None:
    if not isinstance(hosts, list):
        return None

    def number(value: object) -> str:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else "?"

    return [
        {
            "name": str(host.get("name", "")),
            "state": str(host.get("state") or "unknown"),
            "vms": number(host.get("vms")),
            "assigned": number(host.get("assigned")),
            "vcpus": f"{number(host.get('vcpus_allocated'))} / {number(host.get('vcpus'))}",
            "memory": f"{number(host.get('memory_allocated_mib'))} / "
            f"{number(host.get('memory_mib'))} MiB",
            "heartbeat": format_duration(host.get("heartbeat_age_seconds")) + " ago",
            "labels": ", ".join(
                f"{key}={value}" for key, value in sorted((host.get("labels") or {}).items())
            ),
        }
        for host in hosts
        if isinstance(host, dict)
    ]


def page_context(
    status: Mapping[str, Any],
    events: list[dict[str, Any]],
    *,
    now: float | None = None,
    vm: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the template shows, normalised from the status JSON (fields may be missing or
    null: a follower that never observed, a daemon before its first cycle)."""
    now = time.time() if now is None else now
    leader = status.get("leader") or {}
    daemon = status.get("daemon") or {}
    suspended = status.get("suspended") or {}
    vms = sorted(status.get("vms") or [], key=lambda vm: str(vm.get("name", "")))
    errors: list[str] = []
    for error in (status.get("last_error"), daemon.get("last_error")):
        # The revision's failure and the daemon's last cycle error are often the same text.
        if error and str(error) not in errors:
            errors.append(str(error))
    return {
        "refresh": REFRESH_SECONDS,
        "generated_at": format_time(now),
        "fleet": _fleet_name(status),
        "leader": {
            "known": bool(leader),
            "holder": leader.get("holder") or "",
            "term": leader.get("term"),
            "is_leader": bool(leader.get("is_leader")),
            "me": leader.get("me") or daemon.get("id") or "",
            "error": leader.get("lease_error") or "",
        },
        "applied": {
            "short": short_sha(status.get("applied_revision")),
            "full": status.get("applied_revision") or "",
        },
        "attempted": {
            "short": short_sha(status.get("attempted_revision")),
            "full": status.get("attempted_revision") or "",
            "outcome": status.get("attempted_outcome") or "",
            "at": format_time(status.get("attempted_at")),
        },
        "errors": errors,
        "daemon": {
            "last_cycle_at": format_time(daemon.get("last_cycle_at")),
            "last_outcome": daemon.get("last_outcome") or "",
            "backoff_until": format_time(daemon.get("backoff_until")),
            "started_at": format_time(daemon.get("started_at")),
        },
        "suspended": {
            "fleet": bool(suspended.get("fleet")),
            "workloads": [str(w) for w in suspended.get("workloads") or []],
        },
        # The operator's pins (``reconciler rollback``): new commits wait until unpinned.
        "pins": [
            {
                "workload": str(p.get("workload") or ""),
                "revision": str(p.get("revision") or ""),
                "text": _pin_text(p, daemon.get("head")),
            }
            for p in status.get("pins") or []
            if isinstance(p, dict)
        ],
        "panel": _vm_panel(vm),
        # Progressive rollouts under way or rolled back (``planning.rollout``), one line each.
        "rollouts": [
            {
                "workload": str(r.get("workload", "")),
                "phase": str(r.get("phase", "")),
                "text": str(r.get("summary", "")),
            }
            for r in status.get("rollouts") or []
            if isinstance(r, dict)
        ],
        # A fleet across hosts (``execution.host_status``); None: one host, no hosts table.
        "hosts": _hosts(status.get("hosts")),
        "vms": [
            {
                "name": str(vm.get("name", "")),
                "host": str(vm.get("host") or "-"),
                "workload": vm.get("workload") or "",
                "state": vm.get("state") or "unknown",
                "healthy": _healthy(vm.get("healthy")),
                "address": vm.get("address") or "-",
                "runtime": vm.get("runtime") or "-",
                "uptime": format_duration(vm.get("uptime_seconds")),
                "restarts": vm.get("restarts") if vm.get("restarts") is not None else "-",
                "detail": vm.get("detail") or "",
                # The console's last lines of a VM that is not healthy (why it is not).
                "console_tail": [str(line) for line in vm.get("console_tail") or []],
            }
            for vm in vms
        ],
        "vm_counts": {
            "total": len(vms),
            "healthy": sum(1 for vm in vms if vm.get("healthy")),
        },
        "events": [
            {
                "id": event.get("id", ""),
                "at": format_time(event.get("at")),
                "kind": event.get("kind") or "",
                "subject": event.get("subject") or "",
                "message": event.get("message") or "",
                "term": event.get("term") if event.get("term") is not None else "",
            }
            for event in events
        ],
    }


def render_page(
    status: Mapping[str, Any],
    events: list[dict[str, Any]],
    *,
    now: float | None = None,
    vm: Mapping[str, Any] | None = None,
) -> str:
    """The page; with ``vm`` (a ``describe`` of one VM, or ``{"error": ...}``), its panel."""
    context = page_context(status, events, now=now, vm=vm)
    return _ENV.get_template("status.html.j2").render(context)
