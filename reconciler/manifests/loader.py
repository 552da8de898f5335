"""``load_fleet``: one revision's directory in, a ``DesiredFleet`` out, all or nothing.

    find files ─▶ drop ignored ─▶ read ─▶ parse YAML ─▶ (render *.yaml.j2 in a child process)
          ─▶ JSON Schema ─▶ every other document is an error ─▶ compile ─▶ assemble

No YAML document under the manifest path is silently skipped: a skipped document is a workload
that prune deletes. A document that is not a valid manifest is an error with its file, line and
what looks wrong (``no apiVersion; did you mean apiVersion (found 'apiVerison')?``), unless the
operator excluded its file on purpose:

* in ``.reconcilerignore`` at the manifest path or the Fleet's ``spec.ignore`` (``ignore.py``);
* implicitly, inside a directory below the manifest path that a Workload names as its
  ``source.path``: a workload's own YAML (tool configuration, fixtures) is source, not a
  manifest. Even there, a document that claims to be a manifest (a ``reconciler/`` apiVersion
  under any key, or kind ``Fleet`` or ``Workload``) is validated, and a file that mentions
  ``reconciler/`` and does not parse is an error.

Hidden files and directories (``.github/``) are never read. Every problem of the revision is
collected, then raised in one ``ManifestError``. A ``ParseCache`` shared between calls parses
and validates each distinct file content once, so comparing two revisions costs little more
than loading one. With a ``CompileCache`` (``compile_cache.py``) and the revision's Git tree
ids, that reuse reaches compiled workloads and lasts across processes: a workload whose
document and source tree did not change is not compiled again.

A first load of a large revision (thousands of files, or of workloads, that nothing parsed or
compiled before) parses and compiles half of them in a forked child process (``parallel``),
whose results reach the loader as cache entries: the outcome, problems included, is the one of
a serial load.
"""

from __future__ import annotations

import difflib
import marshal
import pickle
import posixpath
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
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
from reconciler.manifests.compile_cache import (
    CompileCache,
    TreeIndex,
    cacheable,
    revision_key,
    text_key,
    workload_key,
)
from reconciler.manifests.ignore import IGNORE_FILE, IgnoreRules
from reconciler.manifests.limits import DEFAULT_LIMITS, Limits
from reconciler.manifests.notifications import compile_notifications
from reconciler.manifests.parallel import Pending, in_child
from reconciler.manifests.paths import (
    SourceTrees,
    find_manifests,
    is_inside,
    relative,
    resolved,
)
from reconciler.manifests.schema import KIND_FILES, SchemaProblem, json_path, validate
from reconciler.manifests.secrets import FleetSecrets
from reconciler.manifests.yaml_loader import ParsedDocument, YAMLProblem, line_of, parse_documents
from reconciler.model import (
    API_VERSION,
    DesiredFleet,
    FleetSettings,
    SensitiveValues,
    Workload,
    assemble_fleet,
    canonical_json,
    expand_workload,
)
from reconciler.secrets import SecretResolver

API_GROUP = API_VERSION.split("/", 1)[0] + "/"


@dataclass
class _Parsed:
    """What is known about one file content, whatever file it is found in."""

    text: str
    key: str = ""  # the digest of ``text``
    stored: str = ""  # its key in the ``CompileCache``: the digest and the limit it passed
    documents: list[ParsedDocument] = field(default_factory=list)
    error: YAMLProblem | None = None
    schema: dict[int, list[SchemaProblem]] = field(default_factory=dict)
    lines: dict[tuple[int, tuple[Hashable, ...]], int] = field(default_factory=dict)
    saved: Any = None
    """The ``CompileCache.files`` entry these documents were decoded from, if they were."""

    def line(self, index: int, path: Sequence[Hashable]) -> int:
        key = (index, tuple(path))
        if key not in self.lines:
            self.lines[key] = line_of(self.text, index, path)
        return self.lines[key]


class ParseCache:
    """Parsed and schema-checked file contents, keyed by the digest of the text; backed by a
    ``CompileCache`` when given (files parsed and validated by an earlier process)."""

    def __init__(self, store: CompileCache | None = None) -> None:
        self._entries: dict[str, _Parsed] = {}
        self.store = store
        self._prefetched: dict[str, Any] = {}
        """Stored key -> what a child process parsed (``prefetch``), in the store's form."""

    def prefetch(self, texts: Sequence[str], limits: Limits) -> None:
        """Parse and schema-check the ``texts`` not known yet, half of them in a child process
        (``parallel``), when there are enough of them to be worth a fork: the first load of a
        large revision. ``parse`` then finds them; the outcome is the serial one."""
        if sum(len(text) for text in texts) < PARALLEL_PARSE_CHARS:
            return  # too little to be worth a fork, known or not: not even hashed here
        unknown: dict[str, str] = {}
        for text in texts:
            key = text_key(text)
            stored = f"{key}:{limits.max_nodes_per_document}"
            if key in self._entries or stored in self._prefetched:
                continue
            if self.store is not None and stored in self.store.files:
                continue
            unknown.setdefault(stored, text)
        if sum(len(text) for text in unknown.values()) < PARALLEL_PARSE_CHARS:
            return
        items = list(unknown.items())
        middle = len(items) // 2
        pending = in_child(lambda: _parse_for_store(items[middle:], limits))
        if pending is None:
            return
        try:
            for _, text in items[:middle]:
                _check_schemas(self.parse(text, limits))
            learnt = pending.result()
        finally:
            pending.close()
        for stored, entry in learnt or ():
            self._prefetched[stored] = entry

    def parse(self, text: str, limits: Limits) -> _Parsed:
        key = text_key(text)
        entry = self._entries.get(key)
        if entry is None:
            # A file parsed under a larger node limit must be parsed again under a smaller one.
            entry = _Parsed(text, key, f"{key}:{limits.max_nodes_per_document}")
            saved = self.store.documents(entry.stored) if self.store is not None else None
            if saved is None:
                saved = self._prefetched.pop(entry.stored, None)
            if saved is not None:
                entry.saved = saved
                documents, validated = saved
                entry.documents = [ParsedDocument(*d) for d in documents]
                entry.schema = {index: [] for index in validated}
            else:
                try:
                    entry.documents = parse_documents(text, max_nodes=limits.max_nodes_per_document)
                except YAMLProblem as exc:
                    entry.error = exc
            self._entries[key] = entry
        return entry

    def remember(self, entries: Sequence[_Parsed]) -> None:
        """Save what ``entries`` (files of a revision that loaded without problems) taught."""
        if self.store is None:
            return
        for entry in entries:
            if entry.error is None:
                validated = sorted(i for i, problems in entry.schema.items() if not problems)
                if entry.saved is not None and tuple(validated) == entry.saved[1]:
                    # Kept as decoded: no need to rebuild and compare it, nor check it is plain.
                    self.store.keep_documents(entry.stored, entry.saved)
                else:
                    self.store.remember_documents(entry.stored, entry.documents, validated)


PARALLEL_PARSE_CHARS = 1_500_000
"""Manifest text never parsed before (some 2,000 workloads' documents) above which a load
parses in two processes. Below it a fork costs more than it saves."""
PARALLEL_COMPILE_WORKLOADS = 2_000
"""Workloads to compile (none reusable) above which a load compiles in two processes."""


def _ours(content: Any) -> str | None:
    """The kind of a document ``_add_document`` would check against its schema, if it is one."""
    if isinstance(content, dict) and content.get("apiVersion") == API_VERSION:
        kind = content.get("kind")
        if isinstance(kind, str) and kind in KIND_FILES:
            return kind
    return None


def _check_schemas(parsed: _Parsed) -> None:
    """Validate ``parsed``'s documents ahead of ``_add_document``, which then finds it done
    (the schemas are pure: the same document gives the same problems, whenever checked)."""
    for parsed_doc in parsed.documents:
        kind = _ours(parsed_doc.content)
        if kind is not None and parsed_doc.index not in parsed.schema:
            parsed.schema[parsed_doc.index] = validate(kind, parsed_doc.content)


def _parse_for_store(items: Sequence[tuple[str, str]], limits: Limits) -> list[Any]:
    """In a child process: ``(stored key, entry)`` for each text that parses into plain data,
    the entry in ``CompileCache.files``' form (the documents, the indexes that passed their
    schema). A text that does not parse is left out: the parent parses it and reports it."""
    learnt = []
    for stored, text in items:
        try:
            documents = parse_documents(text, max_nodes=limits.max_nodes_per_document)
        except YAMLProblem:
            continue
        validated = []
        for parsed_doc in documents:
            kind = _ours(parsed_doc.content)
            if kind is not None and not validate(kind, parsed_doc.content):
                validated.append(parsed_doc.index)
        entry = (tuple((d.index, d.line, d.content) for d in documents), tuple(validated))
        try:
            marshal.dumps(entry)  # plain data only, as the store keeps
        except ValueError:
            continue
        learnt.append((stored, entry))
    return learnt


@dataclass
class _File:
    """One candidate manifest file and what became of it."""

    rel: str  # relative to the revision root: what messages show
    key: str  # relative to the manifest path: what ignore patterns and source paths see
    raw: str
    templated: bool
    parsed: _Parsed | None = None
    problem: Problem | None = None
    manifest: bool = False  # holds at least one document that is ours


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
    sources: set[str] = field(default_factory=set)
    """Source directories of every Workload seen, relative to the manifest path."""

    def report(self, document: Document, path: Sequence[Hashable], message: str) -> None:
        parsed = self.parsed[document.file]
        self.problems.append(
            Problem(
                document.file, parsed.line(document.index, path), json_path(tuple(path)), message
            )
        )

    def in_source(self, key: str) -> bool:
        return any(key.startswith(directory + "/") for directory in self.sources)

    def add_manifests(self, file: _File) -> None:
        """The documents of ``file`` if any of them is ours; else it waits for ``classify``."""
        parsed = file.parsed
        if parsed is None or parsed.error is not None:
            return
        self.parsed[file.rel] = parsed
        if not any(_is_ours(d.content) for d in parsed.documents):
            return
        file.manifest = True
        for parsed_doc in parsed.documents:
            self._add_document(file.rel, parsed, parsed_doc, templated=file.templated)

    def classify(self, file: _File) -> None:
        """A file without manifests: excluded source, or an error for each document in it."""
        inside = self.in_source(file.key)
        mentions_us = API_GROUP in file.raw
        if file.problem is not None:
            if not inside or mentions_us:
                self.problems.append(file.problem)
            return
        parsed = file.parsed
        if parsed is None:
            return  # a template inside a source directory, never rendered
        if parsed.error is not None:
            if not inside or mentions_us:
                self.problems.append(Problem(file.rel, parsed.error.line, "", parsed.error.message))
            return
        for parsed_doc in parsed.documents:
            if inside and not _claims_ours(parsed_doc.content):
                continue
            self._foreign(file.rel, parsed, parsed_doc, hint=not inside)

    def _foreign(
        self, rel: str, parsed: _Parsed, parsed_doc: ParsedDocument, *, hint: bool = True
    ) -> None:
        path, message, typo = _not_ours(parsed_doc.content)
        if hint and not typo:
            message += (
                f"; if the file is not a manifest, exclude it in {IGNORE_FILE} "
                "or the Fleet's spec.ignore"
            )
        line = parsed.line(parsed_doc.index, path) if path else parsed_doc.line
        self.problems.append(Problem(rel, line, json_path(path) if path else "", message))

    def _add_document(
        self, rel: str, parsed: _Parsed, parsed_doc: ParsedDocument, *, templated: bool
    ) -> None:
        content = parsed_doc.content
        where = Problem(rel, parsed_doc.line, "$", "")
        if not isinstance(content, dict) or content.get("apiVersion") != API_VERSION:
            self._foreign(rel, parsed, parsed_doc, hint=False)
            return
        kind = content.get("kind")
        if kind not in KIND_FILES:
            typo = _close_key(content, "kind") if kind is None else None
            self.problems.append(
                _with(
                    where,
                    f"no kind; did you mean kind (found {typo!r})?"
                    if typo
                    else f"unknown kind {kind!r}; expected one of {sorted(KIND_FILES)}",
                    "$.kind",
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
        if kind == "Workload":
            self._note_source(content)
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

    def _note_source(self, content: dict[str, Any]) -> None:
        spec = content.get("spec")
        source = spec.get("source") if isinstance(spec, dict) else None
        declared = source.get("path") if isinstance(source, dict) else None
        if not isinstance(declared, str) or declared.startswith("/"):
            return
        directory = posixpath.normpath(declared)
        # Only a directory below the manifest path excludes anything: a source path of "."
        # (or above) would exclude every manifest, typos included.
        if directory != "." and not directory.startswith("../") and directory != "..":
            self.sources.add(directory)


class _Reuse:
    """The content keys of one revision's workloads (``compile_cache``), and the lookup."""

    def __init__(
        self,
        rev: _Revision,
        store: CompileCache,
        index: TreeIndex,
        defaults: Mapping[str, Any],
    ) -> None:
        self.rev = rev
        self.store = store
        self.index = index
        fleet_rel = relative(rev.fleet_dir, rev.root)
        self.fleet_rel = "" if fleet_rel == "." else fleet_rel
        try:
            self.defaults: str | None = canonical_json(defaults)
        except (TypeError, ValueError):
            self.defaults = None  # not plain data (a YAML date): compile every time
        # Secret references depend on the decrypted files, not on the document alone.
        self.secret_defaults = "secretEnv" in defaults or "secretFiles" in defaults

    def key(self, document: Document) -> str | None:
        if self.defaults is None or self.secret_defaults:
            return None
        spec = document.content["spec"]
        deploy = spec["deploy"]
        if "secretEnv" in deploy or "secretFiles" in deploy:
            return None
        found = self.index.source_tree(self.fleet_rel, spec["source"]["path"])
        if found is None:
            return None
        source_rel, tree = found
        parsed = self.rev.parsed[document.file]
        return workload_key(
            parsed.key,
            str(document.index),
            document.file,
            self.defaults,
            self.fleet_rel,
            source_rel,
            tree,
        )

    def workload(self, key: str, name: str) -> Workload | None:
        found = self.store.workload(key)
        return found if found is not None and found.name == name else None


def _is_ours(content: Any) -> bool:
    return isinstance(content, dict) and str(content.get("apiVersion", "")).startswith(API_GROUP)


def _claims_ours(content: Any) -> bool:
    """A document that means to be a manifest, whatever its keys look like."""
    if not isinstance(content, dict):
        return False
    if content.get("kind") in KIND_FILES:
        return True
    return any(
        isinstance(value, str) and value.strip().lower().startswith(API_GROUP)
        for value in content.values()
    )


def _close_key(content: dict[str, Any], wanted: str) -> str | None:
    """The key of ``content`` that looks like a misspelt ``wanted`` (case and typos)."""
    keys = [k for k in content if isinstance(k, str) and k != wanted]
    lowered = {k.lower(): k for k in keys}
    close = difflib.get_close_matches(wanted.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


def _not_ours(content: Any) -> tuple[tuple[Hashable, ...], str, bool]:
    """(JSON path, message, whether it looks like a typo) for a document that is not one of
    ours."""
    if not isinstance(content, dict):
        kind = "list" if isinstance(content, list) else type(content).__name__
        return (
            (),
            f"not a manifest: a {kind}, where a manifest is a mapping starting with "
            f"apiVersion: {API_VERSION}",
            False,
        )
    if "apiVersion" in content:
        return (
            ("apiVersion",),
            f"apiVersion must be {API_VERSION!r}, not {content['apiVersion']!r}",
            False,
        )
    typo = _close_key(content, "apiVersion")
    if typo is not None:
        return (typo,), f"no apiVersion; did you mean apiVersion (found {typo!r})?", True
    return (), f"not a manifest: no apiVersion (a manifest has apiVersion: {API_VERSION})", False


def _with(where: Problem, message: str, path: str | None = None) -> Problem:
    return Problem(where.file, where.line, where.path if path is None else path, message)


def _read_ignore_file(rev: _Revision) -> IgnoreRules:
    path = rev.fleet_dir / IGNORE_FILE
    rel = relative(path, rev.root)
    if not path.exists() and not path.is_symlink():
        return IgnoreRules()
    target = resolved(path)
    if target is None or not is_inside(target, rev.root) or not target.is_file():
        rev.problems.append(Problem(rel, 0, "", "must be a file inside the repository"))
        return IgnoreRules()
    try:
        if path.stat().st_size > rev.limits.max_file_bytes:
            raise ValueError(f"over the limit of {rev.limits.max_file_bytes} bytes")
        return IgnoreRules.parse(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        rev.problems.append(Problem(rel, 0, "", f"cannot read: {exc}"))
        return IgnoreRules()


def _fleet_ignore(files: Sequence[_File]) -> tuple[_File | None, IgnoreRules]:
    """The file of the first Fleet document and its ``spec.ignore`` rules. A malformed list is
    left for the schema to report."""
    for file in files:
        if file.parsed is None or file.parsed.error is not None:
            continue
        for parsed_doc in file.parsed.documents:
            content = parsed_doc.content
            if not (_is_ours(content) and content.get("kind") == "Fleet"):
                continue
            spec = content.get("spec")
            patterns = spec.get("ignore") if isinstance(spec, dict) else None
            # A secret's file is encrypted data, not a manifest, wherever it is declared.
            secrets = spec.get("secrets") if isinstance(spec, dict) else None
            if isinstance(secrets, dict):
                declared = [s.get("path") for s in secrets.values() if isinstance(s, dict)]
                extra = ["/" + p.lstrip("/") for p in declared if isinstance(p, str)]
                patterns = [*(patterns if isinstance(patterns, list) else []), *extra]
            if isinstance(patterns, list) and all(isinstance(p, str) for p in patterns):
                try:
                    return file, IgnoreRules.parse(patterns)
                except ValueError:
                    pass
            return file, IgnoreRules()
    return None, IgnoreRules()


def _read(rev: _Revision, path: Path) -> _File:
    rel = relative(path, rev.root)
    key = relative(path, rev.fleet_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _File(rel, key, "", False, problem=Problem(rel, 0, "", f"cannot read: {exc}"))
    return _File(rel, key, raw, path.name.endswith(".j2"))


def load_remembered(
    cache: ParseCache, revision: str, *, subpath: str = "", limits: Limits = DEFAULT_LIMITS
) -> DesiredFleet | None:
    """The desired fleet of commit ``revision`` decoded from the cache, without reading a file
    or listing a tree, when a load of it was kept whole; else ``None`` (``load_fleet`` it).

    Only a load that depended on nothing but its commit is kept (no symlink or submodule, no
    template, no secret: see the end of ``load_fleet``), so the commit decides it all."""
    if cache.store is None:
        return None
    kept = cache.store.revision(revision_key(revision, subpath, repr(limits)))
    if kept is None:
        return None
    return _assemble(revision, *kept, cache.store)


def load_fleet(
    root: Path,
    *,
    subpath: str = "",
    revision: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    cache: ParseCache | None = None,
    secrets: SecretResolver | None = None,
    tree_index: TreeIndex | None = None,
) -> DesiredFleet:
    """The desired fleet of the revision checked out at ``root`` (see the module docstring).

    ``tree_index``: the Git tree ids of the revision (``Source.tree_entries``); with a cache
    that has a ``CompileCache``, unchanged workloads are reused instead of compiled.

    ``secrets`` decrypts the secrets that workloads reference (``manifests.secrets``); without
    it they are only checked, and the fleet must not be started.

    ``subpath`` is the fleet directory inside ``root``; source paths in manifests are relative
    to it and must stay inside ``root``. Raises ``ManifestError`` with every problem found.
    """
    cache = cache or ParseCache()
    memo = None
    if cache.store is not None and tree_index is not None and not tree_index.linked and revision:
        memo = revision_key(revision, subpath, repr(limits))
        remembered = load_remembered(cache, revision, subpath=subpath, limits=limits)
        if remembered is not None:
            return remembered
    root = root.resolve()
    shown = subpath or "."
    fleet_dir = resolved(root / subpath)
    if fleet_dir is None:
        raise ManifestError([Problem(shown, 0, "", "the fleet path is a symlink loop")])
    if not is_inside(fleet_dir, root):
        raise ManifestError([Problem(shown, 0, "", "the fleet path leaves the repository")])
    if not fleet_dir.is_dir():
        raise ManifestError(
            [Problem(shown, 0, "", "no such directory in this revision; check --path")]
        )
    rev = _Revision(root, fleet_dir, limits, cache)
    found = find_manifests(root, fleet_dir, limits)
    rev.problems.extend(found.problems)
    ignored = _read_ignore_file(rev)
    files = [_read(rev, p) for p in found.files if not ignored.ignores(relative(p, fleet_dir))]

    plain = [file for file in files if not file.templated and file.problem is None]
    rev.cache.prefetch([file.raw for file in plain], limits)
    for file in plain:
        file.parsed = rev.cache.parse(file.raw, limits)
    fleet_file, fleet_ignored = _fleet_ignore(files)
    if fleet_ignored:
        files = [f for f in files if f is fleet_file or not fleet_ignored.ignores(f.key)]
    for file in files:
        if not file.templated:
            rev.add_manifests(file)

    fleets = [d for d in rev.documents if d.kind == "Fleet"]
    variables = dict((fleets[0].content.get("spec") or {}).get("variables") or {}) if fleets else {}
    # A template inside a known source directory that does not mention us is source; every
    # other template is rendered, all of them in one child process.
    templates = [
        f
        for f in files
        if f.templated and f.problem is None and (API_GROUP in f.raw or not rev.in_source(f.key))
    ]
    if templates:
        # Imported here: it brings multiprocessing, which a fleet without templates (every
        # pull request's diff of one) need not load.
        from reconciler.manifests.templates import render_templates  # noqa: PLC0415

        outcomes = render_templates([(f.rel, f.raw) for f in templates], variables, limits)
        for file in templates:
            outcome = outcomes[file.rel]
            if outcome.text is None:
                file.problem = Problem(file.rel, outcome.line, "", outcome.message)
            else:
                file.parsed = rev.cache.parse(outcome.text, limits)
                rev.add_manifests(file)
    for file in files:
        if not file.manifest:
            rev.classify(file)

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
    store = rev.cache.store if tree_index is not None else None
    trees = SourceTrees(
        root, tree_ids=tree_index.plain if tree_index else None, known=store, listed=tree_index
    )
    fleet_secrets = FleetSecrets(settings.secrets, root=root, fleet_dir=fleet_dir, resolver=secrets)
    notifications = compile_notifications(fleet_doc, fleet_secrets, rev.report)
    settings = replace(settings, notifications=notifications)
    reuse = _Reuse(rev, store, tree_index, defaults) if store and tree_index else None
    workloads: dict[str, Workload] = {}
    keys: dict[str, str] = {}
    ordered = [
        (name, document, reuse.key(document) if reuse is not None else None)
        for name, document in sorted(documents.items())
    ]
    compile_one = partial(
        compile_workload,
        defaults=defaults,
        root=root,
        fleet_dir=fleet_dir,
        trees=trees,
        secrets=fleet_secrets,
    )
    helper = (
        _CompileHalf.start(ordered, store, compile_one, settings.kernel)
        if store is not None
        else None
    )
    try:
        for name, document, key in ordered:
            if key:
                keys[name] = key
            workload = reuse.workload(key, name) if reuse is not None and key else None
            if workload is None and helper is not None and key:
                workload = helper.take(name, key)
            if workload is None:
                workload = compile_one(document, report=rev.report)
                if workload is not None and store is not None and key:
                    store.remember_workload(key, workload)
            if workload is not None:
                workloads[name] = workload
    finally:
        if helper is not None:
            helper.close()

    if rev.problems:
        raise ManifestError(rev.problems)
    rev.cache.remember(list(rev.parsed.values()))
    if rev.cache.store is None:
        fleet = assemble_fleet(revision, settings, workloads)
    else:
        if (
            memo is not None
            and not settings.secrets
            and not fleet_secrets.sensitive
            and not any(f.templated for f in files)
            and keys.keys() == workloads.keys()
            and all(k in rev.cache.store.workloads for k in keys.values())
        ):
            # Nothing outside the commit decided this load: no symlink (whose meaning depends
            # on where the checkout lies), no template (rendered in a child process), no
            # secret (decrypted with a key the repository does not hold).
            rev.cache.store.remember_revision(memo, settings, keys)
        fleet = _assemble(revision, settings, workloads, keys, rev.cache.store)
    return replace(fleet, sensitive=SensitiveValues(fleet_secrets.sensitive))


class _CompileHalf:
    """The second half of a large first load's workloads, compiled in a child process
    (``parallel``) while the loader compiles the first half; ``take`` waits for it on the
    first workload of its half. A workload the child could not compile without a problem is
    not among its results: the loader compiles it, and reports the problem, itself."""

    def __init__(self, pending: Pending, names: set[str], store: CompileCache) -> None:
        self.pending = pending
        self.names = names
        self.store = store
        self.learnt: dict[str, tuple[str, Any]] | None = None

    @classmethod
    def start(
        cls,
        ordered: Sequence[tuple[str, Document, str | None]],
        store: CompileCache,
        compile_one: Callable[..., Workload | None],
        kernel: str | None,
    ) -> _CompileHalf | None:
        # Only workloads the cache can keep (keyed: no secret, no symlink) and does not hold.
        missing = [item for item in ordered if item[2] and item[2] not in store.workloads]
        if len(missing) < PARALLEL_COMPILE_WORKLOADS:
            return None
        # The child also derives what ``assemble_fleet`` needs of its workloads (which the
        # loader would otherwise do after both halves) and pickles them, and a forked child
        # pays for the pages it touches: a little less than half is even.
        half = missing[len(missing) - len(missing) * 9 // 20 :]
        pending = in_child(lambda: _compile_for_store(half, store, compile_one, kernel))
        return None if pending is None else cls(pending, {item[0] for item in half}, store)

    def take(self, name: str, key: str) -> Workload | None:
        """Workload ``name`` as the child compiled it under ``key``, or None (compile it)."""
        if name not in self.names:
            return None
        if self.learnt is None:
            self.learnt = {}
            result = self.pending.result()
            if result is not None:
                compiled, digests = result
                try:
                    # Our own forked child's bytes, through a pipe only it writes: pickle
                    # (C both ways) here, never for the cache file. The file's encoding is
                    # done by the child process that writes it (``CompileCache.save``).
                    learnt = pickle.loads(compiled)
                except Exception:  # a child cut short: compile its half here
                    learnt = []
                self.learnt = {name: (key, expansion) for name, key, expansion in learnt}
                for tree, digest in digests:
                    self.store.remember_digest(tree, digest)
        found = self.learnt.pop(name, None)
        if found is None or found[0] != key:
            return None
        workload = found[1][0]
        if not isinstance(workload, Workload) or workload.name != name:
            return None
        self.store.remember_workload(key, workload)
        # ``_assemble`` finds it as a derivation of this process's (``assemble_fleet`` still
        # checks it is this workload's, with the kernel it boots).
        self.store.expanded[id(workload)] = found[1]
        return workload

    def close(self) -> None:
        self.pending.close()


def _compile_for_store(
    items: Sequence[tuple[str, Document, str | None]],
    store: CompileCache,
    compile_one: Callable[..., Workload | None],
    kernel: str | None,
) -> tuple[bytes, list[tuple[str, str]]]:
    """In a child process: ``(name, key, expansion)`` of each workload of ``items`` that
    compiles without a problem and could be kept in the cache (the expansion: the workload and
    what ``assemble_fleet`` derives of it with the fleet's ``kernel``), pickled, and the source
    digests learnt on the way."""
    known = set(store.trees)
    compiled = []
    for name, document, key in items:
        problems: list[str] = []
        workload = compile_one(document, report=lambda *_, seen=problems: seen.append(""))
        if workload is not None and not problems and key and cacheable(workload):
            boots = workload.deploy.kernel or kernel
            compiled.append((name, key, expand_workload(workload, boots)))
    digests = [(tree, digest) for tree, digest in store.trees.items() if tree not in known]
    return pickle.dumps(compiled, protocol=pickle.HIGHEST_PROTOCOL), digests


def _assemble(
    revision: str | None,
    settings: FleetSettings,
    workloads: dict[str, Workload],
    keys: Mapping[str, str],
    store: CompileCache,
) -> DesiredFleet:
    """``assemble_fleet`` with what the cache knows: each workload's derivations (artifacts,
    settings) as this process last made them, else as the cache file kept them by content key
    (``keys``: name -> key), else made now, and kept both ways for the next load."""
    expanded = store.expanded
    for name, workload in workloads.items():
        key = keys.get(name)
        if key is not None and id(workload) not in expanded:
            kept = store.expansion(key, workload, workload.deploy.kernel or settings.kernel)
            if kept is not None:
                expanded[id(workload)] = kept
    fleet = assemble_fleet(revision, settings, workloads, expanded=expanded)
    for name, key in keys.items():
        made = expanded.get(id(workloads[name])) if name in workloads else None
        if made is not None:
            store.remember_expansion(key, made)
    # Workload objects reused from the last load keep their VMs' settings and artifacts; only
    # this load's are kept for the next (bounded by the fleet, not by history).
    store.expanded = {id(w): expanded[id(w)] for w in workloads.values() if id(w) in expanded}
    return fleet
