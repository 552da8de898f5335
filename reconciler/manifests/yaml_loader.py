"""Safe YAML parsing of manifest files.

PyYAML's C parser with the safe constructor, plus what real fleets need from a loader that reads
untrusted commits:

* duplicate mapping keys and non-string keys are errors (PyYAML silently keeps the last);
* alias expansion is counted, and a document that would expand past the node cap is refused
  before anything walks it (the "billion laughs" bomb);
* unknown tags are errors (the safe constructor refuses them).

Line numbers are not tracked on the fast path: ``line_of`` re-composes a file only when a
problem has to be reported, so valid fleets pay nothing for them.

Constructing Python objects from the composed nodes is most of a parse, and manifests are
mostly plain mappings, lists and strings. Those are built by ``_build`` without PyYAML's
generic machinery (state generators, per-node bookkeeping), and the tag of a plain scalar is
resolved once per distinct value rather than by regular expressions every time. Anything else
(a merge key, a non-string key, a tag of its own) is handed to PyYAML's constructor for that
node, and a document with aliases is constructed by PyYAML whole: the result is the same
objects PyYAML gives, about twice as fast (``tests/test_yaml_loader.py`` compares them).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # C speed where built


class YAMLProblem(Exception):
    """A file cannot be parsed; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"


_RESOLVED_MAX = 20_000
"""Distinct (value, implicit) pairs whose tag is remembered: bounded, since values come from
untrusted files; past it the memo starts again."""
_RESOLVED_VALUE_MAX = 64  # longer scalars are rarely repeated: not worth remembering
_resolved: dict[tuple[str, tuple[bool, bool]], str] = {}


class _StrictLoader(_Loader):  # type: ignore[misc]  # base is chosen at import time
    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        # The tag of a scalar depends only on its text and on whether it was plain or quoted
        # (this loader has no path resolvers): the same keys and values recur in every
        # document of a fleet, and PyYAML matches each against its regular expressions.
        if kind is yaml.MappingNode:
            return _MAP
        if kind is yaml.SequenceNode:
            return _SEQ
        if len(value) > _RESOLVED_VALUE_MAX:
            return str(super().resolve(kind, value, implicit))
        key = (value, implicit)
        tag = _resolved.get(key)
        if tag is None:
            if len(_resolved) >= _RESOLVED_MAX:
                _resolved.clear()
            tag = _resolved[key] = str(super().resolve(kind, value, implicit))
        return tag


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise YAMLProblem(
                f"mapping keys must be strings, not {type(key).__name__} {key!r}",
                key_node.start_mark.line + 1,
            )
        if key in mapping:
            raise YAMLProblem(f"duplicate key {key!r}", key_node.start_mark.line + 1)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _build(loader: _StrictLoader, node: yaml.Node) -> Any:
    """The object PyYAML's constructor would make of ``node`` (a document without aliases):
    plain mappings, sequences and strings here, every other node by the constructor."""
    kind = type(node)
    if kind is yaml.ScalarNode and node.tag == _STR:
        return node.value
    if kind is yaml.MappingNode and node.tag == _MAP:
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if type(key_node) is not yaml.ScalarNode or key_node.tag != _STR:
                # A merge key or a key that is not a string: the strict constructor decides
                # (it merges, or says what is wrong and where).
                return loader.construct_object(node, deep=True)
            key = key_node.value
            if key in mapping:
                raise YAMLProblem(f"duplicate key {key!r}", key_node.start_mark.line + 1)
            mapping[key] = _build(loader, value_node)
        return mapping
    if kind is yaml.SequenceNode and node.tag == _SEQ:
        return [_build(loader, child) for child in node.value]
    return loader.construct_object(node, deep=True)


def _expanded_size(node: yaml.Node, cap: int) -> int:
    """Nodes in ``node`` with aliases expanded, computed without expanding (memoised per node)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        known = sizes.get(id(n))
        if known is not None:
            return known
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        sizes[id(n)] = min(total, cap + 1)
        return sizes[id(n)]

    return size(node)


@dataclass(frozen=True)
class ParsedDocument:
    index: int  # position in the file, 0-based, counting empty documents
    line: int  # 1-based line where the document starts
    content: Any


def parse_documents(text: str, *, max_nodes: int) -> list[ParsedDocument]:
    """Every non-empty document of ``text``. Raises ``YAMLProblem`` on the first error."""
    may_alias = "*" in text
    loader = _StrictLoader(text)
    documents: list[ParsedDocument] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                index += 1
                continue
            if may_alias and _expanded_size(node, max_nodes) > max_nodes:
                raise YAMLProblem(
                    f"document expands to more than {max_nodes} nodes through aliases "
                    "(an alias bomb?); refusing it",
                    node.start_mark.line + 1,
                )
            if may_alias:
                content = loader.construct_document(node)
            else:
                content = _build(loader, node)
                # What the constructor made for this document's other nodes, as
                # ``construct_document`` would forget it.
                loader.constructed_objects = {}
                loader.recursive_objects = {}
            if content is not None:
                documents.append(ParsedDocument(index, node.start_mark.line + 1, content))
            index += 1
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        if exc.context and exc.problem:
            problem = f"{exc.context}: {exc.problem}"
        raise YAMLProblem(f"invalid YAML: {problem}", mark.line + 1 if mark else 0) from exc
    except yaml.YAMLError as exc:
        raise YAMLProblem(f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise YAMLProblem("document is nested too deeply") from exc
    finally:
        loader.dispose()
    return documents


def line_of(text: str, document_index: int, path: Sequence[Hashable]) -> int:
    """1-based line of the node at ``path`` inside document ``document_index`` of ``text``.

    Falls back to the deepest node found (a missing key reports its parent mapping)."""
    loader = yaml.SafeLoader(text)
    try:
        node: yaml.Node | None = None
        for _ in range(document_index + 1):
            if not loader.check_node():
                return 0
            node = loader.get_node()
        if node is None:
            return 0
        line = node.start_mark.line + 1
        for step in path:
            found: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if getattr(key_node, "value", None) == step:
                        found = value_node
                        line = key_node.start_mark.line + 1
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(step, int)
                and 0 <= step < len(node.value)
            ):
                found = node.value[step]
                line = found.start_mark.line + 1
            if found is None:
                break
            node = found
        return line
    except yaml.YAMLError:
        return 0
    finally:
        loader.dispose()
