"""The manifest reference (docs/manifests.md), generated from the JSON Schemas so that the
documentation cannot drift from what the loader enforces. ``tests/test_reference.py`` checks
that the committed file is what this module renders."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from reconciler.manifests.schema import load_schemas


def _resolve(
    node: Mapping[str, Any], schemas: Mapping[str, Any], home: str
) -> tuple[Mapping[str, Any], str]:
    ref = node.get("$ref")
    if not ref:
        return node, home
    file, _, pointer = ref.partition("#")
    target_home = (
        home
        if not file
        else {"fleet.schema.json": "Fleet", "workload.schema.json": "Workload"}[file]
    )
    target: Any = schemas[target_home]
    for part in pointer.strip("/").split("/"):
        if part:
            target = target[part]
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return merged, target_home


def _type(node: Mapping[str, Any]) -> str:
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "")
    if isinstance(kind, list):
        return " \\| ".join(str(k) for k in kind)
    if kind == "array":
        items = node.get("items", {})
        inner = _type(items) if "enum" in items or "type" in items else "object"
        return f"list of {inner}"
    if kind == "object" and "additionalProperties" in node and not node.get("properties"):
        extra = node["additionalProperties"]
        return f"map of {extra.get('type', 'any')}" if isinstance(extra, dict) else "map"
    return str(kind)


def _limits(node: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
    ):
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "default" in node:
        parts.append(f"default `{json.dumps(node['default'])}`")
    return ", ".join(parts)


def _rows(
    node: Mapping[str, Any], prefix: str, schemas: Mapping[str, Any], home: str, required: set[str]
) -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        resolved, child_home = _resolve(child, schemas, home)
        path = f"{prefix}.{name}" if prefix else name
        flag = "yes" if name in required else ""
        description = " ".join(str(resolved.get("description", "")).split())
        limits = _limits(resolved)
        if limits:
            description += f" ({limits})"
        yield f"| `{path}` | {_type(resolved)} | {flag} | {description} |"
        if resolved.get("properties"):
            yield from _rows(resolved, path, schemas, child_home, set(resolved.get("required", [])))
        items = resolved.get("items")
        if isinstance(items, dict) and items.get("properties"):
            yield from _rows(
                items, f"{path}[]", schemas, child_home, set(items.get("required", []))
            )


def render_reference() -> str:
    schemas = load_schemas()
    out = [
        "# Manifest reference",
        "",
        "Generated from `schemas/*.schema.json` by `reconciler.manifests.reference`; do not",
        "edit by hand. Every document has `apiVersion: reconciler/v1alpha1`, a `kind`, `metadata`",
        "and `spec`; several documents may share a file (`---`). Editors can validate with a",
        "modeline such as `# yaml-language-server: $schema=../schemas/workload.schema.json`.",
        "",
    ]
    for kind in ("Fleet", "Workload"):
        schema = schemas[kind]
        out += [
            f"## {kind}",
            "",
            " ".join(schema["description"].split()),
            "",
            "| field | type | required | description |",
            "|---|---|---|---|",
        ]
        out += _rows(schema, "", schemas, kind, set(schema.get("required", [])))
        out.append("")
    return "\n".join(out)
