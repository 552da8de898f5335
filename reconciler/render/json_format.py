"""The JSON rendering of a plan: ``Plan.to_dict`` as one compact JSON document.

Compact on purpose: ``json`` only uses its C encoder without indentation, and a plan of 10,000
VMs would otherwise spend more time indenting than planning. Pipe it through ``jq`` to read it.

A comparison of two revisions of 10,000 workloads has some 100,000 "up to date" rows, alike but
for the VM's name. Each distinct row is encoded once, and the others are that text with the name
put in: the same bytes as ``json.dumps(plan.to_dict())`` (``tests/test_render.py`` compares
them), for a fifth of the time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from reconciler.model import Plan, VMAction, action_to_dict

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""``json.dumps(value, separators=(",", ":"))``, without building an encoder per call."""
_encode_name = json.encoder.encode_basestring_ascii  # what ``_encode`` does with a str

_NO_NOOPS = ',"noops":[],'
"""Where the no-op rows go in the encoded plan without them: only the plan has a ``noops`` key,
and a quote inside a string is escaped, so no value can spell this."""


def render_json(plan: Plan) -> str:
    if not plan.noops:
        return _encode(plan.to_dict()) + "\n"
    text = _encode(replace(plan, noops=()).to_dict())
    before, found, after = text.partition(_NO_NOOPS)
    if not found:  # cannot happen with ``Plan.to_dict``'s keys; never guess
        return _encode(plan.to_dict()) + "\n"
    return f'{before},"noops":[{",".join(_noop_rows(plan.noops))}],{after}\n'


def _noop_rows(noops: Sequence[VMAction]) -> list[str]:
    """The encoded rows of ``noops``, as ``_encode(action_to_dict(action))`` spells each."""
    around: dict[tuple[object, ...], tuple[str, str]] = {}
    rows = []
    for action in noops:
        if action.changes or action.stands_in_for:
            rows.append(_encode(action_to_dict(action)))
            continue
        alike = (
            action.action,
            action.workload,
            action.disruption,
            action.reason,
            action.artifact_before,
            action.artifact_after,
            action.wave,
        )
        parts = around.get(alike)
        if parts is None:
            # "vm" is the row's second key; an empty name marks where each name goes.
            row = _encode(action_to_dict(replace(action, vm="")))
            start, found, end = row.partition(',"vm":"",')
            if not found:
                rows.append(_encode(action_to_dict(action)))
                continue
            parts = around[alike] = (start + ',"vm":', "," + end)
        rows.append(parts[0] + _encode_name(action.vm) + parts[1])
    return rows
