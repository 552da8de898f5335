"""``FleetHost``, the leader's side of a fleet of hosts, against an in-memory registry whose
"agents" answer each assignment when the leader polls: placement across hosts, a lost host's
VMs placed elsewhere (its epoch ended first, and told of once), a plan that does not fit refused
before anything is written, a wave's verdict from what the hosts report, a draining host's VMs
moved wave by wave, a held-back replica's revision read from the store by a new leader, and a
failed wave rolled back to the version and host its VMs ran."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import pytest
from support.fakes import MemoryStateStore, fleet, workload

from reconciler.errors import PlanError
from reconciler.execution.fleet_host import FleetHost
from reconciler.fleet_hosts import placement_hosts
from reconciler.leadership.fence import Fence
from reconciler.model import (
    DesiredFleet,
    HealthCheck,
    HealthKind,
    NotificationEvent,
    ObservedFleet,
    ObservedVM,
    RolloutOverrides,
    RolloutPhase,
    RolloutState,
    RuntimeKind,
    VMState,
)
from reconciler.notify import Notice, host_lost
from reconciler.planning import diff
from reconciler.planning.rollout import stands_in_for, version_of
from reconciler.state.hosts import Assignment, HostRecord, HostRegistration

HEALTH = HealthCheck(HealthKind.TCP, port=80, start_period_seconds=5, timeout_seconds=1)
WEB = workload("web", replicas=3, runtime=RuntimeKind.PROCESS, vcpus=1, memory_mib=512)


def record(name: str, *, age: float = 0.5, epoch: int = 1, memory: int = 4096) -> HostRecord:
    return HostRecord(
        registration=HostRegistration(
            name=name,
            vcpus=4,
            memory_mib=memory,
            disk_mib=10_000,
            runtimes=frozenset({RuntimeKind.PROCESS}),
        ),
        epoch=epoch,
        cordoned=False,
        draining=False,
        registered_at=0.0,
        heartbeat_at=0.0,
        heartbeat_age=age,
        vms=0,
    )


class FleetRegistry(MemoryStateStore):
    """The leader's store handle, with the hosts' registry, assignments and reports in
    memory; ``agent`` (called at each of the leader's waits) plays every host's agent."""

    def __init__(self, hosts: Sequence[HostRecord]) -> None:
        super().__init__()
        self.records = {h.name: h for h in hosts}
        self.placed: dict[str, Assignment] = {}
        self.reported: dict[str, dict[str, ObservedVM]] = {h.name: {} for h in hosts}
        self.ended: list[tuple[str, int]] = []
        self.confirmed: list[int] = []
        self.writes: list[str] = []

    def _term_now(self) -> int:
        assert self.fence is not None, "placement is the leader's, fenced"
        self.fence.check("a placement write")
        return self.fence.term

    def hosts(self) -> list[HostRecord]:
        return [self.records[name] for name in sorted(self.records)]

    def assignments(self) -> dict[str, Assignment]:
        return dict(sorted(self.placed.items()))

    def fleet_observed(self) -> dict[str, ObservedFleet]:
        return {h: ObservedFleet(1, dict(vms)) for h, vms in sorted(self.reported.items())}

    def assign(self, vm: str, host: str, revision: str = "") -> None:
        self.placed[vm] = Assignment(host, revision, self._term_now())
        self.writes.append(f"assign {vm} {host}")

    def unassign(self, vm: str) -> None:
        self._term_now()
        self.placed.pop(vm, None)
        self.writes.append(f"unassign {vm}")

    def confirm_assignments(self, kept: Mapping[str, tuple[str, str]]) -> None:
        term = self._term_now()
        for vm, (host, revision) in kept.items():
            self.placed[vm] = Assignment(host, revision, term)
        self.confirmed.append(term)

    def end_epoch(self, host: str, epoch: int) -> bool:
        self._term_now()
        self.ended.append((host, epoch))
        self.records[host] = replace(self.records[host], ended=True)
        return True

    def agents(self, desired: DesiredFleet, *, unhealthy: frozenset[str] = frozenset()) -> None:
        """Every live host converges its assignments at once: runs what is assigned to it
        (healthy unless named in ``unhealthy``) and drops the rest."""
        for host, vms in self.reported.items():
            if self.records[host].lost(grace=5):
                continue
            for name in list(vms):
                if self.placed.get(name, Assignment("", "", 0)).host != host:
                    del vms[name]
            for name, a in self.placed.items():
                slot = stands_in_for(name) or name  # a surge stand-in runs its slot's spec
                if a.host != host or slot not in desired.vms:
                    continue
                vm = replace(running_vm(desired, slot, healthy=name not in unhealthy), name=name)
                was = vms.get(name)
                if was is None or (was.artifact_digest, was.settings) != (
                    vm.artifact_digest,
                    vm.settings,
                ):
                    vms[name] = vm  # started (again) as its spec says


def running_vm(desired: DesiredFleet, name: str, *, healthy: bool = True) -> ObservedVM:
    vm = desired.vms[name]
    return ObservedVM(
        name=name,
        workload=vm.workload,
        fleet=desired.fleet.name,
        runtime=vm.runtime,
        target=vm.target,
        artifact_digest=vm.artifact.input_digest,
        artifact_inputs=vm.artifact.inputs,
        settings=vm.settings,
        state=VMState.RUNNING,
        healthy=healthy,
        detail="" if healthy else "tcp 80: connection refused",
    )


def leader(
    registry: FleetRegistry, on_wait: Callable[[], None] = lambda: None, term: int = 1
) -> FleetHost:
    registry.fence = Fence(term, renew_deadline=600)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        on_wait()

    return FleetHost(
        registry,
        lambda records: placement_hosts(records, grace=5),
        clock=lambda: now[0],
        sleep=sleep,
    )


def converge(host: FleetHost, desired: DesiredFleet) -> tuple[list[str], dict[str, str]]:
    plan = diff(desired, host.refresh())
    report = host.converge(plan, desired, checkout=None, cache_dir=None)  # type: ignore[arg-type]
    return [a.vm for a in report.applied], report.unhealthy


def test_replicas_spread_one_per_host_and_the_wave_waits_for_their_hosts() -> None:
    desired = fleet(replace(WEB, deploy=replace(WEB.deploy, health=HEALTH)))
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired))
    applied, unhealthy = converge(host, desired)
    assert (applied, unhealthy) == (["web-0", "web-1", "web-2"], {})
    assert {vm: a.host for vm, a in registry.placed.items()} == {
        "web-0": "host-a",
        "web-1": "host-b",
        "web-2": "host-c",
    }
    assert {a.revision for a in registry.placed.values()} == {desired.revision}
    assert {a.term for a in registry.placed.values()} == {1}
    observed = host.observe()
    assert set(observed.vms) == {"web-0", "web-1", "web-2"}
    assert host.where == {"web-0": "host-a", "web-1": "host-b", "web-2": "host-c"}
    assert not diff(desired, observed).has_changes
    assert registry.revisions()[0].outcome == "applied"


def test_a_lost_host_ends_and_its_vms_are_placed_on_the_others() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired))
    converge(host, desired)
    assert not host.host_lost()
    registry.records["host-b"] = replace(registry.records["host-b"], heartbeat_age=9.0)
    assert host.host_lost()  # the daemon runs a cycle at once
    # Its VM is absent while its host is lost: the plan starts it again, elsewhere.
    assert set(host.observe().vms) == {"web-0", "web-2"}
    applied, unhealthy = converge(host, desired)
    assert (applied, unhealthy) == (["web-1"], {})
    assert registry.ended == [("host-b", 1)]
    assert registry.placed["web-1"].host in {"host-a", "host-c"}
    assert not host.host_lost()  # its epoch ended: nothing more to place


def test_a_plan_that_does_not_fit_is_refused_before_anything_is_written() -> None:
    big = replace(WEB, deploy=replace(WEB.deploy, memory_mib=3000))
    desired = fleet(big)
    registry = FleetRegistry([record("host-a"), record("host-b", memory=2048)])
    host = leader(registry)
    with pytest.raises(PlanError, match="web-"):
        converge(host, desired)
    assert registry.writes == []


def test_a_wave_reports_unhealthy_vms_and_vms_nobody_reported() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired, unhealthy=frozenset({"web-1"})))
    applied, unhealthy = converge(host, desired)
    assert unhealthy == {"web-1": "tcp 80: connection refused"}
    assert registry.revisions()[0].outcome == "failed"

    silent = FleetRegistry([record("host-a")])
    host = leader(silent)  # no agent ever answers
    applied, unhealthy = converge(host, fleet(workload("db", runtime=RuntimeKind.PROCESS)))
    assert applied == ["db-0"]
    assert unhealthy["db-0"].startswith("not reported running by host host-a within")


def test_a_new_term_confirms_what_it_keeps_and_adopts_what_runs_unassigned() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b")])
    registry.reported["host-a"]["web-0"] = running_vm(desired, "web-0")  # from before hosts
    host = leader(registry, term=7)
    host.refresh()
    host.refresh()
    assert registry.confirmed == [7]  # once per term
    assert registry.placed == {"web-0": Assignment("host-a", "", 7)}


def test_a_vm_started_again_is_judged_on_its_new_report_not_its_failed_one() -> None:
    """A failed VM the plan starts again: its old report (unhealthy) is not the verdict; the
    wave waits for the report of the VM its host started anew."""
    desired = fleet(workload("db", runtime=RuntimeKind.PROCESS))
    registry = FleetRegistry([record("host-a")])
    failed = replace(running_vm(desired, "db-0", healthy=False), state=VMState.FAILED)
    registry.reported["host-a"]["db-0"] = replace(failed, started_at=1.0)
    polls = []

    def agent() -> None:
        polls.append(1)
        if len(polls) == 3:  # the host gets to it a little later
            registry.reported["host-a"]["db-0"] = replace(
                running_vm(desired, "db-0"), started_at=2.0
            )

    host = leader(registry, agent)
    applied, unhealthy = converge(host, desired)
    assert (applied, unhealthy) == (["db-0"], {})
    assert len(polls) == 3


def test_vms_no_longer_desired_lose_the_assignment_to_their_lost_host() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired))
    converge(host, desired)
    registry.records["host-c"] = replace(registry.records["host-c"], heartbeat_age=9.0)
    smaller = fleet(replace(WEB, deploy=replace(WEB.deploy, replicas=1)))
    host = leader(registry, lambda: registry.agents(smaller))
    applied, unhealthy = converge(host, smaller)
    assert (applied, unhealthy) == (["web-1"], {})  # web-2 ran on the lost host
    assert set(registry.placed) == {"web-0"}  # host-c would start web-2 again otherwise


def running_count(registry: FleetRegistry, prefix: str = "web-") -> int:
    return sum(
        1
        for host, vms in registry.reported.items()
        if not registry.records[host].lost(grace=5)
        for name, vm in vms.items()
        if name.startswith(prefix) and vm.healthy
    )


def test_a_lost_host_is_told_of_once_per_epoch_naming_its_vms() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired))
    told: list[Notice] = []
    # As the daemon's cycle wires it: the notice goes through its Notifier.
    host.on_host_lost = lambda *lost: told.append(host_lost(*lost))
    converge(host, desired)
    assert told == []
    registry.records["host-b"] = replace(registry.records["host-b"], heartbeat_age=41.0)
    converge(host, desired)
    converge(host, desired)  # the epoch ended already: nothing more to tell
    (notice,) = told
    assert notice.event is NotificationEvent.HOST_LOST
    assert notice.key == "host-lost:host-b:1"
    assert notice.message == "no heartbeat for 41 s; its VM web-1 goes to another host"


def test_a_draining_host_s_vms_move_although_the_revision_changed_nothing() -> None:
    desired = fleet(WEB)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(desired))
    converge(host, desired)
    registry.records["host-b"] = replace(registry.records["host-b"], draining=True)
    observed = host.refresh()
    assert not diff(desired, observed).has_changes
    plan = host.with_moves(diff(desired, observed), desired, observed)
    ((action, vm, reason),) = [(a.action.value, a.vm, a.reason) for a in plan.actions]
    assert (action, vm) == ("restart", "web-1")
    assert reason.startswith("moves host-b -> host-")
    assert reason.endswith("(host-b is draining)")
    report = host.converge(plan, desired, checkout=None, cache_dir=None)  # type: ignore[arg-type]
    assert (report.ok, registry.reported["host-b"]) == (True, {})
    assert registry.placed["web-1"].host in {"host-a", "host-c"}
    assert registry.placed["web-1"].revision == desired.revision
    # Drained: the next cycle has nothing to move.
    observed = host.refresh()
    assert not host.with_moves(diff(desired, observed), desired, observed).has_changes


def test_a_drain_with_surge_starts_the_new_copy_healthy_before_the_old_one_goes() -> None:
    surged = replace(
        WEB,
        deploy=replace(WEB.deploy, rollout=RolloutOverrides(max_surge=1, max_unavailable=0)),
    )
    desired = fleet(surged)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    counts: list[int] = []

    def agents() -> None:
        registry.agents(desired)
        counts.append(running_count(registry))

    host = leader(registry, agents)
    converge(host, desired)
    registry.records["host-a"] = replace(registry.records["host-a"], draining=True)
    counts.clear()
    observed = host.refresh()
    plan = host.with_moves(diff(desired, observed), desired, observed)
    assert [(a.wave, a.action.value, a.vm) for a in plan.actions] == [
        (1, "create", "web-0-surge"),
        (2, "restart", "web-0"),
        (3, "delete", "web-0-surge"),
    ]
    report = host.converge(plan, desired, checkout=None, cache_dir=None)  # type: ignore[arg-type]
    assert report.ok
    assert min(counts) >= 3  # never fewer replicas up than the workload wants
    assert max(counts) == 4  # the stand-in served while web-0 moved
    assert set(registry.placed) == {"web-0", "web-1", "web-2"}
    assert registry.placed["web-0"].host in {"host-b", "host-c"}
    assert registry.reported["host-a"] == {}


def test_a_new_leader_assigns_a_held_back_replica_the_revision_its_version_came_from() -> None:
    """Mid-rollout the leader changes; a replica still on the previous version is re-created
    (its host was lost): the new leader, which never assigned it, assigns it the previous
    revision, read from the store, not the head's."""
    old = fleet(WEB, revision="a" * 40)
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])
    host = leader(registry, lambda: registry.agents(old))
    converge(host, old)
    changed = replace(WEB, deploy=replace(WEB.deploy, env={"V": "2"}))
    new = fleet(changed, revision="b" * 40)
    # A canary rollout of the new version (as the store keeps it): the gate holds web-1 and
    # web-2 back on the previous version.
    registry.fence = Fence(2, renew_deadline=600)
    registry.put_rollout(
        RolloutState("web", version_of(new.vms["web-0"]), "b" * 40, RolloutPhase.CANARY, 0.0)
    )
    gated = replace(new, vms={**new.vms, "web-1": old.vms["web-1"], "web-2": old.vms["web-2"]})
    registry.records["host-c"] = replace(registry.records["host-c"], heartbeat_age=9.0)
    successor = leader(registry, lambda: registry.agents(gated), term=2)
    applied, unhealthy = converge(successor, gated)
    assert (sorted(applied), unhealthy) == (["web-0", "web-2"], {})
    assert registry.placed["web-0"].revision == "b" * 40
    assert registry.placed["web-2"].revision == "a" * 40  # where web-1's version came from
    assert registry.placed["web-2"].host != "host-c"


def test_a_failed_wave_goes_back_to_the_version_and_host_it_ran_and_stops_the_rollout() -> None:
    old = fleet(WEB, revision="a" * 40)
    new = fleet(replace(WEB, deploy=replace(WEB.deploy, env={"V": "2"})), revision="b" * 40)
    by_revision = {old.revision: old, new.revision: new}
    registry = FleetRegistry([record("host-a"), record("host-b"), record("host-c")])

    def agents() -> None:
        """Each host runs its VMs as their assigned revision defines them; the new version
        of web-0 never gets healthy."""
        for host, vms in registry.reported.items():
            for name in [
                n for n in vms if registry.placed.get(n, Assignment("", "", 0)).host != host
            ]:
                del vms[name]
            for name, a in registry.placed.items():
                if a.host != host:
                    continue
                desired = by_revision[a.revision]
                vm = running_vm(
                    desired, name, healthy=(name, a.revision) != ("web-0", new.revision)
                )
                was = vms.get(name)
                if was is None or was.settings != vm.settings:
                    vms[name] = vm

    host = leader(registry, agents)
    converge(host, old)
    placed_before = dict(registry.placed)
    events: list[str] = []
    plan = diff(new, host.refresh())
    assert [(a.wave, a.vm) for a in plan.actions] == [(1, "web-0"), (2, "web-1"), (3, "web-2")]
    report = host.converge(
        plan,
        new,
        checkout=None,  # type: ignore[arg-type]
        cache_dir=None,  # type: ignore[arg-type]
        on_event=lambda e: events.append(e.text()),
    )
    assert report.unhealthy == {"web-0": "tcp 80: connection refused"}
    assert report.rolled_back == ["web-0"]
    assert [a.vm for a in report.applied] == ["web-0"]  # later waves did not run
    assert registry.placed["web-0"] == replace(placed_before["web-0"], term=1)
    assert registry.reported[placed_before["web-0"].host]["web-0"].healthy
    assert any(line.startswith("rollback web-0") for line in events)
    assert {a.revision for a in registry.placed.values()} == {old.revision}
    assert "rolled back web-0" in registry.revisions()[0].message
