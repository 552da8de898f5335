"""The planner: compare a ``DesiredFleet`` with an ``ObservedFleet`` and return a ``Plan``.

Input comes from ``manifests`` (desired) and from the state store or, for a review of two
revisions, from :func:`observed_from_desired` of the base revision. Output goes to ``render``
(diff) or ``execution`` (apply). Pure: same inputs, same plan, no I/O.

Decisions, in the order they are taken for each VM:

1. An observed VM owned by another fleet is never touched (prune touches only what this fleet
   owns).
2. A desired VM that is not observed is created.
3. A suspended workload's VMs are left as they are.
4. An observed VM that died is recreated (``replace``), a stopped one restarted, unless it is a
   batch job (``restartPolicy: never``) that ended, which is left alone.
5. Otherwise the settings are compared key by key and the worst disruption class of the changed
   keys (``rules``) picks ``update`` (in place), ``restart`` or ``replace``.
6. An observed VM that is no longer desired is deleted, if the fleet prunes; a surge stand-in
   (``<vm>-surge``, ``rollout``) is deleted once its VM no longer needs it, prune or not.

Waves follow each workload's rollout policy (``rollout.surge_waves``): ``maxUnavailable`` VMs
at a time, or with ``maxSurge`` a stand-in first, so capacity never drops during a replace.

Volumes (``deploy.volumes``) outlive every action but a delete: a plan that would shrink one is
refused (ext4 is grown in place, never shrunk), and a delete says whether it discards the VM's
volume data (``reclaimPolicy: delete``) or keeps it.

An empty desired set never deletes the fleet unless the fleet sets ``allowEmpty``.

Comparing two revisions (``observed_from_desired``), both sides stay one record per workload
(``model.ReplicaVMs``, ``DerivedVMs``): a workload whose replicas have the same settings on
both sides is "up to date" for every replica they share without a ``DesiredVM`` or
``ObservedVM`` being built, so the cost follows the workloads and the change, not the VMs. The
decisions, and the plan's content and order, are the same as VM by VM (a randomized test
compares both).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from reconciler.errors import PlanError
from reconciler.model import (
    ActionType,
    ArtifactRef,
    BuildAction,
    Change,
    DesiredFleet,
    DesiredVM,
    Disruption,
    ObservedFleet,
    ObservedVM,
    Plan,
    Replicas,
    ReplicaVMs,
    RestartPolicy,
    Target,
    VMAction,
    VMState,
    settings_change,
    vm_name,
    volumes_of,
)
from reconciler.noop_rows import NoopRows, NoopRun, noop
from reconciler.planning.rollout import (
    policy_of,
    stand_in_delete,
    stands_in_for,
    surge_waves,
)
from reconciler.planning.rules import disruption_of

_ACTION_FOR = {
    Disruption.IN_PLACE: ActionType.UPDATE,
    Disruption.RESTART: ActionType.RESTART,
    Disruption.REPLACE: ActionType.REPLACE,
}


def observed_from_desired(desired: DesiredFleet, *, version: int = 0) -> ObservedFleet:
    """The fleet as it would run once ``desired`` were fully applied and healthy.

    This is the "observed" side when two revisions are compared (``diff --base --head``): the
    review of a pull request needs no runtime and no state store. Its VMs stay one record per
    workload (``DerivedVMs``), which lets ``diff`` compare whole workloads.
    """
    if isinstance(desired.vms, ReplicaVMs):
        running = ReplicaVMs(
            group
            for name, group in desired.vms.groups.items()
            if not desired.workloads[name].suspended
        )
        return ObservedFleet(
            version=version,
            vms=DerivedVMs(running, desired.fleet.name),
            applied_revision=desired.revision,
        )
    vms = {vm.name: _running(vm, desired.fleet.name) for vm in desired.vms.values()}
    vms = {n: vm for n, vm in vms.items() if not desired.workloads[vm.workload].suspended}
    return ObservedFleet(version=version, vms=vms, applied_revision=desired.revision)


def _running(vm: DesiredVM, fleet: str) -> ObservedVM:
    return ObservedVM(
        name=vm.name,
        workload=vm.workload,
        fleet=fleet,
        runtime=vm.runtime,
        target=vm.target,
        artifact_digest=vm.artifact.input_digest,
        artifact_inputs=vm.artifact.inputs,
        settings=vm.settings,
        state=VMState.RUNNING,
        healthy=True,
    )


class DerivedVMs(Mapping[str, ObservedVM]):
    """``observed_from_desired``'s VMs: every replica of ``replicas`` running and healthy in
    ``fleet``, an ``ObservedVM`` made when it is looked up."""

    __slots__ = ("fleet", "replicas")

    def __init__(self, replicas: ReplicaVMs, fleet: str) -> None:
        self.replicas = replicas
        self.fleet = fleet

    def __getitem__(self, name: str) -> ObservedVM:
        return _running(self.replicas[name], self.fleet)

    def __contains__(self, name: object) -> bool:
        return name in self.replicas

    def __iter__(self) -> Iterator[str]:
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)


@dataclass(frozen=True)
class _Sides:
    """Both sides of a plan kept per workload (``ReplicaVMs`` against ``DerivedVMs`` of one
    fleet): ``diff`` then decides whole workloads at once where nothing differs."""

    desired: ReplicaVMs
    observed: DerivedVMs

    @classmethod
    def of(cls, desired: DesiredFleet, observed: ObservedFleet) -> _Sides | None:
        if (
            isinstance(desired.vms, ReplicaVMs)
            and isinstance(observed.vms, DerivedVMs)
            and observed.vms.fleet == desired.fleet.name
        ):
            return cls(desired.vms, observed.vms)
        return None

    def pair(self, workload: str) -> tuple[Replicas | None, Replicas | None]:
        return self.desired.groups.get(workload), self.observed.replicas.groups.get(workload)


def _same(group: Replicas | None, before: Replicas | None) -> bool:
    """Whether the replicas both records have in common are alike (``_plan_vm`` of a running
    VM with the same settings is "up to date"; the settings hold the artifact, the runtime and
    the target)."""
    return (
        group is not None
        and before is not None
        and (group.settings is before.settings or group.settings == before.settings)
    )


def diff(
    desired: DesiredFleet,
    observed: ObservedFleet,
    *,
    base: DesiredFleet | None = None,
) -> Plan:
    """Plan the actions that take ``observed`` to ``desired``.

    ``base`` is the previous revision's desired fleet when two revisions are compared; it lets
    the plan name every artifact whose inputs change, not only those of VMs that move.
    """
    fleet = desired.fleet.name
    sides = _Sides.of(desired, observed)
    owned: Mapping[str, ObservedVM]
    if sides is not None:
        owned = sides.observed  # one fleet's, all of them
    else:
        owned = {name: vm for name, vm in observed.vms.items() if vm.fleet == fleet}
    if not desired.vms and owned and not desired.fleet.allow_empty:
        raise PlanError(
            f"the revision declares no VMs, which would delete all {len(owned)} VMs of fleet "
            f"{fleet!r}; refusing. Set Fleet spec.allowEmpty: true to allow an empty fleet"
        )

    _refuse_shrinking(desired, owned, sides)
    if sides is not None:
        # Every VM of a workload has the same settings: one of each speaks for all.
        order = _workload_order(
            desired,
            (owned[vm_name(w, 0)] for w, g in sides.observed.replicas.groups.items() if g.count),
        )
    else:
        order = _workload_order(desired, owned.values())
    actions: list[VMAction] = []
    noops: list[VMAction | NoopRun] = []
    warnings: list[str] = []
    # Surge stand-ins of an earlier plan still running (``rollout``), by the VM they stand in for.
    stand_ins: dict[str, VMAction] = {}

    desired_by_workload: dict[str, list[DesiredVM]] = {}
    extra_by_workload: dict[str, list[ObservedVM]] = {}
    if sides is None:
        for name, foreign in sorted(observed.vms.items()):
            if foreign.fleet != fleet:
                noops.append(
                    noop(name, foreign.workload, f"owned by fleet {foreign.fleet!r}, not {fleet!r}")
                )
                if name in desired.vms:
                    warnings.append(
                        f"VM {name} is wanted by fleet {fleet!r} but owned by fleet "
                        f"{foreign.fleet!r}; it is left alone"
                    )
        for desired_vm in desired.vms.values():
            desired_by_workload.setdefault(desired_vm.workload, []).append(desired_vm)
        for observed_vm in owned.values():
            if observed_vm.name not in desired.vms:
                extra_by_workload.setdefault(observed_vm.workload, []).append(observed_vm)

    for workload_name in order:
        workload = desired.workloads.get(workload_name)
        suspended = workload is not None and workload.suspended
        restart_policy = workload.deploy.restart_policy if workload else RestartPolicy.ALWAYS
        desired_vms: Iterable[DesiredVM]
        extra: Iterable[ObservedVM]
        if sides is not None:
            group, before = sides.pair(workload_name)
            count = group.count if group is not None else 0
            start = 0
            if group is not None and suspended:
                noops.append(NoopRun(workload_name, "workload is suspended", range(count)))
                start = count
            elif group is not None and before is not None and _same(group, before):
                # Unchanged replicas, running: up to date, without comparing them one by one.
                start = min(count, before.count)
                noops.append(NoopRun(workload_name, "up to date", range(start)))
            desired_vms = (group.vm(o) for o in range(start, count)) if group is not None else ()
            extra = (
                (owned[vm_name(workload_name, o)] for o in range(count, before.count))
                if before is not None
                else ()
            )
        else:
            desired_vms = sorted(
                desired_by_workload.get(workload_name, []), key=lambda vm: vm.ordinal
            )
            extra = sorted(
                extra_by_workload.get(workload_name, []), key=lambda v: _ordinal_key(v.name)
            )
        for vm in desired_vms:
            current = owned.get(vm.name) if sides is not None else observed.vms.get(vm.name)
            if current is not None and current.fleet != fleet:
                continue
            if suspended:
                noops.append(noop(vm.name, vm.workload, "workload is suspended"))
                continue
            action = _plan_vm(vm, current, restart_policy)
            if action.action is ActionType.NOOP:
                noops.append(action)
            else:
                actions.append(action)

        for current in extra:
            vm_name_ = current.name
            if suspended:
                noops.append(noop(vm_name_, current.workload, "workload is suspended"))
                continue
            slot = stands_in_for(vm_name_)
            if slot is not None:
                # Temporary capacity of an interrupted surge: it goes, prune or not, once its
                # VM is replaced (``_assign_waves`` orders it after that VM's action).
                stand_ins[slot] = stand_in_delete(
                    vm_name_,
                    current.workload,
                    slot,
                    current.artifact_digest,
                    f"surge: stood in for {slot}, which no longer needs it",
                )
                continue
            reason = (
                f"workload {workload_name!r} is no longer in the revision"
                if workload is None
                else f"scaled down to {workload.deploy.replicas} replicas"
            )
            if not desired.fleet.prune:
                noops.append(noop(vm_name_, current.workload, f"{reason}; prune is disabled"))
                continue
            reason += _volume_fate(current, warnings)
            actions.append(
                VMAction(
                    action=ActionType.DELETE,
                    vm=vm_name_,
                    workload=current.workload,
                    disruption=Disruption.DESTROY,
                    reason=reason,
                    artifact_before=current.artifact_digest,
                )
            )

    staged = sorted(
        {a.workload for a in actions if a.action is not ActionType.CREATE}
        & {w for w in desired.workloads if policy_of(desired, w).canary}
    )
    warnings += [
        f"workload {w!r} rolls out with canaries under the daemon (deploy.rollout.canary); "
        "a one-off apply moves every replica in waves"
        for w in staged
    ]
    return Plan(
        fleet=fleet,
        base=base.revision if base is not None else observed.applied_revision,
        head=desired.revision,
        observed_version=observed.version,
        actions=tuple(_assign_waves(actions, order, desired, owned, stand_ins)),
        noops=NoopRows(noops),
        builds=tuple(_builds(desired, owned, actions, base)),
        warnings=tuple(warnings),
    )


def _refuse_shrinking(
    desired: DesiredFleet, owned: Mapping[str, ObservedVM], sides: _Sides | None
) -> None:
    """A volume is never made smaller (resize2fs can shrink only what is unused, and a plan
    cannot know what that is): the whole revision is refused, naming every such volume."""
    # The replicas of a workload share one settings mapping: compare each pair once.
    compared: dict[tuple[int, int], list[str]] = {}

    def shrunk(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
        key = (id(before), id(after))
        if key not in compared:
            compared[key] = _shrunk_volumes(before, after)
        return compared[key]

    problems: list[tuple[str, str]] = []
    if sides is not None:
        for workload, group in sides.desired.groups.items():
            before = sides.observed.replicas.groups.get(workload)
            if before is None or group.settings is before.settings:
                continue
            found = shrunk(before.settings, group.settings)
            for ordinal in range(min(group.count, before.count)) if found else ():
                problems += [(vm_name(workload, ordinal), p) for p in found]
        problems.sort(key=lambda problem: problem[0])  # by VM name, as below
    else:
        for name, vm in sorted(desired.vms.items()):
            current = owned.get(name)
            if current is not None:
                problems += [(name, p) for p in shrunk(current.settings, vm.settings)]
    if problems:
        raise PlanError(
            "volumes cannot shrink or change filesystem: "
            + ", ".join(f"{name}/{problem}" for name, problem in problems)
            + "; keep the size, or give the volume a new name (the old one is kept until "
            "`reconciler volumes rm`)"
        )


def _shrunk_volumes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """``<volume> from <old> to <new>`` for each volume of ``after`` smaller than, or of
    another filesystem than, its namesake in ``before``."""
    old_volumes = {v.name: v for v in volumes_of(before)}
    problems = []
    for volume in volumes_of(after):
        old = old_volumes.get(volume.name)
        if old is not None and volume.size_mib < old.size_mib:
            problems.append(f"{volume.name} from {old.size_mib} to {volume.size_mib} MiB")
        elif old is not None and volume.filesystem != old.filesystem:
            problems.append(f"{volume.name} from {old.filesystem} to {volume.filesystem}")
    return problems


def _volume_fate(current: ObservedVM, warnings: list[str]) -> str:
    """What deleting ``current`` does to its volumes, for the action's reason; a warning for
    data that is discarded."""
    volumes = volumes_of(current.settings)
    discarded = [v.name for v in volumes if v.reclaim_policy == "delete"]
    kept = [v.name for v in volumes if v.reclaim_policy != "delete"]
    text = ""
    if discarded:
        names = ", ".join(discarded)
        warnings.append(
            f"deleting VM {current.name} discards the data of its volume(s) {names} "
            "(reclaimPolicy delete)"
        )
        text += f"; discards volume data: {names}"
    if kept:
        text += f"; keeps volume(s) {', '.join(kept)} (reclaimPolicy retain)"
    return text


def _plan_vm(vm: DesiredVM, current: ObservedVM | None, restart_policy: RestartPolicy) -> VMAction:
    if current is None:
        return VMAction(
            action=ActionType.CREATE,
            vm=vm.name,
            workload=vm.workload,
            disruption=Disruption.NONE,
            reason="not running",
            changes=tuple(settings_change(k, None, v) for k, v in sorted(vm.settings.items())),
            artifact_after=vm.artifact.input_digest,
        )

    changes = _changes(current.settings, vm.settings)
    ended = current.state in (VMState.STOPPED, VMState.FAILED, VMState.MISSING)
    if ended and not changes:
        if restart_policy == RestartPolicy.NEVER:
            return noop(
                vm.name,
                vm.workload,
                f"batch job ended ({current.state.value}); restartPolicy never",
            )
        if restart_policy == RestartPolicy.ON_FAILURE and current.state is VMState.STOPPED:
            return noop(
                vm.name, vm.workload, "workload exited successfully; restartPolicy on-failure"
            )
    if current.state in (VMState.MISSING, VMState.FAILED):
        detail = f": {current.detail}" if current.detail else ""
        return VMAction(
            action=ActionType.REPLACE,
            vm=vm.name,
            workload=vm.workload,
            disruption=Disruption.REPLACE,
            reason=f"VM is {current.state.value}{detail}; it is recreated",
            changes=changes,
            artifact_before=current.artifact_digest,
            artifact_after=vm.artifact.input_digest,
        )

    disruption = max((disruption_of(c.key) for c in changes), default=Disruption.NONE)
    if current.state is VMState.STOPPED and disruption < Disruption.RESTART:
        disruption = Disruption.RESTART
        reason = "VM is stopped; it is started"
        if changes:
            reason += "; changed: " + _keys(changes)
    elif disruption is Disruption.NONE:
        return noop(vm.name, vm.workload, "up to date")
    else:
        reason = "changed: " + _keys(changes)
    return VMAction(
        action=_ACTION_FOR[disruption],
        vm=vm.name,
        workload=vm.workload,
        disruption=disruption,
        reason=reason,
        changes=changes,
        artifact_before=current.artifact_digest,
        artifact_after=vm.artifact.input_digest,
    )


def _changes(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[Change, ...]:
    if before == after:
        return ()
    return tuple(
        settings_change(key, before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    )


def _keys(changes: Sequence[Change], limit: int = 4) -> str:
    keys = [c.key for c in changes]
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def _ordinal_key(vm_name: str) -> tuple[str, int]:
    prefix, _, ordinal = vm_name.rpartition("-")
    return (prefix, int(ordinal)) if ordinal.isdigit() else (vm_name, -1)


def _workload_order(desired: DesiredFleet, owned: Iterable[ObservedVM]) -> list[str]:
    """Desired workloads with dependencies first, then removed workloads with dependents first.

    Manifest validation has refused unknown names and cycles already; a dependency that is not
    desired (which cannot happen after validation) is ignored rather than looped on.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str) -> None:
        if state.get(name) or name not in desired.workloads:
            return
        state[name] = 1
        for dependency in sorted(desired.workloads[name].deploy.depends_on):
            visit(dependency)
        state[name] = 2
        order.append(name)

    for name in sorted(desired.workloads):
        visit(name)

    removed: dict[str, list[str]] = {}
    for vm in owned:
        if vm.workload not in desired.workloads and vm.workload not in removed:
            removed[vm.workload] = _json_list(vm.settings.get("deploy.dependsOn"))
    order.extend(reversed(_toposort(removed)))
    return order


def _toposort(graph: Mapping[str, list[str]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in graph:
            return
        seen.add(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        order.append(name)

    for name in sorted(graph):
        visit(name)
    return order


def _json_list(encoded: str | None) -> list[str]:
    if not encoded:
        return []
    value = json.loads(encoded)
    return [str(v) for v in value] if isinstance(value, list) else []


def _assign_waves(
    actions: list[VMAction],
    order: list[str],
    desired: DesiredFleet,
    owned: Mapping[str, ObservedVM],
    stand_ins: Mapping[str, VMAction],
) -> list[VMAction]:
    """Order actions by workload dependency order and cut them into rollout waves.

    Per workload: creates first (new capacity before anything is disturbed), then in-place
    updates, then restarts and replaces per the workload's rollout policy (batches of
    ``maxUnavailable``, or surged ``maxSurge`` at a time: ``rollout.surge_waves``), then
    scale-down deletes and the stand-ins no VM needs any more. Waves are numbered across the
    whole plan so the executor runs them in sequence.
    """
    rank = {name: index for index, name in enumerate(order)}
    by_workload: dict[str, list[VMAction]] = {}
    for action in actions:
        by_workload.setdefault(action.workload, []).append(action)
    for stand_in in stand_ins.values():
        by_workload.setdefault(stand_in.workload, [])

    result: list[VMAction] = []
    wave = 0
    for workload in sorted(by_workload, key=lambda w: rank.get(w, len(rank))):
        group = by_workload[workload]
        moving = [a for a in group if a.action in (ActionType.RESTART, ActionType.REPLACE)]
        slots = {a.vm for a in moving}
        own_stand_ins = {s: a for s, a in stand_ins.items() if a.workload == workload}
        leftover = [a for s, a in sorted(own_stand_ins.items()) if s not in slots]
        for phase in (
            [a for a in group if a.action is ActionType.CREATE],
            [a for a in group if a.action is ActionType.UPDATE],
        ):
            if phase:
                wave += 1
                result.extend(_with_wave(a, wave) for a in phase)
        if moving:
            surged, wave = surge_waves(
                moving,
                policy=policy_of(desired, workload),
                observed=owned,
                stand_ins={s: a for s, a in own_stand_ins.items() if s in slots},
                workload=workload,
                first_wave=wave,
            )
            result.extend(surged)
        deletes = [a for a in group if a.action is ActionType.DELETE] + leftover
        if deletes:
            wave += 1
            result.extend(_with_wave(a, wave) for a in deletes)
    return result


def _with_wave(action: VMAction, wave: int) -> VMAction:
    return replace(action, wave=wave)


def _builds(
    desired: DesiredFleet,
    owned: Mapping[str, ObservedVM],
    actions: Sequence[VMAction],
    base: DesiredFleet | None,
) -> list[BuildAction]:
    """Artifacts whose input digest is new, with the inputs that moved.

    Comparing two revisions, every target of every workload is compared with the base. Against
    the live fleet, only the artifacts that VMs about to be created or replaced will run.
    """
    builds: dict[tuple[str, Target], BuildAction] = {}
    if base is not None:
        for key, ref in sorted(desired.artifacts.items()):
            before = base.artifacts.get(key)
            if before is None or before.input_digest != ref.input_digest:
                builds[key] = _build(
                    ref, before.input_digest if before else None, before.inputs if before else None
                )
        return list(builds.values())

    for action in actions:
        if action.action not in (ActionType.CREATE, ActionType.REPLACE):
            continue
        slot = action.stands_in_for or action.vm  # a surge stand-in runs its VM's artifact
        vm = desired.vms[slot]
        current = owned.get(slot)
        if current is not None and current.artifact_digest == vm.artifact.input_digest:
            continue
        key = (vm.workload, vm.target)
        if key not in builds:
            if current is not None and current.target == vm.target:
                builds[key] = _build(vm.artifact, current.artifact_digest, current.artifact_inputs)
            else:
                builds[key] = _build(vm.artifact, None, None)
    return [builds[key] for key in sorted(builds)]


def _build(
    ref: ArtifactRef, digest_before: str | None, inputs_before: Mapping[str, str] | None
) -> BuildAction:
    if inputs_before is None:
        changed = tuple(sorted(ref.inputs))
        reason = "new artifact"
    else:
        changed = tuple(
            sorted(
                k
                for k in ref.inputs.keys() | inputs_before.keys()
                if ref.inputs.get(k) != inputs_before.get(k)
            )
        )
        reason = "inputs changed: " + ", ".join(changed)
    return BuildAction(
        workload=ref.workload,
        target=ref.target,
        digest_before=digest_before,
        digest_after=ref.input_digest,
        changed_inputs=changed,
        reason=reason,
    )
