"""The JSON rendering of a plan: ``Plan.to_dict`` as one compact JSON document.

Compact on purpose: ``json`` only uses its C encoder without indentation, and a plan of 10,000
VMs would otherwise spend more time indenting than planning. Pipe it through ``jq`` to read it.

A comparison of two revisions of 10,000 workloads has some 100,000 "up to date" rows, alike but
for the VM's and the workload's names. Each distinct row is encoded once, and the others are that
text with the names put in; a run of them (``noop_rows``) is one list comprehension.
The same bytes as ``json.dumps(plan.to_dict())`` (``tests/test_render.py`` compares them), for
a twentieth of the time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from reconciler.model import Plan, VMAction, action_to_dict
from reconciler.noop_rows import NoopRun, all_rows

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
    rows: list[str] = []
    for part in all_rows(noops):
        if isinstance(part, NoopRun):
            if not part.ordinals:
                continue
            # A run's rows differ only in the VM's name, "<workload>-<ordinal>": its JSON
            # string is the workload's without the closing quote, "-", the digits and '"'.
            start, end = _around_names(part.template(), around)
            workload = _encode_name(part.workload)
            start += workload[:-1] + "-"
            end = f'","workload":{workload},{end}'
            rows.extend([f"{start}{ordinal}{end}" for ordinal in part.ordinals])
            continue
        action = part
        if action.changes or action.stands_in_for:
            rows.append(_encode(action_to_dict(action)))
            continue
        start, end = _around_names(action, around)
        vm, workload = _encode_name(action.vm), _encode_name(action.workload)
        rows.append(f'{start}{vm},"workload":{workload},{end}')
    return rows


_NAMES = ',"vm":"","workload":"",'
"""Where the VM's and the workload's names go in a row encoded with both empty: "vm" and
"workload" are the second and third keys of ``action_to_dict``, after "action"."""


def _around_names(
    action: VMAction, around: dict[tuple[object, ...], tuple[str, str]]
) -> tuple[str, str]:
    """The encoded row of ``action``: what comes before its VM's name and after its workload's
    name, encoded once for each distinct row (remembered in ``around``)."""
    alike = (
        action.action,
        action.disruption,
        action.reason,
        action.artifact_before,
        action.artifact_after,
        action.wave,
    )
    parts = around.get(alike)
    if parts is None:
        row = _encode(action_to_dict(replace(action, vm="", workload="")))
        start, found, end = row.partition(_NAMES)
        if not found:  # cannot happen with ``action_to_dict``'s keys
            raise AssertionError(f"no VM and workload names in the encoded row {row}")
        parts = around[alike] = (start + ',"vm":', end)
    return parts
