"""Placement of VMs on hosts (``reconciler.planning.placement``): every rule as a table, the
refusal line, drain waves, determinism, stability, and a seeded randomized property test."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.errors import ConfigError, ManifestError, PlanError
from reconciler.manifests import load_fleet
from reconciler.manifests.compile_cache import decode_workload, encode_workload
from reconciler.model import PlacementSpec, RolloutPolicy, RuntimeKind
from reconciler.planning.placement import (
    HOST_RULES,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    PREFERENCES,
    HostFacts,
    Overcommit,
    Placement,
    VMDemand,
    demands_of,
    drain_waves,
    label_problem,
    place,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
QEMU, FC, PROC = RuntimeKind.QEMU, RuntimeKind.FIRECRACKER, RuntimeKind.PROCESS
ALL = frozenset(RuntimeKind)


def host(name: str, vcpus: int = 4, memory: int = 4096, **kwargs: object) -> HostFacts:
    kwargs.setdefault("runtimes", ALL)
    kwargs.setdefault("kvm", True)
    return HostFacts(name, vcpus, memory, **kwargs)  # type: ignore[arg-type]


def vms(
    workload: str,
    replicas: int,
    *,
    vcpus: int = 1,
    memory: int = 256,
    runtime: RuntimeKind = PROC,
    selector: Mapping[str, str] | None = None,
    spread_by: str | None = None,
) -> list[VMDemand]:
    spec = PlacementSpec(dict(selector or {}), spread_by)
    return [
        VMDemand(f"{workload}-{i}", workload, i, runtime, vcpus, memory, spec)
        for i in range(replicas)
    ]


def on(placement: Placement, host_name: str) -> list[str]:
    return sorted(vm for vm, h in placement.assignments.items() if h == host_name)


# --------------------------------------------------------------------------------------------
# Hard rules, one table
# --------------------------------------------------------------------------------------------


HARD_CASES = [
    pytest.param(
        vms("w", 1, vcpus=5),
        [host("a", vcpus=1)],
        Overcommit(cpu=4.0),
        None,
        "w-0 needs 5 vCPU / 256 MiB; largest free slot: a 4 vCPU / 4096 MiB (1 host)",
        id="capacity: vCPUs with the CPU overcommit (1 core x 4 = 4)",
    ),
    pytest.param(
        vms("w", 1, vcpus=4),
        [host("a", vcpus=1)],
        Overcommit(cpu=4.0),
        "a",
        None,
        id="capacity: 4 vCPUs fit 1 core at overcommit 4",
    ),
    pytest.param(
        vms("w", 1, memory=4097),
        [host("a")],
        Overcommit(),
        None,
        "w-0 needs 1 vCPU / 4097 MiB; largest free slot: a 16 vCPU / 4096 MiB (1 host)",
        id="capacity: memory is not overcommitted by default",
    ),
    pytest.param(
        vms("w", 1, memory=6000),
        [host("a")],
        Overcommit(memory=1.5),
        "a",
        None,
        id="capacity: memory overcommit when configured",
    ),
    pytest.param(
        vms("w", 1, runtime=FC),
        [host("a", kvm=False)],
        Overcommit(),
        None,
        "w-0 needs runtime firecracker (with KVM); no schedulable host offers it (1 host)",
        id="runtime: firecracker needs KVM",
    ),
    pytest.param(
        vms("w", 1, runtime=QEMU),
        [host("a", kvm=False)],
        Overcommit(),
        "a",
        None,
        id="runtime: qemu runs without KVM (TCG)",
    ),
    pytest.param(
        vms("w", 1, runtime=QEMU),
        [host("a", runtimes=frozenset({PROC})), host("b", runtimes=frozenset({QEMU}))],
        Overcommit(),
        "b",
        None,
        id="runtime: only where the VMM is installed",
    ),
    pytest.param(
        vms("w", 1, selector={"zone": "b"}),
        [host("a", labels={"zone": "a"}), host("b", labels={"zone": "b", "disk": "ssd"})],
        Overcommit(),
        "b",
        None,
        id="hostSelector: a matching host",
    ),
    pytest.param(
        vms("w", 1, selector={"zone": "c", "disk": "ssd"}),
        [host("a", labels={"zone": "c"}), host("b", labels={"disk": "ssd"})],
        Overcommit(),
        None,
        "w-0 needs hostSelector disk=ssd,zone=c; no schedulable host with runtime process "
        "matches it (2 hosts)",
        id="hostSelector: every label, not any",
    ),
    pytest.param(
        vms("w", 1),
        [host("a", cordoned=True), host("b", lost=True), host("c", draining=True)],
        Overcommit(),
        None,
        "w-0 needs a host; none takes new VMs (3 hosts, 1 lost, 1 draining, 1 cordoned)",
        id="schedulable: no new VM on a cordoned, draining or lost host",
    ),
    pytest.param(
        vms("w", 1),
        [],
        Overcommit(),
        None,
        "w-0 needs a host; none is registered (0 hosts)",
        id="schedulable: no host at all",
    ),
]


@pytest.mark.parametrize(("demands", "hosts", "overcommit", "where", "refusal"), HARD_CASES)
def test_hard_rules(
    demands: list[VMDemand],
    hosts: list[HostFacts],
    overcommit: Overcommit,
    where: str | None,
    refusal: str | None,
) -> None:
    placement = place(demands, hosts, {}, overcommit)
    assert placement.assignments.get(demands[0].name) == where
    assert placement.refusal() == refusal


def test_every_rule_says_why() -> None:
    assert [r.name for r in HOST_RULES] == ["schedulable", "runtime", "hostSelector"]
    assert [name for name, _ in PREFERENCES] == ["stability", "spread", "least allocated", "name"]
    assert all(len(r.why) > 40 for r in HOST_RULES)
    assert all(len(why) > 40 for _, why in PREFERENCES)


def test_a_plan_that_does_not_fit_is_refused_with_one_line_naming_the_largest_slot() -> None:
    hosts = [
        host("host-a", vcpus=1, memory=2048, cordoned=True),
        host("host-b", vcpus=1, memory=2048),
        host("host-c", vcpus=1, memory=2048, cordoned=True),
    ]
    demands = vms("web", 3, vcpus=2, memory=512)
    placement = place(demands, hosts, {}, Overcommit(cpu=2.0))
    assert placement.assignments == {"web-0": "host-b"}
    with pytest.raises(PlanError) as info:
        placement.require_fit()
    assert str(info.value) == (
        "web-1 needs 2 vCPU / 512 MiB; largest free slot: host-b 0 vCPU / 1536 MiB "
        "(3 hosts, 2 cordoned); and 1 more VM"
    )
    assert "\n" not in str(info.value)


def test_the_largest_free_slot_is_the_one_closest_to_the_need() -> None:
    hosts = [host("a", vcpus=1, memory=8192), host("b", vcpus=2, memory=1024)]
    placement = place(vms("w", 1, vcpus=8, memory=2048), hosts, {}, Overcommit(cpu=1.0))
    # a has 1/8 of the vCPUs, b 2/8 of the vCPUs and half the memory: b is closer.
    assert placement.refusal() == (
        "w-0 needs 8 vCPU / 2048 MiB; largest free slot: b 2 vCPU / 1024 MiB (2 hosts)"
    )


# --------------------------------------------------------------------------------------------
# Preferences: spread, least allocated, stability
# --------------------------------------------------------------------------------------------


def test_replicas_spread_across_hosts() -> None:
    hosts = [host(n) for n in ("a", "b", "c")]
    placement = place(vms("web", 3), hosts, {})
    assert sorted(placement.assignments.values()) == ["a", "b", "c"]
    placement = place(vms("web", 6), hosts, {})
    assert Counter(placement.assignments.values()) == {"a": 2, "b": 2, "c": 2}


def test_replicas_spread_across_the_spread_label_first() -> None:
    zones = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}
    hosts = [host(n, labels={"zone": z}) for n, z in zones.items()]
    placement = place(vms("web", 2, spread_by="zone"), hosts, {})
    assert sorted(zones[h] for h in placement.assignments.values()) == ["a", "b"]
    # Without spreadBy, hosts alone: both replicas may land in zone a.
    placement = place(vms("web", 2), hosts, {})
    assert sorted(placement.assignments.values()) == ["a1", "a2"]
    # Four replicas over two zones: two per zone, and never two on one host in zone a.
    placement = place(vms("web", 4, spread_by="zone"), hosts, {})
    assert Counter(zones[h] for h in placement.assignments.values()) == {"a": 2, "b": 2}
    assert Counter(placement.assignments.values())["b1"] == 2


def test_spread_is_best_effort_a_full_zone_does_not_leave_a_replica_unplaced() -> None:
    hosts = [host("a1", labels={"zone": "a"}), host("b1", memory=256, labels={"zone": "b"})]
    placement = place(vms("web", 3, spread_by="zone"), hosts, {})
    assert placement.unplaceable == ()
    assert on(placement, "b1") == ["web-1"]
    assert on(placement, "a1") == ["web-0", "web-2"]


def test_new_vms_go_to_the_least_allocated_host() -> None:
    hosts = [host("a"), host("b")]
    current = {"big-0": "a"}
    placement = place(vms("big", 1, memory=2048) + vms("small", 1), hosts, current)
    assert placement.assignments == {"big-0": "a", "small-0": "b"}


MOVE_CASES = [
    pytest.param({"a": {"lost": True}}, "a is lost", id="host lost"),
    pytest.param({"a": {"draining": True}}, "a is draining", id="host draining"),
    pytest.param({"a": None}, "a is not a registered host", id="host gone from the registry"),
    pytest.param(
        {"a": {"labels": {"zone": "y"}}},
        "a no longer matches hostSelector zone=x",
        id="host no longer matches",
    ),
    pytest.param(
        {"a": {"runtimes": frozenset({QEMU})}},
        "a no longer offers runtime process",
        id="runtime removed",
    ),
    pytest.param(
        {"a": {"memory_mib": 512}},
        "no longer fits on a (needs 1 vCPU / 1024 MiB, free 16 vCPU / 512 MiB)",
        id="host shrank",
    ),
]


@pytest.mark.parametrize(("change", "reason"), MOVE_CASES)
def test_a_vm_moves_only_when_it_must_and_says_why(
    change: Mapping[str, Mapping[str, object] | None], reason: str
) -> None:
    labels = {"zone": "x"}
    before = {"a": host("a", labels=labels), "b": host("b", labels=labels)}
    demands = vms("w", 1, memory=1024, selector={"zone": "x"})
    after = dict(before)
    for name, fields in change.items():
        if fields is None:
            del after[name]
        else:
            after[name] = replace(after[name], **fields)  # type: ignore[arg-type]
    placement = place(demands, after.values(), {"w-0": "a"})
    assert [(m.vm, m.source, m.destination, m.reason) for m in placement.moves] == [
        ("w-0", "a", "b", reason)
    ]


def test_a_cordoned_host_keeps_its_vms_and_takes_no_new_ones() -> None:
    hosts = [host("a", cordoned=True), host("b")]
    placement = place(vms("w", 3), hosts, {"w-0": "a"})
    assert placement.moves == ()
    assert on(placement, "a") == ["w-0"]
    assert on(placement, "b") == ["w-1", "w-2"]


def test_a_vm_that_should_spread_better_is_not_moved_for_it() -> None:
    hosts = [host("a"), host("b"), host("c")]
    placement = place(vms("w", 3), hosts, {"w-0": "a", "w-1": "a", "w-2": "a"})
    assert placement.moves == ()
    assert on(placement, "a") == ["w-0", "w-1", "w-2"]


def test_on_an_overfull_host_the_lowest_ordinals_stay() -> None:
    hosts = [host("a", memory=1024), host("b")]
    current = {f"w-{i}": "a" for i in range(3)}
    placement = place(vms("w", 3, memory=512), hosts, current)
    assert on(placement, "a") == ["w-0", "w-1"]
    assert [(m.vm, m.destination) for m in placement.moves] == [("w-2", "b")]


def test_adding_a_host_moves_nothing() -> None:
    hosts = [host(n) for n in ("a", "b")]
    demands = vms("web", 5) + vms("db", 2, memory=1024)
    first = place(demands, hosts, {})
    again = place(demands, [*hosts, host("c", vcpus=64, memory=65536)], first.assignments)
    assert again.moves == ()
    assert again.assignments == first.assignments


def test_losing_a_host_moves_only_its_vms() -> None:
    hosts = [host(n) for n in ("a", "b", "c")]
    demands = vms("web", 6) + vms("db", 3, memory=1024)
    first = place(demands, hosts, {})
    lost = [replace(hosts[1], lost=True), hosts[0], hosts[2]]
    again = place(demands, lost, first.assignments)
    on_b = {vm for vm, h in first.assignments.items() if h == "b"}
    assert {m.vm for m in again.moves} == on_b
    assert all(m.reason == "b is lost" for m in again.moves)
    assert {vm for vm in first.assignments if again.assignments[vm] != first.assignments[vm]} == (
        on_b
    )


def test_vms_no_longer_desired_are_ignored() -> None:
    placement = place(vms("w", 1), [host("a")], {"gone-0": "a", "w-0": "a"})
    assert placement.assignments == {"w-0": "a"}
    assert placement.free["a"].memory_mib == 4096 - 256


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def _fleet(
    rng: random.Random, hosts: int, workloads: int
) -> tuple[list[HostFacts], list[VMDemand]]:
    zones = ("a", "b", "c")
    facts = [
        HostFacts(
            f"h{i:03d}",
            rng.choice((2, 4, 8)),
            rng.choice((2048, 4096, 8192)),
            labels={"zone": rng.choice(zones), **({"disk": "ssd"} if rng.random() < 0.5 else {})},
            runtimes=frozenset(rng.sample(sorted(RuntimeKind), rng.randint(1, 3))),
            kvm=rng.random() < 0.7,
            cordoned=rng.random() < 0.1,
        )
        for i in range(hosts)
    ]
    demands: list[VMDemand] = []
    for w in range(workloads):
        selector = {"disk": "ssd"} if rng.random() < 0.3 else {}
        spread = "zone" if rng.random() < 0.5 else None
        demands += vms(
            f"w{w:03d}",
            rng.randint(1, 6),
            vcpus=rng.choice((1, 2, 4)),
            memory=rng.choice((128, 256, 512, 1024)),
            runtime=rng.choice(sorted(RuntimeKind)),
            selector=selector,
            spread_by=spread,
        )
    return facts, demands


def test_shuffled_inputs_give_the_same_placement() -> None:
    rng = random.Random(11)
    hosts, demands = _fleet(rng, 12, 30)
    first = place(demands, hosts, {})
    current = dict(list(first.assignments.items())[::2])
    reference = place(demands, hosts, current)
    for seed in range(5):
        shuffle = random.Random(seed)
        h, d, c = list(hosts), list(demands), list(current.items())
        shuffle.shuffle(h)
        shuffle.shuffle(d)
        shuffle.shuffle(c)
        assert place(d, h, dict(c)) == reference


# --------------------------------------------------------------------------------------------
# A seeded randomized property test
# --------------------------------------------------------------------------------------------


def _check_invariants(
    placement: Placement, hosts: Iterable[HostFacts], demands: Iterable[VMDemand], ratio: Overcommit
) -> None:
    by_name = {h.name: h for h in hosts}
    by_vm = {d.name: d for d in demands}
    load: dict[str, list[int]] = {name: [0, 0] for name in by_name}
    for vm, where in placement.assignments.items():
        demand, facts = by_vm[vm], by_name[where]
        assert not facts.lost, (vm, where)
        assert not facts.draining, (vm, where)
        assert all(facts.labels.get(k) == v for k, v in demand.placement.host_selector.items())
        assert demand.runtime in facts.runtimes
        assert facts.kvm or demand.runtime is not FC
        load[where][0] += demand.vcpus
        load[where][1] += demand.memory_mib
    for name, (cpu, memory) in load.items():
        assert cpu <= by_name[name].vcpus * ratio.cpu, name
        assert memory <= by_name[name].memory_mib * ratio.memory, name
    assert set(placement.assignments) | {u.vm for u in placement.unplaceable} == set(by_vm)


@pytest.mark.parametrize("seed", range(20))
def test_randomized_fleets_respect_every_rule_and_only_lost_hosts_vms_move(seed: int) -> None:
    rng = random.Random(seed)
    hosts, demands = _fleet(rng, rng.randint(3, 20), rng.randint(5, 40))
    ratio = Overcommit(cpu=rng.choice((1.0, 2.0, 4.0)), memory=rng.choice((1.0, 1.5)))
    first = place(demands, hosts, {}, ratio)
    _check_invariants(first, hosts, demands, ratio)

    lost_names = {h.name for h in rng.sample(hosts, max(1, len(hosts) // 5))}
    after = [replace(h, lost=h.name in lost_names) for h in hosts]
    again = place(demands, after, first.assignments, ratio)
    _check_invariants(again, after, demands, ratio)
    for vm, where in first.assignments.items():
        if where in lost_names:
            assert again.assignments.get(vm) != where
        else:
            assert again.assignments[vm] == where, vm
    assert {m.source for m in again.moves} <= lost_names
    # Placed before, unplaced now: only a lost host's VM can be.
    for u in again.unplaceable:
        assert u.vm not in first.assignments or first.assignments[u.vm] in lost_names


# --------------------------------------------------------------------------------------------
# Drain
# --------------------------------------------------------------------------------------------


def test_drain_moves_the_hosts_vms_in_waves_of_max_unavailable_per_workload() -> None:
    hosts = [host("a", vcpus=8, memory=8192), host("b", vcpus=8, memory=8192), host("c")]
    demands = vms("web", 4) + vms("db", 2, memory=512) + vms("job", 1)
    current = {"web-0": "a", "web-1": "a", "web-2": "a", "web-3": "b"}
    current |= {"db-0": "a", "db-1": "b", "job-0": "c"}
    drain = drain_waves("a", demands, hosts, current, rollout=RolloutPolicy(max_unavailable=2))
    waves = [[m.vm for m in wave] for wave in drain.waves]
    assert waves == [["db-0", "web-0", "web-1"], ["web-2"]]
    assert all(m.source == "a" and m.destination != "a" for w in drain.waves for m in w)
    assert on(drain.placement, "a") == []
    assert drain.placement.assignments["job-0"] == "c"  # others stay
    one = drain_waves("a", demands, hosts, current, rollout=RolloutPolicy(max_unavailable=1))
    assert [len(w) for w in one.waves] == [2, 1, 1]


def test_a_drain_that_does_not_fit_is_refused_and_names_what() -> None:
    hosts = [host("a"), host("b", memory=512)]
    with pytest.raises(PlanError, match=r"^cannot drain a: w-1 needs 1 vCPU / 512 MiB; "):
        drain_waves(
            "a", vms("w", 2, memory=512), hosts, {"w-0": "a", "w-1": "a"}, rollout=RolloutPolicy()
        )
    with pytest.raises(PlanError, match="cannot drain nope: no such host"):
        drain_waves("nope", [], hosts, {}, rollout=RolloutPolicy())


def test_draining_an_empty_host_has_no_waves() -> None:
    drain = drain_waves(
        "a", vms("w", 1), [host("a"), host("b")], {"w-0": "b"}, rollout=RolloutPolicy()
    )
    assert drain.waves == ()


# --------------------------------------------------------------------------------------------
# Inputs: overcommit, duplicates, labels, manifests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan"), float("inf"), 65.0])
def test_overcommit_ratios_are_checked(ratio: float) -> None:
    with pytest.raises(ConfigError, match="overcommit ratio"):
        Overcommit(cpu=ratio)


def test_duplicate_hosts_or_vms_are_refused() -> None:
    with pytest.raises(PlanError, match="host 'a' is listed twice"):
        place([], [host("a"), host("a")], {})
    with pytest.raises(PlanError, match="VM 'w-0' is demanded twice"):
        place(vms("w", 1) * 2, [host("a")], {})


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("zone", "eu-west-1a", True),
        ("example.com/zone", "a", True),
        ("topology.kubernetes.io/zone", "", True),
        ("a" * 63, "b" * 63, True),
        ("a" * 64, "b", False),
        ("zone", "b" * 64, False),
        ("-zone", "a", False),
        ("zone", "a b", False),
        ("Example.com/zone", "a", False),
        ("x" * 254 + "/zone", "a", False),
        ("example.com/", "a", False),
        ("zone", "$(reboot)", False),
        ("zone\n", "a", False),
    ],
)
def test_label_syntax(key: str, value: str, ok: bool) -> None:
    assert (label_problem(key, value) is None) == ok


def test_the_schema_checks_labels_with_the_same_patterns() -> None:
    schema = json.loads((SCHEMAS / "workload.schema.json").read_text())
    assert schema["$defs"]["labelKey"]["pattern"] == LABEL_KEY_PATTERN
    selector = schema["$defs"]["deploy"]["properties"]["placement"]["properties"]["hostSelector"]
    assert selector["additionalProperties"]["pattern"] == LABEL_VALUE_PATTERN


WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: src, language: c, entrypoint: main.c}}
  build: {{targets: [executable]}}
  deploy: {{replicas: 2, vcpus: 2, memoryMiB: 128{extra}}}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    return root


def test_deploy_placement_compiles_and_is_not_a_vm_setting(tiny: Path) -> None:
    (tiny / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        "spec: {defaults: {deploy: {placement: {spreadBy: zone}}}}\n"
    )
    (tiny / "w.yaml").write_text(
        WORKLOAD.format(
            name="w",
            extra=", placement: {hostSelector: {example.com/disk: ssd}, spreadBy: zone}",
        )
        + "---\n"
        + WORKLOAD.format(name="v", extra="")
    )
    desired = load_fleet(tiny)
    assert desired.workloads["w"].deploy.placement == PlacementSpec(
        {"example.com/disk": "ssd"}, "zone"
    )
    assert desired.workloads["v"].deploy.placement == PlacementSpec({}, "zone")
    assert not any("placement" in key for key in desired.vms["w-0"].settings)
    demands = demands_of(desired)
    assert [(d.name, d.vcpus, d.memory_mib, d.runtime) for d in demands] == [
        ("v-0", 2, 128, PROC),
        ("v-1", 2, 128, PROC),
        ("w-0", 2, 128, PROC),
        ("w-1", 2, 128, PROC),
    ]
    assert demands[2].placement.host_selector == {"example.com/disk": "ssd"}


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("{hostSelector: {'bad key': a}}", "'bad key': a label key is a name of 1-63"),
        ("{hostSelector: {zone: 'a;b'}}", "'a;b': a label value is at most 63"),
        ("{hostSelector: {zone: 3}}", "expected string"),
        ("{spreadBy: '../zone'}", "'../zone': a label key is a name of 1-63"),
        ('{hostSelector: {"zone\\n": a}}', "a label key is a name of 1-63"),
        ('{hostSelector: {zone: "a\\n"}}', "a label value is at most 63"),
        ("{spread: zone}", "unknown field"),
    ],
)
def test_hostile_placement_is_refused_by_the_schema(
    tiny: Path, placement: str, message: str
) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=f", placement: {placement}"))
    with pytest.raises(ManifestError) as info:
        load_fleet(tiny)
    found = [str(p) for p in info.value.problems]
    assert len(found) == 1, found
    assert message in found[0]
    assert re.search(r"\$\.spec\.deploy\.placement", found[0]), found[0]


def test_the_compile_cache_keeps_a_workloads_placement(tiny: Path) -> None:
    (tiny / "w.yaml").write_text(
        WORKLOAD.format(name="w", extra=", placement: {hostSelector: {zone: a}, spreadBy: rack}")
    )
    workload = load_fleet(tiny).workloads["w"]
    assert decode_workload(encode_workload(workload)) == workload
