"""Placement: which host runs each desired VM when the fleet spans several hosts.

    DesiredFleet ──demands_of──▶ VMDemand* ─┐
    hosts (the registry's HostFacts) ───────┼──place──▶ Placement (assignments, moves,
    current assignments (VM -> host) ───────┘              unplaceable VMs)
                                                     └──drain_waves──▶ moves, wave by wave
    Plan (diff) + Placement.moves of VMs running where they must leave ──move_plan──▶ Plan
        with each move as a restart on its new host, in the workload's rollout waves

The leader calls ``place`` after ``diff`` with what the hosts registry says (capacity, labels,
runtimes, cordoned, draining, lost) and the assignments of the previous term; it stores the new
assignments, shows the moves in the plan, and refuses a plan that does not fit
(``Placement.require_fit``) before anything changes. Pure: no I/O and no clock; whether a host
is lost is the registry's verdict, an input here.

The rules are the two tables below, each with its why: ``HOST_RULES`` (hard: a host that fails
one never gets the VM, and the first rule that leaves no host names why a VM is unplaceable) and
``PREFERENCES`` (soft: the order among the hosts that pass).

Determinism: hosts are taken in name order, VMs in (workload, ordinal) order, every tie is
broken by the host's name and every output is sorted; nothing depends on dict order, set
order or hash seeds, so the same inputs give the same placement, in any order they come.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from reconciler.errors import ConfigError, PlanError
from reconciler.model import (
    ActionType,
    DesiredFleet,
    Disruption,
    ObservedVM,
    PlacementSpec,
    Plan,
    RolloutPolicy,
    RuntimeKind,
    VMAction,
)
from reconciler.planning.rollout import policy_of, surge_waves

# Kubernetes label syntax, the same patterns as ``schemas/workload.schema.json``'s ``labelKey``
# and ``hostSelector`` values (a test keeps them equal): host labels (``--label k=v``) are
# checked with ``label_problem`` against the syntax the manifests are checked with. The end is
# ``(?![\s\S])``, not ``$``: in Python (which runs the schema's patterns) ``$`` also matches
# before a final newline, and ECMA-262, the schema's regex dialect, has no ``\Z``.
_END = r"(?![\s\S])"
LABEL_KEY_PATTERN = (
    r"^((?=[^/]{1,253}/)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?" + _END
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?" + _END
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def label_problem(key: str, value: str) -> str | None:
    """Why ``key=value`` is not a valid label (Kubernetes syntax), or None when it is."""
    if not _LABEL_KEY.match(key):
        return (
            f"label key {key!r}: 1-63 letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit, optionally after a DNS prefix and '/'"
        )
    if not _LABEL_VALUE.match(value):
        return (
            f"label value {value!r} of {key!r}: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


@dataclass(frozen=True)
class Overcommit:
    """How much of a host's real capacity may be promised to VMs."""

    cpu: float = 4.0
    """A vCPU is a thread that the host time-shares, and a fleet of small services idles most
    of the time: four vCPUs per core keeps a busy host responsive (OpenStack defaults to 16,
    which is for idle desktops), and a workload that needs dedicated cores sets 1.0."""
    memory: float = 1.0
    """Guest memory is not given back (no balloon driver), so an overcommitted host ends with
    its OOM killer choosing a VMM to kill: memory is never overcommitted by default."""

    def __post_init__(self) -> None:
        for name, ratio in (("cpu", self.cpu), ("memory", self.memory)):
            if not (math.isfinite(ratio) and 0 < ratio <= 64):
                raise ConfigError(f"{name} overcommit ratio {ratio!r} must be in (0, 64]")


@dataclass(frozen=True, order=True)
class Resources:
    vcpus: int
    memory_mib: int

    def __str__(self) -> str:
        return f"{self.vcpus} vCPU / {self.memory_mib} MiB"


@dataclass(frozen=True)
class HostFacts:
    """One host as the registry sees it: what it has and whether it may take VMs."""

    name: str
    vcpus: int
    memory_mib: int
    labels: Mapping[str, str] = field(default_factory=dict)
    runtimes: frozenset[RuntimeKind] = frozenset({RuntimeKind.PROCESS})
    """Runtimes usable there (binaries present); Firecracker also needs ``kvm``."""
    kvm: bool = False
    cordoned: bool = False
    """Takes no new VM; the VMs it runs stay."""
    draining: bool = False
    """Takes no new VM, and the VMs it runs move elsewhere (``drain_waves``)."""
    lost: bool = False
    """Its heartbeat stopped past the grace period: its VMs are re-placed."""

    @property
    def state(self) -> str:
        return (
            "lost"
            if self.lost
            else "draining"
            if self.draining
            else "cordoned"
            if self.cordoned
            else "ready"
        )


@dataclass(frozen=True)
class VMDemand:
    """What placement needs of one desired VM."""

    name: str
    workload: str
    ordinal: int
    runtime: RuntimeKind
    vcpus: int
    memory_mib: int
    placement: PlacementSpec = field(default_factory=PlacementSpec)

    @property
    def size(self) -> Resources:
        return Resources(self.vcpus, self.memory_mib)


def demands_of(desired: DesiredFleet) -> tuple[VMDemand, ...]:
    """The demand of every VM of ``desired``, in (workload, ordinal) order."""
    demands = []
    for vm in desired.vms.values():
        deploy = desired.workloads[vm.workload].deploy
        demands.append(
            VMDemand(
                name=vm.name,
                workload=vm.workload,
                ordinal=vm.ordinal,
                runtime=vm.runtime,
                vcpus=deploy.vcpus,
                memory_mib=deploy.memory_mib,
                placement=deploy.placement,
            )
        )
    return tuple(sorted(demands, key=lambda d: (d.workload, d.ordinal, d.name)))


@dataclass(frozen=True)
class Move:
    vm: str
    workload: str
    source: str
    destination: str
    reason: str
    """Why it leaves ``source``: the host is lost or draining, or the VM no longer fits or
    matches it."""

    def __str__(self) -> str:
        return f"~ {self.vm} {self.source} -> {self.destination} ({self.reason})"


@dataclass(frozen=True)
class Unplaceable:
    vm: str
    workload: str
    reason: str
    """One line: what the VM needs and why no host gives it."""
    source: str | None = None
    """The host it was on, when it had one it had to leave."""


@dataclass(frozen=True)
class Placement:
    assignments: Mapping[str, str]
    """VM -> host, sorted by VM; unplaceable VMs are absent."""
    moves: tuple[Move, ...]
    unplaceable: tuple[Unplaceable, ...]
    free: Mapping[str, Resources]
    """What each host has left (overcommit applied), sorted by host."""
    hosts_summary: str
    """``3 hosts, 2 cordoned``: what the refusal says of the fleet."""

    def refusal(self) -> str | None:
        """The one line refusing a plan that does not fit, or None when every VM has a host."""
        if not self.unplaceable:
            return None
        first = self.unplaceable[0]
        more = len(self.unplaceable) - 1
        return first.reason + (f"; and {more} more VM{'s' if more > 1 else ''}" if more else "")

    def require_fit(self) -> Placement:
        """This placement, or a ``PlanError`` saying what does not fit."""
        refusal = self.refusal()
        if refusal is not None:
            raise PlanError(refusal)
        return self


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HostRule:
    name: str
    passes: Callable[[HostFacts, VMDemand], bool]
    refusal: Callable[[VMDemand], str]
    """Why no host is left once this rule ran (the VM's name and the hosts summary follow)."""
    why: str


def _selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _runtime_text(runtime: RuntimeKind) -> str:
    return "firecracker (with KVM)" if runtime is RuntimeKind.FIRECRACKER else runtime.value


def runtime_usable(host: HostFacts, runtime: RuntimeKind) -> bool:
    """Whether ``host`` can run a VM of ``runtime``: QEMU runs without KVM (TCG, slower, still
    correct); Firecracker has no emulator and needs ``/dev/kvm``."""
    if runtime not in host.runtimes:
        return False
    return host.kvm or runtime is not RuntimeKind.FIRECRACKER


def selector_matches(host: HostFacts, selector: Mapping[str, str]) -> bool:
    return all(host.labels.get(key) == value for key, value in selector.items())


# Hard rules, in the order they are tried; capacity comes last (``place`` checks it per VM, and
# its refusal names the largest free slot among the hosts the other rules left).
HOST_RULES: tuple[_HostRule, ...] = (
    _HostRule(
        "schedulable",
        lambda host, _: not (host.lost or host.draining or host.cordoned),
        lambda _: "needs a host; none takes new VMs",
        "A lost host does not answer; a draining one is being emptied; a cordoned one was "
        "taken out of rotation by an operator (maintenance): none of them gets a new VM.",
    ),
    _HostRule(
        "runtime",
        lambda host, vm: runtime_usable(host, vm.runtime),
        lambda vm: f"needs runtime {_runtime_text(vm.runtime)}; no schedulable host offers it",
        "A VM runs only where its VMM is installed and usable; the artifact (unikernel, "
        "microvm, executable) follows from the runtime, which compile already matched.",
    ),
    _HostRule(
        "hostSelector",
        lambda host, vm: selector_matches(host, vm.placement.host_selector),
        lambda vm: (
            f"needs hostSelector {_selector_text(vm.placement.host_selector)}; no schedulable "
            f"host with runtime {_runtime_text(vm.runtime)} matches it"
        ),
        "The manifest's promise (a zone, a disk, a network) is a hard constraint: running the "
        "VM elsewhere would silently break what its author relied on.",
    ),
)

PREFERENCES: tuple[tuple[str, str], ...] = (
    (
        "stability",
        "A placed VM stays on its host while that host is neither lost nor draining and the VM "
        "still fits and matches it: a move is a restart elsewhere, never free. Adding a host or "
        "changing another workload moves nothing; a cordon moves nothing (drain does).",
    ),
    (
        "spread",
        "A new replica goes to the spreadBy value (zone) with the fewest replicas of its "
        "workload, then to the host with the fewest, so one host or zone lost takes as few "
        "replicas of a service as possible. Best effort, not a hard rule: a fleet too small to "
        "spread still runs every replica, and a VM that would spread better elsewhere is not "
        "moved for it (stability wins). Hosts without the spread label count as one value.",
    ),
    (
        "least allocated",
        "Among equally spread hosts, the one with the lowest allocation (the larger of its CPU "
        "and memory fractions): headroom on every host is what absorbs a lost host's VMs.",
    ),
    (
        "name",
        "The last tie-breaker is the host's name, so that equal inputs give equal outputs.",
    ),
)


# --------------------------------------------------------------------------------------------
# Placing
# --------------------------------------------------------------------------------------------


def place(
    demands: Iterable[VMDemand],
    hosts: Iterable[HostFacts],
    current: Mapping[str, str],
    overcommit: Overcommit = Overcommit(),
) -> Placement:
    """Assign every VM of ``demands`` to a host (module docstring); ``current`` maps VMs to
    the hosts they were assigned to (entries of VMs no longer desired are ignored)."""
    ordered_hosts = sorted(hosts, key=lambda h: h.name)
    by_name: dict[str, HostFacts] = {}
    for host in ordered_hosts:
        if host.name in by_name:
            raise PlanError(f"host {host.name!r} is listed twice")
        if host.vcpus < 0 or host.memory_mib < 0:
            raise PlanError(f"host {host.name!r} reports a negative capacity")
        by_name[host.name] = host
    vms = sorted(demands, key=lambda d: (d.workload, d.ordinal, d.name))
    seen: set[str] = set()
    for vm in vms:
        if vm.name in seen:
            raise PlanError(f"VM {vm.name!r} is demanded twice")
        seen.add(vm.name)

    state = _State(ordered_hosts, overcommit)
    assigned: dict[str, str] = {}
    left: dict[str, tuple[str, str]] = {}  # VM -> (the host it leaves, why)
    pending: list[VMDemand] = []
    for vm in vms:  # stability first: every VM that may stay, stays
        was = current.get(vm.name)
        if was is None:
            pending.append(vm)
            continue
        why = state.why_leave(vm, by_name.get(was), was)
        if why is None:
            state.take(vm, was)
            assigned[vm.name] = was
        else:
            left[vm.name] = (was, why)
            pending.append(vm)

    unplaceable: list[Unplaceable] = []
    # Largest VMs first (first-fit decreasing packs better), a workload's replicas together.
    groups: dict[tuple[object, ...], list[VMDemand]] = {}
    for vm in pending:
        groups.setdefault(_alike(vm), []).append(vm)
    for _, group in sorted(groups.items()):
        for vm, chosen, refusal in state.place_group(group):
            source = left.get(vm.name, (None, ""))[0]
            if chosen is not None:
                assigned[vm.name] = chosen
            else:
                unplaceable.append(Unplaceable(vm.name, vm.workload, refusal, source))

    workloads = {vm.name: vm.workload for vm in vms if vm.name in left}
    moves = tuple(
        Move(name, workloads[name], left[name][0], assigned[name], left[name][1])
        for name in sorted(left)
        if name in assigned
    )
    return Placement(
        assignments={name: assigned[name] for name in sorted(assigned)},
        moves=moves,
        unplaceable=tuple(sorted(unplaceable, key=lambda u: u.vm)),
        free=state.free(),
        hosts_summary=state.summary,
    )


def _alike(vm: VMDemand) -> tuple[object, ...]:
    """The VMs placed as one group (a workload's replicas: same size, runtime and placement),
    in the order groups are placed: the largest first."""
    selector = tuple(sorted(vm.placement.host_selector.items()))
    spread = vm.placement.spread_by or ""
    return (-vm.memory_mib, -vm.vcpus, vm.workload, vm.runtime.value, selector, spread)


class _State:
    """Allocation while placing: capacities (overcommit applied), what is used, and how many
    replicas of each workload each host and each spread value holds."""

    def __init__(self, hosts: list[HostFacts], overcommit: Overcommit) -> None:
        self.hosts = hosts
        self.cap = {
            h.name: (
                math.floor(h.vcpus * overcommit.cpu),
                math.floor(h.memory_mib * overcommit.memory),
            )
            for h in hosts
        }
        self.used = {h.name: [0, 0] for h in hosts}
        self.labels = {h.name: h.labels for h in hosts}
        self.on_host: dict[tuple[str, str], int] = {}
        self.on_value: dict[tuple[str, str, str | None], int] = {}
        self.eligible: dict[
            tuple[RuntimeKind, tuple[tuple[str, str], ...]], list[HostFacts] | str
        ] = {}
        counts: dict[str, int] = {}
        for host in hosts:
            if host.state != "ready":
                counts[host.state] = counts.get(host.state, 0) + 1
        self.summary = f"{len(hosts)} host{'s' if len(hosts) != 1 else ''}" + "".join(
            f", {counts[s]} {s}" for s in ("lost", "draining", "cordoned") if s in counts
        )

    def fits(self, vm: VMDemand, host: str) -> bool:
        used, cap = self.used[host], self.cap[host]
        return used[0] + vm.vcpus <= cap[0] and used[1] + vm.memory_mib <= cap[1]

    def free_of(self, host: str) -> Resources:
        used, cap = self.used[host], self.cap[host]
        return Resources(cap[0] - used[0], cap[1] - used[1])

    def free(self) -> dict[str, Resources]:
        return {h.name: self.free_of(h.name) for h in self.hosts}

    def take(self, vm: VMDemand, host: str) -> None:
        used = self.used[host]
        used[0] += vm.vcpus
        used[1] += vm.memory_mib
        key = (vm.workload, host)
        self.on_host[key] = self.on_host.get(key, 0) + 1
        spread = vm.placement.spread_by
        if spread is not None:
            value_key = (vm.workload, spread, self.labels[host].get(spread))
            self.on_value[value_key] = self.on_value.get(value_key, 0) + 1

    def why_leave(self, vm: VMDemand, host: HostFacts | None, name: str) -> str | None:
        """Why ``vm`` may not stay on its current host, or None (and it stays)."""
        if host is None:
            return f"{name} is not a registered host"
        if host.lost or host.draining:
            return f"{name} is {host.state}"
        if not runtime_usable(host, vm.runtime):
            return f"{name} no longer offers runtime {_runtime_text(vm.runtime)}"
        if not selector_matches(host, vm.placement.host_selector):
            selector = _selector_text(vm.placement.host_selector)
            return f"{name} no longer matches hostSelector {selector}"
        if not self.fits(vm, name):
            return f"no longer fits on {name} (needs {vm.size}, free {self.free_of(name)})"
        return None

    def candidates(self, vm: VMDemand) -> list[HostFacts] | str:
        """The hosts every hard rule but capacity lets ``vm`` onto, or why there is none;
        the same for every VM of one runtime and selector, so computed once per pair."""
        key = (vm.runtime, tuple(sorted(vm.placement.host_selector.items())))
        known = self.eligible.get(key)
        if known is None:
            hosts = self.hosts
            known = []
            for rule in HOST_RULES:
                hosts = [h for h in hosts if rule.passes(h, vm)]
                if not hosts:
                    known = rule.refusal(vm)
                    break
            else:
                known = hosts
            if not self.hosts:
                known = "needs a host; none is registered"
            self.eligible[key] = known
        return known

    def _key(self, workload: str, host: str) -> tuple[int, float, str]:
        """A host's preference for the next replica of ``workload`` within one spread value:
        fewest replicas of it, then least allocated, then the name."""
        used, cap = self.used[host], self.cap[host]
        load = max(used[0] / cap[0] if cap[0] else 1.0, used[1] / cap[1] if cap[1] else 1.0)
        return (self.on_host.get((workload, host), 0), load, host)

    def _best(
        self, heap: list[tuple[int, float, str]], vm: VMDemand
    ) -> tuple[int, float, str] | None:
        """The heap's truly best host for ``vm`` that still fits, or None when none does.

        Every key only grows while a workload's replicas are placed (counts and allocation
        rise), so a top whose stored key is still its current key is the true minimum; a stale
        one goes back with its new key, a full one leaves for good: ``O(log H)`` per replica
        instead of a scan of every host."""
        while heap:
            stored = heap[0]
            host = stored[2]
            if not self.fits(vm, host):
                heapq.heappop(heap)
                continue
            now = self._key(vm.workload, host)
            if now == stored:
                return now
            heapq.heapreplace(heap, now)
        return None

    def place_group(self, group: list[VMDemand]) -> Iterable[tuple[VMDemand, str | None, str]]:
        """Place the pending replicas of one workload (same size, runtime and placement), in
        ordinal order: ``(vm, host or None, refusal)``.

        One heap of hosts per value of the spread label (one heap in all without spreadBy):
        the value holding the fewest replicas of the workload wins, then its best host."""
        first = group[0]
        candidates = self.candidates(first)
        if isinstance(candidates, str):
            for vm in group:
                yield vm, None, f"{vm.name} {candidates} ({self.summary})"
            return
        spread = first.placement.spread_by
        heaps: dict[str | None, list[tuple[int, float, str]]] = {}
        for h in candidates:  # in name order, so the values' order is the same on every run
            if self.fits(first, h.name):
                value = h.labels.get(spread) if spread is not None else None
                heaps.setdefault(value, []).append(self._key(first.workload, h.name))
        for heap in heaps.values():
            heapq.heapify(heap)
        for vm in group:
            choice: tuple[int, tuple[int, float, str]] | None = None
            for value, heap in heaps.items():
                top = self._best(heap, vm)
                if top is None:
                    continue
                count = self.on_value.get((vm.workload, spread, value), 0) if spread else 0
                if choice is None or (count, top) < choice:
                    choice = (count, top)
            if choice is None:
                yield vm, None, self._capacity_refusal(vm, candidates)
                continue
            chosen = choice[1][2]
            self.take(vm, chosen)
            yield vm, chosen, ""

    def _capacity_refusal(self, vm: VMDemand, candidates: list[HostFacts]) -> str:
        """``web-2 needs 2 vCPU / 512 MiB; largest free slot: host-b 1 vCPU / 2048 MiB (...)``:
        the slot that comes closest to the need, among the hosts the other rules allow."""

        def closeness(host: HostFacts) -> tuple[float, int, int, str]:
            free = self.free_of(host.name)
            ratio = min(free.vcpus / max(1, vm.vcpus), free.memory_mib / max(1, vm.memory_mib))
            # Name last, inverted by ``max``: the first name wins a tie.
            return (ratio, free.memory_mib, free.vcpus, _inverted(host.name))

        best = max(candidates, key=closeness)
        return (
            f"{vm.name} needs {vm.size}; largest free slot: {best.name} "
            f"{self.free_of(best.name)} ({self.summary})"
        )


def _inverted(name: str) -> str:
    return "".join(chr(0x10FFFF - ord(c)) for c in name)


# --------------------------------------------------------------------------------------------
# Drain
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    placement: Placement
    """Where every VM ends once the drain is done."""
    waves: tuple[tuple[Move, ...], ...]
    """The drained host's VMs' moves: waves run in order, the moves of one wave together."""


def drain_waves(
    host: str,
    demands: Iterable[VMDemand],
    hosts: Iterable[HostFacts],
    current: Mapping[str, str],
    *,
    rollout: RolloutPolicy,
    overcommit: Overcommit = Overcommit(),
) -> Drain:
    """The moves that empty ``host``, wave by wave: each wave moves at most
    ``rollout.max_unavailable`` replicas of any one workload (a moving VM is down between its
    stop on one host and its health on the other), so a drain disturbs a service no more than
    a rollout does. Refused with one line (``PlanError``) when a VM of ``host`` fits nowhere
    else: a drain either empties the host or changes nothing."""
    listed = list(hosts)
    if host not in {h.name for h in listed}:
        raise PlanError(f"cannot drain {host}: no such host")
    marked = [replace(h, draining=True) if h.name == host else h for h in listed]
    placement = place(demands, marked, current, overcommit)
    stuck = [u for u in placement.unplaceable if u.source == host]
    if stuck:
        more = len(stuck) - 1
        raise PlanError(
            f"cannot drain {host}: {stuck[0].reason}"
            + (f"; and {more} more VM{'s' if more > 1 else ''}" if more else "")
        )
    batch = max(1, rollout.max_unavailable)
    by_workload: dict[str, list[Move]] = {}
    for move in placement.moves:
        if move.source == host:
            by_workload.setdefault(move.workload, []).append(move)
    depth = max((len(m) for m in by_workload.values()), default=0)
    count = math.ceil(depth / batch)
    waves = tuple(
        tuple(
            sorted(
                (m for moves in by_workload.values() for m in moves[i * batch : (i + 1) * batch]),
                key=lambda m: m.vm,
            )
        )
        for i in range(count)
    )
    return Drain(placement, waves)


def move_plan(
    plan: Plan,
    moves: Iterable[Move],
    desired: DesiredFleet,
    observed: Mapping[str, ObservedVM],
) -> Plan:
    """``plan`` with the ``moves`` of VMs that must leave the host they run on (a draining
    host's, or one they no longer fit or match) even though nothing else about them changed:
    each is a restart of the VM on its new host, cut into the workload's rollout waves after
    the plan's own (``rollout.surge_waves``: ``maxSurge`` stand-ins started on the new host
    and healthy before the VM leaves the old one, else ``maxUnavailable`` VMs at a time), so a
    drain disturbs a service no more than a rollout does.

    A VM the plan already acts on (or whose surge stand-in it removes) is left to the plan:
    it is placed anew as it is acted on, or moves next cycle. A move of a VM that does not run
    (its host is lost) is the plan's create, not a move."""
    acted = {a.vm for a in plan.actions} | {
        a.stands_in_for for a in plan.actions if a.stands_in_for is not None
    }
    by_workload: dict[str, list[VMAction]] = {}
    for move in sorted(moves, key=lambda m: (m.workload, m.vm)):
        running = observed.get(move.vm)
        wanted = desired.vms.get(move.vm)
        if move.vm in acted or running is None or wanted is None:
            continue
        by_workload.setdefault(move.workload, []).append(
            VMAction(
                action=ActionType.RESTART,
                vm=move.vm,
                workload=move.workload,
                disruption=Disruption.RESTART,
                reason=f"moves {move.source} -> {move.destination} ({move.reason})",
                artifact_before=running.artifact_digest,
                artifact_after=wanted.artifact.input_digest,
            )
        )
    if not by_workload:
        return plan
    wave = max((a.wave for a in plan.actions), default=0)
    added: list[VMAction] = []
    for workload, group in sorted(by_workload.items()):
        waved, wave = surge_waves(
            group,
            policy=policy_of(desired, workload),
            observed=observed,
            stand_ins={},
            workload=workload,
            first_wave=wave,
        )
        added += waved
    return replace(plan, actions=(*plan.actions, *added))
