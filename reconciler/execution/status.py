"""The fleet's status as plain data: shared by ``reconciler status`` and the daemon's
``/api/status`` and status page, so both say the same thing.

    StateStore (observed VMs, revisions) ──fleet_status──▶ FleetStatus ──▶ table, JSON or HTML
    console logs (``console_logs.last_lines``) ─┘ the last lines of each VM that is not healthy

The operator's pins (``reconciler rollback``) are part of it: a pinned fleet says so wherever
its status is shown (``describe_pin``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NotRequired, TypedDict

from builders.cache import ArtifactCache
from reconciler.errors import ConfigError
from reconciler.execution.console_logs import checked_name, last_lines
from reconciler.execution.vms import vm_dir
from reconciler.formatting import short_sha
from reconciler.model import (
    DesiredFleet,
    ObservedFleet,
    ObservedVM,
    RevisionOutcome,
    RolloutPhase,
    RolloutState,
    RuntimeKind,
    VMState,
)
from reconciler.state import FLEET_WIDE, Pin, RevisionRecord, StateStore
from runtime.console import read_markers
from runtime.console_log import LOG, ConsoleLog


class SuspendedStatus(TypedDict):
    fleet: bool  # the whole fleet is suspended
    workloads: list[str]  # the suspended workloads, by name


class VMStatus(TypedDict):
    name: str
    workload: str
    state: str  # a ``VMState`` value
    healthy: bool
    address: str | None
    pid: int | None
    artifact: str  # the artifact's input digest
    runtime: str  # a ``RuntimeKind`` value
    detail: str  # the last health verdict, or why the VM is not running
    uptime_seconds: float | None  # None unless running
    restarts: int
    console_tail: list[str]  # the last console lines of a VM that is not healthy
    host: NotRequired[str]  # the host that reports it (a store with a host registry only)


class RolloutStatus(TypedDict):
    """A progressive rollout under way, or rolled back and held (``planning.rollout``)."""

    workload: str
    phase: str  # canary | promoted | aborted
    revision: str | None
    started_at: float
    canaries: list[str]  # while in the canary phase
    soak_remaining_seconds: float | None  # canaries healthy, soaking
    waiting_for_promote: bool  # soaked, autoPromote false
    message: str  # why it was rolled back, or what it waits for
    summary: str  # all of the above in one line (``describe_rollout``)


class PinStatus(TypedDict):
    """An operator's pin (``reconciler rollback``): held there until ``reconciler unpin``."""

    workload: str | None  # None: the whole fleet
    revision: str
    reason: str
    at: float


class HostStatus(TypedDict):
    """One host of a fleet that spans hosts (``execution.host_status``)."""

    name: str
    state: str  # ready | cordoned | draining | lost (``HostFacts.state``)
    epoch: int  # its registration epoch
    vms: int  # VMs it reports it runs
    assigned: int  # VMs the leader's assignments place on it
    vcpus_allocated: int  # what the VMs it reports (all but stopped ones) were given
    vcpus: int  # its capacity, as registered
    memory_allocated_mib: int
    memory_mib: int
    heartbeat_age_seconds: float  # by the database clock
    labels: dict[str, str]


class FleetStatus(TypedDict):
    """``reconciler status --format json``; the daemon's ``/api/status`` adds to it."""

    suspended: SuspendedStatus
    pins: list[PinStatus]
    rollouts: list[RolloutStatus]
    applied_revision: str | None
    attempted_revision: str | None
    attempted_outcome: str | None
    attempted_at: float | None
    last_error: str | None  # the attempted revision's failure, when it failed
    vms: list[VMStatus]
    hosts: NotRequired[list[HostStatus]]  # a store with a host registry only (PostgreSQL)


def fleet_status(
    observed: ObservedFleet,
    applied: RevisionRecord | None,
    attempted: RevisionRecord | None,
    suspended: Mapping[str, str],
    *,
    now: float | None = None,
    state_dir: Path | None = None,
    rollouts: Mapping[str, RolloutState] | None = None,
    pins: Mapping[str, Pin] | None = None,
) -> FleetStatus:
    """The JSON of ``reconciler status --format json``; ``suspended`` as the store keeps it.
    With ``state_dir``, a VM that is not healthy carries its last console lines
    (``console_tail``: why it is not, in one place); a healthy one an empty list."""
    now = time.time() if now is None else now
    return {
        "suspended": {
            "fleet": FLEET_WIDE in suspended,
            "workloads": sorted(w for w in suspended if w != FLEET_WIDE),
        },
        "pins": [
            {
                "workload": None if key == FLEET_WIDE else key,
                "revision": pin.revision,
                "reason": pin.reason,
                "at": pin.at,
            }
            for key, pin in sorted((pins or {}).items())
        ],
        "rollouts": [
            rollout_status(state, now)
            for _, state in sorted((rollouts or {}).items())
            if state.phase is not RolloutPhase.COMPLETE
        ],
        "applied_revision": applied.revision if applied else None,
        "attempted_revision": attempted.revision if attempted else None,
        "attempted_outcome": attempted.outcome if attempted else None,
        "attempted_at": attempted.at if attempted else None,
        "last_error": attempted.message
        if attempted and attempted.outcome == RevisionOutcome.FAILED
        else None,
        "vms": [vm_status(vm, now, state_dir) for vm in observed.vms.values()],
    }


def vm_status(vm: ObservedVM, now: float, state_dir: Path | None) -> VMStatus:
    """One VM's row; with ``state_dir``, the last console lines of one that is not healthy."""
    return {
        "name": vm.name,
        "workload": vm.workload,
        "state": vm.state.value,
        "healthy": bool(vm.healthy),
        "address": vm.address,
        "pid": vm.pid,
        "artifact": vm.artifact_digest,
        "runtime": vm.runtime.value,
        "detail": vm.detail,
        "uptime_seconds": round(now - vm.started_at, 1)
        if vm.started_at and vm.state is VMState.RUNNING
        else None,
        "restarts": vm.restarts,
        "console_tail": last_lines(state_dir, vm.name)
        if state_dir is not None and not vm.healthy
        else [],
    }


def rollout_status(state: RolloutState, now: float) -> RolloutStatus:
    soaking = state.phase is RolloutPhase.CANARY and state.canaries_healthy_since is not None
    remaining = (
        max(0.0, state.soak_seconds - (now - state.canaries_healthy_since))
        if soaking and state.canaries_healthy_since is not None
        else None
    )
    status: RolloutStatus = {
        "workload": state.workload,
        "phase": state.phase.value,
        "revision": state.revision,
        "started_at": state.started_at,
        "canaries": list(state.canaries),
        "soak_remaining_seconds": round(remaining, 1) if remaining is not None else None,
        "waiting_for_promote": state.awaiting_promote,
        "message": state.message,
        "summary": "",
    }
    status["summary"] = describe_rollout(status)
    return status


def describe_rollout(rollout: RolloutStatus) -> str:
    """One line of a rollout for the text status."""
    name = rollout["workload"]
    if rollout["phase"] == RolloutPhase.ABORTED:
        return f"{name}: rolled back: {rollout['message']}"
    if rollout["phase"] == RolloutPhase.PROMOTED:
        return f"{name}: promoted, rolling out to every replica"
    text = f"{name}: canary {', '.join(rollout['canaries'])}"
    if rollout["waiting_for_promote"]:
        return f"{text} soaked; waiting for `reconciler promote {name}`"
    if rollout["soak_remaining_seconds"] is not None:
        return f"{text} healthy, soak {rollout['soak_remaining_seconds']:.0f} s left"
    return f"{text} starting"


def describe_pin(pin: PinStatus, head: str | None = None) -> str:
    """One line of a pin: ``the fleet: pinned at REV (head is REV2)``."""
    what = f"workload {pin['workload']}" if pin["workload"] else "the fleet"
    text = f"{what}: pinned at {short_sha(pin['revision'])}"
    if head is not None and head != pin["revision"]:
        text += f" (head is {short_sha(head)})"
    if pin["reason"]:
        text += f": {pin['reason']}"
    lift = (
        f"reconciler unpin --workload {pin['workload']}" if pin["workload"] else "reconciler unpin"
    )
    return f"{text}; `{lift}` lifts it"


# -- one VM, whole (``reconciler describe``, ``/api/vms/NAME``, the page's panel) ----------------

BUILD_LOG_LINES = 40  # the end of an artifact's build log that a description carries
CONSOLE_LINES = 20


class ManifestLocation(TypedDict):
    file: str  # relative to the fleet's directory in the repository
    line: int | None  # of the workload's name in it, when found


class BootMarker(TypedDict):
    event: str  # a guest init marker: booted, workload-started, workload-exited ...
    at: float | None  # host time: the VMM's start plus the guest's clock
    guest_seconds: float | None  # seconds since the guest kernel started (process VM: its init)
    detail: str  # the marker's other fields


class HistoryEntry(TypedDict):
    at: float
    kind: str  # action, rollback, health
    detail: str
    healthy: bool | None
    term: int | None


class VMDescription(TypedDict):
    name: str
    workload: str
    host: str  # this machine's name (one host per state directory for now)
    state: str
    healthy: bool
    address: str | None
    pid: int | None
    runtime: str
    detail: str
    revision: str | None  # what it is converged onto: its pin, the fleet's, or the applied one
    pinned: bool
    manifest: ManifestLocation | None
    manifest_error: str | None  # why the manifest could not be read, when it could not
    artifact: str
    build_log: list[str]  # the end of the artifact's build log (kept with the artifact)
    build_log_path: str | None
    boot: list[BootMarker]
    probes: list[HistoryEntry]  # health verdicts, newest first
    actions: list[HistoryEntry]  # actions and rollbacks, newest first
    rollbacks: list[HistoryEntry]
    last_term: int | None  # the leader's term that last acted on it
    console_tail: list[str]


def vm_revision(store: StateStore, workload: str) -> tuple[str | None, bool]:
    """The revision a workload's VMs are converged onto, and whether a pin holds it there."""
    pins = store.pins()
    pin = pins.get(workload) or pins.get(FLEET_WIDE)
    if pin is not None:
        return pin.revision, True
    applied = store.applied_revision()
    return (applied.revision if applied else None), False


def describe_vm(
    store: StateStore,
    name: str,
    *,
    state_dir: Path,
    cache_dir: Path,
    host: str,
    desired: DesiredFleet | None = None,
    manifest_root: Path | None = None,
) -> VMDescription:
    """Everything known of VM ``name``, read from the store, its console log and the artifact
    cache; with the desired fleet of its revision and that revision's fleet directory, its
    manifest file and line. Reads only: nothing is written (``ConfigError`` for an unknown
    VM, or a name that is not one)."""
    vm = store.observed().vms.get(checked_name(name))
    if vm is None:
        raise ConfigError(f"no VM named {name!r} (`reconciler status` lists them)")
    revision, pinned = vm_revision(store, vm.workload)
    history = [
        HistoryEntry(at=e.at, kind=e.kind, detail=e.detail, healthy=e.healthy, term=e.term)
        for e in store.vm_history(vm.name)
    ]
    acted = [e for e in history if e["kind"] in ("action", "rollback")]
    log_path = _build_log(cache_dir, vm.artifact_digest)
    return {
        "name": vm.name,
        "workload": vm.workload,
        "host": host,
        "state": vm.state.value,
        "healthy": bool(vm.healthy),
        "address": vm.address,
        "pid": vm.pid,
        "runtime": vm.runtime.value,
        "detail": vm.detail,
        "revision": revision,
        "pinned": pinned,
        "manifest": _manifest_of(desired, vm.workload, manifest_root),
        "manifest_error": None,
        "artifact": vm.artifact_digest,
        "build_log": _tail(log_path, BUILD_LOG_LINES) if log_path else [],
        "build_log_path": str(log_path) if log_path else None,
        "boot": _boot_markers(state_dir, vm.name, host_clock=vm.runtime is RuntimeKind.PROCESS),
        "probes": [e for e in history if e["kind"] == "health"],
        "actions": acted,
        "rollbacks": [e for e in history if e["kind"] == "rollback"],
        "last_term": next((e["term"] for e in acted if e["term"] is not None), None),
        "console_tail": last_lines(state_dir, vm.name, CONSOLE_LINES),
    }


def _manifest_of(
    desired: DesiredFleet | None, workload: str, root: Path | None
) -> ManifestLocation | None:
    declared = desired.workloads.get(workload) if desired is not None else None
    if declared is None or not declared.declared_in:
        return None
    line = None
    if root is not None:
        try:
            text = (root / declared.declared_in).read_text(errors="replace")
        except OSError:
            text = ""
        line = _metadata_line(text, workload)
    return {"file": declared.declared_in, "line": line}


def _metadata_line(text: str, name: str) -> int | None:
    """The line of the ``metadata`` that names ``name`` (block or flow style) in a manifest
    file's text: where its document starts to say what it is."""
    quoted = rf"['\"]?{re.escape(name)}['\"]?(?=\s*(?:[,}}#]|$))"
    pattern = re.compile(
        rf"^[ \t]*metadata:(?:[ \t]*\{{[^}}]*?|[ \t]*\n(?:[ \t]+.*\n)*?[ \t]+)name:[ \t]*{quoted}",
        re.MULTILINE,
    )
    found = pattern.search(text)
    return text.count("\n", 0, found.start()) + 1 if found else None


def _build_log(cache_dir: Path, digest: str) -> Path | None:
    """The build log kept with the artifact built for ``digest`` (``builders.cache``)."""
    entry = ArtifactCache(cache_dir).find(digest)
    if entry is None:
        return None
    path = entry.file(str(entry.manifest.get("log", "build.log")))
    return path if path.is_file() else None


def _tail(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


def _boot_markers(state_dir: Path, name: str, *, host_clock: bool = False) -> list[BootMarker]:
    """The guest init's markers of the current boot, with host times. A guest's ``t`` counts
    from its kernel's start; the init of a process VM (``host_clock``) reads the host's own
    CLOCK_MONOTONIC, which counts from the host's boot, so it maps straight onto wall time, and
    its ``guest_seconds`` count from the init's first marker (a host's uptime says nothing)."""
    directory = vm_dir(state_dir, name)
    try:
        booted = ConsoleLog(directory).boot()
    except OSError:
        booted = None
    if host_clock:
        booted = time.time() - time.monotonic()
    markers: list[BootMarker] = []
    origin: float | None = None
    for marker in read_markers(directory / LOG):
        t = marker.get("t")
        clock = float(t) if isinstance(t, int | float) else None
        if host_clock and origin is None:
            origin = clock
        guest = clock - origin if host_clock and clock is not None and origin is not None else clock
        rest = {k: v for k, v in marker.items() if k not in ("event", "t")}
        markers.append(
            {
                "event": str(marker.get("event")),
                "at": booted + clock if booted is not None and clock is not None else None,
                "guest_seconds": guest,
                "detail": " ".join(f"{k}={v}" for k, v in sorted(rest.items())),
            }
        )
    return markers


def render_description(d: VMDescription) -> str:
    """``reconciler describe``'s text."""

    def when(at: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"

    manifest = d["manifest"]
    where = (
        f"{manifest['file']}" + (f":{manifest['line']}" if manifest["line"] else "")
        if manifest
        else f"unknown ({d['manifest_error']})"
        if d["manifest_error"]
        else "unknown"
    )
    lines = [
        f"name:       {d['name']} (workload {d['workload']})",
        f"host:       {d['host']}",
        f"state:      {d['state']}, {'healthy' if d['healthy'] else 'not healthy'}"
        + (f": {d['detail']}" if d["detail"] else ""),
        f"runtime:    {d['runtime']}, pid {d['pid'] or '-'}, address {d['address'] or '-'}",
        f"revision:   {short_sha(d['revision'])}" + (" (pinned)" if d["pinned"] else ""),
        f"manifest:   {where}",
        f"artifact:   {d['artifact']}",
        f"last term:  {d['last_term'] if d['last_term'] is not None else '-'}",
        "boot:",
        *(
            f"  {when(m['at'])} {m['event']}"
            + (f" +{m['guest_seconds']:.3f}s" if m["guest_seconds"] is not None else "")
            + (f" {m['detail']}" if m["detail"] else "")
            for m in d["boot"]
        ),
        "probes:",
        *(
            f"  {when(p['at'])} {'healthy' if p['healthy'] else 'unhealthy':<9} {p['detail']}"
            for p in d["probes"]
        ),
        "actions:",
        *(
            f"  {when(a['at'])} {a['kind']:<8} term {a['term'] or '-'}: {a['detail']}"
            for a in d["actions"]
        ),
        f"build log:  {d['build_log_path'] or 'none kept (the artifact left the cache)'}",
        *(f"  {line}" for line in d["build_log"]),
        "console:",
        *(f"  {line}" for line in d["console_tail"]),
    ]
    return "\n".join(lines) + "\n"
