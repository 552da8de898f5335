"""Which ref a revision name means, decided before git sees it (pure).

    --ref / --rev text ──qualify(name, existing refs)──▶ ``refs/heads/main~1`` | a full SHA
                                                          ──▶ ``GitSource.resolve`` (rev-parse)

Git's own lookup (``git rev-parse main``) tries ``refs/main``, ``refs/tags/main``,
``refs/heads/main`` ... in that order, so whoever can push a *tag* named like the followed
branch decides what the daemon applies. Here a bare name is looked up only as a branch, a tag or
(in a local clone) a remote-tracking branch, and a name that matches more than one of them is
refused with a request for the qualified form. Names that ``git check-ref-format`` would refuse,
and anything starting with ``-`` (which git would read as an option: ``--upload-pack=...``), are
refused before any git command runs.

Accepted forms: ``HEAD``, a full commit SHA, an abbreviated SHA (4 to 39 hex digits, resolved by
the caller to exactly one commit), ``refs/...`` exactly as it exists, a bare branch or tag name,
and ``origin/<branch>`` (a remote-tracking branch of a local clone, or the remote's branch in a
mirror); each optionally followed by ``~N`` / ``^N`` steps. Nothing else (``@{...}``, ``:/text``,
ranges) is a revision here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from reconciler.errors import SourceError

_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_ABBREVIATED = re.compile(r"^[0-9a-f]{4,39}$")
_STEPS = re.compile(r"(?:[~^][0-9]*)+$")
# git check-ref-format, rule 4, 5 and 10: control characters, space, ~ ^ : ? * [ and \.
_FORBIDDEN_CHARACTER = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_HINT = "give a branch, a tag, refs/heads/NAME, refs/tags/NAME or a commit SHA"


@dataclass(frozen=True)
class Qualified:
    """What a revision name was qualified to.

    ``expression`` is safe to hand to ``git rev-parse --end-of-options``. When ``abbreviation``
    is set, the caller must first expand it to the one commit it names and put that SHA in
    front of ``steps``.
    """

    expression: str
    abbreviation: str | None = None
    steps: str = ""


def ref_format_problem(name: str) -> str | None:
    """Why ``git check-ref-format --allow-onelevel`` would refuse ``name`` (or why git could
    take it for an option); ``None`` for a good name."""
    if not name:
        return "it is empty"
    if name.startswith("-"):
        return "it starts with '-' (git would read it as an option)"
    if name == "@":
        return "'@' alone is not a ref name"
    if _FORBIDDEN_CHARACTER.search(name):
        return "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in name:
        return "it contains '..'"
    if "@{" in name:
        return "it contains '@{'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has an empty path component"
    if name.endswith("."):
        return "it ends with '.'"
    for component in name.split("/"):
        if component.startswith("."):
            return "a component starts with '.'"
        if component.endswith(".lock"):
            return "a component ends with '.lock'"
    return None


def check_revision_syntax(name: str, what: str = "revision") -> None:
    """``SourceError`` unless ``name`` has one of the accepted forms (module docstring)."""
    _split(name, what)


def _split(name: str, what: str) -> tuple[str, str]:
    """``name`` as (base, ``~N``/``^N`` steps); ``SourceError`` for anything else."""
    match = _STEPS.search(name)
    steps = match.group(0) if match else ""
    base = name[: len(name) - len(steps)]
    problem = ref_format_problem(base)
    if problem is not None:
        raise SourceError(f"refusing the {what} {name!r}: {problem}; {_HINT}")
    return base, steps


def qualify(
    name: str, refs: Collection[str], *, mirror: bool, what: str = "revision", where: str = ""
) -> Qualified:
    """Qualify ``name`` against the repository's ``refs`` (full ref names).

    ``mirror``: the repository is our mirror of a remote, holding the remote's branches as
    ``refs/heads/*`` (so ``origin/main`` means ``refs/heads/main``) and no remote-tracking refs.
    ``SourceError`` for a malformed name, a bare name that is both a branch and a tag (say), or
    a name that matches nothing.
    """
    base, steps = _split(name, what)
    inside = f" in {where}" if where else ""
    if base == "HEAD" or _FULL_SHA.match(base):
        return Qualified(base + steps)
    if base.startswith("refs/"):
        if base in refs:
            return Qualified(base + steps)
        raise SourceError(f"unknown {what} {name!r}{inside}: there is no ref {base}; {_HINT}")
    candidates = [f"refs/heads/{base}", f"refs/tags/{base}"]
    if mirror:
        if base.startswith("origin/"):
            candidates.append(f"refs/heads/{base.removeprefix('origin/')}")
    else:
        candidates.append(f"refs/remotes/{base}")
    found = [c for c in dict.fromkeys(candidates) if c in refs]
    if len(found) > 1:
        raise SourceError(
            f"the {what} {name!r} is ambiguous{inside}: {' and '.join(found)} both exist; "
            f"name the one you mean in full (--ref {found[0]})"
        )
    if found:
        return Qualified(found[0] + steps)
    if _ABBREVIATED.match(base):
        return Qualified(base + steps, abbreviation=base, steps=steps)
    raise SourceError(f"unknown {what} {name!r}{inside}; {_HINT} that exists")
