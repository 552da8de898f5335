"""The executor: runs a ``Plan`` against this host, wave by wave.

    Plan ──▶ build what the new VMs run (builders/, through the cache; nothing is touched when a
             build fails) ──▶ per wave: stop/remove, record, start ──▶ wait for health
         ──▶ record the revision as applied, or as failed with the reason

Ordering for crash safety: a VM is recorded in the state store (``pending``) *before* its VMM
starts, and forgotten only *after* it was stopped and its TAP and address were released, so a
reconciler killed at any point finds every VM it may have started and adopts or removes it on
the next run, never starting a duplicate.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from builders.matrix import MatrixBuilder
from reconciler.errors import BuildError, VMRuntimeError
from reconciler.execution.health import wait_healthy
from reconciler.execution.launch import launch_config
from reconciler.execution.vms import runtime_for, spec_of, vm_dir, vm_spec
from reconciler.model import (
    ActionType,
    DesiredFleet,
    ObservedVM,
    Plan,
    RuntimeKind,
    VMAction,
    VMState,
)
from reconciler.state import StateStore
from runtime.network import Network
from runtime.protocol import Runtime, VMSpec


@dataclass
class ApplyReport:
    applied: list[VMAction] = field(default_factory=list)
    unhealthy: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unhealthy


@dataclass
class Executor:
    store: StateStore
    state_dir: Path
    builder: MatrixBuilder
    runtimes: Mapping[RuntimeKind, Runtime]
    network: Network | None
    say: Callable[[str], None] = print

    def apply(self, plan: Plan, desired: DesiredFleet) -> ApplyReport:
        revision = plan.head or "unknown"
        try:
            artifacts = self._build(plan, desired)
            report = ApplyReport()
            for wave in sorted({a.wave for a in plan.actions}):
                actions = [a for a in plan.actions if a.wave == wave]
                started = [self._run(action, desired, artifacts) for action in actions]
                report.applied += actions
                for spec in (s for s in started if s is not None):
                    healthy, why = self._health(spec)
                    if not healthy:
                        report.unhealthy[spec.name] = why
                if report.unhealthy:
                    break  # later waves would spread a change that does not work
        except (BuildError, VMRuntimeError) as err:
            self.store.record_revision(revision, outcome="failed", message=str(err))
            raise
        if report.ok:
            self.store.record_revision(revision, outcome="applied")
        else:
            problems = "; ".join(f"{vm}: {why}" for vm, why in sorted(report.unhealthy.items()))
            self.store.record_revision(revision, outcome="failed", message=problems)
        return report

    def _build(self, plan: Plan, desired: DesiredFleet) -> dict[str, Path]:
        """The artifact directory of every VM the plan starts, keyed by VM name."""
        starting = [
            a
            for a in plan.actions
            if a.action in (ActionType.CREATE, ActionType.REPLACE, ActionType.RESTART)
        ]
        if not starting:
            return {}
        workloads = {a.workload for a in starting}
        targets = {desired.vms[a.vm].target for a in starting}
        results = self.builder.build(desired, targets=targets, workloads=workloads)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            first = failed[0]
            raise BuildError(
                f"{len(failed)} artifact(s) failed to build, nothing was changed; "
                f"{first.workload}/{first.target.value}: {first.error}"
            )
        by_digest = {r.digest: r.path for r in results if r.path is not None}
        return {a.vm: by_digest[desired.vms[a.vm].artifact.input_digest] for a in starting}

    def _run(
        self, action: VMAction, desired: DesiredFleet, artifacts: Mapping[str, Path]
    ) -> VMSpec | None:
        current = self.store.observed().vms.get(action.vm)
        self.say(f"{action.action.value:<8} {action.vm}: {action.reason}")
        if action.action is ActionType.DELETE:
            if current is not None:
                self._remove(current)
            return None
        wanted = desired.vms[action.vm]
        if action.action is ActionType.UPDATE:
            if current is not None:
                self.store.put_vm(replace(current, settings=wanted.settings))
            return None
        if current is not None:
            runtime_for(self.runtimes, current.runtime).stop(spec_of(current, self.state_dir))
        directory = vm_dir(self.state_dir, wanted.name)
        artifact = artifacts[wanted.name]
        fresh_disk = action.action is not ActionType.RESTART
        if fresh_disk and (directory / "rootfs.ext4").exists():
            (directory / "rootfs.ext4").unlink()
        directory.mkdir(parents=True, exist_ok=True)
        if (artifact / "rootfs.ext4").exists() and not (directory / "rootfs.ext4").exists():
            shutil.copyfile(artifact / "rootfs.ext4", directory / "rootfs.ext4")
        attachment = self.network.attach(wanted.name, wanted.workload) if self.network else None
        spec = vm_spec(
            name=wanted.name,
            workload=wanted.workload,
            fleet=desired.fleet.name,
            runtime=wanted.runtime,
            directory=directory,
            config=launch_config(wanted.settings),
            artifact=artifact,
            network=attachment,
        )
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
            healthy=None,
            address=attachment.address.split("/")[0] if attachment else None,
        )
        self.store.put_vm(record)  # before the VMM starts: a crash leaves a record to adopt
        try:
            status = runtime_for(self.runtimes, wanted.runtime).start(spec)
        except VMRuntimeError as err:
            self.store.put_vm(replace(record, state=VMState.FAILED, healthy=False, detail=str(err)))
            raise
        self.store.put_vm(replace(record, state=status.state, pid=status.pid, detail=status.detail))
        return spec

    def _health(self, spec: VMSpec) -> tuple[bool, str]:
        vm = self.store.observed().vms[spec.name]
        runtime = runtime_for(self.runtimes, vm.runtime)
        config = launch_config(vm.settings)
        healthy, why = wait_healthy(
            spec.vm_dir / "console.log",
            config.health,
            vm.address,
            alive=lambda: runtime.status(spec).state is VMState.RUNNING,
        )
        status = runtime.status(spec)
        self.store.put_vm(
            replace(vm, healthy=healthy, state=status.state, pid=status.pid, detail=why)
        )
        self.say(f"{'healthy' if healthy else 'UNHEALTHY':<8} {spec.name}: {why}")
        return healthy, why

    def _remove(self, vm: ObservedVM) -> None:
        runtime_for(self.runtimes, vm.runtime).stop(spec_of(vm, self.state_dir), grace_seconds=5.0)
        if self.network is not None:
            self.network.detach(vm.name)
        shutil.rmtree(vm_dir(self.state_dir, vm.name), ignore_errors=True)
        self.store.remove_vm(vm.name)  # last: until here a crash leaves the record to retry
