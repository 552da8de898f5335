"""The manifest YAML loader's fast construction gives exactly what PyYAML's constructor gives.

``yaml_loader.parse_documents`` builds plain mappings, lists and strings itself and remembers
the tag of each scalar it resolved; on generated documents full of scalars that YAML 1.1
reads as something else than a string (``yes``, ``0o17``, ``12:30``, ``.nan``, dates), with
quoted and plain spellings of the same text in one file, every document must equal (type for
type) what PyYAML's safe constructor makes of it. Merge keys, tags, aliases and the errors
keep their behaviour.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.manifests import yaml_loader
from reconciler.manifests.yaml_loader import YAMLProblem, parse_documents

MAX_NODES = 100_000

# Plain scalars that PyYAML's resolver turns into ints, floats, bools, nulls, timestamps,
# and strings that only look like them.
TRICKY = [
    "yes", "No", "on", "OFF", "true", "False", "y", "n",
    "0", "-0", "017", "0o17", "0x1F", "0b101", "1_000", "12:30:00", "190:20:30",
    "1.5", "-1e3", "1e3", "6.8523015e+5", ".inf", "-.Inf", ".NaN", "1.", ".5",
    "~", "null", "Null", "NULL",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10",
    "reconciler/v1alpha1", "Workload", "a b", "http://x/y", "-", "<<x",
]  # fmt: skip


def typed(value: Any) -> Any:
    """``value`` with the type of every node spelt out (``1 == True == 1.0`` otherwise)."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, repr(value))


def reference(text: str) -> list[Any]:
    """What PyYAML's own constructor makes of ``text``, with the loader's strict mappings
    (duplicate and non-string keys refused): what ``parse_documents`` did before it built
    plain nodes itself."""
    loader = yaml_loader._StrictLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                documents.append(loader.construct_document(node))
        return [d for d in documents if d is not None]
    finally:
        loader.dispose()


def ours(text: str) -> list[Any]:
    return [d.content for d in parse_documents(text, max_nodes=MAX_NODES)]


def scalar(rng: random.Random) -> str:
    word = rng.choice(TRICKY) if rng.random() < 0.7 else f"w{rng.randrange(1000)}"
    style = rng.random()
    if style < 0.2:
        return f"'{word}'"
    if style < 0.3:
        return f'"{word}"'
    if style < 0.35:
        return f"!!str {word}"
    return word


def block(rng: random.Random, depth: int, indent: str) -> list[str]:
    """Lines of a random block mapping (keys unique within it)."""
    lines: list[str] = []
    for i in range(rng.randint(1, 5)):
        key = f"k{i}" if rng.random() < 0.6 else f"'{rng.choice(TRICKY)}{i}'"
        roll = rng.random()
        if depth < 3 and roll < 0.25:
            lines.append(f"{indent}{key}:")
            lines += block(rng, depth + 1, indent + "  ")
        elif depth < 3 and roll < 0.4:
            lines.append(f"{indent}{key}:")
            for _ in range(rng.randint(1, 3)):
                lines.append(f"{indent}  - {scalar(rng)}")
        elif roll < 0.5:
            items = ", ".join(scalar(rng) for _ in range(rng.randint(0, 3)))
            lines.append(f"{indent}{key}: [{items}]")
        elif roll < 0.55:
            lines.append(f"{indent}{key}: {{a: {scalar(rng)}, b: {scalar(rng)}}}")
        else:
            lines.append(f"{indent}{key}: {scalar(rng)}")
    return lines


@pytest.mark.parametrize("seed", range(40))
def test_generated_documents_equal_pyyaml(seed: int) -> None:
    rng = random.Random(seed)
    documents = []
    for _ in range(rng.randint(1, 6)):
        documents.append("---\n" + ("\n".join(block(rng, 0, "")) if rng.random() < 0.9 else ""))
    text = "\n".join(documents) + "\n"
    try:
        expected = reference(text)
    except (yaml.YAMLError, YAMLProblem):
        with pytest.raises(YAMLProblem):  # some generated scalars are not valid YAML
            ours(text)
        return
    assert typed(ours(text)) == typed(expected), text
    # The memo of resolved tags (used by both) against PyYAML's resolver alone.
    plain = [d for d in yaml.load_all(text, Loader=yaml.SafeLoader) if d is not None]
    assert typed(expected) == typed(plain), text


def test_the_same_text_plain_and_quoted_keeps_its_own_type() -> None:
    # The resolver's memo is keyed by the text and by how it was written.
    text = "a: 1\nb: '1'\nc: yes\nd: \"yes\"\ne: !!str 1\n---\nf: '1'\ng: 1\n"
    assert typed(ours(text)) == typed(reference(text))
    assert ours(text) == [{"a": 1, "b": "1", "c": True, "d": "yes", "e": "1"}, {"f": "1", "g": 1}]


def test_the_memo_of_resolved_tags_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml_loader, "_RESOLVED_MAX", 10)
    monkeypatch.setattr(yaml_loader, "_resolved", {})
    text = "".join(f"k{i}: {i}\n" for i in range(50))
    assert ours(text) == reference(text)
    assert len(yaml_loader._resolved) <= 10


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {x: 1, y: two}\nother:\n  <<: *b\n  z: 3\n",  # merge key and aliases
        "plain: {x: 1}\nmerged:\n  <<: [{x: 2}, {z: 3}]\n  y: 1\n",  # merge key, no alias
        "s: !!set {a, b}\no: !!omap [{a: 1}, {b: 2}]\np: !!pairs [{a: 1}]\n",
        "bin: !!binary aGVsbG8=\nts: 2001-12-14t21:59:43.10-05:00\nd: 2002-12-14\n",
        "m: !!map {a: 1}\nq: !!seq [1, 2]\nn: !!null ''\nf: !!float 1\ni: !!int '7'\n",
        "---\n---\na: 1\n--- ~\n---\n- 1\n- [2, {b: c}]\n",
        "a: &x [1, 2]\nb: *x\n",
        "long: " + "x" * 200 + "\nlong2: " + "x" * 200 + "\n",
    ],
)
def test_tags_merges_and_aliases_equal_pyyaml(text: str) -> None:
    assert typed(ours(text)) == typed(reference(text))


def test_document_indexes_and_lines_count_empty_documents() -> None:
    parsed = parse_documents("---\n---\na: 1\n--- ~\n---\nb: 2\n", max_nodes=MAX_NODES)
    assert [(d.index, d.line, d.content) for d in parsed] == [(1, 3, {"a": 1}), (3, 6, {"b": 2})]


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("a: 1\nb:\n  c: 1\n  c: 2\n", "duplicate key 'c'", 4),
        ("a: 1\n1: 2\n", "mapping keys must be strings, not int 1", 2),
        ("a:\n  - {x: 1, ? [k]: v}\n", "mapping keys must be strings, not list ['k']", 2),
        ("a: !!python/object:os.system x\n", "could not determine a constructor", 1),
        ("a: !custom x\n", "could not determine a constructor", 1),
        ("a: =\n", "could not determine a constructor", 1),  # YAML 1.1's value key
        ("a: [1, 2\n", "invalid YAML", 2),
    ],
)
def test_errors_keep_their_message_and_line(text: str, message: str, line: int) -> None:
    with pytest.raises(YAMLProblem) as caught:
        parse_documents(text, max_nodes=MAX_NODES)
    assert message in caught.value.message
    assert caught.value.line == line


def test_an_alias_bomb_is_still_refused() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name in "bcdefghij":
        previous = chr(ord(name) - 1)
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    with pytest.raises(YAMLProblem, match="alias bomb"):
        parse_documents(text, max_nodes=MAX_NODES)


# The line-based fast path ---------------------------------------------------------------------
#
# ``parse_documents`` first tries ``_parse_plain``, which reads a strict subset of block YAML
# line by line and answers None for anything else. Texts in the subset must take it and read
# exactly as PyYAML reads them; texts just outside it must read (or fail) exactly as the PyYAML
# path does.

# Plain scalars of the subset: strings, and texts the resolver makes something else of.
PLAIN = [
    "yes", "No", "on", "OFF", "true", "False", "y", "n", "0", "-0", "017", "0o17", "0x1F",
    "0b101", "1_000", "12:30:00", "190:20:30", "1:20", "1.5", "-1e3", "1e3", "6.8523015e+5",
    ".inf", "-.Inf", ".NaN", "1.", ".5", "-3", "+7", "~", "null", "Null", "NULL", "2001-12-14",
    "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10", "reconciler/v1alpha1",
    "Workload", "a b", "a  b", "http://x/y", "a#b", "x:y", "$HOME", "(x)", "~/p", "a, b",
    "caf\u00e9", "_x", "a\\b", "a-b?", "=x", "^x", "./run.sh --flag=1", "1 2",
]  # fmt: skip
# Flow sequence items: no ':' or '#' in plain ones.
FLOW_PLAIN = [
    "yes", "0x1F", "1_000", "-3", ".5", "~", "null", "2001-12-14", "a b", "executable",
    "x/y", "1.5e3", "(x)", "$v",
]  # fmt: skip
QUOTED_TEXT = ["yes", "1", "", " spaced ", "a: b", "a # b", "[x]", "{}", "-", "~", "&a *b !c"]
KEYS = ["name", "a.b", "x-y", "a/b", "_k", "K9", "spec", "0x", "1a", "on_x", "ports"]


def subset_scalar(rng: random.Random, *, flow: bool = False) -> str:
    roll = rng.random()
    if roll < 0.15:
        return "'" + rng.choice(QUOTED_TEXT) + "'"
    if roll < 0.25:
        return '"' + rng.choice(QUOTED_TEXT) + '"'
    return rng.choice(FLOW_PLAIN if flow else PLAIN)


def subset_value(rng: random.Random) -> str:
    """A value written on its key's or ``-``'s line (never empty)."""
    roll = rng.random()
    if roll < 0.1:
        items = ", ".join(subset_scalar(rng, flow=True) for _ in range(rng.randint(0, 3)))
        return rng.choice(["[{}]", "[ {} ]"]).format(items)
    if roll < 0.13:
        return rng.choice(["{}", "{ }"])
    return subset_scalar(rng)


def line_end(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.1:
        return "  # a comment: with [odd] 'text' &x *y !z |"
    if roll < 0.15:
        return " " * rng.randint(1, 3)
    return ""


def subset_node(rng: random.Random, indent: int, depth: int) -> list[str]:
    """Lines of a block mapping or sequence whose lines start at column ``indent``."""
    if rng.random() < 0.6 or depth >= 4:
        return subset_mapping(rng, indent, depth)
    return subset_sequence(rng, indent, depth)


def nested(rng: random.Random, indent: int, depth: int, *, after_key: bool) -> list[str]:
    """Lines after ``key:`` or ``-`` at ``indent``: a deeper block, a sequence at the key's
    column, or nothing (null)."""
    roll = rng.random()
    if depth >= 4 or roll < 0.15:
        return []
    if after_key and roll < 0.35:
        return subset_sequence(rng, indent, depth + 1)
    return subset_node(rng, indent + rng.randint(1, 3), depth + 1)


def filler(rng: random.Random) -> list[str]:
    roll = rng.random()
    if roll < 0.05:
        return [""]
    if roll < 0.1:
        return [" " * rng.randint(0, 6) + "# " + rng.choice(["note", "a: b", "- x", "---"])]
    return []


def subset_mapping(rng: random.Random, indent: int, depth: int, first: str = "") -> list[str]:
    """A block mapping at ``indent``; ``first``: what its first line starts with instead of
    the indentation (``- `` for a mapping that is a sequence item)."""
    lines: list[str] = []
    for i, key in enumerate(rng.sample(KEYS, rng.randint(1, 4))):
        start = first if i == 0 and first else " " * indent
        lines += filler(rng) if i else []
        if rng.random() < 0.3:
            lines.append(f"{start}{key}:{line_end(rng)}")
            lines += nested(rng, indent, depth, after_key=True)
        else:
            lines.append(f"{start}{key}: {subset_value(rng)}{line_end(rng)}")
    return lines


def subset_sequence(rng: random.Random, indent: int, depth: int) -> list[str]:
    lines: list[str] = []
    for _ in range(rng.randint(1, 4)):
        lines += filler(rng)
        dash = " " * indent + "-" + " " * rng.randint(1, 3)
        roll = rng.random()
        if roll < 0.3 and depth < 4:
            lines += subset_mapping(rng, len(dash), depth + 1, first=dash)
        elif roll < 0.45:
            lines.append(" " * indent + "-" + line_end(rng))
            lines += nested(rng, indent, depth, after_key=False)
        else:
            lines.append(f"{dash}{subset_value(rng)}{line_end(rng)}")
    return lines


def subset_text(rng: random.Random) -> str:
    """A file of documents in the fast path's subset, with separators and empty documents."""
    parts: list[str] = []
    if rng.random() < 0.3:
        parts.append("# a header comment")
    for i in range(rng.randint(0, 5)):
        if i or rng.random() < 0.7:
            parts.append("---" + " " * rng.randint(0, 2))
        if rng.random() < 0.85:
            parts += subset_node(rng, rng.choice([0, 0, 0, 2]), 0)
        parts += filler(rng)
    return "\n".join(parts) + rng.choice(["\n", "", "\n\n"])


def pyyaml_documents(text: str) -> list[tuple[int, Any]]:
    """(index, content) of the non-empty documents, as PyYAML's C loader reads them."""
    loaded = enumerate(yaml.load_all(text, Loader=yaml.CSafeLoader))
    return [(index, typed(content)) for index, content in loaded if content is not None]


def described(documents: list[yaml_loader.ParsedDocument]) -> list[tuple[int, int, Any]]:
    return [(d.index, d.line, typed(d.content)) for d in documents]


def outcome(parse: Any, text: str) -> Any:
    """What ``parse`` gives for ``text``, or the problem it raises (message and line)."""
    try:
        return ("documents", described(parse(text, max_nodes=MAX_NODES)))
    except YAMLProblem as exc:
        return ("problem", exc.message, exc.line)
    except Exception as exc:  # whatever PyYAML's path raises, the same
        return ("raises", type(exc).__name__)


@pytest.mark.parametrize("seed", range(300))
def test_texts_in_the_subset_take_the_fast_path_and_read_as_pyyaml(seed: int) -> None:
    rng = random.Random(seed)
    text = subset_text(rng)
    fast = yaml_loader._parse_plain(text)
    assert fast is not None, text  # the fast path took it
    assert [(d.index, typed(d.content)) for d in fast] == pyyaml_documents(text), text
    assert described(fast) == described(yaml_loader._parse_with_pyyaml(text, max_nodes=MAX_NODES))


def mutate(rng: random.Random, text: str) -> str:
    """``text`` with one change that is often outside the subset (or not YAML at all)."""
    lines = text.split("\n")
    at = rng.randrange(len(lines))
    line = lines[at]
    cut = rng.randint(0, len(line))
    mutations = [
        lambda: line[:cut] + "\t" + line[cut:],
        lambda: line[:cut] + ": " + line[cut:],
        lambda: line[:cut] + "#" + line[cut:],
        lambda: line[:cut] + " #" + line[cut:],
        lambda: line[:cut] + rng.choice("&*!|>%@`'\"[]{},?:-=<~") + line[cut:],
        lambda: line[:cut] + rng.choice("\r\x85\u2028\ufeff\x07\xa0\u3000\u00e9") + line[cut:],
        lambda: line + "\n" + " " * (len(line) - len(line.lstrip(" ")) + 2) + "more",
        lambda: line + "\n" + line,  # a duplicate key (or entry)
        lambda: " " + line,
        lambda: line[1:] if line.startswith(" ") else line,
        lambda: line.replace(": ", ": &a ", 1) + "\nalias: *a",
        lambda: line.replace(": ", ": - ", 1),
        lambda: line.replace(": ", ": !!str ", 1),
        lambda: line.replace(": ", ": |\n  block", 1),
        lambda: line.replace(": ", ": 'it''s' ", 1),
        lambda: line.replace(": ", ': "a\\tb"', 1),
        lambda: line.replace(": ", ": {a: 1}", 1),
        lambda: line.replace(": ", ": [a, [b]]", 1),
        lambda: line.replace(": ", ": [a,]", 1),
        lambda: line.replace(": ", ":", 1),
        lambda: line.replace(": ", " : ", 1),
        lambda: rng.choice(["1", "true", "null", "~", "<<", "? a", "'q'", "2001-01-01"]) + ": x",
        lambda: rng.choice(["...", "--- x", "%YAML 1.1\n---", "---#", "- - a", "-x", "=: y"]),
        lambda: line.replace("-", "", 1),
        lambda: line + ":",
        lambda: "x" * 1030 + ": y",
    ]
    other = rng.randrange(len(lines))
    moves = [
        lambda: lines.insert(other, lines.pop(at)),  # a line moved elsewhere
        lambda: lines.pop(at),
        lambda: lines.insert(at, " " * rng.randint(1, 4) + lines.pop(at)),
        lambda: lines.insert(at, " " * rng.randint(1, 4) + "- " + lines.pop(at).lstrip(" ")),
    ]
    if rng.random() < 0.25:
        rng.choice(moves)()
    else:
        lines[at] = rng.choice(mutations)()
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(400))
def test_texts_near_the_subset_read_or_fail_as_the_pyyaml_path(seed: int) -> None:
    rng = random.Random(seed)
    text = subset_text(rng)
    for _ in range(rng.randint(1, 2)):
        text = mutate(rng, text)
    slow = outcome(yaml_loader._parse_with_pyyaml, text)
    assert outcome(parse_documents, text) == slow, text
    fast = yaml_loader._parse_plain(text)
    if fast is not None:
        assert ("documents", described(fast)) == slow, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("# only a comment\n\n  # another\n", []),
        ("---\n", []),
        ("---\n---\n", []),
        ("a: 1\n---\n", [(0, 1, {"a": 1})]),
        ("---\na: 1\n", [(0, 2, {"a": 1})]),
        ("# header\n---\na: 1\n---\nb: 2\n", [(0, 3, {"a": 1}), (1, 5, {"b": 2})]),
        ("a: 1\n---\n\n---\n# c\nb: 2", [(0, 1, {"a": 1}), (2, 6, {"b": 2})]),
        ("---  \n---\n- 1\n", [(1, 3, [1])]),
        ("key:\n", [(0, 1, {"key": None})]),
        ("key:\n# c\nother: x\n", [(0, 1, {"key": None, "other": "x"})]),
        ("key:\n- a\n- b\nnext: 1\n", [(0, 1, {"key": ["a", "b"], "next": 1})]),
        ("key:\n  - a\n  - b\nnext: 1\n", [(0, 1, {"key": ["a", "b"], "next": 1})]),
        ("- a: 1\n  b:\n  - x\n-\n  - y\n-\n", [(0, 1, [{"a": 1, "b": ["x"]}, ["y"], None])]),
        ("  a: 'x # y'\n  b: \"yes\" # c\n", [(0, 1, {"a": "x # y", "b": "yes"})]),
        ("a: [1, 'b', \"c\", d e]\nb: []\nc: {}\n",
         [(0, 1, {"a": [1, "b", "c", "d e"], "b": [], "c": {}})]),
    ],
)  # fmt: skip
def test_the_fast_path_reads_documents_and_blocks_as_pyyaml(
    text: str, expected: list[tuple[int, int, Any]]
) -> None:
    fast = yaml_loader._parse_plain(text)
    assert fast is not None
    assert [(d.index, d.line, d.content) for d in fast] == expected
    assert described(fast) == described(yaml_loader._parse_with_pyyaml(text, max_nodes=MAX_NODES))


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # duplicate key: PyYAML's path says where
        "1: a\n",
        "yes: a\n",
        "a: b\n  c\n",  # a continuation line
        "a: &x 1\nb: *x\n",
        "a: =\n",
        "a: 1\n- b\n",
        "a:\n  - b\n  c: 1\n",
        "...\n",
        "--- a\n",
        "a: 'it''s'\n",
        "a: {b: 1}\n",
        "- - a\n",
        "a:\tb\n",
        "\ufeffa: b\n",
        "a: b\r\n",
        "a: 0b_\n",  # an int PyYAML's constructor fails on: the same exception
        "".join("  " * depth + f"k{depth}:\n" for depth in range(150)),  # nested very deeply
    ],
)
def test_the_fast_path_declines_what_is_outside_its_subset(text: str) -> None:
    assert yaml_loader._parse_plain(text) is None
    assert outcome(parse_documents, text) == outcome(yaml_loader._parse_with_pyyaml, text)


def test_the_example_fleet_and_fixtures_read_the_same_on_both_paths() -> None:
    root = Path(__file__).resolve().parent.parent
    files = [
        path
        for folder in ("fleet-example", "tests")
        for pattern in ("**/*.yaml", "**/*.yml")
        for path in (root / folder).glob(pattern)
    ]
    assert files
    for path in files:
        text = path.read_text()
        fast = yaml_loader._parse_plain(text)
        if fast is not None:
            slow = yaml_loader._parse_with_pyyaml(text, max_nodes=MAX_NODES)
            assert described(fast) == described(slow), path
