"""Golden tests of the plan renderers: the same plan as text, JSON and Markdown."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import fleet, running, workload

from reconciler.model import ActionType, Change
from reconciler.noop_rows import NoopRows, NoopRun
from reconciler.planning import diff
from reconciler.render import RENDERERS

GOLDEN = Path(__file__).parent / "golden"


def _sample_plan():  # type: ignore[no-untyped-def]
    before = fleet(
        workload("web", replicas=2, env={"GREETING": "hello"}, depends_on=["db"]),
        workload("db"),
        workload("old"),
        revision="a" * 40,
    )
    after = fleet(
        workload("web", replicas=3, env={"GREETING": "hi | there"}, depends_on=["db"]),
        workload("db", source="v2"),
        revision="b" * 40,
    )
    return diff(after, running(before), base=before)


@pytest.mark.parametrize(("fmt", "suffix"), [("text", "txt"), ("markdown", "md"), ("json", "json")])
def test_rendering_matches_golden_file(fmt: str, suffix: str) -> None:
    rendered = RENDERERS[fmt](_sample_plan())
    golden = GOLDEN / f"plan.{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run UPDATE_GOLDEN=1 pytest {__file__} to refresh"


def test_json_has_the_documented_shape() -> None:
    data = json.loads(RENDERERS["json"](_sample_plan()))
    assert data["base"] == "a" * 40
    assert data["head"] == "b" * 40
    assert data["summary"] == {"create": 1, "update": 0, "restart": 2, "replace": 1, "delete": 1}
    first = data["actions"][0]
    assert {"action", "vm", "workload", "disruption", "reason"} <= first.keys()
    assert all(a["action"] != "no-op" for a in data["actions"])


def test_text_reads_like_terraform() -> None:
    text = RENDERERS["text"](_sample_plan())
    assert "-/+ vm 'db-0'" in text
    assert "  + vm 'web-2'" in text
    assert "  - vm 'old-0'" in text
    assert text.rstrip().endswith(
        "Plan: 1 to create, 0 to update in place, 2 to restart, 1 to replace, 1 to delete."
    )


def test_markdown_escapes_pipes_in_cells() -> None:
    plan = _sample_plan()
    odd = replace(plan.actions[0], reason="a | b")
    md = RENDERERS["markdown"](replace(plan, actions=(odd, *plan.actions[1:])))
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert rows
    # Every row of the actions table has exactly the header's 8 cell borders.
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 8 for row in rows), rows
    assert "a \\| b" in md


def test_json_of_many_alike_noops_is_the_plain_encoding() -> None:
    """``render_json`` encodes each distinct no-op row once and fills in the VM names: the
    bytes must be those of encoding the plan's dict, whatever the names and reasons hold."""
    plan = _sample_plan()
    model = replace(plan.actions[0], changes=(), stands_in_for=None)
    odd_names = ["web-0", 'q"uote-1', "é-ü-2", "back\\slash-3", "tab\there-4", "\u2028-5"]
    noops = [
        replace(model, vm=name, workload=workload, reason=reason, action=ActionType.NOOP)
        for workload in ("web", 'we"b', "ü")
        for reason in ("up to date", 'a ,"noops":[], reason', "workload is suspended")
        for name in odd_names
    ]
    noops.insert(3, replace(noops[0], vm="changed-0", changes=(Change("k", "1", "2"),)))
    noops.insert(5, replace(noops[0], vm="surge-0", stands_in_for="web-0"))
    tricky = replace(plan.actions[0], reason=',"noops":[],', vm=',"vm":"",')
    plan = replace(plan, noops=tuple(noops), actions=(tricky, *plan.actions[1:]))
    assert RENDERERS["json"](plan) == json.dumps(plan.to_dict(), separators=(",", ":")) + "\n"
    assert RENDERERS["json"](replace(plan, noops=())) == (
        json.dumps(replace(plan, noops=()).to_dict(), separators=(",", ":")) + "\n"
    )


def test_json_of_noop_runs_is_the_plain_encoding() -> None:
    """Runs of no-op rows (what ``diff`` makes for unchanged workloads) are written from one
    encoded row: the same bytes as encoding every action, whatever the workload's name holds,
    with empty runs and single rows between them."""
    plan = _sample_plan()
    single = replace(plan.actions[0], changes=(), stands_in_for=None, action=ActionType.NOOP)
    parts = [
        NoopRun("web", "up to date", range(3)),
        NoopRun('we"b', 'a ,"noops":[], reason', range(2, 12)),
        single,
        NoopRun("ü-\\x", "workload is suspended", range(0)),
        NoopRun("\u2028", "up to date", range(1)),
        replace(single, vm="changed-0", changes=(Change("k", "1", "2"),)),
        NoopRun("web", "up to date", range(5, 7)),
    ]
    plan = replace(plan, noops=NoopRows(parts))
    spelled = replace(plan, noops=tuple(plan.noops))
    assert len(plan.noops) == 3 + 10 + 1 + 0 + 1 + 1 + 2
    assert RENDERERS["json"](plan) == json.dumps(spelled.to_dict(), separators=(",", ":")) + "\n"
    for fmt in ("text", "markdown"):
        assert RENDERERS[fmt](plan) == RENDERERS[fmt](spelled)
