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
