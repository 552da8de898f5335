"""``FleetHost``, the leader's side of a fleet of hosts, against an in-memory registry whose
"agents" answer each assignment when the leader polls: placement across hosts, a lost host's
VMs placed elsewhere (its epoch ended first), a plan that does not fit refused before anything
is written, and a wave's verdict from what the hosts report."""

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
    ObservedFleet,
    ObservedVM,
    RuntimeKind,
    VMState,
)
from reconciler.planning import diff
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
                if a.host == host and name in desired.vms:
                    vms[name] = running_vm(desired, name, healthy=name not in unhealthy)


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
