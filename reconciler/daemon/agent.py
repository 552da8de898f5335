"""``HostAgent``: the thread of a multi-host daemon that converges this host's share of the fleet.

    leader's FleetHost ──assign(vm, host, revision, term)──▶ assignments ──┐
    heartbeat thread ──on_alive(epoch) / on_ended(epoch)──▶ agent fence    │
    agent thread, every second (and when woken):                            ▼
        epoch ended? ──▶ stop and remove every VM this host runs, then register anew
        the network across hosts: routes to every live peer's subnet (``sync_host_routes``),
        the firewall over every host's VMs when they changed
        placement confirmed by the current term? ──▶ load each assigned revision ──▶ diff
        (only the VMs assigned here; prune the rest) ──▶ LocalHost.converge ──▶ this host's
        runtimes, and its VMs reported in the store for the leader; settle their health

In multi-host mode (a PostgreSQL store) every daemon runs one, leader or not, and it is the only
thing that touches this machine's runtimes; the leader's cycle only writes assignments
(``execution.fleet_host``). It has its own store handle, speaking for this host, its own
``LocalHost`` and its own ``RevisionLoader`` over the daemon's repository (a psycopg connection
and a loader's caches are not shared between threads).

Fencing is by the host's registration epoch, not the leader's term: the agent's writes of VMs
and intents are refused inside their transaction unless the epoch is still the host's and was
not ended (``PostgresStateStore.claim_epoch``), and a local ``Fence`` with the epoch as its term,
renewed by each heartbeat that succeeds, stops the agent once it could not heartbeat for
``RENEW_DEADLINE_SECONDS`` or half the grace period, whichever is shorter: a host cut off from
the database stops acting long before the grace period lets the leader place its VMs elsewhere
(see ``HOST_GRACE_SECONDS``).

A host whose epoch ended (the leader declared it lost while it was paused or partitioned) stops
and removes every VM it runs *before anything else*, records it, and only then lets the
heartbeat register it anew: its VMs were already placed on other hosts.

Each host's bridge and VMs take the host's own subnet of the fleet's pool (its registry slot,
``carving.host_subnet``, set on ``LocalHost.subnet_for``), and every pass routes each live
peer's subnet via the peer's underlay address, dropping the routes of lost hosts: a VM reaches
a VM of another host through both hosts' forwarding (the host-gateway model,
``runtime.network.routes``). The firewall's addresses are every host's VMs
(``executor.firewall_addresses``), reloaded whenever they change, since a packet routed between
hosts is judged on both; its dependencies are those of every revision the fleet runs. The pool
is the one of the newest assigned revision.

Assignments are read only once the fleet's current term confirmed them
(``placement_terms``): between a leader's election and its first refresh, what runs is left as
it runs. A VM assigned here without a revision (adopted as it ran) is left as it runs too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from reconciler.daemon.heartbeat import HostHeartbeat
from reconciler.errors import LeadershipError, NetworkError, ReconcilerError, SourceError
from reconciler.execution.events import ExecutionEvent
from reconciler.execution.executor import firewall_addresses, firewall_dependencies
from reconciler.execution.host import LocalHost
from reconciler.leadership.fence import Fence
from reconciler.model import (
    DesiredFleet,
    DesiredVM,
    FleetSettings,
    NetworkPool,
    Plan,
    VMState,
)
from reconciler.pipeline import RevisionLoader
from reconciler.planning import diff
from reconciler.planning.rollout import stands_in_for
from reconciler.state.hosts import HOST_GRACE_SECONDS, Assignment, HostRecord
from runtime.network.carving import host_peers, host_subnet
from runtime.network.routes import host_routes, sync_host_routes

log = logging.getLogger("reconciler.daemon")

RENEW_DEADLINE_SECONDS = 10.0
"""The leader's renew deadline: an agent that could not heartbeat for this long stops acting.
The daemon uses at most half the host grace period, so that a host stops acting before the
leader may declare it lost and place its VMs elsewhere (a paused host wakes with its fence
expired, and its first heartbeat tells it whether its epoch ended)."""

INTERVAL_SECONDS = 1.0
"""How often the agent looks at its assignments when nothing wakes it."""

_LOADED_KEPT = 4  # revisions whose desired fleets stay loaded (the head, pins, a rollout's)


class AgentStore(Protocol):
    """What the agent needs of its own store handle (``PostgresStateStore``)."""

    epoch_fence: Fence | None
    """The fence its writes are checked against (``claim_epoch``)."""

    def claim_epoch(self, fence: Fence) -> None: ...

    def release_epoch(self) -> None: ...

    def placement_terms(self) -> tuple[int, int]: ...

    def assignments(self) -> dict[str, Assignment]: ...

    def hosts(self) -> list[HostRecord]: ...

    def record_event(
        self, kind: str, subject: str, message: str, *, term: int | None = None
    ) -> None: ...


class HostAgent:
    """Converges this host's assignments; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        local: LocalHost,
        store: AgentStore,
        loader: RevisionLoader,
        heartbeat: HostHeartbeat,
        cache_dir: Path,
        interval: float = INTERVAL_SECONDS,
        renew_deadline: float = RENEW_DEADLINE_SECONDS,
        grace: float = HOST_GRACE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.local = local
        self.store = store  # the same handle as ``local.store``, with the agent's calls
        self.loader = loader
        self.heartbeat = heartbeat
        self.cache_dir = cache_dir
        self.interval = interval
        self.renew_deadline = renew_deadline
        self.grace = grace  # a peer silent for longer is lost: its route goes
        self._monotonic = monotonic
        self.fence: Fence | None = None
        self._ended: int | None = None
        self._pool: NetworkPool | None = None  # the fleet network of the last converge
        self._loaded: dict[str, DesiredFleet] = {}
        # The last problem logged, by what it is about, so a stuck one logs once.
        self._said: dict[str, str] = {}
        self._slot: int | None = None  # this host's subnet slot in the registry
        self._conflicts: tuple[str, ...] = ()  # peer subnets held by routes not ours
        self._firewall: object = None  # what the rules were last loaded from, by this agent
        local.subnet_for = self._subnet
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        heartbeat.hold_ended = True
        heartbeat.on_alive = self._alive
        heartbeat.on_ended = self._epoch_ended

    # -- the heartbeat's callbacks (heartbeat thread: no store, no runtimes here) -------------

    def _alive(self, epoch: int, sent_at: float) -> None:
        fence = self.fence
        if fence is None or fence.term != epoch:
            fence = Fence(epoch, renew_deadline=self.renew_deadline, monotonic=self._monotonic)
            self.fence = fence
            self._wake.set()
        fence.renewed(sent_at)

    def _epoch_ended(self, epoch: int) -> None:
        self._ended = epoch
        fence = self.fence
        if fence is not None:
            fence.revoke(f"registration epoch {epoch} ended")
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="host-agent", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.step()
            self._wake.wait(self.interval)
            self._wake.clear()

    def step(self) -> None:
        """One look: stop a stale epoch's VMs, or converge the assignments. Never raises; a
        problem is logged once until it changes."""
        try:
            if self._ended is not None:
                self._stop_stale(self._ended)
                return
            fence = self.fence
            if fence is None or not fence.valid:
                return  # not registered yet, or cut off from the database: hands off
            try:
                self.sync_network()
                self._said.pop("network", None)
            except ReconcilerError as err:  # converging this host's VMs goes on regardless
                self._say(logging.WARNING, f"host agent: network across hosts: {err}", "network")
            self._converge(fence)
            self._said.pop("converge", None)
        except LeadershipError as err:
            self._say(logging.WARNING, f"host agent stopped acting: {err}")
        except ReconcilerError as err:
            self._say(logging.WARNING, f"host agent: {err}")
        except Exception as exc:  # the daemon outlives a bug of its agent; the operator sees it
            if self._say(logging.ERROR, f"host agent failed: {exc!r}"):
                log.exception("host agent failed")

    def _say(self, level: int, message: str, about: str = "converge") -> bool:
        if self._said.get(about) == message:
            return False
        self._said[about] = message
        log.log(level, "%s", message)
        return True

    # -- the network across hosts ---------------------------------------------------------------

    def _learn_slot(self, records: list[HostRecord] | None = None) -> None:
        records = self.store.hosts() if records is None else records
        own = next((r for r in records if r.name == self.name), None)
        if own is not None:
            self._slot = own.subnet_slot

    def _subnet(self, pool: NetworkPool) -> str:
        """This host's subnet of ``pool`` (``LocalHost.subnet_for``): its bridge and VMs'."""
        if self._slot is None:
            raise NetworkError(
                f"host {self.name} has no subnet slot in the registry yet, so it runs no VMs"
            )
        return str(host_subnet(pool, self._slot, self.name))

    def sync_network(self) -> None:
        """Routes to every live peer's subnet, and the firewall over every host's VMs."""
        records = self.store.hosts()
        self._learn_slot(records)
        assignments = self.store.assignments()
        fleets = self._fleet_revisions(assignments)
        pool = fleets[-1].fleet.network if fleets else self._pool
        if pool is None:
            return  # nothing assigned anywhere yet: no pool to route
        live = [r for r in records if not r.lost(self.grace)]
        peers = host_peers(pool, live, own=self.name)
        # A lone host (or one whose peers registered no underlay address) leaves the host's
        # routing and forwarding as they are, unless routes of ours are left to remove.
        if peers or host_routes(pool.cidr):
            changes = sync_host_routes(peers, fleet_cidr=pool.cidr)
            if changes.changed:
                log.info(
                    "host %s routes to its peers: added %s, removed %s",
                    self.name,
                    ", ".join(changes.added) or "none",
                    ", ".join(changes.removed) or "none",
                    extra={"event": "host-routes"},
                )
            if changes.conflicts and changes.conflicts != self._conflicts:
                log.warning(
                    "host %s does not route %s to its peer(s): a route that is not "
                    "reconciler's holds it; remove it to let the hosts' VMs reach each other",
                    self.name,
                    ", ".join(changes.conflicts),
                    extra={"event": "host-route-conflict"},
                )
            self._conflicts = changes.conflicts
        if not any(a.host == self.name for a in assignments.values()):
            return  # no VM here: no rules to keep
        addresses = firewall_addresses(self.local.store)
        depends_on = firewall_dependencies(*fleets)
        wanted = (pool, addresses, depends_on)
        if wanted != self._firewall:
            self.local.sync_firewall(pool, addresses, depends_on)
            self._firewall = wanted

    def _fleet_revisions(self, assignments: dict[str, Assignment]) -> list[DesiredFleet]:
        """The desired fleets of the revisions the fleet's VMs are assigned, oldest term first
        (at most those the loader keeps); one that cannot be loaded is left out (the
        converge says why)."""
        newest: dict[str, int] = {}
        for a in assignments.values():
            if a.revision:
                newest[a.revision] = max(a.term, newest.get(a.revision, 0))
        ordered = sorted(newest, key=lambda revision: (newest[revision], revision))
        fleets = []
        for revision in ordered[-(_LOADED_KEPT - 1) :]:
            try:
                fleets.append(self._load(revision))
            except ReconcilerError:
                continue
        return fleets

    # -- an ended epoch -----------------------------------------------------------------------

    def _stop_stale(self, epoch: int) -> None:
        """Stop and remove every VM this host runs, then let the heartbeat register anew. The
        writes are this host's own records and only remove them, so they need no epoch."""
        self.store.release_epoch()
        if self._slot is None:
            self._learn_slot()  # a restart: the VMs' addresses are of this host's subnet
        observed = self.local.observe()
        count = len(observed.vms)
        for fleet_name in sorted({vm.fleet for vm in observed.vms.values()}):
            own = {n: vm for n, vm in observed.vms.items() if vm.fleet == fleet_name}
            empty = _fleet_of(fleet_name, self._pool)
            plan = diff(empty, replace(observed, vms=own))
            self._execute(plan, empty, None, None, what="stops its stale VMs")
        log.warning(
            "host %s: registration epoch %d ended; stopped %d stale VM(s) before anything else",
            self.name,
            epoch,
            count,
            extra={"event": "host-stale-stopped"},
        )
        self.store.record_event(
            "host-stale-stopped", self.name, f"epoch {epoch} ended: stopped {count} VM(s)"
        )
        self._ended = None
        self.fence = None
        self.heartbeat.register_again()

    # -- converging the assignments -------------------------------------------------------------

    def _converge(self, fence: Fence) -> None:
        term, placed = self.store.placement_terms()
        if term == 0 or placed != term:
            return  # a new leader has not confirmed the assignments yet: leave all as it runs
        if self.store.epoch_fence is not fence:
            self.store.claim_epoch(fence)
        mine = {vm: a for vm, a in self.store.assignments().items() if a.host == self.name}
        held = {vm for vm, a in mine.items() if a.term != term or not a.revision}
        groups: dict[str, list[str]] = {}
        for vm, a in sorted(mine.items()):
            if vm not in held:
                groups.setdefault(a.revision, []).append(vm)
        fleets: dict[str, DesiredFleet] = {}
        for revision in sorted(groups):
            try:
                fleets[revision] = self._load(revision)
            except ReconcilerError as err:
                # Its VMs stay as they run; the leader sees them not coming and says so.
                self._say(logging.WARNING, f"host agent cannot load {revision[:12]}: {err}")
                held.update(groups.pop(revision))
        observed = self.local.refresh()
        wanted = {vm for names in groups.values() for vm in names}
        stray = {n: vm for n, vm in observed.vms.items() if n not in wanted and n not in held}
        if stray:
            # Assigned elsewhere or nowhere: removed, whichever fleet of this host it is in.
            for fleet_name in sorted({vm.fleet for vm in stray.values()}):
                own = {n: vm for n, vm in stray.items() if vm.fleet == fleet_name}
                empty = _fleet_of(fleet_name, self._pool)
                self._execute(diff(empty, replace(observed, vms=own)), empty, None, fence)
        for revision, names in sorted(groups.items()):
            desired = _restricted(fleets[revision], names)
            self._pool = desired.fleet.network
            current = self.local.observe()
            own = {n: vm for n, vm in current.vms.items() if n in names}
            plan = diff(desired, replace(current, vms=own))
            if plan.has_changes:
                self._execute(plan, desired, revision, fence)
        # Health nobody judged yet (a VM adopted after a restart): fresh for the leader.
        observed = self.local.observe()
        unjudged = {
            n: vm
            for n, vm in observed.vms.items()
            if n in wanted and vm.state is VMState.RUNNING and vm.healthy is None
        }
        if unjudged:
            self.local.settle_health(
                replace(observed, vms=unjudged), fence, on_event=_log_event, superseded=self._ends
            )

    def _ends(self) -> bool:
        return self._stopping.is_set() or self._ended is not None

    def _execute(
        self,
        plan: Plan,
        desired: DesiredFleet,
        revision: str | None,
        fence: Fence | None,
        *,
        what: str = "converges its assignments",
    ) -> None:
        if not plan.has_changes:
            return
        summary = ", ".join(f"{n} {kind}" for kind, n in plan.summary().items() if n)
        at = f" at {revision[:12]}" if revision else ""
        log.info("host %s %s%s: %s", self.name, what, at, summary)
        self._firewall = None  # the executor loads rules of its own: load ours again after
        checkout = self._checkout(revision) if revision else self.local.state_dir
        report = self.local.converge(
            plan,
            desired,
            checkout,
            self.cache_dir,
            fence=fence,
            on_event=_log_event,
            record_revision=False,
            superseded=self._ends,
        )
        if not report.ok:
            log.warning("host %s: %s", self.name, report.problems())

    def _checkout(self, revision: str) -> Path:
        source = self.loader.source
        try:
            return source.checkout(revision)
        except SourceError:
            source.fetch()  # a remote's commit this host has not fetched yet
            return source.checkout(revision)

    def _load(self, revision: str) -> DesiredFleet:
        loaded = self._loaded.get(revision)
        if loaded is None:
            try:
                loaded = self.loader.load(revision)
            except SourceError:
                self.loader.source.fetch()
                loaded = self.loader.load(revision)
            self._loaded = dict(list(self._loaded.items())[-(_LOADED_KEPT - 1) :])
            self._loaded[revision] = loaded
        return loaded


def _restricted(fleet: DesiredFleet, names: list[str]) -> DesiredFleet:
    """``fleet`` with only the VMs ``names`` (a surge stand-in runs its slot's definition),
    pruning whatever else of the fleet runs here and allowed to be empty: this host's share."""
    vms: dict[str, DesiredVM] = {}
    for name in names:
        vm = fleet.vms.get(name)
        if vm is None:
            slot = stands_in_for(name)
            if slot is None or slot not in fleet.vms:
                continue  # not in its revision (the leader's mistake): nothing to run
            vm = replace(fleet.vms[slot], name=name)
        vms[name] = vm
    settings = replace(fleet.fleet, allow_empty=True, prune=True)
    return replace(fleet, fleet=settings, vms=vms)


def _fleet_of(name: str, pool: NetworkPool | None) -> DesiredFleet:
    """An empty desired fleet named ``name``: the plan that removes all of its VMs here."""
    settings = FleetSettings(name=name, allow_empty=True, prune=True, network=pool or NetworkPool())
    return DesiredFleet(revision=None, fleet=settings, workloads={}, vms={}, artifacts={})


def _log_event(event: ExecutionEvent) -> None:
    log.info("%s", event.text(), extra=event.fields())


__all__ = ["INTERVAL_SECONDS", "RENEW_DEADLINE_SECONDS", "AgentStore", "HostAgent"]
