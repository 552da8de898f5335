"""The JSON rendering of a plan: ``Plan.to_dict`` with stable key order and indentation."""

from __future__ import annotations

import json

from reconciler.model import Plan


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2) + "\n"
