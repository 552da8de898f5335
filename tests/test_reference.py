"""docs/manifests.md is generated from the schemas and must not drift from them."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.manifests.reference import render_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "manifests.md"


def test_committed_reference_matches_the_schemas() -> None:
    rendered = render_reference()
    if os.environ.get("UPDATE_GOLDEN"):
        DOC.write_text(rendered)
    assert DOC.read_text() == rendered, "run UPDATE_GOLDEN=1 pytest tests/test_reference.py"


def test_every_schema_field_has_a_description() -> None:
    rows = [r for r in render_reference().splitlines() if r.startswith("| `")]
    assert len(rows) > 40
    assert all(not r.rstrip().endswith("|  |") for r in rows), [
        r for r in rows if r.rstrip().endswith("|  |")
    ]
