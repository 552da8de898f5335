"""``load_fleet``: one revision's directory in, a ``DesiredFleet`` out, all or nothing.

    find files ─▶ read ─▶ (render *.yaml.j2) ─▶ parse YAML ─▶ JSON Schema ─▶ compile ─▶ assemble

Every problem of the revision is collected, then raised in one ``ManifestError``. A
``ParseCache`` shared between calls parses and validates each distinct file content once, so
comparing two revisions costs little more than loading one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.errors import ManifestError, Problem
from reconciler.manifests.compile import (
    Document,
    check_dependencies,
    check_fleet,
    compile_fleet,
    compile_workload,
    fleet_defaults,
)
from reconciler.manifests.limits import DEFAULT_LIMITS, Limits
from reconciler.manifests.paths import SourceTrees, find_manifests, is_inside, relative
from reconciler.manifests.schema import KIND_FILES, SchemaProblem, json_path, validate
from reconciler.manifests.templates import render_template
from reconciler.manifests.yaml_loader import ParsedDocument, YAMLProblem, line_of, parse_documents
from reconciler.model import API_VERSION, DesiredFleet, Workload, assemble_fleet

API_GROUP = API_VERSION.split("/", 1)[0] + "/"


@dataclass
class _Parsed:
    """What is known about one file content, whatever file it is found in."""

    text: str
    documents: list[ParsedDocument] = field(default_factory=list)
    error: YAMLProblem | None = None
    schema: dict[int, list[SchemaProblem]] = field(default_factory=dict)
    lines: dict[tuple[int, tuple[Hashable, ...]], int] = field(default_factory=dict)

    def line(self, index: int, path: Sequence[Hashable]) -> int:
        key = (index, tuple(path))
        if key not in self.lines:
            self.lines[key] = line_of(self.text, index, path)
        return self.lines[key]


class ParseCache:
    """Parsed and schema-checked file contents, keyed by the digest of the text."""

    def __init__(self) -> None:
        self._entries: dict[str, _Parsed] = {}

    def parse(self, text: str, limits: Limits) -> _Parsed:
        key = hashlib.sha256(text.encode()).hexdigest()
        entry = self._entries.get(key)
        if entry is None:
            entry = _Parsed(text)
            try:
                entry.documents = parse_documents(text, max_nodes=limits.max_nodes_per_document)
            except YAMLProblem as exc:
                entry.error = exc
            self._entries[key] = entry
        return entry


@dataclass
class _Revision:
    root: Path
    fleet_dir: Path
    limits: Limits
    cache: ParseCache
    problems: list[Problem] = field(default_factory=list)
    parsed: dict[str, _Parsed] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)
    declared: set[tuple[str, str]] = field(default_factory=set)
    """Every (kind, name) seen, valid or not: an invalid workload still exists for dependsOn."""

    def report(self, document: Document, path: Sequence[Hashable], message: str) -> None:
        parsed = self.parsed[document.file]
        self.problems.append(
            Problem(
                document.file, parsed.line(document.index, path), json_path(tuple(path)), message
            )
        )

    def add_file(self, path: Path, variables: dict[str, Any] | None) -> None:
        rel = relative(path, self.root)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(Problem(rel, 0, "", f"cannot read: {exc}"))
            return
        if variables is not None:
            try:
                text = render_template(text, variables)
            except YAMLProblem as exc:
                self.problems.append(Problem(rel, exc.line, "", exc.message))
                return
        parsed = self.cache.parse(text, self.limits)
        self.parsed[rel] = parsed
        if parsed.error is not None:
            # A file that does not parse cannot tell whether it is a manifest; only report
            # it when it looks like one, so workload sources may hold arbitrary YAML.
            if API_GROUP in text:
                self.problems.append(Problem(rel, parsed.error.line, "", parsed.error.message))
            return
        if not any(_is_ours(d.content) for d in parsed.documents):
            return
        for parsed_doc in parsed.documents:
            self._add_document(rel, parsed, parsed_doc, templated=variables is not None)

    def _add_document(
        self, rel: str, parsed: _Parsed, parsed_doc: ParsedDocument, *, templated: bool
    ) -> None:
        content = parsed_doc.content
        where = Problem(rel, parsed_doc.line, "$", "")
        if not isinstance(content, dict):
            self.problems.append(_with(where, "a manifest document must be a mapping"))
            return
        api, kind = content.get("apiVersion"), content.get("kind")
        if api != API_VERSION:
            self.problems.append(
                _with(where, f"apiVersion must be {API_VERSION!r}, not {api!r}", "$.apiVersion")
            )
            return
        if kind not in KIND_FILES:
            self.problems.append(
                _with(
                    where, f"unknown kind {kind!r}; expected one of {sorted(KIND_FILES)}", "$.kind"
                )
            )
            return
        if kind == "Fleet" and templated:
            self.problems.append(
                _with(
                    where,
                    "the Fleet document must be in a plain .yaml file: its variables "
                    "render the templates",
                )
            )
            return
        if parsed_doc.index not in parsed.schema:
            parsed.schema[parsed_doc.index] = validate(kind, content)
        name = (content.get("metadata") or {}).get("name")
        self.declared.add((kind, str(name)))
        document = Document(rel, parsed_doc.index, kind, str(name), content)
        schema_problems = parsed.schema[parsed_doc.index]
        for problem in schema_problems:
            self.report(document, problem.path, problem.message)
        if not schema_problems:
            self.documents.append(document)


def _is_ours(content: Any) -> bool:
    return isinstance(content, dict) and str(content.get("apiVersion", "")).startswith(API_GROUP)


def _with(where: Problem, message: str, path: str | None = None) -> Problem:
    return Problem(where.file, where.line, where.path if path is None else path, message)


def load_fleet(
    root: Path,
    *,
    subpath: str = "",
    revision: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    cache: ParseCache | None = None,
) -> DesiredFleet:
    """The desired fleet of the revision checked out at ``root`` (see the module docstring).

    ``subpath`` is the fleet directory inside ``root``; source paths in manifests are relative
    to it and must stay inside ``root``. Raises ``ManifestError`` with every problem found.
    """
    root = root.resolve()
    fleet_dir = (root / subpath).resolve()
    shown = subpath or "."
    if not is_inside(fleet_dir, root):
        raise ManifestError([Problem(shown, 0, "", "the fleet path leaves the repository")])
    if not fleet_dir.is_dir():
        raise ManifestError(
            [Problem(shown, 0, "", "no such directory in this revision; check --path")]
        )
    rev = _Revision(root, fleet_dir, limits, cache or ParseCache())
    found = find_manifests(root, fleet_dir, limits)
    rev.problems.extend(found.problems)

    templates = [p for p in found.files if p.name.endswith(".j2")]
    for path in found.files:
        if not path.name.endswith(".j2"):
            rev.add_file(path, None)
    fleets = [d for d in rev.documents if d.kind == "Fleet"]
    variables = dict((fleets[0].content.get("spec") or {}).get("variables") or {}) if fleets else {}
    for path in templates:
        rev.add_file(path, variables)

    if len(rev.documents) > limits.max_documents:
        rev.problems.append(
            Problem(
                shown,
                0,
                "",
                f"{len(rev.documents)} documents, over the limit of {limits.max_documents}",
            )
        )
    seen: dict[tuple[str, str], Document] = {}
    for document in rev.documents:
        first = seen.setdefault((document.kind, document.name), document)
        if first is not document:
            rev.report(
                document,
                ("metadata", "name"),
                f"duplicate {document.kind} {document.name!r}, first declared in {first.file}",
            )
    for extra in fleets[1:]:
        rev.report(extra, (), f"a revision has at most one Fleet; {fleets[0].file} has one")

    fleet_doc = fleets[0] if fleets else None
    if fleet_doc is not None:
        check_fleet(fleet_doc, rev.report)
    settings = compile_fleet(fleet_doc)
    defaults = fleet_defaults(fleet_doc)
    documents = {
        d.name: d
        for d in rev.documents
        if d.kind == "Workload" and seen.get(("Workload", d.name)) is d
    }
    known = {name for kind, name in rev.declared if kind == "Workload"}
    check_dependencies(documents, known, rev.report)
    trees = SourceTrees(root)
    workloads: dict[str, Workload] = {}
    for name, document in sorted(documents.items()):
        workload = compile_workload(
            document,
            defaults=defaults,
            root=root,
            fleet_dir=fleet_dir,
            trees=trees,
            report=rev.report,
        )
        if workload is not None:
            workloads[name] = workload

    if rev.problems:
        raise ManifestError(rev.problems)
    return assemble_fleet(revision, settings, workloads)
