"""Which files under the manifest path the operator declared not to be manifests.

    .reconcilerignore (manifest path root) + Fleet spec.ignore ──▶ IgnoreRules ──▶ loader

Every ``*.yaml``, ``*.yml`` and ``*.yaml.j2`` file under the manifest path must hold valid
manifests: a document the loader cannot recognise is an error, never skipped, because a skipped
document is a workload deleted by prune. Files that are not manifests are excluded here, on
purpose and in the repository, where a review sees it.

Patterns are a subset of gitignore's, relative to the manifest path:

* blank lines and lines starting with ``#`` are ignored; ``!pattern`` re-includes;
* ``*`` and ``?`` match within one path component, ``[abc]`` a character class, and a whole
  ``**`` component any number of components;
* a pattern with a ``/`` (other than a trailing one) is anchored to the manifest path, one
  without matches a file or directory name at any depth; a trailing ``/`` matches directories
  only; a directory that matches excludes everything beneath it, as in git;
* the last matching pattern wins.

Matching works component by component with ``fnmatch`` (which cannot backtrack exponentially)
and memoises ``**``, so hostile patterns cost at most (pattern components x path components).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache

IGNORE_FILE = ".reconcilerignore"
MAX_PATTERNS = 1000
MAX_PATTERN_LENGTH = 256


@dataclass(frozen=True)
class _Pattern:
    parts: tuple[str, ...]
    negated: bool
    directories_only: bool
    source: str


def _compile(line: str) -> _Pattern | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    negated = text.startswith("!")
    if negated:
        text = text[1:]
    directories_only = text.endswith("/")
    text = text.strip("/") if directories_only else text
    anchored = "/" in text
    text = text.lstrip("/")
    parts = tuple(p for p in text.split("/") if p)
    if not parts:
        return None
    if not anchored:
        parts = ("**", *parts)
    return _Pattern(parts, negated, directories_only, line.strip())


def _matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    @cache
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(path)
        if pattern[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(path) + 1))
        return j < len(path) and fnmatchcase(path[j], pattern[i]) and match(i + 1, j + 1)

    return match(0, 0)


class IgnoreRules:
    """Compiled patterns; ``ignores("dir/file.yaml")`` for a path relative to the manifest path."""

    def __init__(self, patterns: Sequence[_Pattern] = ()) -> None:
        self._patterns = tuple(patterns)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> IgnoreRules:
        """Patterns from lines; raises ``ValueError`` for too many or too long ones."""
        compiled = []
        for line in lines:
            if len(line) > MAX_PATTERN_LENGTH:
                raise ValueError(f"a pattern is longer than {MAX_PATTERN_LENGTH} characters")
            pattern = _compile(line)
            if pattern is not None:
                compiled.append(pattern)
        if len(compiled) > MAX_PATTERNS:
            raise ValueError(f"{len(compiled)} patterns, over the limit of {MAX_PATTERNS}")
        return cls(compiled)

    def __add__(self, other: IgnoreRules) -> IgnoreRules:
        return IgnoreRules(self._patterns + other._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def _decide(self, parts: tuple[str, ...], is_dir: bool) -> bool:
        ignored = False
        for pattern in self._patterns:
            if pattern.directories_only and not is_dir:
                continue
            if _matches(pattern.parts, parts):
                ignored = not pattern.negated
        return ignored

    def ignores(self, relative_path: str) -> bool:
        parts = tuple(p for p in relative_path.split("/") if p)
        if not self._patterns or not parts:
            return False
        # As in git: once a directory is excluded, nothing beneath it comes back.
        for depth in range(1, len(parts)):
            if self._decide(parts[:depth], is_dir=True):
                return True
        return self._decide(parts, is_dir=False)
