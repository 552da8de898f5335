"""Progressive rollouts: canaries, soak, promotion, abort, progress deadline and surge.

    DesiredFleet + ObservedFleet + stored RolloutStates + operator switches + now
        ──gate──▶ the effective DesiredFleet (each replica on the new version or the previous
                  one) + the RolloutStates to store + what happened (events)
        ──diff──▶ Plan (``surge_waves`` cuts a workload's restarts and replaces into waves)

A rollout does not change what a plan can say: it only decides, per replica, which version is
*desired* right now, and the ordinary diff plans the way there. So a canary is "web-0 desired on
the new version, web-1 and web-2 on the previous one", an abort is "every replica desired on the
previous one" (from the ``VersionSnapshot`` taken when the rollout began: the settings and the
artifact digest, whose build the content-addressed cache keeps), and healing a dead replica
during a canary restarts it on the version it is meant to run.

The state machine of one workload (``RolloutPhase``), keyed by the new version's digest, so that
a new revision with the same workload version continues a rollout and one with another version
starts a new one:

    canary ──canaries healthy for soakSeconds (autoPromote) or `reconciler promote`──▶ promoted
    promoted ──every replica on the new version, healthy──▶ complete
    canary | promoted ──`reconciler abort`, a canary failing health (the cycle), or
                        progressDeadlineSeconds passed──▶ aborted (held on the previous version
                        until a revision brings another version)

Surge: a restart or replace of a running VM with ``maxSurge`` > 0 starts a stand-in first, a VM
named ``<vm>-surge`` (no desired name ends so: desired names end with an ordinal) running the
new version; then the VM is replaced while the stand-in serves; then the stand-in is deleted.
The stand-in's name is fixed, so a daemon killed mid-way finds it (the executor records a VM
before its VMM starts) and the next plan either keeps it until its VM is replaced or deletes it:
never a second stand-in, never an orphan. Workloads with volumes are not surged (a stand-in
would get empty disks of its own).

Pure: no I/O; time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from reconciler.errors import PlanError
from reconciler.model import (
    ActionType,
    ArtifactRef,
    DesiredFleet,
    DesiredVM,
    Disruption,
    ObservedFleet,
    ObservedVM,
    RolloutCommand,
    RolloutPhase,
    RolloutPolicy,
    RolloutState,
    RolloutSwitch,
    VersionSnapshot,
    VMAction,
    VMState,
    Workload,
    digest_of,
    rollout_policy,
    volumes_of,
)

SURGE_SUFFIX = "-surge"

ACTIVE = (RolloutPhase.CANARY, RolloutPhase.PROMOTED)


def stand_in_name(vm: str) -> str:
    return vm + SURGE_SUFFIX


def stands_in_for(name: str) -> str | None:
    """The VM a surge stand-in named ``name`` replaces for a while; ``None`` for other VMs."""
    return name[: -len(SURGE_SUFFIX)] if name.endswith(SURGE_SUFFIX) else None


def policy_of(desired: DesiredFleet, workload: str) -> RolloutPolicy:
    known = desired.workloads.get(workload)
    own = known.deploy.rollout if known is not None else None
    return rollout_policy(desired.fleet.rollout, own)


def version_of(vm: DesiredVM) -> str:
    """The digest naming what a replica runs: artifact, runtime, target and settings."""
    return _version(vm.runtime.value, vm.target.value, vm.artifact.input_digest, vm.settings)


def observed_version(vm: ObservedVM) -> str:
    return _version(vm.runtime.value, vm.target.value, vm.artifact_digest, vm.settings)


def _version(runtime: str, target: str, artifact: str, settings: Mapping[str, str]) -> str:
    return digest_of(
        {"runtime": runtime, "target": target, "artifact": artifact, "settings": dict(settings)}
    )


# -- canaries, promotion, abort, deadline -------------------------------------------------------


@dataclass(frozen=True)
class RolloutEvent:
    kind: str  # rollout-started | rollout-promoted | rollout-complete | rollout-aborted
    workload: str
    message: str


@dataclass(frozen=True)
class RolloutProgress:
    """What status pages show of one workload's rollout."""

    state: RolloutState
    canaries: tuple[str, ...]
    soak_remaining: float | None  # seconds; None when not soaking
    waiting_for_promote: bool


@dataclass(frozen=True)
class Gated:
    desired: DesiredFleet
    changed: tuple[RolloutState, ...] = ()  # to store
    events: tuple[RolloutEvent, ...] = ()
    progress: Mapping[str, RolloutProgress] = field(default_factory=dict)
    aborted: tuple[RolloutState, ...] = ()  # rolled back this time (to report once)

    @property
    def in_progress(self) -> tuple[str, ...]:
        """Workloads whose rollout of this revision is not finished (the revision is not
        applied yet)."""
        return tuple(sorted(w for w, p in self.progress.items() if p.state.phase in ACTIVE))


def gate(
    desired: DesiredFleet,
    observed: ObservedFleet,
    states: Mapping[str, RolloutState],
    switches: Mapping[str, RolloutSwitch],
    now: float,
    *,
    track: bool = True,
) -> Gated:
    """The fleet to converge onto now, given each workload's rollout.

    ``track`` is False when the daemon heals onto an older revision than the head: stored
    rollouts of other versions are left alone and no rollout starts (the older revision's
    versions were rolled out when it was applied)."""
    vms = dict(desired.vms)
    moved = False
    changed: list[RolloutState] = []
    events: list[RolloutEvent] = []
    progress: dict[str, RolloutProgress] = {}
    aborted: list[RolloutState] = []
    by_workload: dict[str, list[DesiredVM]] = {}
    for vm in desired.vms.values():
        by_workload.setdefault(vm.workload, []).append(vm)

    for name, replicas in sorted(by_workload.items()):
        workload = desired.workloads[name]
        if workload.suspended:
            continue
        replicas.sort(key=lambda vm: vm.ordinal)
        policy = rollout_policy(desired.fleet.rollout, workload.deploy.rollout)
        version = version_of(replicas[0])
        stored = states.get(name)
        state = stored if stored is not None and stored.version == version else None
        if state is None:
            if not track:
                continue
            state = _begin(desired, workload, replicas, observed, policy, version, now)
            if state is None:
                if stored is not None and stored.phase is not RolloutPhase.COMPLETE:
                    # A revision that brings the running version back ends a held rollout.
                    done = replace(
                        stored,
                        phase=RolloutPhase.COMPLETE,
                        message="a later revision runs the previous version again",
                    )
                    changed.append(done)
                continue
            changed.append(state)
            events.append(
                RolloutEvent("rollout-started", name, _started_text(state, policy, replicas))
            )
        before = state
        state = _switch(state, switches.get(name), now, events)
        state = _advance(state, policy, replicas, observed, now, events)
        canaries = tuple(vm.name for vm in replicas[: policy.canary])
        state = replace(
            state,
            canaries=canaries if state.phase is RolloutPhase.CANARY else (),
            soak_seconds=float(policy.soak_seconds),
            awaiting_promote=_waits_for_promote(state, policy, now),
        )
        if state.phase is RolloutPhase.ABORTED and before.phase is not RolloutPhase.ABORTED:
            aborted.append(state)
        if state != before and state not in changed:
            changed = [s for s in changed if s.workload != name] + [state]
        assigned_previous = _previous_replicas(state, policy, replicas)
        if state.previous is not None:
            for vm in assigned_previous:
                vms[vm.name] = _on_previous(vm, state.previous)
                moved = True
        progress[name] = RolloutProgress(
            state=state,
            canaries=canaries if state.phase is RolloutPhase.CANARY else (),
            soak_remaining=_soak_remaining(state, policy, now),
            waiting_for_promote=_waits_for_promote(state, policy, now),
        )
    return Gated(
        desired=replace(desired, vms=vms) if moved else desired,
        changed=tuple(changed),
        events=tuple(events),
        progress=progress,
        aborted=tuple(aborted),
    )


def abort_for_unhealthy(
    states: Mapping[str, RolloutState], unhealthy: Mapping[str, str], workloads: Mapping[str, str]
) -> tuple[RolloutState, ...]:
    """The active rollouts to abort because a VM they started failed its health check
    (``workloads``: VM name -> workload); the executor has put those VMs back already."""
    aborted: list[RolloutState] = []
    for vm, why in sorted(unhealthy.items()):
        workload = workloads.get(vm) or workloads.get(stands_in_for(vm) or "")
        state = states.get(workload or "")
        if state is None or state.phase not in ACTIVE:
            continue
        if any(s.workload == state.workload for s in aborted):
            continue
        aborted.append(
            replace(
                state,
                phase=RolloutPhase.ABORTED,
                message=f"{vm} failed its health check ({why}); held on the previous version",
            )
        )
    return tuple(aborted)


def _begin(  # noqa: PLR0917 - one internal step of gate, called once
    desired: DesiredFleet,
    workload: Workload,
    replicas: Sequence[DesiredVM],
    observed: ObservedFleet,
    policy: RolloutPolicy,
    version: str,
    now: float,
) -> RolloutState | None:
    """A new rollout when some replica runs another version and the policy stages rollouts."""
    if not policy.canary and policy.progress_deadline_seconds is None:
        return None
    fleet = desired.fleet.name
    current = [
        observed.vms[vm.name]
        for vm in replicas
        if vm.name in observed.vms and observed.vms[vm.name].fleet == fleet
    ]
    old = [vm for vm in current if observed_version(vm) != version]
    if not old:
        return None  # a first deployment, or already there: nothing to stage
    # The snapshot of what ran: a healthy running replica's if there is one.
    old.sort(key=lambda vm: (vm.state is not VMState.RUNNING, vm.healthy is not True))
    source = old[0]
    snapshot = VersionSnapshot(
        runtime=source.runtime,
        target=source.target,
        artifact_digest=source.artifact_digest,
        artifact_inputs=dict(source.artifact_inputs),
        settings=dict(source.settings),
    )
    return RolloutState(
        workload=workload.name,
        version=version,
        revision=desired.revision,
        phase=RolloutPhase.CANARY if policy.canary else RolloutPhase.PROMOTED,
        started_at=now,
        previous=snapshot,
        deadline_from=now,
    )


def _switch(
    state: RolloutState, switch: RolloutSwitch | None, now: float, events: list[RolloutEvent]
) -> RolloutState:
    """An operator's promote or abort, if it is for this rollout and it can still apply."""
    if switch is None or switch.version != state.version or state.phase not in ACTIVE:
        return state
    if switch.command is RolloutCommand.ABORT:
        message = "aborted by the operator; held on the previous version"
        events.append(RolloutEvent("rollout-aborted", state.workload, message))
        return replace(state, phase=RolloutPhase.ABORTED, message=message)
    if state.phase is RolloutPhase.CANARY:
        events.append(RolloutEvent("rollout-promoted", state.workload, "by the operator"))
        return replace(state, phase=RolloutPhase.PROMOTED, deadline_from=now, message="")
    return state


def _advance(  # noqa: PLR0917 - one internal step of gate, called once
    state: RolloutState,
    policy: RolloutPolicy,
    replicas: Sequence[DesiredVM],
    observed: ObservedFleet,
    now: float,
    events: list[RolloutEvent],
) -> RolloutState:
    if state.phase not in ACTIVE:
        return state
    deadline = policy.progress_deadline_seconds
    started = state.deadline_from
    if deadline is not None and started is not None and now - started > deadline:
        message = (
            f"not finished within progressDeadlineSeconds ({deadline:g} s); "
            "rolled back to the previous version"
        )
        events.append(RolloutEvent("rollout-aborted", state.workload, message))
        return replace(state, phase=RolloutPhase.ABORTED, message=message)
    if state.phase is RolloutPhase.CANARY:
        canaries = replicas[: policy.canary]
        ready = all(_healthy_on(observed, vm, state.version) for vm in canaries)
        if not ready:
            return replace(state, canaries_healthy_since=None, message="")
        since = state.canaries_healthy_since if state.canaries_healthy_since else now
        state = replace(state, canaries_healthy_since=since)
        if now - since < policy.soak_seconds:
            return state
        if not policy.auto_promote:
            # Waiting for a person is not slow progress: the deadline starts again at promote.
            return replace(
                state,
                deadline_from=None,
                message=f"waiting for `reconciler promote {state.workload}`",
            )
        events.append(
            RolloutEvent(
                "rollout-promoted",
                state.workload,
                f"canaries healthy for {policy.soak_seconds:g} s",
            )
        )
        state = replace(state, phase=RolloutPhase.PROMOTED, message="")
    if all(_healthy_on(observed, vm, state.version) for vm in replicas):
        events.append(
            RolloutEvent("rollout-complete", state.workload, f"{len(replicas)} replica(s)")
        )
        return replace(state, phase=RolloutPhase.COMPLETE, message="")
    return state


def _healthy_on(observed: ObservedFleet, vm: DesiredVM, version: str) -> bool:
    current = observed.vms.get(vm.name)
    return (
        current is not None
        and current.state is VMState.RUNNING
        and current.healthy is True
        and observed_version(current) == version
    )


def _previous_replicas(
    state: RolloutState, policy: RolloutPolicy, replicas: Sequence[DesiredVM]
) -> Sequence[DesiredVM]:
    if state.phase is RolloutPhase.CANARY:
        return replicas[policy.canary :]
    if state.phase is RolloutPhase.ABORTED:
        return replicas
    return ()


def _on_previous(vm: DesiredVM, previous: VersionSnapshot) -> DesiredVM:
    return replace(
        vm,
        runtime=previous.runtime,
        target=previous.target,
        artifact=ArtifactRef(
            workload=vm.workload,
            target=previous.target,
            input_digest=previous.artifact_digest,
            inputs=previous.artifact_inputs,
        ),
        settings=previous.settings,
    )


def _soak_remaining(state: RolloutState, policy: RolloutPolicy, now: float) -> float | None:
    if state.phase is not RolloutPhase.CANARY or state.canaries_healthy_since is None:
        return None
    return max(0.0, policy.soak_seconds - (now - state.canaries_healthy_since))


def _waits_for_promote(state: RolloutState, policy: RolloutPolicy, now: float) -> bool:
    remaining = _soak_remaining(state, policy, now)
    return remaining == 0.0 and not policy.auto_promote


def _started_text(state: RolloutState, policy: RolloutPolicy, replicas: Sequence[DesiredVM]) -> str:
    if state.phase is RolloutPhase.CANARY:
        names = ", ".join(vm.name for vm in replicas[: policy.canary])
        return f"canary {names} first, soak {policy.soak_seconds:g} s"
    return f"{len(replicas)} replica(s) in waves"


def previous_digests(gated: Gated) -> set[str]:
    """Artifact digests of the previous versions the gate put replicas back on: these come from
    the build cache, never from a build (``reconciler diff`` does not list them as builds)."""
    return {
        p.state.previous.artifact_digest
        for p in gated.progress.values()
        if p.state.previous is not None
    }


# -- surge ----------------------------------------------------------------------------------


def surge_waves(
    group: Sequence[VMAction],
    *,
    policy: RolloutPolicy,
    observed: Mapping[str, ObservedVM],
    stand_ins: Mapping[str, VMAction],
    workload: str,
    first_wave: int,
) -> tuple[list[VMAction], int]:
    """A workload's restarts and replaces (``group``), cut into waves; returns the actions and
    the last wave used.

    A running VM with ``maxSurge`` > 0 gets a stand-in first (create, then the VM's action,
    then the stand-in's delete, each in its own wave, ``maxSurge`` VMs at a time); a VM that is
    down (dead, stopped) or has volumes goes in batches of ``maxUnavailable``. ``stand_ins``
    are the deletes of stand-ins already running (an interrupted surge), by the VM they stand
    in for: that VM is replaced with no second stand-in, then the stand-in goes.
    """
    wave = first_wave
    result: list[VMAction] = []
    surged: list[VMAction] = []
    direct: list[VMAction] = []
    for action in group:
        current = observed.get(action.vm)
        up = current is not None and current.state is VMState.RUNNING
        if action.vm in stand_ins:
            direct.append(action)
        elif (
            up and current is not None and policy.max_surge > 0 and not volumes_of(current.settings)
        ):
            surged.append(action)
        elif up and policy.max_unavailable == 0:
            raise PlanError(
                f"workload {workload!r}: maxUnavailable 0 needs maxSurge of 1 or more "
                f"(and a workload without volumes) to restart or replace {action.vm}"
            )
        else:
            direct.append(action)

    batch = max(1, policy.max_unavailable)
    for start in range(0, len(direct), batch):
        wave += 1
        chunk = direct[start : start + batch]
        result.extend(replace(a, wave=wave) for a in chunk)
        leaving = [stand_ins[a.vm] for a in chunk if a.vm in stand_ins]
        if leaving:
            wave += 1
            result.extend(replace(a, wave=wave) for a in leaving)

    size = max(1, policy.max_surge)
    for start in range(0, len(surged), size):
        chunk = surged[start : start + size]
        result.extend(replace(_stand_in_create(a), wave=wave + 1) for a in chunk)
        result.extend(replace(a, wave=wave + 2) for a in chunk)
        result.extend(replace(_stand_in_delete(a), wave=wave + 3) for a in chunk)
        wave += 3
    return result, wave


def stand_in_delete(name: str, workload: str, slot: str, artifact: str, why: str) -> VMAction:
    """The delete of a running stand-in (found by the diff): it never counts as a deletion of
    the fleet (``planning.guard``)."""
    return VMAction(
        action=ActionType.DELETE,
        vm=name,
        workload=workload,
        disruption=Disruption.NONE,
        reason=why,
        artifact_before=artifact,
        stands_in_for=slot,
    )


def _stand_in_create(action: VMAction) -> VMAction:
    return VMAction(
        action=ActionType.CREATE,
        vm=stand_in_name(action.vm),
        workload=action.workload,
        disruption=Disruption.NONE,
        reason=f"surge: stands in for {action.vm} while it is {_verb(action)}",
        artifact_after=action.artifact_after,
        stands_in_for=action.vm,
    )


def _stand_in_delete(action: VMAction) -> VMAction:
    return stand_in_delete(
        stand_in_name(action.vm),
        action.workload,
        action.vm,
        action.artifact_after or "",
        f"surge: {action.vm} is {_verb(action)}, its stand-in goes",
    )


def _verb(action: VMAction) -> str:
    return "restarted" if action.action is ActionType.RESTART else "replaced"
