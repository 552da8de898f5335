"""Golden tests of the pure planner: desired + observed -> plan, for every action type."""

from __future__ import annotations

import pytest
from support.fakes import fleet, running, with_vm, workload

from reconciler.errors import PlanError
from reconciler.model import (
    ActionType,
    Disruption,
    HealthCheck,
    Plan,
    RolloutPolicy,
    RuntimeKind,
    Target,
    VMState,
)
from reconciler.planning import diff, observed_from_desired

WEB = workload("web", replicas=2, env={"GREETING": "hello"})
DB = workload("db", replicas=1)


def actions(plan: Plan) -> list[tuple[str, str, str]]:
    return [(a.action.value, a.vm, a.disruption.label) for a in plan.actions]


def test_nothing_runs_everything_is_created_dependencies_first() -> None:
    web = workload("web", replicas=2, depends_on=["db"])
    desired = fleet(web, DB)
    plan = diff(desired, observed_from_desired(fleet(), version=0))
    assert actions(plan) == [
        ("create", "db-0", "none"),
        ("create", "web-0", "none"),
        ("create", "web-1", "none"),
    ]
    assert [a.wave for a in plan.actions] == [1, 2, 2]
    assert plan.summary() == {"create": 3, "update": 0, "restart": 0, "replace": 0, "delete": 0}
    # Every artifact that a new VM runs is named as a build.
    assert {(b.workload, b.target) for b in plan.builds} == {
        ("db", Target.MICROVM),
        ("web", Target.MICROVM),
    }


def test_same_fleet_has_no_changes_and_says_why() -> None:
    desired = fleet(WEB)
    plan = diff(desired, running(desired))
    assert not plan.has_changes
    assert [(a.vm, a.reason) for a in plan.noops] == [
        ("web-0", "up to date"),
        ("web-1", "up to date"),
    ]
    assert plan.builds == ()


def test_label_and_health_changes_are_in_place() -> None:
    before = fleet(WEB)
    after = fleet(
        workload(
            "web",
            replicas=2,
            env={"GREETING": "hello"},
            labels={"tier": "front"},
            health=HealthCheck(kind="tcp", port=8080),
        )
    )
    plan = diff(after, running(before))
    assert actions(plan) == [("update", "web-0", "in-place"), ("update", "web-1", "in-place")]
    assert "metadata.labels.tier" in plan.actions[0].reason
    assert {c.key for c in plan.actions[0].changes} == {"deploy.health", "metadata.labels.tier"}


def test_env_change_restarts_in_batches_of_max_unavailable() -> None:
    before = fleet(workload("web", replicas=3, env={"GREETING": "hello"}))
    after = fleet(
        workload("web", replicas=3, env={"GREETING": "hi"}),
        rollout=RolloutPolicy(max_unavailable=2),
    )
    plan = diff(after, running(before))
    assert actions(plan) == [
        ("restart", "web-0", "restart"),
        ("restart", "web-1", "restart"),
        ("restart", "web-2", "restart"),
    ]
    assert [a.wave for a in plan.actions] == [1, 1, 2]
    change = plan.actions[0].changes[0]
    assert (change.key, change.before, change.after) == ("deploy.env.GREETING", '"hello"', '"hi"')


def test_source_change_replaces_and_names_the_changed_input() -> None:
    before = fleet(WEB)
    after = fleet(workload("web", replicas=2, env={"GREETING": "hello"}, source="v2"))
    plan = diff(after, running(before), base=before)
    assert actions(plan) == [("replace", "web-0", "replace"), ("replace", "web-1", "replace")]
    assert plan.actions[0].artifact_before != plan.actions[0].artifact_after
    # Comparing two revisions names every target whose inputs moved, with the input.
    assert {(b.target, b.changed_inputs) for b in plan.builds} == {
        (Target.EXECUTABLE, ("source",)),
        (Target.MICROVM, ("source",)),
    }


def test_memory_change_replaces() -> None:
    before = fleet(WEB)
    after = fleet(workload("web", replicas=2, env={"GREETING": "hello"}, memory_mib=512))
    plan = diff(after, running(before))
    assert {a.action for a in plan.actions} == {ActionType.REPLACE}
    assert "deploy.memoryMiB" in plan.actions[0].reason


def test_scale_down_deletes_highest_ordinals() -> None:
    before = fleet(workload("web", replicas=3, env={"GREETING": "hello"}))
    plan = diff(fleet(WEB), running(before))
    assert actions(plan) == [("delete", "web-2", "destroy")]
    assert plan.actions[0].reason == "scaled down to 2 replicas"


def test_removed_workload_is_deleted_after_its_dependents() -> None:
    before = fleet(workload("web", depends_on=["db"]), DB)
    plan = diff(fleet(workload("other")), running(before))
    deletes = [a.vm for a in plan.actions if a.action is ActionType.DELETE]
    assert deletes == ["web-0", "db-0"]
    assert plan.actions[-1].reason == "workload 'db' is no longer in the revision"


def test_prune_disabled_keeps_removed_vms_and_says_so() -> None:
    before = fleet(WEB, DB)
    plan = diff(fleet(WEB, prune=False), running(before))
    assert not plan.has_changes
    assert ("db-0", "workload 'db' is no longer in the revision; prune is disabled") in [
        (a.vm, a.reason) for a in plan.noops
    ]


def test_vms_of_another_fleet_are_never_touched() -> None:
    theirs = fleet(DB, name="theirs")
    plan = diff(fleet(WEB), running(theirs))
    assert [a.action for a in plan.actions] == [ActionType.CREATE, ActionType.CREATE]
    assert [(a.vm, a.reason) for a in plan.noops] == [
        ("db-0", "owned by fleet 'theirs', not 'test'")
    ]


def test_empty_revision_refuses_to_delete_the_fleet() -> None:
    before = fleet(WEB)
    with pytest.raises(PlanError, match="allowEmpty"):
        diff(fleet(), running(before))


def test_empty_revision_deletes_everything_when_allowed() -> None:
    before = fleet(WEB)
    plan = diff(fleet(allow_empty=True), running(before))
    assert actions(plan) == [("delete", "web-0", "destroy"), ("delete", "web-1", "destroy")]


def test_dead_vm_is_recreated_and_stopped_vm_restarted() -> None:
    desired = fleet(WEB)
    observed = with_vm(running(desired), "web-0", state=VMState.MISSING, detail="pid 42 is gone")
    observed = with_vm(observed, "web-1", state=VMState.STOPPED)
    plan = diff(desired, observed)
    assert actions(plan) == [("replace", "web-0", "replace"), ("restart", "web-1", "restart")]
    replace_action = plan.actions[0]
    assert replace_action.reason == "VM is missing: pid 42 is gone; it is recreated"


def test_finished_batch_job_is_left_alone() -> None:
    job = workload("report", restart_policy="never")
    desired = fleet(job)
    observed = with_vm(running(desired), "report-0", state=VMState.STOPPED)
    plan = diff(desired, observed)
    assert not plan.has_changes
    assert plan.noops[0].reason == "batch job ended (stopped); restartPolicy never"


def test_suspended_workload_is_not_touched() -> None:
    before = fleet(WEB)
    after = fleet(workload("web", replicas=3, env={"GREETING": "x"}, suspended=True))
    plan = diff(after, running(before))
    assert not plan.has_changes
    assert {a.reason for a in plan.noops} == {"workload is suspended"}


def test_runtime_change_replaces() -> None:
    before = fleet(WEB)
    after = fleet(
        workload("web", replicas=2, env={"GREETING": "hello"}, runtime=RuntimeKind.FIRECRACKER)
    )
    plan = diff(after, running(before))
    assert {a.disruption for a in plan.actions} == {Disruption.REPLACE}


def test_plan_round_trips_through_json() -> None:
    before = fleet(WEB)
    after = fleet(workload("web", replicas=3, env={"GREETING": "hi"}, source="v2"))
    plan = diff(after, running(before), base=before)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_planner_is_deterministic() -> None:
    before = fleet(WEB, DB)
    after = fleet(workload("web", replicas=3), workload("db", source="v3"))
    assert diff(after, running(before)) == diff(after, running(before))


def test_max_surge_no_longer_warns() -> None:
    # maxSurge is implemented (tests/test_rollout_planning.py has its plans).
    desired = fleet(WEB, rollout=RolloutPolicy(max_unavailable=1, max_surge=1))
    plan = diff(desired, running(desired))
    assert plan.warnings == ()


# -- Deletion guards (planning.guard) -------------------------------------------------------


def test_default_max_deletions_refuses_a_plan_that_drops_most_of_the_fleet() -> None:
    from reconciler.planning import DeletionGuardError, check_deletions

    before = fleet(workload("web", replicas=8), workload("db", replicas=2))
    after = fleet(workload("db", replicas=2))
    observed = running(before)
    plan = diff(after, observed)
    assert plan.summary()["delete"] == 8
    with pytest.raises(DeletionGuardError) as refused:
        check_deletions(plan, after, observed)
    message = str(refused.value)
    assert message.startswith("refusing the plan: the plan deletes 8 VMs (web-0, web-1, web-2")
    assert "over the default maxDeletions (25% of the fleet's 10 VMs, at least 5) of 5" in message
    assert "--force-deletions" in message
    # The refused plan says so in its own warnings, for diff to show.
    assert refused.value.plan.warnings[-1].startswith("this plan is refused: the plan deletes 8")
    assert refused.value.plan.actions == plan.actions
    assert check_deletions(plan, after, observed, force_deletions=True) is plan

    # Five deletions, or a quarter of a big fleet, pass by default.
    small = fleet(workload("db", replicas=2), workload("web", replicas=3))
    assert check_deletions(diff(after, running(small)), after, running(small))
    big = fleet(workload("web", replicas=40), workload("db", replicas=2))
    scaled = fleet(workload("web", replicas=30), workload("db", replicas=2))
    assert check_deletions(diff(scaled, running(big)), scaled, running(big))


@pytest.mark.parametrize(
    ("setting", "refused"), [(0, True), (8, False), ("50%", True), ("80%", False)]
)
def test_max_deletions_setting_as_a_count_or_a_percentage(setting: object, refused: bool) -> None:
    from reconciler.planning import DeletionGuardError, check_deletions

    before = fleet(workload("web", replicas=8), workload("db", replicas=2))
    after = fleet(workload("db", replicas=2), max_deletions=setting)
    observed = running(before)
    plan = diff(after, observed)
    if refused:
        with pytest.raises(DeletionGuardError, match=r"over the Fleet's spec.maxDeletions"):
            check_deletions(plan, after, observed)
    else:
        assert check_deletions(plan, after, observed) is plan


def test_prevent_destroy_survives_the_workload_and_no_flag_overrides_it() -> None:
    from reconciler.planning import DeletionGuardError, check_deletions

    db = workload("db", replicas=2, prevent_destroy=True)
    before = fleet(db, workload("web"))
    observed = running(before)
    assert observed.vms["db-0"].settings["deploy.preventDestroy"] == "true"

    # Scaling down, or dropping the document (the flag lives on in the VMs' settings).
    for after in (fleet(workload("db", replicas=1, prevent_destroy=True)), fleet(workload("web"))):
        plan = diff(after, observed)
        with pytest.raises(DeletionGuardError, match=r"protected by deploy\.preventDestroy") as err:
            check_deletions(plan, after, observed, force_deletions=True)
        assert "first apply a commit that sets preventDestroy: false on 'db'" in str(err.value)

    # Clearing the flag is an in-place update; once applied, the deletion may go.
    cleared = fleet(workload("db", replicas=2), workload("web"))
    update = diff(cleared, observed)
    assert actions(update) == [("update", "db-0", "in-place"), ("update", "db-1", "in-place")]
    assert update.actions[0].changes[0].key == "deploy.preventDestroy"
    observed = running(cleared)
    after = fleet(workload("web"))
    assert check_deletions(diff(after, observed), after, observed).summary()["delete"] == 2


def test_suspended_deletions_do_not_count() -> None:
    from reconciler.planning import check_deletions, suspend_plan

    before = fleet(workload("web", replicas=8), workload("db", replicas=2))
    after = fleet(workload("db", replicas=2), max_deletions=0)
    observed = running(before)
    held = suspend_plan(diff(after, observed), {"web": "migrating"})
    assert check_deletions(held, after, observed) is held
