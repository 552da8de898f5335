"""JSON Schema validation of manifest documents against ``schemas/`` (draft 2020-12).

The schemas are the single source of truth for the manifest shape: editors use them, this
module validates with them, ``reference.py`` documents them. One validator per kind is built
once per process.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.errors import ConfigError

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

# The validators are imported where they are built: a revision whose documents were all
# validated before (``compile_cache``) loads neither, and ``jsonschema`` (the slow import, the
# one that explains) only when a document is invalid.

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
KIND_FILES = {"Fleet": "fleet.schema.json", "Workload": "workload.schema.json"}


@dataclass(frozen=True)
class SchemaProblem:
    path: tuple[Hashable, ...]
    message: str

    @property
    def json_path(self) -> str:
        return json_path(self.path)


def json_path(path: tuple[Hashable, ...]) -> str:
    out = "$"
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}"
    return out


@cache
def load_schemas() -> dict[str, dict[str, Any]]:
    """The schema of each kind, keyed by kind."""
    schemas = {}
    for kind, name in KIND_FILES.items():
        path = SCHEMA_DIR / name
        try:
            schemas[kind] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the manifest schema {path}: {exc}; reinstall reconciler"
            ) from exc
    return schemas


@cache
def _validators() -> dict[str, Draft202012Validator]:
    from jsonschema import Draft202012Validator  # noqa: PLC0415 (see the imports)
    from referencing import Registry, Resource  # noqa: PLC0415

    schemas = load_schemas()
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    return {
        kind: Draft202012Validator(schema, registry=registry) for kind, schema in schemas.items()
    }


@cache
def _fast_validators() -> dict[str, Any]:
    """The same schemas compiled by jsonschema-rs: about 300 times faster at saying "valid",
    which is the answer for almost every document. Its verdict is trusted only when it says
    valid; the messages of an invalid document come from ``jsonschema``."""
    import jsonschema_rs  # noqa: PLC0415 (see the imports)

    schemas = load_schemas()
    registry = jsonschema_rs.Registry([(s["$id"], s) for s in schemas.values()])
    return {
        kind: jsonschema_rs.validator_for(schema, registry=registry)
        for kind, schema in schemas.items()
    }


def validate(kind: str, document: Mapping[str, Any]) -> list[SchemaProblem]:
    if _fast_validators()[kind].is_valid(document):
        return []
    validator = _validators()[kind]
    return sorted(
        (_problem(error) for error in validator.iter_errors(document)),
        key=lambda p: (str(p.path), p.message),
    )


def _problem(error: ValidationError) -> SchemaProblem:
    leaf = error
    # "oneOf/anyOf/allOf failed": the deepest, most specific cause reads best.
    while leaf.context:
        leaf = min(leaf.context, key=lambda e: (-len(e.absolute_path), str(e.message)))
    message = leaf.message
    if leaf.validator == "type":
        expected = leaf.validator_value
        expected_text = " or ".join(expected) if isinstance(expected, list) else str(expected)
        message = f"expected {expected_text}, got {_type_name(leaf.instance)} {leaf.instance!r}"
    elif leaf.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown field")
        message += _did_you_mean(leaf.instance, leaf.schema)
    elif leaf.validator == "pattern" and isinstance(leaf.instance, str):
        # A schema may say in words what its pattern means ("x-message"), for fields whose
        # regular expression is a poor explanation (a bridge name, a network).
        hint = leaf.schema.get("x-message") if isinstance(leaf.schema, Mapping) else None
        message = (
            f"{leaf.instance!r}: {hint}"
            if hint
            else f"{leaf.instance!r} does not match {leaf.validator_value!r}"
        )
    return SchemaProblem(tuple(leaf.absolute_path), message)


def _did_you_mean(instance: Any, schema: Any) -> str:
    """The hint for an unknown field close to a known one (``; did you mean 'preventDestroy'
    (found 'preventDestory')?``): a typo in a key must say which key was meant."""
    if not isinstance(instance, Mapping) or not isinstance(schema, Mapping):
        return ""
    known = list(schema.get("properties", {}))
    hints = []
    for key in instance:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if close:
            hints.append(f"{close[0]!r} (found {key!r})")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
