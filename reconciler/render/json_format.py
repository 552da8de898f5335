"""The JSON rendering of a plan: ``Plan.to_dict`` as one compact JSON document.

Compact on purpose: ``json`` only uses its C encoder without indentation, and a plan of 10,000
VMs would otherwise spend more time indenting than planning. Pipe it through ``jq`` to read it.
"""

from __future__ import annotations

import json

from reconciler.model import Plan


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), separators=(",", ":")) + "\n"
