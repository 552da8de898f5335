"""Pure types shared by every layer: the desired fleet, the observed fleet and the plan.

Data flow::

    manifests.compile ──▶ DesiredFleet ─┐
                                        ├──▶ planning.diff ──▶ Plan ──▶ render / execute
    state store / runtime ─▶ ObservedFleet ┘

Nothing here does I/O. Instances are frozen; mappings inside them are never mutated after
construction. Identity is ``(kind, name)`` and a VM is ``<workload>-<ordinal>``: no type here
knows the file a document came from, except for error messages (``Workload.declared_in``).

A VM's configuration is kept as a flat ``settings`` mapping (``"deploy.env.LOG_LEVEL"`` ->
canonical JSON of the value). The planner compares the desired and observed mappings key by key
and looks up each changed key's disruption class (``planning.rules``); the same keys name the
change in every rendering of the plan, so a reviewer reads exactly what moved.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

API_VERSION = "reconciler/v1alpha1"
PLAN_FORMAT_VERSION = 1

# What a suspension names instead of a workload when the whole fleet is suspended (``reconciler
# suspend`` without a workload); no workload name can be "*".
FLEET_WIDE = "*"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_encode_string = json.encoder.encode_basestring  # what _CANONICAL uses for a str (ensure_ascii off)
# _CANONICAL's own C encoder, made once: ``encode`` makes one per call. Without the check for
# circular values (a circular value recurses until RecursionError, and is then encoded again
# by _CANONICAL, which says what is wrong).
_ENCODE_C = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None,
        _CANONICAL.default,
        _encode_string,
        None,
        _CANONICAL.key_separator,
        _CANONICAL.item_separator,
        True,
        False,
        True,
    )
    if getattr(json.encoder, "c_make_encoder", None) is not None
    else None
)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the one encoding that digests are taken of."""
    # Scalars spelt as the encoder spells them, without the encoder: a fleet of ten thousand
    # workloads encodes some 300,000 settings values and digest inputs, most of them scalars.
    kind = type(value)
    if kind is str:
        return _encode_string(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if (kind is list or kind is dict) and _ENCODE_C is not None:
        try:
            return "".join(_ENCODE_C(value, 0))
        except RecursionError:
            pass
    # One shared encoder: json.dumps builds a new one per call when given options.
    return _CANONICAL.encode(value)


def digest_of(value: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``value``."""
    return "sha256:" + hashlib.sha256(canonical_json(value).encode()).hexdigest()


def short_digest(digest: str | None, length: int = 12) -> str:
    """``sha256:0123abcd...`` shortened for humans; ``-`` for no digest."""
    if not digest:
        return "-"
    return digest.split(":", 1)[-1][:length]


class Language(StrEnum):
    PYTHON = "python"
    C = "c"
    BINARY = "binary"


class Target(StrEnum):
    EXECUTABLE = "executable"
    UNIKERNEL = "unikernel"
    MICROVM = "microvm"


class RuntimeKind(StrEnum):
    QEMU = "qemu"
    FIRECRACKER = "firecracker"
    PROCESS = "process"


class RestartPolicy(StrEnum):
    """What the guest init does when the workload exits (``deploy.restartPolicy``)."""

    ALWAYS = "always"  # services: restart it, whatever its exit code
    ON_FAILURE = "on-failure"  # restart it after a non-zero exit; a clean exit ends the VM
    NEVER = "never"  # batch jobs: the VM ends when the job does


class HealthKind(StrEnum):
    CONSOLE = "console"
    TCP = "tcp"
    HTTP = "http"


class BuildStatus(StrEnum):
    """How one artifact of a build came to be (``builders.matrix.BuildResult.status``)."""

    BUILT = "built"
    CACHED = "cached"
    FAILED = "failed"


class RevisionOutcome(StrEnum):
    """What the state store records of a revision that was tried."""

    APPLIED = "applied"
    FAILED = "failed"


# --------------------------------------------------------------------------------------------
# Desired state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """How the host decides a VM is healthy once its workload started.

    ``console``: the guest init's "workload started" marker is enough. ``tcp``: a connection to
    ``port`` on the VM's address succeeds. ``http``: ``GET path`` on ``port`` answers 2xx/3xx.
    """

    kind: HealthKind
    port: int | None = None
    path: str | None = None
    timeout_seconds: float = 5.0
    interval_seconds: float = 2.0
    start_period_seconds: float = 60.0


@dataclass(frozen=True)
class PortSpec:
    name: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class SourceSpec:
    """Where a workload's source lives: ``path`` is relative to the revision root (POSIX form,
    normalised, never leaving it), whatever the fleet sub-directory is."""

    path: str
    language: Language
    entrypoint: str


@dataclass(frozen=True)
class BuildSpec:
    targets: tuple[Target, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VolumeSpec:
    """A disk of one VM that outlives the VM's restarts and replaces (``deploy.volumes``).

    Each replica has its own, created once under the state directory and mounted by the guest
    init at ``mount_path`` before the workload starts. ``reclaim_policy``: what a prune of the
    VM does with it, ``retain`` (kept for ``reconciler volumes rm``) or ``delete``.
    """

    name: str
    size_mib: int
    mount_path: str
    filesystem: str = "ext4"
    reclaim_policy: str = "retain"


@dataclass(frozen=True)
class SecretRef:
    """A value of one of the fleet's secrets (``Fleet.spec.secrets``): ``key`` names a value of
    a sops file, ``""`` the whole of a plain age file. ``digest`` is the keyed digest of the
    value (``reconciler.secrets``): what settings, the state store and plans hold instead of it.
    """

    secret: str
    key: str
    digest: str


@dataclass(frozen=True)
class SecretFileSpec:
    """A secret the guest init writes, mode 0400, at ``path`` (under ``/run/secrets/``) before
    the workload starts (``deploy.secretFiles``)."""

    path: str
    ref: SecretRef


class SensitiveValues:
    """Decrypted secret values by their keyed digest, in memory only: what the executor hands to
    a guest's per-VM configuration. Its ``repr`` shows a count, so that no log, traceback or
    debugger line of a desired fleet prints a value."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def get(self, digest: str) -> str | None:
        return self._values.get(digest)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<{len(self._values)} sensitive values>"

    def values(self) -> tuple[str, ...]:
        """The values themselves: for masking them in free text (the daemon's redactor)."""
        return tuple(self._values.values())

    def union(self, other: SensitiveValues) -> SensitiveValues:
        """These values and ``other``'s (both are keyed by digest, so they never conflict)."""
        return SensitiveValues({**other._values, **self._values})


@dataclass(frozen=True)
class PlacementSpec:
    """Where a workload's VMs may run in a fleet of several hosts (``deploy.placement``).

    ``host_selector``: labels a host must carry, all of them. ``spread_by``: a host label (such
    as ``zone``) across whose values the replicas are spread, on top of the spread across hosts.
    Read by the leader's placement (``planning.placement``) only: not a VM setting, so changing
    it disturbs no VM by itself; a VM it moves shows as a move.
    """

    host_selector: Mapping[str, str] = field(default_factory=dict)
    spread_by: str | None = None


@dataclass(frozen=True)
class DeploySpec:
    target: Target
    runtime: RuntimeKind
    replicas: int
    vcpus: int
    memory_mib: int
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[PortSpec, ...] = ()
    health: HealthCheck | None = None
    depends_on: tuple[str, ...] = ()
    kernel: str | None = None
    args: tuple[str, ...] = ()
    kernel_args: str = ""
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    prevent_destroy: bool = False
    """No plan may delete these VMs (``planning.guard``) until a commit clears the flag."""
    volumes: tuple[VolumeSpec, ...] = ()
    secret_env: Mapping[str, SecretRef] = field(default_factory=dict)
    secret_files: tuple[SecretFileSpec, ...] = ()
    placement: PlacementSpec = PlacementSpec()
    rollout: RolloutOverrides | None = None
    """``deploy.rollout``: overrides of the Fleet's rollout policy (``rollout_policy``)."""


@dataclass(frozen=True)
class Workload:
    name: str
    labels: Mapping[str, str]
    source: SourceSpec
    build: BuildSpec
    deploy: DeploySpec
    source_digest: str
    """Content digest of the source tree at this revision (paths, modes, bytes)."""
    declared_in: str = ""
    """File the document came from; for messages only, never part of identity."""
    suspended: bool = False


@dataclass(frozen=True)
class ArtifactRef:
    """One build output a VM needs, named by the digest of its inputs.

    ``inputs`` names each component digest (``source``, ``target``, ``build``, ``kernel``,
    ``builder``) so that a plan can say which input moved. ``input_digest`` is the digest of
    ``inputs``; the artifact cache adds the toolchain versions of the machine that builds it.
    """

    workload: str
    target: Target
    input_digest: str
    inputs: Mapping[str, str]


@dataclass(frozen=True)
class DesiredVM:
    name: str
    workload: str
    ordinal: int
    runtime: RuntimeKind
    target: Target
    artifact: ArtifactRef
    settings: Mapping[str, str]
    """Flat canonical settings; see the module docstring and ``planning.rules``."""


@dataclass(frozen=True)
class RolloutPolicy:
    """How a workload's VMs move to a new version (``planning.rollout``): at most
    ``max_unavailable`` down and ``max_surge`` extra at once; ``canary`` replicas first, healthy
    for ``soak_seconds`` before the rest follow (or until ``reconciler promote`` when not
    ``auto_promote``); rolled back when not done within ``progress_deadline_seconds``."""

    max_unavailable: int = 1
    max_surge: int = 0
    canary: int = 0
    soak_seconds: float = 0.0
    auto_promote: bool = True
    progress_deadline_seconds: float | None = None


@dataclass(frozen=True)
class RolloutOverrides:
    """A workload's own ``deploy.rollout``: each field set overrides the Fleet's policy."""

    max_unavailable: int | None = None
    max_surge: int | None = None
    canary: int | None = None
    soak_seconds: float | None = None
    auto_promote: bool | None = None
    progress_deadline_seconds: float | None = None


def rollout_policy(fleet: RolloutPolicy, own: RolloutOverrides | None) -> RolloutPolicy:
    """The policy a workload rolls out with: the Fleet's, overridden field by field."""
    if own is None:
        return fleet
    merged = {
        name: getattr(own, name) if getattr(own, name) is not None else getattr(fleet, name)
        for name in RolloutPolicy.__dataclass_fields__
    }
    return RolloutPolicy(**merged)


class RolloutPhase(StrEnum):
    CANARY = "canary"  # the canaries run the new version; the rest wait for the soak
    PROMOTED = "promoted"  # every replica moves, in waves
    COMPLETE = "complete"  # every replica runs the new version, healthy
    ABORTED = "aborted"  # rolled back (operator, failed canary, deadline): held on the old


@dataclass(frozen=True)
class VersionSnapshot:
    """What a workload's replicas ran before a rollout: enough to start one again (its cached
    artifact by digest, its settings), so an abort needs neither the old revision nor a
    build."""

    runtime: RuntimeKind
    target: Target
    artifact_digest: str
    artifact_inputs: Mapping[str, str]
    settings: Mapping[str, str]


@dataclass(frozen=True)
class RolloutState:
    """One workload's rollout as the leader keeps it in the state store (``planning.rollout``
    derives it; it survives restarts and leader changes). ``version`` names the new version
    (``planning.rollout.version_of``); ``previous`` is what ran before it."""

    workload: str
    version: str
    revision: str | None
    phase: RolloutPhase
    started_at: float
    previous: VersionSnapshot | None = None
    canaries_healthy_since: float | None = None
    deadline_from: float | None = None  # progress is timed from here (not while held)
    message: str = ""  # why it was aborted, or what it waits for
    canaries: tuple[str, ...] = ()  # for status pages: the policy when it was last advanced
    soak_seconds: float = 0.0
    awaiting_promote: bool = False  # soaked, autoPromote false: `reconciler promote` is due

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "workload": self.workload,
            "version": self.version,
            "revision": self.revision,
            "phase": self.phase.value,
            "started_at": self.started_at,
            "canaries_healthy_since": self.canaries_healthy_since,
            "deadline_from": self.deadline_from,
            "message": self.message,
            "canaries": list(self.canaries),
            "soak_seconds": self.soak_seconds,
            "awaiting_promote": self.awaiting_promote,
            "previous": None,
        }
        if self.previous is not None:
            prev = self.previous
            data["previous"] = {
                "runtime": prev.runtime.value,
                "target": prev.target.value,
                "artifact_digest": prev.artifact_digest,
                "artifact_inputs": dict(prev.artifact_inputs),
                "settings": dict(prev.settings),
            }
        return canonical_json(data)

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        data = json.loads(text)
        prev = data.get("previous")
        return cls(
            workload=str(data["workload"]),
            version=str(data["version"]),
            revision=data.get("revision"),
            phase=RolloutPhase(data["phase"]),
            started_at=float(data["started_at"]),
            canaries_healthy_since=data.get("canaries_healthy_since"),
            deadline_from=data.get("deadline_from"),
            message=str(data.get("message", "")),
            canaries=tuple(str(c) for c in data.get("canaries", ())),
            soak_seconds=float(data.get("soak_seconds", 0.0)),
            awaiting_promote=bool(data.get("awaiting_promote", False)),
            previous=None
            if prev is None
            else VersionSnapshot(
                runtime=RuntimeKind(prev["runtime"]),
                target=Target(prev["target"]),
                artifact_digest=str(prev["artifact_digest"]),
                artifact_inputs={str(k): str(v) for k, v in prev["artifact_inputs"].items()},
                settings={str(k): str(v) for k, v in prev["settings"].items()},
            ),
        )


class RolloutCommand(StrEnum):
    """An operator's switch on a rollout (``reconciler promote`` / ``abort``)."""

    PROMOTE = "promote"
    ABORT = "abort"


@dataclass(frozen=True)
class RolloutSwitch:
    """An operator's switch as stored (unfenced, like a suspension): it applies to the rollout
    of ``version`` only, so a switch never carries over to a later revision's rollout."""

    workload: str
    command: RolloutCommand
    version: str
    at: float


@dataclass(frozen=True)
class NetworkPool:
    cidr: str = "10.88.0.0/24"
    bridge: str = "rcbr0"
    nat: bool = False
    host_prefix_length: int | None = None
    """Multi-host mode: the prefix of each host's subnet carved from ``cidr``; None derives
    it from the pool's size (``runtime.network.carving``). One host uses the whole pool."""


class NotificationEvent(StrEnum):
    """What a ``Fleet.spec.notifications`` endpoint may subscribe to (``reconciler.notify``)."""

    REVISION_APPLIED = "revision-applied"
    REVISION_FAILED = "revision-failed"  # refused, or failed to converge
    VM_UNHEALTHY = "vm-unhealthy"
    ROLLBACK = "rollback"
    LEADER_CHANGE = "leader-change"
    HOST_LOST = "host-lost"  # multi-host mode: the leader ended a lost host's epoch


@dataclass(frozen=True)
class NotificationSpec:
    """One outbound webhook (``Fleet.spec.notifications``). Its URL is a secret: either a value
    of the fleet's secrets (``url_secret``, a keyed digest like every secret reference) or the
    daemon's environment variable ``RECONCILER_NOTIFY_<url_env>`` (``url_env``), never a plain
    value in the manifest."""

    name: str
    format: str  # generic | slack | teams
    events: tuple[NotificationEvent, ...]
    url_secret: SecretRef | None = None
    url_env: str | None = None


@dataclass(frozen=True)
class FleetSettings:
    name: str
    rollout: RolloutPolicy = RolloutPolicy()
    prune: bool = True
    allow_empty: bool = False
    network: NetworkPool = NetworkPool()
    kernel: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    max_deletions: int | str | None = None
    """VMs one plan may delete: a count, ``"N%"`` of the fleet, or None for the default
    (``planning.guard``)."""
    declared: bool = True
    """False when the revision has no Fleet document and these are the built-in defaults."""
    secrets: Mapping[str, str] = field(default_factory=dict)
    """Secret name -> its encrypted file, relative to the fleet directory (``spec.secrets``)."""
    notifications: tuple[NotificationSpec, ...] = ()
    """Outbound webhooks of the fleet's events (``spec.notifications``, ``reconciler.notify``)."""


@dataclass(frozen=True)
class DesiredFleet:
    revision: str | None
    fleet: FleetSettings
    workloads: Mapping[str, Workload]
    vms: Mapping[str, DesiredVM]
    artifacts: Mapping[tuple[str, Target], ArtifactRef]
    sensitive: SensitiveValues = field(default_factory=SensitiveValues, compare=False)
    """The decrypted values behind the digests of ``deploy.secretEnv``/``secretFiles``."""


# --------------------------------------------------------------------------------------------
# Observed state
# --------------------------------------------------------------------------------------------


class VMState(StrEnum):
    PENDING = "pending"  # recorded, not started yet (or start in progress)
    RUNNING = "running"
    STOPPED = "stopped"  # shut down cleanly, can be started again
    FAILED = "failed"  # the workload or the guest failed
    MISSING = "missing"  # recorded as running, but its process is gone


@dataclass(frozen=True)
class ObservedVM:
    name: str
    workload: str
    fleet: str
    runtime: RuntimeKind
    target: Target
    artifact_digest: str
    artifact_inputs: Mapping[str, str]
    settings: Mapping[str, str]
    state: VMState = VMState.RUNNING
    healthy: bool | None = None
    pid: int | None = None
    address: str | None = None
    detail: str = ""
    started_at: float | None = None  # when its current VMM or process started (epoch seconds)
    restarts: int = 0  # how often the reconciler started it again after its first start


@dataclass(frozen=True)
class ObservedFleet:
    """What runs now. ``version`` grows with every write to the state store, so a saved plan
    can tell that the world moved since it was made."""

    version: int
    vms: Mapping[str, ObservedVM]
    applied_revision: str | None = None


EMPTY_OBSERVED = ObservedFleet(version=0, vms={})


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


class ActionType(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    RESTART = "restart"
    REPLACE = "replace"
    DELETE = "delete"
    NOOP = "no-op"


class Disruption(IntEnum):
    """How much a change to a running VM disturbs it; ordered, so ``max`` picks the worst."""

    NONE = 0  # also the disruption of a create: nothing running is disturbed
    IN_PLACE = 1
    RESTART = 2
    REPLACE = 3
    DESTROY = 4  # a delete: the VM goes away

    @property
    def label(self) -> str:
        return {0: "none", 1: "in-place", 2: "restart", 3: "replace", 4: "destroy"}[self.value]

    @classmethod
    def from_label(cls, label: str) -> Disruption:
        return {d.label: d for d in cls}[label]


@dataclass(frozen=True)
class Change:
    key: str
    before: str | None
    after: str | None


@dataclass(frozen=True)
class VMAction:
    action: ActionType
    vm: str
    workload: str
    disruption: Disruption
    reason: str
    changes: tuple[Change, ...] = ()
    artifact_before: str | None = None
    artifact_after: str | None = None
    wave: int = 0
    """Rollout batch: actions of one wave may run together; waves run in order."""
    stands_in_for: str | None = None
    """A surge stand-in (``planning.rollout``): this VM runs ``stands_in_for``'s desired spec
    under its own name while that VM is restarted or replaced."""


@dataclass(frozen=True)
class BuildAction:
    """An artifact whose input digest is not what runs now, with the inputs that moved."""

    workload: str
    target: Target
    digest_before: str | None
    digest_after: str
    changed_inputs: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class HostMove:
    """A VM that leaves one host for another: a stop there, then a start here."""

    vm: str
    workload: str
    source: str
    destination: str
    reason: str
    """Why it leaves ``source`` (the host is lost or draining, or the VM no longer fits it)."""


@dataclass(frozen=True)
class HostRoom:
    """What a host has left once the plan's VMs are placed (overcommit applied)."""

    host: str
    vcpus: int
    memory_mib: int
    state: str = "ready"
    """``ready``, or why the host takes no new VM: ``cordoned``, ``draining``, ``lost``."""


@dataclass(frozen=True)
class PlanPlacement:
    """Where a plan's VMs run across the fleet's hosts (multi-host stores only): the desired
    VMs' hosts, the VMs placed for the first time, the moves, the hosts deleted VMs leave and
    the room left on each host. ``planning.placed`` makes it; every renderer shows it."""

    hosts: str
    """The live hosts it was placed on, ``3 hosts, 1 draining``."""
    assignments: tuple[tuple[str, str], ...]
    """``(vm, host)`` for every desired VM, by VM."""
    new: tuple[str, ...] = ()
    """VMs that had no host before this plan, by name."""
    moves: tuple[HostMove, ...] = ()
    released: tuple[tuple[str, str], ...] = ()
    """``(vm, host)``: VMs no longer desired, and the host each one frees."""
    free: tuple[HostRoom, ...] = ()

    def host_of(self, vm: str) -> str | None:
        return dict(self.assignments).get(vm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "assignments": dict(self.assignments),
            "new": list(self.new),
            "moves": [
                {
                    "vm": m.vm,
                    "workload": m.workload,
                    "from": m.source,
                    "to": m.destination,
                    "reason": m.reason,
                }
                for m in self.moves
            ],
            "released": dict(self.released),
            "free": {
                r.host: {"vcpus": r.vcpus, "memory_mib": r.memory_mib, "state": r.state}
                for r in self.free
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanPlacement:
        return cls(
            hosts=str(data["hosts"]),
            assignments=tuple((str(k), str(v)) for k, v in data["assignments"].items()),
            new=tuple(str(vm) for vm in data["new"]),
            moves=tuple(
                HostMove(m["vm"], m["workload"], m["from"], m["to"], m["reason"])
                for m in data["moves"]
            ),
            released=tuple((str(k), str(v)) for k, v in data["released"].items()),
            free=tuple(
                HostRoom(str(host), int(r["vcpus"]), int(r["memory_mib"]), str(r["state"]))
                for host, r in data["free"].items()
            ),
        )


@dataclass(frozen=True)
class Plan:
    fleet: str
    base: str | None
    head: str | None
    observed_version: int
    actions: tuple[VMAction, ...]
    noops: Sequence[VMAction]
    """What the plan leaves alone, in order; a ``noop_rows.NoopRows`` from ``diff``."""
    builds: tuple[BuildAction, ...]
    warnings: tuple[str, ...] = ()
    format_version: int = PLAN_FORMAT_VERSION
    placement: PlanPlacement | None = None
    """Where the VMs run across hosts; None when not placed (no multi-host store)."""

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    def summary(self) -> dict[str, int]:
        counts = {kind.value: 0 for kind in ActionType if kind is not ActionType.NOOP}
        for action in self.actions:
            counts[action.action.value] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The stable, documented JSON form (see docs/plan-format.md)."""
        return {
            "format_version": self.format_version,
            "fleet": self.fleet,
            "base": self.base,
            "head": self.head,
            "observed_version": self.observed_version,
            "summary": self.summary(),
            "actions": [action_to_dict(a) for a in self.actions],
            "noops": [action_to_dict(a) for a in self.noops],
            "builds": [
                {
                    "workload": b.workload,
                    "target": b.target.value,
                    "digest_before": b.digest_before,
                    "digest_after": b.digest_after,
                    "changed_inputs": list(b.changed_inputs),
                    "reason": b.reason,
                }
                for b in self.builds
            ],
            "warnings": list(self.warnings),
            # Only when placed: an unplaced plan's JSON stays as it always was.
            **({"placement": self.placement.to_dict()} if self.placement is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``ValueError`` on malformed input
        (the caller turns those into a ``PlanError``)."""
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"unsupported plan format_version {data.get('format_version')!r}")
        return cls(
            fleet=str(data["fleet"]),
            base=data["base"],
            head=data["head"],
            observed_version=int(data["observed_version"]),
            actions=tuple(_action_from_dict(a) for a in data["actions"]),
            noops=tuple(_action_from_dict(a) for a in data["noops"]),
            builds=tuple(
                BuildAction(
                    workload=b["workload"],
                    target=Target(b["target"]),
                    digest_before=b["digest_before"],
                    digest_after=b["digest_after"],
                    changed_inputs=tuple(b["changed_inputs"]),
                    reason=b["reason"],
                )
                for b in data["builds"]
            ),
            warnings=tuple(data.get("warnings", ())),
            placement=(
                PlanPlacement.from_dict(data["placement"]) if data.get("placement") else None
            ),
        )


# Looked up, not read from the enums: a plan of 100,000 VMs spends more in ``Enum.value``
# (a descriptor call) than in the rest of ``action_to_dict``.
_ACTION_VALUES = {kind: kind.value for kind in ActionType}
_DISRUPTION_LABELS = {d: d.label for d in Disruption}


def action_to_dict(action: VMAction) -> dict[str, Any]:
    """One action's row in the JSON form of a plan (``Plan.to_dict``)."""
    row = {
        "action": _ACTION_VALUES[action.action],
        "vm": action.vm,
        "workload": action.workload,
        "disruption": _DISRUPTION_LABELS[action.disruption],
        "reason": action.reason,
        "changes": [{"key": c.key, "before": c.before, "after": c.after} for c in action.changes]
        if action.changes
        else [],
        "artifact_before": action.artifact_before,
        "artifact_after": action.artifact_after,
        "wave": action.wave,
    }
    if action.stands_in_for:
        row["stands_in_for"] = action.stands_in_for
    return row


def _action_from_dict(data: Mapping[str, Any]) -> VMAction:
    return VMAction(
        action=ActionType(data["action"]),
        vm=data["vm"],
        workload=data["workload"],
        disruption=Disruption.from_label(data["disruption"]),
        reason=data["reason"],
        changes=tuple(Change(c["key"], c["before"], c["after"]) for c in data["changes"]),
        artifact_before=data["artifact_before"],
        artifact_after=data["artifact_after"],
        wave=int(data["wave"]),
        stands_in_for=data.get("stands_in_for"),
    )


# --------------------------------------------------------------------------------------------
# Derivations from a Workload (pure; used by manifests.compile and by tests)
# --------------------------------------------------------------------------------------------

BUILDER_ABI = "1"
"""Bump when the builders produce different output from the same inputs; it is one of the
inputs of every artifact digest, so bumping it rebuilds everything once."""


def artifact_ref_for(workload: Workload, target: Target, kernel: str | None) -> ArtifactRef:
    """The artifact ``workload`` builds for ``target``, named by the digest of its inputs.

    ``kernel`` is the fleet's kernel reference (name or digest); the executable target does
    not boot a kernel, so its digest ignores it.
    """
    source = workload.source
    build = digest_of(
        {
            "language": source.language.value,
            "entrypoint": source.entrypoint,
            "options": dict(workload.build.options),
        }
    )
    return _artifact_ref(workload.name, workload.source_digest, build, target, kernel)


def _artifact_ref(
    name: str, source: str, build: str, target: Target, kernel: str | None
) -> ArtifactRef:
    inputs = {"source": source, "build": build, **_fixed_inputs(target, kernel)}
    return ArtifactRef(workload=name, target=target, input_digest=digest_of(inputs), inputs=inputs)


@functools.lru_cache(maxsize=256)  # kernel names come from manifests: bounded
def _fixed_inputs(target: Target, kernel: str | None) -> dict[str, str]:
    """The inputs of an artifact digest that every workload of a fleet shares: the same few
    (target, kernel) pairs for ten thousand workloads, so each is digested once."""
    return {
        "target": digest_of(target.value),
        "kernel": digest_of(kernel if target is not Target.EXECUTABLE else None),
        "builder": digest_of(BUILDER_ABI),
    }


def vm_settings(workload: Workload, artifact: ArtifactRef, kernel: str | None) -> dict[str, str]:
    """The flat settings of every replica of ``workload`` (see the module docstring)."""
    deploy = workload.deploy
    settings: dict[str, Any] = {
        "runtime": deploy.runtime.value,
        "target": deploy.target.value,
        "artifact": artifact.input_digest,
        "deploy.vcpus": deploy.vcpus,
        "deploy.memoryMiB": deploy.memory_mib,
        "deploy.kernel": kernel if deploy.runtime is not RuntimeKind.PROCESS else None,
        "deploy.kernelArgs": deploy.kernel_args,
        "deploy.args": list(deploy.args),
        "deploy.restartPolicy": deploy.restart_policy,
        "deploy.ports": [[p.name, p.port, p.protocol] for p in deploy.ports],
        HEALTH_KEY: None if deploy.health is None else _health_setting(deploy.health),
        "deploy.dependsOn": sorted(deploy.depends_on),
    }
    if deploy.prevent_destroy:
        # Only when set, so that fleets without the flag see no change in their settings.
        settings["deploy.preventDestroy"] = True
    for volume in deploy.volumes:
        # Only when declared, like preventDestroy. The reclaim policy is a key of its own: the
        # host alone reads it (at prune time), so changing it disturbs nothing.
        settings[f"{VOLUME_KEY}{volume.name}"] = {
            "sizeMiB": volume.size_mib,
            "mountPath": volume.mount_path,
            "filesystem": volume.filesystem,
        }
        settings[f"{VOLUME_RECLAIM_KEY}{volume.name}"] = volume.reclaim_policy
    for key, value in deploy.env.items():
        settings[f"deploy.env.{key}"] = value
    # Only the reference and its keyed digest: a new value is a new digest (a restart), and
    # nothing that stores or shows settings ever holds the value.
    for key, ref in deploy.secret_env.items():
        settings[f"{SECRET_ENV_KEY}{key}"] = _secret_setting(ref)
    for secret_file in deploy.secret_files:
        settings[f"{SECRET_FILE_KEY}{secret_file.path}"] = _secret_setting(secret_file.ref)
    for key, value in workload.labels.items():
        settings[f"metadata.labels.{key}"] = value
    return {key: canonical_json(value) for key, value in settings.items()}


HEALTH_KEY = "deploy.health"
SECRET_ENV_KEY = "deploy.secretEnv."
SECRET_FILE_KEY = "deploy.secretFiles."
SENSITIVE = "(sensitive)"
"""What every plan shows instead of a secret setting's value, before and after."""


def _secret_setting(ref: SecretRef) -> dict[str, str]:
    return {"secret": ref.secret, "key": ref.key, "digest": ref.digest}


def is_sensitive(key: str) -> bool:
    """Whether settings ``key`` stands for a secret (shown as ``SENSITIVE``)."""
    return key.startswith((SECRET_ENV_KEY, SECRET_FILE_KEY))


def settings_change(key: str, before: str | None, after: str | None) -> Change:
    """A changed setting as plans carry it: a secret's digests become ``SENSITIVE``, so that a
    plan still says *that* a secret changed, in every rendering, and never what it is."""
    if is_sensitive(key):
        before = None if before is None else SENSITIVE
        after = None if after is None else SENSITIVE
    return Change(key, before, after)


def secret_digests_of(settings: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({env name: digest}, {file path: digest})`` of a VM's flat settings (inverse of
    ``vm_settings``): what the executor looks up in ``SensitiveValues`` at start time."""
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    for key, raw in settings.items():
        for prefix, found in ((SECRET_ENV_KEY, env), (SECRET_FILE_KEY, files)):
            if key.startswith(prefix):
                value = json.loads(raw)
                found[key.removeprefix(prefix)] = str(value["digest"])
    return env, files


def _health_setting(check: HealthCheck) -> dict[str, Any]:
    return {
        "kind": check.kind,
        "port": check.port,
        "path": check.path,
        "timeoutSeconds": check.timeout_seconds,
        "intervalSeconds": check.interval_seconds,
        "startPeriodSeconds": check.start_period_seconds,
    }


def health_check_of(settings: Mapping[str, str]) -> HealthCheck | None:
    """The health check a VM's flat settings declare (inverse of ``vm_settings``): the host
    probes the same ``HealthCheck`` the manifest compiled to, not a loose mapping."""
    raw = settings.get(HEALTH_KEY)
    value = json.loads(raw) if raw else None
    if not isinstance(value, dict):
        return None
    port, path = value.get("port"), value.get("path")
    return HealthCheck(
        kind=HealthKind(value.get("kind") or HealthKind.CONSOLE),
        port=int(port) if port is not None else None,
        path=str(path) if path is not None else None,
        timeout_seconds=float(value.get("timeoutSeconds", HealthCheck.timeout_seconds)),
        interval_seconds=float(value.get("intervalSeconds", HealthCheck.interval_seconds)),
        start_period_seconds=float(
            value.get("startPeriodSeconds", HealthCheck.start_period_seconds)
        ),
    )


VOLUME_KEY = "deploy.volumes."
VOLUME_RECLAIM_KEY = "deploy.volumeReclaim."


def volumes_of(settings: Mapping[str, str]) -> tuple[VolumeSpec, ...]:
    """The volumes a VM's flat settings declare, by name (inverse of ``vm_settings``)."""
    volumes = []
    for key, raw in sorted(settings.items()):
        if not key.startswith(VOLUME_KEY):
            continue
        name = key.removeprefix(VOLUME_KEY)
        value = json.loads(raw)
        reclaim = settings.get(f"{VOLUME_RECLAIM_KEY}{name}")
        volumes.append(
            VolumeSpec(
                name=name,
                size_mib=int(value["sizeMiB"]),
                mount_path=str(value["mountPath"]),
                filesystem=str(value.get("filesystem", "ext4")),
                reclaim_policy=str(json.loads(reclaim)) if reclaim else "retain",
            )
        )
    return tuple(volumes)


def vm_name(workload: str, ordinal: int) -> str:
    return f"{workload}-{ordinal}"


@dataclass(frozen=True)
class Replicas:
    """What every replica of one workload shares: the compact record of its VMs
    (``ReplicaVMs``), one per workload whatever its number of replicas."""

    workload: str
    count: int
    runtime: RuntimeKind
    target: Target
    artifact: ArtifactRef
    settings: Mapping[str, str]

    def vm(self, ordinal: int) -> DesiredVM:
        return DesiredVM(
            name=vm_name(self.workload, ordinal),
            workload=self.workload,
            ordinal=ordinal,
            runtime=self.runtime,
            target=self.target,
            artifact=self.artifact,
            settings=self.settings,
        )


class ReplicaVMs(Mapping[str, DesiredVM]):
    """A desired fleet's VMs, ``<workload>-<ordinal>`` -> ``DesiredVM``, kept as one
    ``Replicas`` record per workload: a ``DesiredVM`` is made when it is looked up.

    A fleet of 100,000 VMs is mostly replicas nobody looks at one by one (the planner compares
    whole workloads first: ``planning.diff``), so memory and time follow the workloads. Reads
    like the ``dict`` it stands for: iteration in workload order, then ordinal order."""

    __slots__ = ("_count", "groups")

    def __init__(self, groups: Iterable[Replicas]) -> None:
        self.groups: dict[str, Replicas] = {g.workload: g for g in groups}
        self._count = sum(g.count for g in self.groups.values())

    def locate(self, name: str) -> tuple[Replicas, int] | None:
        """The record and ordinal of VM ``name``, or None when it is not one of these."""
        workload, dash, digits = name.rpartition("-")
        # Only the spelling vm_name gives: "web-01" or "web-+1" name no VM.
        if not dash or not digits.isascii() or not digits.isdigit():
            return None
        if len(digits) > 1 and digits[0] == "0":
            return None
        group = self.groups.get(workload)
        ordinal = int(digits)
        if group is None or ordinal >= group.count:
            return None
        return group, ordinal

    def __getitem__(self, name: str) -> DesiredVM:
        found = self.locate(name)
        if found is None:
            raise KeyError(name)
        return found[0].vm(found[1])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.locate(name) is not None

    def __iter__(self) -> Iterator[str]:
        for group in self.groups.values():
            for ordinal in range(group.count):
                yield vm_name(group.workload, ordinal)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<{self._count} VMs of {len(self.groups)} workloads>"


# What ``assemble_fleet`` derived from one workload object: (the workload, kernel, artifact of
# each target, the deployed one, the VMs' settings).
Expansion = tuple[Workload, str | None, dict[Target, ArtifactRef], ArtifactRef, dict[str, str]]


def expand_workload(workload: Workload, kernel: str | None) -> Expansion:
    """What ``assemble_fleet`` derives from one workload booting ``kernel``: its artifacts,
    the one it deploys and its VMs' settings."""
    # One build digest for every target of the workload (``artifact_ref_for``).
    build = artifact_ref_for(workload, workload.deploy.target, kernel)
    own = {
        t: build
        if t is build.target
        else _artifact_ref(workload.name, workload.source_digest, build.inputs["build"], t, kernel)
        for t in workload.build.targets
    }
    deployed = own.get(workload.deploy.target) or build
    return workload, kernel, own, deployed, vm_settings(workload, deployed, kernel)


def assemble_fleet(
    revision: str | None,
    fleet: FleetSettings,
    workloads: Mapping[str, Workload],
    *,
    expanded: dict[int, Expansion] | None = None,
) -> DesiredFleet:
    """Expand validated workloads into VMs and artifacts: the last, pure step of compiling.

    ``expanded`` (by ``id`` of the workload object, which each entry keeps alive) carries the
    derivations of a workload object the loader reuses from one revision to the next: they are
    computed once, and both revisions share the settings objects."""
    groups: list[Replicas] = []
    artifacts: dict[tuple[str, Target], ArtifactRef] = {}
    for workload in workloads.values():
        kernel = workload.deploy.kernel or fleet.kernel
        known = expanded.get(id(workload)) if expanded is not None else None
        if known is None or known[0] is not workload or known[1] != kernel:
            known = expand_workload(workload, kernel)
            if expanded is not None:
                expanded[id(workload)] = known
        _, _, own, deployed, settings = known
        for target, ref in own.items():
            artifacts[(workload.name, target)] = ref
        groups.append(
            Replicas(
                workload=workload.name,
                count=workload.deploy.replicas,
                runtime=workload.deploy.runtime,
                target=workload.deploy.target,
                artifact=deployed,
                settings=settings,
            )
        )
    return DesiredFleet(
        revision=revision,
        fleet=fleet,
        workloads=dict(workloads),
        vms=ReplicaVMs(groups),
        artifacts=artifacts,
    )
