"""Golden tables of the pure rollout planning: desired + observed + rollout state -> plan.

``planning.rollout.gate`` decides which version each replica is desired on; ``diff`` plans the
way there, with surge stand-ins cut into waves.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import fleet, running, workload

from reconciler.errors import ManifestError, PlanError
from reconciler.manifests import load_fleet
from reconciler.model import (
    DesiredFleet,
    ObservedFleet,
    Plan,
    RolloutCommand,
    RolloutOverrides,
    RolloutPhase,
    RolloutPolicy,
    RolloutState,
    RolloutSwitch,
    VMState,
)
from reconciler.planning import check_deletions, diff
from reconciler.planning.rollout import Gated, gate, observed_version, policy_of, version_of

OLD = workload("web", replicas=3, env={"GREETING": "old"})


def web(rollout: RolloutOverrides | None = None, greeting: str = "new") -> DesiredFleet:
    return fleet(workload("web", replicas=3, env={"GREETING": greeting}, rollout=rollout))


CANARY = RolloutOverrides(canary=1, soak_seconds=10)


def steps(plan: Plan) -> list[tuple[int, str, str]]:
    return [(a.wave, a.action.value, a.vm) for a in plan.actions]


def on_new(observed: ObservedFleet, desired: DesiredFleet, *names: str) -> ObservedFleet:
    """``observed`` with ``names`` running ``desired``'s version, healthy."""
    new = running(desired)
    return replace(observed, vms={**observed.vms, **{n: new.vms[n] for n in names}})


def run_gate(
    desired: DesiredFleet,
    observed: ObservedFleet,
    states: dict[str, RolloutState] | None = None,
    now: float = 100.0,
    switches: dict[str, RolloutSwitch] | None = None,
) -> tuple[Gated, Plan]:
    gated = gate(desired, observed, states or {}, switches or {}, now)
    return gated, diff(gated.desired, observed)


# -- surge ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        (  # the default: one at a time, down while replaced
            RolloutPolicy(max_unavailable=1),
            [(1, "restart", "web-0"), (2, "restart", "web-1"), (3, "restart", "web-2")],
        ),
        (  # maxSurge 1, maxUnavailable 0: stand-in, VM, stand-in gone, per VM
            RolloutPolicy(max_unavailable=0, max_surge=1),
            [
                (1, "create", "web-0-surge"),
                (2, "restart", "web-0"),
                (3, "delete", "web-0-surge"),
                (4, "create", "web-1-surge"),
                (5, "restart", "web-1"),
                (6, "delete", "web-1-surge"),
                (7, "create", "web-2-surge"),
                (8, "restart", "web-2"),
                (9, "delete", "web-2-surge"),
            ],
        ),
        (  # maxSurge 2: two stand-ins at a time
            RolloutPolicy(max_unavailable=0, max_surge=2),
            [
                (1, "create", "web-0-surge"),
                (1, "create", "web-1-surge"),
                (2, "restart", "web-0"),
                (2, "restart", "web-1"),
                (3, "delete", "web-0-surge"),
                (3, "delete", "web-1-surge"),
                (4, "create", "web-2-surge"),
                (5, "restart", "web-2"),
                (6, "delete", "web-2-surge"),
            ],
        ),
    ],
)
def test_surge_waves(rollout: RolloutPolicy, expected: list[tuple[int, str, str]]) -> None:
    plan = diff(
        fleet(workload("web", replicas=3, env={"GREETING": "new"}), rollout=rollout),
        running(fleet(OLD)),
    )
    assert steps(plan) == expected
    for stand_in in (a for a in plan.actions if a.vm == "web-0-surge"):
        assert stand_in.stands_in_for == "web-0"
        assert "web-0" in stand_in.reason
    assert Plan.from_dict(plan.to_dict()) == plan


def test_workload_rollout_overrides_the_fleet() -> None:
    desired = web(RolloutOverrides(max_unavailable=0, max_surge=1))
    plan = diff(desired, running(fleet(OLD)))
    assert steps(plan)[:3] == [
        (1, "create", "web-0-surge"),
        (2, "restart", "web-0"),
        (3, "delete", "web-0-surge"),
    ]


def test_dead_vm_is_replaced_without_a_stand_in() -> None:
    desired = web(RolloutOverrides(max_unavailable=0, max_surge=1))
    observed = running(fleet(OLD))
    observed = replace(
        observed,
        vms={**observed.vms, "web-1": replace(observed.vms["web-1"], state=VMState.MISSING)},
    )
    plan = diff(desired, observed)
    assert [s for s in steps(plan) if s[2].startswith("web-1")] == [(1, "replace", "web-1")]


def test_an_interrupted_surge_resumes_with_no_second_stand_in() -> None:
    """A daemon killed after starting web-0's stand-in: the next plan replaces web-0 while the
    stand-in serves, then deletes the stand-in; the other VMs surge as usual."""
    desired = web(RolloutOverrides(max_unavailable=0, max_surge=1))
    observed = running(fleet(OLD))
    stand_in = replace(running(desired).vms["web-0"], name="web-0-surge")
    observed = replace(observed, vms={**observed.vms, "web-0-surge": stand_in})
    plan = diff(desired, observed)
    assert steps(plan)[:2] == [(1, "restart", "web-0"), (2, "delete", "web-0-surge")]
    assert [a.vm for a in plan.actions].count("web-0-surge") == 1
    # Interrupted after web-0 was replaced: only the stand-in goes, and it deletes nothing of
    # the fleet (the deletion guard does not count it).
    done = on_new(observed, desired, "web-0", "web-1", "web-2")
    plan = diff(desired, done)
    assert steps(plan) == [(1, "delete", "web-0-surge")]
    check_deletions(plan, desired, done)


def test_stand_ins_go_even_when_prune_is_disabled() -> None:
    desired = fleet(workload("web", replicas=3, env={"GREETING": "new"}), prune=False)
    observed = running(desired)
    stand_in = replace(observed.vms["web-0"], name="web-0-surge")
    plan = diff(desired, replace(observed, vms={**observed.vms, "web-0-surge": stand_in}))
    assert steps(plan) == [(1, "delete", "web-0-surge")]


def test_no_surge_and_no_unavailability_is_refused() -> None:
    desired = web(RolloutOverrides(max_unavailable=0))
    with pytest.raises(PlanError, match="maxUnavailable 0 needs maxSurge"):
        diff(desired, running(fleet(OLD)))


# -- canaries -------------------------------------------------------------------------------


def test_a_new_version_goes_to_the_canary_first() -> None:
    desired = web(CANARY)
    gated, plan = run_gate(desired, running(fleet(OLD)), now=100.0)
    assert steps(plan) == [(1, "restart", "web-0")]
    (state,) = gated.changed
    assert (state.phase, state.started_at, state.version) == (
        RolloutPhase.CANARY,
        100.0,
        version_of(desired.vms["web-0"]),
    )
    assert state.previous is not None
    assert state.previous.settings == running(fleet(OLD)).vms["web-1"].settings
    assert [e.kind for e in gated.events] == ["rollout-started"]
    assert gated.in_progress == ("web",)
    assert gated.progress["web"].canaries == ("web-0",)


def _canary_state(desired: DesiredFleet, **changes: object) -> dict[str, RolloutState]:
    first, _ = run_gate(desired, running(fleet(OLD)), now=100.0)
    return {"web": replace(first.changed[0], **changes)}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "soaked_since", "expected_phase", "expected_steps", "remaining"),
    [
        # canary healthy at 110 for the first time: the soak starts, nothing else moves
        (110.0, None, RolloutPhase.CANARY, [], 10.0),
        # 5 s into the soak
        (115.0, 110.0, RolloutPhase.CANARY, [], 5.0),
        # soaked: promoted, the rest follow one at a time (maxUnavailable 1)
        (
            120.0,
            110.0,
            RolloutPhase.PROMOTED,
            [(1, "restart", "web-1"), (2, "restart", "web-2")],
            None,
        ),
    ],
)
def test_soak_then_promote(
    now: float,
    soaked_since: float | None,
    expected_phase: RolloutPhase,
    expected_steps: list[tuple[int, str, str]],
    remaining: float | None,
) -> None:
    desired = web(CANARY)
    states = _canary_state(desired, canaries_healthy_since=soaked_since)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    gated, plan = run_gate(desired, observed, states, now=now)
    assert gated.progress["web"].state.phase is expected_phase
    assert steps(plan) == expected_steps
    assert gated.progress["web"].soak_remaining == remaining


def test_unhealthy_canary_does_not_soak() -> None:
    desired = web(CANARY)
    states = _canary_state(desired, canaries_healthy_since=110.0)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    sick = replace(observed.vms["web-0"], healthy=False)
    observed = replace(observed, vms={**observed.vms, "web-0": sick})
    gated, plan = run_gate(desired, observed, states, now=200.0)
    assert gated.progress["web"].state.phase is RolloutPhase.CANARY
    assert gated.progress["web"].state.canaries_healthy_since is None
    assert steps(plan) == []


def test_auto_promote_false_waits_for_the_operator_then_promote_goes_on() -> None:
    desired = web(RolloutOverrides(canary=1, soak_seconds=10, auto_promote=False))
    states = _canary_state(desired, canaries_healthy_since=110.0)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    gated, plan = run_gate(desired, observed, states, now=500.0)
    assert gated.progress["web"].waiting_for_promote
    assert "reconciler promote web" in gated.progress["web"].state.message
    assert steps(plan) == []
    version = states["web"].version
    promote = {"web": RolloutSwitch("web", RolloutCommand.PROMOTE, version, at=501.0)}
    gated, plan = run_gate(desired, observed, {"web": gated.changed[0]}, 502.0, promote)
    assert gated.progress["web"].state.phase is RolloutPhase.PROMOTED
    assert steps(plan) == [(1, "restart", "web-1"), (2, "restart", "web-2")]


def test_abort_puts_the_canary_back_on_the_previous_version() -> None:
    desired = web(CANARY)
    states = _canary_state(desired)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    abort = {"web": RolloutSwitch("web", RolloutCommand.ABORT, states["web"].version, at=105.0)}
    gated, plan = run_gate(desired, observed, states, 106.0, abort)
    assert gated.progress["web"].state.phase is RolloutPhase.ABORTED
    assert steps(plan) == [(1, "restart", "web-0")]
    old_settings = running(fleet(OLD)).vms["web-0"].settings
    assert all(c.after == old_settings.get(c.key) for c in plan.actions[0].changes)
    # Held there: the next cycles (and the same revision) plan nothing.
    held = running(fleet(OLD))
    gated, plan = run_gate(desired, held, {"web": gated.changed[0]}, 300.0)
    assert steps(plan) == []
    assert gated.changed == ()
    # A switch for another version (an older rollout's) changes nothing.
    stale = {"web": RolloutSwitch("web", RolloutCommand.ABORT, "other", at=105.0)}
    gated, _ = run_gate(desired, observed, states, 106.0, stale)
    assert gated.progress["web"].state.phase is RolloutPhase.CANARY


def test_a_new_revision_starts_a_new_rollout_after_an_abort() -> None:
    desired = web(CANARY)
    aborted = _canary_state(desired, phase=RolloutPhase.ABORTED)
    newer = web(CANARY, greeting="newer")
    gated, plan = run_gate(newer, running(fleet(OLD)), aborted, 400.0)
    assert gated.progress["web"].state.phase is RolloutPhase.CANARY
    assert steps(plan) == [(1, "restart", "web-0")]


def test_progress_deadline_rolls_back() -> None:
    desired = web(RolloutOverrides(canary=1, soak_seconds=10, progress_deadline_seconds=60))
    states = _canary_state(desired)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    sick = replace(observed.vms["web-0"], healthy=False)
    observed = replace(observed, vms={**observed.vms, "web-0": sick})
    gated, plan = run_gate(desired, observed, states, now=150.0)
    assert gated.progress["web"].state.phase is RolloutPhase.CANARY
    gated, plan = run_gate(desired, observed, states, now=161.0)
    assert gated.progress["web"].state.phase is RolloutPhase.ABORTED
    assert "progressDeadlineSeconds" in gated.aborted[0].message
    assert steps(plan) == [(1, "restart", "web-0")]


def test_complete_when_every_replica_is_on_the_new_version() -> None:
    desired = web(CANARY)
    states = _canary_state(desired, phase=RolloutPhase.PROMOTED)
    gated, plan = run_gate(desired, running(desired), states, 200.0)
    assert gated.progress["web"].state.phase is RolloutPhase.COMPLETE
    assert gated.in_progress == ()
    assert steps(plan) == []


def test_first_deployment_and_healing_start_no_rollout() -> None:
    desired = web(CANARY)
    gated, plan = run_gate(desired, ObservedFleet(version=0, vms={}))
    assert gated.changed == ()
    assert [a.action.value for a in plan.actions] == ["create"] * 3
    # Healing onto an older revision (track=False) leaves the stored rollout alone.
    states = _canary_state(desired)
    gated = gate(fleet(OLD), running(desired), states, {}, 200.0, track=False)
    assert gated.changed == ()
    assert gated.desired == fleet(OLD)


def test_a_dead_replica_heals_on_the_version_it_is_meant_to_run() -> None:
    desired = web(CANARY)
    states = _canary_state(desired)
    observed = on_new(running(fleet(OLD)), desired, "web-0")
    dead = replace(observed.vms["web-2"], state=VMState.MISSING)
    observed = replace(observed, vms={**observed.vms, "web-2": dead})
    gated, plan = run_gate(desired, observed, states, 105.0)
    assert steps(plan) == [(1, "replace", "web-2")]
    assert observed_version(observed.vms["web-1"]) == version_of(gated.desired.vms["web-2"])


# -- the manifests ------------------------------------------------------------------------------

_WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: src, language: c, entrypoint: main.c}}
  build: {{targets: [executable]}}
  deploy: {{runtime: process, replicas: 3, rollout: {rollout}}}
"""


def _tiny(tmp_path: Path, **rollouts: str) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    for name, rollout in rollouts.items():
        (tmp_path / f"{name}.yaml").write_text(_WORKLOAD.format(name=name, rollout=rollout))
    return tmp_path


def test_deploy_rollout_compiles_to_overrides_of_the_fleet(tmp_path: Path) -> None:
    root = _tiny(tmp_path, web="{canary: 1, soakSeconds: 10, autoPromote: false}")
    (root / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        "spec: {rollout: {maxSurge: 1, maxUnavailable: 0, progressDeadlineSeconds: 600}}\n"
    )
    desired = load_fleet(root)
    policy = policy_of(desired, "web")
    assert policy == RolloutPolicy(
        max_unavailable=0,
        max_surge=1,
        canary=1,
        soak_seconds=10.0,
        auto_promote=False,
        progress_deadline_seconds=600.0,
    )


def test_impossible_rollouts_are_refused_with_their_file(tmp_path: Path) -> None:
    root = _tiny(
        tmp_path, a="{canary: 3}", b="{maxUnavailable: 0}", c="{canary: -1}", d="{surge: 1}"
    )
    with pytest.raises(ManifestError) as info:
        load_fleet(root)
    found = [str(p) for p in info.value.problems]
    assert any("a.yaml" in p and "canary 3 must be fewer than the 3 replicas" in p for p in found)
    assert any("b.yaml" in p and "maxUnavailable 0 needs maxSurge" in p for p in found)
    assert any("c.yaml" in p for p in found)
    assert any("d.yaml" in p for p in found)
