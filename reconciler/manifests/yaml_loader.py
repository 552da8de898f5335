"""Safe YAML parsing of manifest files: ``parse_documents`` turns a file's text into its
documents for the manifest loader (``loader.py``), which validates and compiles them.

PyYAML's C parser with the safe constructor, plus what real fleets need from a loader that reads
untrusted commits:

* duplicate mapping keys and non-string keys are errors (PyYAML silently keeps the last);
* alias expansion is counted, and a document that would expand past the node cap is refused
  before anything walks it (the "billion laughs" bomb);
* unknown tags are errors (the safe constructor refuses them).

Line numbers are not tracked on the fast path: ``line_of`` re-composes a file only when a
problem has to be reported, so valid fleets pay nothing for them.

Most manifests are plain block YAML, and for those ``_parse_plain`` reads the text line by line
(one regular expression per distinct line, remembered, and a stack of the open mappings and
sequences), several times faster than PyYAML's C composer alone. It is conservative: for any
text outside this subset it answers None and the PyYAML path below runs, unchanged.

* No character PyYAML's reader refuses, and no tab, CR, NEL, line or paragraph separator or
  byte-order mark: lines are exactly what the newlines separate, and the space the only blank.
* ``---`` alone on a line separates documents; the part before the first one is a document
  only when it has content, and empty documents are counted, as PyYAML counts them.
  ``...``, directives and content after ``---`` are outside.
* Every other line is blank, a comment, or ``key:``, ``key: value``, ``-``, ``- value``,
  ``- key:``, ``- key: value``, then optionally `` # comment``. Keys are plain words that
  resolve to strings (``yes:``, ``1:``, ``~:`` are outside). Values are single-line: plain
  scalars starting with a letter, a digit, one of ``_./~(+$=^`` or ``-`` before a digit or
  dot, with no ``: ``, `` #``, brackets, braces, quotes, backquote or ``&*!|>%@`` and no
  final ``:``; ``'...'`` with no quote inside; ``"..."`` with no backslash or quote inside;
  ``[]``, ``{}`` and one-line flow sequences of such scalars (no ``:`` or ``#`` in their
  plain items). So no anchor, alias, tag, block scalar, multi-line scalar, flow mapping with
  content, complex or merge key can be in it.
* The structure is what PyYAML's scanner makes of indentation: the value of ``key:`` or ``-``
  is the block on the following lines indented deeper, or a sequence at the key's own column,
  or null; siblings share a column. A deeper line after a scalar (a continuation, or an
  error), a line between two open columns, a sequence entry where a key is due (or the
  reverse) and a duplicate key are outside: PyYAML's path reads them or says what is wrong.
* A plain scalar's type is PyYAML's resolver's and its value PyYAML's safe constructor's (str,
  int, float, bool, null, timestamp; a scalar of any other tag puts the text outside).

``tests/test_yaml_loader.py`` checks that generated texts in the subset take this path and read
exactly as PyYAML reads them, and that mutations of them read or fail as the PyYAML path does.

Constructing Python objects from the composed nodes is most of the PyYAML path, and manifests
are mostly plain mappings, lists and strings. Those are built by ``_build`` without PyYAML's
generic machinery (state generators, per-node bookkeeping), and the tag of a plain scalar is
resolved once per distinct value rather than by regular expressions every time. Anything else
(a merge key, a non-string key, a tag of its own) is handed to PyYAML's constructor for that
node, and a document with aliases is constructed by PyYAML whole: the result is the same
objects PyYAML gives, about twice as fast (``tests/test_yaml_loader.py`` compares them).
"""

from __future__ import annotations

import re
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


# The fast path: plain block YAML, read line by line (the subset: see the module docstring).

_FAST_REFUSED = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)
"""What PyYAML's reader refuses (``Reader.NON_PRINTABLE``), plus the characters that are blanks
or line breaks to it besides ' ' and '\\n' (tab, CR, NEL, LS, PS) and the byte-order mark."""

_PLAIN_CHAR = r"[^\x00-\x20'\"\[\]{}&*!|>%@`:#\x7f]"
_PLAIN_INNER = rf"(?:{_PLAIN_CHAR}|\#|:(?={_PLAIN_CHAR}|[#:]))"
_PLAIN_START = r"(?:[A-Za-z0-9_./~(+$=^]|-(?=[0-9.]))"
_FLOW_PLAIN = (
    r"(?:[A-Za-z0-9_./~(+$=^]|-(?=[0-9.]))[A-Za-z0-9_./~()+$=^-]*(?:\ +[A-Za-z0-9_./~()+$=^-]+)*"
)
_FLOW_ITEM = rf"(?:'[^']*'|\"[^\"\\]*\"|{_FLOW_PLAIN})"
_LINE = re.compile(
    rf"""
    (?P<sep>---\ *$)
    |
    (?P<indent>\ *)
    (?P<dash>-(?:\ +|$))?
    (?:(?P<key>[A-Za-z0-9_][A-Za-z0-9_./-]{{0,200}}):(?:\ +|$))?
    (?:
        (?P<plain>{_PLAIN_START}{_PLAIN_INNER}*(?:\ +{_PLAIN_CHAR}{_PLAIN_INNER}*)*)
      | '(?P<single>[^']*)'
      | "(?P<double>[^"\\]*)"
      | (?P<flow>\[\ *(?:{_FLOW_ITEM}(?:\ *,\ *{_FLOW_ITEM})*)?\ *\])
      | (?P<empty_map>\{{\ *\}})
    )?
    \ *(?:(?<![^\ ])\#.*)?$
    """,
    re.VERBOSE,
)
"""One line of the subset; a line it does not match refuses the text."""
_FLOW_ITEMS = re.compile(r"'([^']*)'|\"([^\"\\]*)\"|([^ ,'\"\[\]]+(?: +[^ ,'\"\[\]]+)*)")

# How a line ends (the value kind of a ``_Line``).
_NO_VALUE = 0  # ``key:`` or ``-``: a block follows, or null
_SCALAR = 1
_FLOW_SEQ = 2  # value: the items, as a tuple (a new list each time it is used)
_EMPTY_MAP = 3
_BLANK = 4  # blank or comment only
_SEPARATOR = 5  # ``---``

_Line = tuple[int, int, str | None, int, Any]
"""(indent, width of ``- `` or 0, key or None, value kind, value), as ``_read_line`` makes it."""
_BLANK_LINE: _Line = (0, 0, None, _BLANK, None)
_SEPARATOR_LINE: _Line = (0, 0, None, _SEPARATOR, None)

_LINES_MAX = 20_000
_LINE_MAX_CHARS = 160  # longer lines are rarely repeated: not worth remembering
_lines: dict[str, _Line] = {}
"""Distinct lines read in the subset. Fleets repeat most lines in every document;
bounded, since lines come from untrusted files (past the bound the memo starts again)."""
_plain_values: dict[str, Any] = {}
"""Distinct plain scalars constructed (``_REFUSE``: a tag this path does not construct)."""

_REFUSE: Any = object()
_RESOLVER: Any = yaml.resolver.Resolver()
_CONSTRUCTOR: Any = yaml.constructor.SafeConstructor()
_CONSTRUCTED_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("int", "float", "bool", "null", "timestamp")
)
_MAX_DEPTH = 100  # deeper nesting is left to PyYAML's path, which says it is too deep


def _plain_value(text: str) -> Any:
    """What PyYAML's safe loader makes of the plain scalar ``text``, or ``_REFUSE``."""
    value = _plain_values.get(text, _REFUSE)
    if value is not _REFUSE or text in _plain_values:
        return value
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    if tag == _STR:
        value = text
    elif tag in _CONSTRUCTED_TAGS:
        try:
            value = _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, yaml.ScalarNode(tag, text))
        except Exception:  # whatever it is, PyYAML's path raises it
            value = _REFUSE
    if len(text) <= _RESOLVED_VALUE_MAX:
        if len(_plain_values) >= _RESOLVED_MAX:
            _plain_values.clear()
        _plain_values[text] = value
    return value


def _read_line(line: str) -> _Line | None:
    """``line`` as the fast path's stack machine takes it, or None when outside the subset."""
    match = _LINE.match(line)
    if match is None:
        return None
    separator, indent, dash, key, plain, single, double, flow, empty_map = match.groups()
    if separator is not None:
        return _SEPARATOR_LINE
    kind, value = _NO_VALUE, None
    if plain is not None:
        kind, value = _SCALAR, _plain_value(plain)
        if value is _REFUSE:
            return None
    elif single is not None:
        kind, value = _SCALAR, single
    elif double is not None:
        kind, value = _SCALAR, double
    elif flow is not None:
        items = []
        for quoted, double_quoted, plain_item in _FLOW_ITEMS.findall(flow[1:-1]):
            # A plain item is never empty; an empty one is quoted ('' or "").
            item = _plain_value(plain_item) if plain_item else quoted or double_quoted
            if item is _REFUSE:
                return None
            items.append(item)
        kind, value = _FLOW_SEQ, tuple(items)
    elif empty_map is not None:
        kind = _EMPTY_MAP
    if dash is None and key is None:
        # A scalar or flow node alone on its line: a document's root or a continuation line.
        return _BLANK_LINE if kind == _NO_VALUE else None
    if key is not None and type(_plain_value(key)) is not str:
        return None  # ``yes:``, ``1:``, ``null:``: not a string (or a tag refused)
    return (len(indent), len(dash) if dash else 0, key, kind, value)


def _parse_plain(text: str) -> list[ParsedDocument] | None:
    """The documents of ``text`` if it is all in the fast path's subset, else None."""
    if _FAST_REFUSED.search(text) is not None:
        return None
    lines = _lines
    documents: list[ParsedDocument] = []
    index = 0
    in_document = False  # a ``---`` opened one, or content outside any did
    root: Any = None
    root_line = 0
    # Open blocks, innermost last: (column, the dict or list, is a dict, is a sequence at its
    # key's own column). Columns only grow inwards (equal for such a sequence).
    stack: list[tuple[int, Any, bool, bool]] = []
    # The slot (container, key or position, column of its key or ``-``, is a mapping key)
    # whose value is the block on the next lines, if any.
    pending: tuple[Any, Any, int, bool] | None = None
    for number, raw in enumerate(text.split("\n"), 1):
        line = lines.get(raw)
        if line is None:
            line = _read_line(raw)
            if line is None:
                return None
            if len(raw) <= _LINE_MAX_CHARS:
                if len(lines) >= _LINES_MAX:
                    lines.clear()
                lines[raw] = line
        indent, dash, key, kind, value = line
        if kind == _BLANK:
            continue
        if kind == _SEPARATOR:
            if in_document:
                if root is not None:
                    documents.append(ParsedDocument(index, root_line, root))
                index += 1
            in_document, root, stack, pending = True, None, [], None
            continue
        in_document = True
        if pending is not None:
            container, slot, column, after_key = pending
            pending = None
            if indent > column or (indent == column and dash and after_key):
                block: Any = [] if dash else {}
                container[slot] = block
                if len(stack) >= _MAX_DEPTH:
                    return None
                stack.append((indent, block, not dash, indent == column))
        while stack and stack[-1][0] > indent:
            stack.pop()
        if not stack:
            if root is not None:
                return None  # dedented past the document's root
            root = [] if dash else {}
            root_line = number
            stack.append((indent, root, not dash, False))
        top_column, top, top_is_map, top_at_key_column = stack[-1]
        if top_at_key_column and not dash:
            # A key at the column of a sequence that sits at its own key's column: the
            # sequence is over, the mapping goes on.
            stack.pop()
            top_column, top, top_is_map, top_at_key_column = stack[-1]
        if top_column != indent:
            return None
        if dash:
            if top_is_map:
                return None
            if key is None:
                if kind == _NO_VALUE:
                    pending = (top, len(top), indent, False)
                    top.append(None)
                else:
                    top.append(
                        value if kind == _SCALAR else list(value) if kind == _FLOW_SEQ else {}
                    )
                continue
            # ``- key: ...``: a mapping whose keys sit at the column after the ``- ``.
            block = {}
            top.append(block)
            indent += dash
            if len(stack) >= _MAX_DEPTH:
                return None
            stack.append((indent, block, True, False))
            top = block
        elif not top_is_map:
            return None
        if key in top:
            return None  # a duplicate key: PyYAML's path says where
        if kind == _NO_VALUE:
            top[key] = None
            pending = (top, key, indent, True)
        else:
            top[key] = value if kind == _SCALAR else list(value) if kind == _FLOW_SEQ else {}
    if in_document and root is not None:
        documents.append(ParsedDocument(index, root_line, root))
    return documents


def parse_documents(text: str, *, max_nodes: int) -> list[ParsedDocument]:
    """Every non-empty document of ``text``. Raises ``YAMLProblem`` on the first error."""
    documents = _parse_plain(text)
    if documents is not None:
        return documents
    return _parse_with_pyyaml(text, max_nodes=max_nodes)


def _parse_with_pyyaml(text: str, *, max_nodes: int) -> list[ParsedDocument]:
    """``parse_documents`` for any text: PyYAML's C composer, ``_build`` and the constructor."""
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
