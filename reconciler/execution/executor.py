"""The executor: runs a ``Plan`` against this host, wave by wave.

    Plan ──▶ build what the new VMs run (builders/, through the cache; nothing is touched when a
             build fails) ──▶ per wave: stop/remove, record, start ──▶ wait for health
         ──▶ record the revision as applied, or as failed with the reason

Ordering for crash safety: a VM is recorded in the state store (``pending``) *before* its VMM
starts, and forgotten only *after* it was stopped and its TAP and address were released, so a
reconciler killed at any point finds every VM it may have started and adopts or removes it on
the next run, never starting a duplicate.

Firewall: after each wave the rules are loaded for every VM the store knows (workload ->
addresses, ``firewall_addresses``); on a store shared by a fleet of hosts that is every host's
VMs, so ``dependsOn`` isolation holds for traffic routed between hosts too.

Fencing: under the daemon, ``fence`` is the leader's term. It is checked before every runtime
action (and the state store checks it on every write), so a leader that lost its lease stops
between two actions instead of racing its successor.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from builders.matrix import MatrixBuilder
from reconciler.errors import (
    BuildError,
    NotImplementedFeatureError,
    SupersededError,
    VMRuntimeError,
)
from reconciler.execution.events import EventKind, ExecutionEvent, Reporter, print_event
from reconciler.execution.health import describe_problems, judge_health
from reconciler.execution.launch import launch_config
from reconciler.execution.vm_lock import vm_lock
from reconciler.execution.vms import runtime_for, spec_of, vm_dir, vm_spec
from reconciler.execution.volumes import prepare as prepare_volumes
from reconciler.execution.volumes import reclaim as reclaim_volumes
from reconciler.leadership.fence import Fence
from reconciler.log_context import log_fields
from reconciler.model import (
    ActionType,
    BuildStatus,
    DesiredFleet,
    DesiredVM,
    ObservedFleet,
    ObservedVM,
    Plan,
    RevisionOutcome,
    RuntimeKind,
    SensitiveValues,
    VMAction,
    VMState,
)
from reconciler.state import StateStore
from runtime.network import Network
from runtime.protocol import Runtime, VMSpec


@runtime_checkable
class FleetObservations(Protocol):
    """A store that holds what every host of a fleet runs (``PostgresStateStore``)."""

    def fleet_observed(self) -> dict[str, ObservedFleet]: ...


def firewall_addresses(store: StateStore) -> dict[str, list[str]]:
    """Workload -> the addresses of its VMs, sorted, for the firewall: every host's when the
    store holds a fleet of hosts (a packet routed between hosts is judged by both its ends, on
    both hosts), else this host's."""
    vms = list(store.observed().vms.values())
    if isinstance(store, FleetObservations):
        vms += [vm for fleet in store.fleet_observed().values() for vm in fleet.vms.values()]
    addresses: dict[str, set[str]] = {}
    for vm in vms:
        if vm.address:
            addresses.setdefault(vm.workload, set()).add(vm.address)
    return {workload: sorted(found) for workload, found in sorted(addresses.items())}


def firewall_dependencies(*fleets: DesiredFleet) -> dict[str, list[str]]:
    """Workload -> the workloads it may reach, over ``fleets`` (the revisions the fleet's VMs
    run: during a rollout a dependency declared by either revision is allowed)."""
    depends_on: dict[str, set[str]] = {}
    for fleet in fleets:
        for name, workload in fleet.workloads.items():
            depends_on.setdefault(name, set()).update(workload.deploy.depends_on)
    return {name: sorted(deps) for name, deps in sorted(depends_on.items())}


@dataclass
class ApplyReport:
    applied: list[VMAction] = field(default_factory=list)
    unhealthy: dict[str, str] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)
    builds: dict[str, int] = field(default_factory=dict)  # built / cached / failed counts
    superseded: str | None = None  # why the rollout stopped early for a newer revision

    @property
    def ok(self) -> bool:
        return not self.unhealthy

    def problems(self) -> str:
        """One line: each unhealthy VM and why, then what was rolled back."""
        text = describe_problems(self.unhealthy)
        if self.rolled_back:
            text += "; rolled back " + ", ".join(self.rolled_back)
        return text


@dataclass
class Executor:
    store: StateStore
    state_dir: Path
    builder: MatrixBuilder
    runtimes: Mapping[RuntimeKind, Runtime]
    network: Network | None
    on_event: Reporter = print_event
    fence: Fence | None = None
    superseded: Callable[[], bool] = lambda: False
    """True when a newer revision waits (the daemon): health waits stop, nothing rolls back."""
    record_revision: bool = True
    """False when re-converging onto the last applied revision (the daemon healing drift while a
    newer revision is refused): that is not an attempt, and must not hide the refused one."""
    _last_healthy: dict[str, ObservedVM] = field(default_factory=dict, init=False)
    # Secret values of the revisions applied by this process (memory only), by keyed digest:
    # a roll back restarts a VM with the values it had.
    _sensitive: SensitiveValues = field(default_factory=SensitiveValues, init=False)

    def apply(self, plan: Plan, desired: DesiredFleet) -> ApplyReport:
        revision = plan.head or "unknown"
        self._sensitive = desired.sensitive.union(self._sensitive)
        for intent in self.store.open_intents():
            # A reconciler was killed mid-action; the observer has already seen what it left
            # (a recorded VM is adopted or recreated), so the plan finishes the job.
            self.on_event(ExecutionEvent(EventKind.INTENT_RESUMED, intent.vm, action=intent.action))
            self.store.complete_intent(intent.id, "interrupted")
        if self.network is not None:
            # TAPs, veths and namespaces made for a VM that a killed reconciler never recorded.
            self._guard("removing orphaned network devices")
            for name in self.network.cleanup_orphans(set(self.store.observed().vms)):
                self.on_event(ExecutionEvent(EventKind.ORPHAN_REMOVED, detail=name))
        report = ApplyReport()
        try:
            for action in plan.actions:  # a runtime that does not exist fails before any change
                if action.action is not ActionType.DELETE and action.vm in desired.vms:
                    runtime_for(self.runtimes, _wanted(action, desired).runtime)
            began = time.monotonic()
            artifacts = self._build(plan, desired, report)
            if artifacts:
                built = ", ".join(f"{n} {status}" for status, n in sorted(report.builds.items()))
                self._phase("build", None, time.monotonic() - began, built)
            for wave in sorted({a.wave for a in plan.actions}):
                actions = [a for a in plan.actions if a.wave == wave]
                started = [self._run_with_intent(a, desired, artifacts) for a in actions]
                report.applied += actions
                self._sync_firewall(desired)
                for spec in (s for s in started if s is not None):
                    healthy, why = self._health(spec)
                    if not healthy:
                        report.unhealthy[spec.name] = why
                if report.unhealthy:
                    # Later waves would spread a change that does not work; the VMs of this
                    # wave go back to what they ran, and the untouched ones keep serving.
                    report.rolled_back = self._roll_back(sorted(report.unhealthy))
                    break
        except SupersededError as err:
            # The VMs started so far keep running; the newer revision's plan takes them from
            # here (or the next cycle judges their health), so there is nothing to roll back.
            if self.record_revision:
                self.store.record_revision(
                    revision, outcome=RevisionOutcome.FAILED, message=str(err)
                )
            report.superseded = str(err)
            return report
        except (BuildError, VMRuntimeError, NotImplementedFeatureError) as err:
            if self.record_revision:
                self.store.record_revision(
                    revision, outcome=RevisionOutcome.FAILED, message=str(err)
                )
            raise
        if not self.record_revision:
            return report
        if report.ok:
            self.store.record_revision(revision, outcome=RevisionOutcome.APPLIED)
        else:
            self.store.record_revision(
                revision, outcome=RevisionOutcome.FAILED, message=report.problems()
            )
        return report

    def _guard(self, what: str) -> None:
        if self.fence is not None:
            self.fence.check(what)

    def _build(self, plan: Plan, desired: DesiredFleet, report: ApplyReport) -> dict[str, Path]:
        """The artifact directory of every VM the plan starts, keyed by VM name."""
        starting = [
            a
            for a in plan.actions
            if a.action in (ActionType.CREATE, ActionType.REPLACE, ActionType.RESTART)
        ]
        if not starting:
            return {}
        # A replica put back on a rollout's previous version (``planning.rollout``) runs an
        # artifact this revision does not build: the content-addressed cache holds it.
        built_here = {ref.input_digest for ref in desired.artifacts.values()}
        cached: dict[str, Path] = {}
        for action in starting:
            digest = _wanted(action, desired).artifact.input_digest
            if digest not in built_here and digest not in cached:
                entry = self.builder.cache.find(digest)
                if entry is None:
                    raise BuildError(
                        f"{action.vm} goes back to artifact {digest[:12]}, which is no longer "
                        "in the build cache; push a revision that builds that version again"
                    )
                cached[digest] = entry.path
        building = [a for a in starting if _wanted(a, desired).artifact.input_digest in built_here]
        workloads = {a.workload for a in building}
        targets = {_wanted(a, desired).target for a in building}
        results = (
            self.builder.build(desired, targets=targets, workloads=workloads) if building else []
        )
        for result in results:
            report.builds[result.status] = report.builds.get(result.status, 0) + 1
        failed = [r for r in results if r.status == BuildStatus.FAILED]
        if failed:
            first = failed[0]
            raise BuildError(
                f"{len(failed)} artifact(s) failed to build, nothing was changed; "
                f"{first.workload}/{first.target.value}: {first.error}"
            )
        by_digest = {**cached, **{r.digest: r.path for r in results if r.path is not None}}
        return {a.vm: by_digest[_wanted(a, desired).artifact.input_digest] for a in starting}

    def _run_with_intent(
        self, action: VMAction, desired: DesiredFleet, artifacts: Mapping[str, Path]
    ) -> VMSpec | None:
        with log_fields(vm=action.vm):  # whatever logs during the action names its VM
            intent = self.store.begin_intent(action.vm, action.action.value)
            try:
                spec = self._run(action, desired, artifacts)
            except BaseException:
                self.store.complete_intent(intent, "failed")
                raise
            self.store.complete_intent(intent)
            return spec

    def _run(
        self, action: VMAction, desired: DesiredFleet, artifacts: Mapping[str, Path]
    ) -> VMSpec | None:
        current = self.store.observed().vms.get(action.vm)
        self.on_event(
            ExecutionEvent(
                EventKind.ACTION, action.vm, action=action.action.value, detail=action.reason
            )
        )
        if action.action is ActionType.DELETE:
            if current is not None:
                self._remove(current)
            return None
        wanted = _wanted(action, desired)
        if action.action is ActionType.UPDATE:
            if current is not None:
                self.store.put_vm(replace(current, settings=wanted.settings))
            return None
        if current is not None:
            began = time.monotonic()
            self._stop(current, f"stopping {current.name}")
            self._phase("stop", current.name, time.monotonic() - began)
            if current.healthy:
                self._last_healthy[current.name] = current
        record = ObservedVM(
            name=wanted.name,
            workload=wanted.workload,
            fleet=desired.fleet.name,
            runtime=wanted.runtime,
            target=wanted.target,
            artifact_digest=wanted.artifact.input_digest,
            artifact_inputs=wanted.artifact.inputs,
            settings=wanted.settings,
            state=VMState.PENDING,
        )
        if current is not None:
            record = replace(record, restarts=current.restarts + 1)
        fresh_disk = action.action is not ActionType.RESTART
        return self._launch(record, artifacts[wanted.name], fresh_disk=fresh_disk)

    def _launch(self, record: ObservedVM, artifact: Path, *, fresh_disk: bool) -> VMSpec:
        """Start ``record``'s VM from ``artifact`` (the caller stopped any previous one)."""
        directory = vm_dir(self.state_dir, record.name)
        if fresh_disk and (directory / "rootfs.ext4").exists():
            (directory / "rootfs.ext4").unlink()
        directory.mkdir(parents=True, exist_ok=True)
        if (artifact / "rootfs.ext4").exists() and not (directory / "rootfs.ext4").exists():
            shutil.copyfile(artifact / "rootfs.ext4", directory / "rootfs.ext4")
        # Every VM gets an address of the pool: a VMM a TAP, a host process a network namespace
        # of its own on a veth pair.
        began = time.monotonic()
        attachment = (
            self.network.attach(
                record.name, record.workload, namespace=record.runtime is RuntimeKind.PROCESS
            )
            if self.network is not None
            else None
        )
        if attachment is not None:
            self._phase("network", record.name, time.monotonic() - began)
        spec = vm_spec(
            name=record.name,
            workload=record.workload,
            fleet=record.fleet,
            runtime=record.runtime,
            directory=directory,
            config=launch_config(record.settings),
            artifact=artifact,
            network=attachment,
            # Created once, grown here while the VM is stopped, never part of its directory: a
            # replace gets a fresh root disk and the same volumes.
            volumes=prepare_volumes(self.state_dir, record, on_event=self.on_event),
            sensitive=self._sensitive,
        )
        if record.runtime is RuntimeKind.FIRECRACKER:
            # Firecracker boots the uncompressed ELF of the kernel the artifact was built with.
            built_with = json.loads((artifact / "manifest.json").read_text())["toolchain"]["kernel"]
            registry = self.builder.kernels
            spec = replace(spec, kernel=registry.vmlinux_for(registry.get(built_with)))
        record = replace(
            record,
            state=VMState.PENDING,
            healthy=None,
            pid=None,
            address=attachment.address.split("/")[0] if attachment else None,
        )
        self.store.put_vm(record)  # before the VMM starts: a crash leaves a record to adopt
        began = time.monotonic()
        try:
            with vm_lock(self.state_dir, record.name):
                self._guard(f"starting {record.name}")
                status = runtime_for(self.runtimes, record.runtime).start(spec)
        except VMRuntimeError as err:
            self.store.put_vm(replace(record, state=VMState.FAILED, healthy=False, detail=str(err)))
            raise
        self._phase("vmm-start", record.name, time.monotonic() - began)
        self.store.put_vm(
            replace(
                record,
                state=status.state,
                pid=status.pid,
                detail=status.detail,
                started_at=time.time(),
            )
        )
        return spec

    def _roll_back(self, names: list[str]) -> list[str]:
        """Put the VMs of a failed wave back on what they ran, healthy, before the change;
        returns the VMs rolled back."""
        done = []
        for name in names:
            previous = self._last_healthy.get(name)
            if previous is None:
                continue  # a new VM: nothing to go back to; it stays recorded as failed
            entry = self.builder.cache.find(previous.artifact_digest)
            if entry is None:
                self.on_event(ExecutionEvent(EventKind.ROLLBACK_IMPOSSIBLE, name))
                continue
            current = self.store.observed().vms[name]
            self._stop(current, f"stopping {name} for a rollback")
            self.on_event(
                ExecutionEvent(EventKind.ROLLBACK, name, artifact=previous.artifact_digest)
            )
            spec = self._launch(previous, entry.path, fresh_disk=True)
            if self._health(spec)[0]:
                done.append(name)
        return done

    def _sync_firewall(self, desired: DesiredFleet) -> None:
        """Rules for every VM on the fleet network: same workload or declared dependency."""
        if self.network is None:
            return
        self.network.sync_firewall(firewall_addresses(self.store), firewall_dependencies(desired))

    def _phase(self, phase: str, vm: str | None, seconds: float, detail: str = "") -> None:
        """Report how long a phase of bringing VMs up took (the daemon's timeline)."""
        self.on_event(
            ExecutionEvent(EventKind.PHASE, vm, phase=phase, seconds=seconds, detail=detail)
        )

    def _health(self, spec: VMSpec) -> tuple[bool, str]:
        return judge_health(
            self.store,
            self.runtimes,
            self.state_dir,
            spec.name,
            on_event=self.on_event,
            superseded=self.superseded,
        )

    def _stop(self, vm: ObservedVM, what: str, grace_seconds: float = 10.0) -> None:
        """Stop ``vm`` under its host lock (``vm_lock``), if this term may still act."""
        with vm_lock(self.state_dir, vm.name):
            self._guard(what)
            runtime_for(self.runtimes, vm.runtime).stop(
                spec_of(vm, self.state_dir), grace_seconds=grace_seconds
            )

    def _remove(self, vm: ObservedVM) -> None:
        self._stop(vm, f"removing {vm.name}", grace_seconds=5.0)
        if self.network is not None:
            self.network.detach(vm.name)
        shutil.rmtree(vm_dir(self.state_dir, vm.name), ignore_errors=True)
        reclaim_volumes(
            self.state_dir, vm, on_event=self.on_event
        )  # only reclaimPolicy: delete goes
        self.store.remove_vm(vm.name)  # last: until here a crash leaves the record to retry


def _wanted(action: VMAction, desired: DesiredFleet) -> DesiredVM:
    """The desired VM an action starts: a surge stand-in (``planning.rollout``) runs the spec
    of the VM it stands in for, under its own name."""
    if action.stands_in_for is None:
        return desired.vms[action.vm]
    return replace(desired.vms[action.stands_in_for], name=action.vm)
