"""Work the loader need not repeat: parsed files, source digests and compiled workloads.

    GitSource.tree_entries ──▶ TreeIndex (tree id of every symlink-free directory)
    load_fleet ──▶ CompileCache ──▶ parsed documents by text digest (schema-valid ones marked)
                                └─▶ source digest by Git tree id
                                └─▶ compiled Workload by content key ──▶ assemble_fleet
                                └─▶ its artifacts and VMs' settings, by the same key

Comparing two revisions, or loading each commit the daemon sees, mostly meets workloads that
did not change: the same document (content-addressed by the digest of its file's text) and the
same source tree (named by its Git tree id, which Git computed already). Such a workload is
compiled once, and its source tree hashed once, whatever the number of revisions.

A workload is reused only when every input of ``compile_workload`` is in its key: the text
digest and position of its document, the file it is declared in, the Fleet's deploy defaults,
the fleet directory, the source directory and its tree id, and the compiler's own version
(a digest of the modules and schemas that decide the output). A source directory is keyed only
when reaching it crosses no symlink and nothing below it is a symlink or a submodule: what a
symlink means depends on what lies outside the tree, so those workloads are compiled every time.
Workloads with secrets are never cached: their references depend on the decrypted files.

A whole revision is kept too, keyed by its commit (which names its whole tree), the fleet path
and the limits: its fleet settings and the content keys of its workloads. Loading it again
decodes those and reads no file of the checkout (a pull request's diff run again, the daemon
meeting a commit it loaded before). Only a revision whose load depended on nothing but its
commit is kept: no symlink or submodule anywhere in it, no template, no secret, every workload
keyed.

The cache persists in one file of the state directory (``save``/``open``), private like the
rest of it: a magic, the SHA-256 of the payload, the payload (``marshal`` of plain data, never
pickle). A file that is truncated, altered or from another compiler version is ignored as a
whole, and an entry that does not decode is dropped: either way the workload is compiled again,
never trusted. The file holds at most ``MAX_ENTRIES`` of each kind, the most recently used.
Without a writable state directory it is simply not written: the loader works the same.
A large cache may be written by a detached process while this one goes on and exits
(``save(background=True)``, what ``pipeline.plan_between`` asks for): the command's answer does
not wait for a file that only the next run reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import marshal
import operator
import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from reconciler import model
from reconciler.manifests.parallel import Pending, detached
from reconciler.manifests.schema import KIND_FILES, SCHEMA_DIR
from reconciler.model import Expansion, Workload

log = logging.getLogger("reconciler.manifests")

CACHE_FILE = "compile-cache"
MAGIC = b"reconciler-compile-cache-2\n"
MAX_ENTRIES = 50_000
BACKGROUND_SAVE_WORKLOADS = 2_000
"""Workloads in the cache from which ``save(background=True)`` writes in a child process."""
"""Of each kind (files, trees, workloads): a fleet of tens of thousands of workloads keeps its
own entries, a repository that churns does not grow the file without bound."""
_TREE_MODE = "040000"
_INPUTS = (
    "compile.py",
    "loader.py",
    "paths.py",
    "schema.py",
    "yaml_loader.py",
    "compile_cache.py",
    "../model.py",
    "../guest_values.py",
    "../build_flags.py",
)


@cache
def compiler_version() -> str:
    """A digest of everything that decides what a document compiles to: these modules and the
    schemas. A changed reconciler never reuses an older one's work."""
    here = Path(__file__).resolve().parent
    hasher = hashlib.sha256()
    for name in (*_INPUTS, *(str(SCHEMA_DIR / f) for f in sorted(KIND_FILES.values()))):
        path = here / name
        try:
            hasher.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError:
            hasher.update(f"{name} missing".encode())
    return hasher.hexdigest()


def text_key(text: str) -> str:
    """The content address of a manifest file's text (what ``ParseCache`` keys on too)."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class TreeIndex:
    """The directories of one revision whose content Git names by a tree id.

    ``plain`` maps a path (relative to the revision root) to its tree id when neither it nor
    anything below it is a symlink or a submodule; ``directories`` holds every directory."""

    plain: Mapping[str, str]
    directories: frozenset[str]
    linked: bool = True
    """Whether the revision holds any symlink or submodule anywhere (``True`` when unknown)."""

    @classmethod
    def from_entries(cls, entries: Mapping[str, tuple[str, str]]) -> TreeIndex:
        """From ``Source.tree_entries``: path -> (mode, object id) of non-file entries."""
        directories = {path for path, (mode, _) in entries.items() if mode == _TREE_MODE}
        tainted: set[str] = set()
        for path, (mode, _) in entries.items():
            if mode == _TREE_MODE:
                continue
            parent = posixpath.dirname(path)
            while parent and parent not in tainted:
                tainted.add(parent)
                parent = posixpath.dirname(parent)
        plain = {
            path: object_id
            for path, (mode, object_id) in entries.items()
            if mode == _TREE_MODE and path not in tainted
        }
        linked = any(mode != _TREE_MODE for mode, _ in entries.values())
        return cls(plain, frozenset(directories), linked)

    def source_tree(self, fleet_rel: str, declared: str) -> tuple[str, str] | None:
        """(path relative to the root, tree id) of the source directory ``declared`` (relative
        to the fleet directory ``fleet_rel``), when resolving it crosses only real directories
        and its content has no symlink; ``None``: resolve it on disk and do not key it."""
        if posixpath.isabs(declared):
            return None
        parts: list[str] = fleet_rel.split("/") if fleet_rel else []
        for step in declared.split("/"):
            if step in ("", "."):
                continue
            if step == "..":
                if not parts:
                    return None  # leaves the repository: the loader says so
                parts.pop()
                continue
            parts.append(step)
            # A path Git lists as a tree is a directory on every step of the way: no symlink
            # can stand in for it, so ".." after it means what it says.
            if "/".join(parts) not in self.directories:
                return None
        rel = "/".join(parts)
        tree = self.plain.get(rel)
        return None if tree is None else (rel, tree)


@dataclass
class CompileCache:
    """Parsed files, source digests and compiled workloads, shared by every load of a process
    and, with ``path``, across processes (see the module docstring)."""

    path: Path | None = None
    files: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """text digest and node limit -> ((index, line, content), ...) of a file whose documents
    are all plain data, and the indexes of those that passed their schema."""
    trees: dict[str, str] = field(default_factory=dict)
    """Git tree id -> the ``sha256:`` source digest of that tree (``SourceTrees.digest``)."""
    workloads: dict[str, Any] = field(default_factory=dict)
    """content key -> compiled workload; as read from the file (plain data) until first used."""
    expanded: dict[int, Expansion] = field(default_factory=dict)
    """What ``assemble_fleet`` derived from the workloads of the last load (memory only)."""
    encoded: dict[str, Any] = field(default_factory=dict)
    """content key -> the plain data a workload was decoded from: saved again as it was read."""
    revisions: dict[str, Any] = field(default_factory=dict)
    """revision key (``revision_key``) -> (the encoded ``FleetSettings``, ((workload name,
    content key), ...)) of a whole revision that loaded without problems, symlinks, templates
    or secrets: loading it again decodes these and reads no file."""
    expansions: dict[str, Any] = field(default_factory=dict)
    """content key -> what ``assemble_fleet`` derived from that workload (``Expansion``: its
    artifacts and VMs' settings) in plain data (``remember_expansion``), with the kernel it was
    derived for: a revision decoded from the cache is not derived again."""
    changed: bool = False
    _saving: list[Pending] = field(default_factory=list, repr=False, compare=False)
    hits: int = 0
    """Workloads served without compiling, since the cache was made (for logs and tests)."""

    @classmethod
    def open(cls, path: Path | None) -> CompileCache:
        """The cache saved at ``path``; empty when there is none or it cannot be trusted."""
        loaded = cls(path)
        if path is not None:
            loaded._read(path)
        return loaded

    def _read(self, path: Path) -> None:
        try:
            with open(path, "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.debug("compile cache %s not read: %s", path, exc)
            return
        head, digest, payload = data[: len(MAGIC)], data[len(MAGIC) : len(MAGIC) + 32], b""
        payload = data[len(MAGIC) + 32 :]
        if head != MAGIC or hashlib.sha256(payload).digest() != digest:
            log.warning("the compile cache %s is damaged; compiling everything again", path)
            return
        try:
            version, files, trees, workloads, revisions, expansions = marshal.loads(payload)
        except (ValueError, EOFError, TypeError):
            log.warning("the compile cache %s does not decode; compiling everything again", path)
            return
        if version != compiler_version():
            return  # another reconciler wrote it
        if isinstance(files, dict):
            self.files = files
        if isinstance(trees, dict):
            self.trees = trees
        if isinstance(workloads, dict):
            self.workloads = workloads  # decoded when used: a run touches what it loads
        if isinstance(revisions, dict):
            self.revisions = revisions
        if isinstance(expansions, dict):
            self.expansions = expansions

    def save(self, *, background: bool = False) -> None:
        """Write the cache (atomically, mode 0600) when it learnt something; a state directory
        that cannot be written only costs the next run its reuse.

        ``background``: a large cache (a first load of thousands of workloads: encoding and
        writing them takes most of a second) is written by a detached process (``parallel``)
        while this one goes on making and rendering its plan, and exits without waiting for it:
        a run that starts before the file is replaced finds the previous one. ``wait`` (and the
        next ``save``) waits for it."""
        for entries in (
            self.files,
            self.trees,
            self.workloads,
            self.revisions,
            self.expansions,
        ):
            for key in list(entries)[: max(0, len(entries) - MAX_ENTRIES)]:
                del entries[key]  # the least recently used first
        self.wait()  # an older write still under way must not land after this one
        if self.path is None or not self.changed:
            return
        path = self.path
        if background and len(self.workloads) >= BACKGROUND_SAVE_WORKLOADS:
            pending = detached(lambda: self._write(path))
            if pending is not None:
                self.changed = False
                self._saving.append(pending)
                return
        self._write(path)

    def wait(self) -> None:
        """Wait for the writes ``save(background=True)`` left to a child process."""
        if self._saving:
            while self._saving:
                self._saving.pop().result()

    def _write(self, path: Path) -> None:
        workloads = {}
        for key, value in self.workloads.items():
            encoded = value
            if isinstance(value, Workload):
                encoded = self.encoded.get(key)
                if encoded is None and cacheable(value):
                    encoded = _encode(value)
            if encoded is not None:
                workloads[key] = encoded
        contents = (
            compiler_version(),
            self.files,
            self.trees,
            workloads,
            self.revisions,
            self.expansions,
        )
        try:
            payload = marshal.dumps(contents)
        except ValueError:
            # Some workload holds a value that is not plain data: checked one by one only
            # then (one ``marshal`` of the whole is much cheaper than one per workload).
            workloads = {k: v for k, v in workloads.items() if _plain(v)}
            expansions = {k: v for k, v in self.expansions.items() if _plain(v)}
            payload = marshal.dumps((*contents[:3], workloads, self.revisions, expansions))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _remove_abandoned(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("compile cache %s not written: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self.changed = False

    # -- the loader's side ------------------------------------------------------------------

    def documents(self, key: str) -> tuple[Any, ...] | None:
        entry = self.files.get(key)
        if entry is not None:
            self.files[key] = self.files.pop(key)  # most recently used last
        return entry

    def remember_documents(self, key: str, documents: Any, validated: Iterable[int]) -> None:
        entry = (tuple((d.index, d.line, d.content) for d in documents), tuple(sorted(validated)))
        if self.files.get(key) == entry:
            return
        try:
            marshal.dumps(entry)  # plain data only: a YAML timestamp or set is parsed again
        except ValueError:
            return
        self.files[key] = entry
        self.changed = True

    def keep_documents(self, key: str, entry: tuple[Any, ...]) -> None:
        """Keep ``entry`` as ``documents`` returned it, or as a child process made it
        (``loader.ParseCache.prefetch``): plain data already."""
        if self.files.get(key) is not entry:
            self.files[key] = entry
            self.changed = True

    def digest(self, tree: str) -> str | None:
        return self.trees.get(tree)

    def remember_digest(self, tree: str, digest: str) -> None:
        if self.trees.get(tree) != digest:
            self.trees[tree] = digest
            self.changed = True

    def workload(self, key: str) -> Workload | None:
        found = self.workloads.pop(key, None)
        if found is None:
            return None
        if not isinstance(found, Workload):
            decoded = decode_workload(found)
            if decoded is None:
                self.changed = True  # a bad entry: dropped, and compiled again
                return None
            self.encoded[key] = found
            found = decoded
        self.workloads[key] = found
        self.hits += 1
        return found

    def remember_workload(self, key: str, workload: Workload, *, encoded: Any = None) -> None:
        """Keep ``workload`` under ``key``; ``encoded``: its plain data, when known already
        (``encode_workload``), so ``save`` need not encode it again."""
        if not cacheable(workload):
            return
        self.workloads[key] = workload
        if encoded is None:
            self.encoded.pop(key, None)
        else:
            self.encoded[key] = encoded
        self.changed = True

    def revision(
        self, key: str
    ) -> tuple[model.FleetSettings, dict[str, Workload], dict[str, str]] | None:
        """The fleet settings, workloads and their content keys (by name) of a whole revision
        loaded before, or ``None`` when it was not, or any part of it no longer decodes or was
        evicted (load it again)."""
        entry = self.revisions.get(key)
        if entry is None:
            return None
        try:
            settings = _decode(entry[0])
            names = [(str(name), str(content)) for name, content in entry[1]]
        except (TypeError, ValueError, IndexError, KeyError):
            settings = None
        if not isinstance(settings, model.FleetSettings):
            del self.revisions[key]
            self.changed = True
            return None
        workloads: dict[str, Workload] = {}
        for name, content in names:
            found = self.workload(content)
            if found is None or found.name != name:
                return None
            workloads[name] = found
        self.revisions[key] = self.revisions.pop(key)  # most recently used last
        return settings, workloads, dict(names)

    def remember_revision(
        self, key: str, settings: model.FleetSettings, workloads: Mapping[str, str]
    ) -> None:
        """Remember a revision whose every workload is in the cache under ``workloads``
        (name -> content key)."""
        encoded = _encode(settings)
        try:
            marshal.dumps(encoded)
        except ValueError:
            return
        entry = (encoded, tuple(sorted(workloads.items())))
        if self.revisions.get(key) != entry:
            self.revisions[key] = entry
            self.changed = True

    def expansion(self, key: str, workload: Workload, kernel: str | None) -> Expansion | None:
        """What ``assemble_fleet`` derived from the workload under ``key`` with ``kernel``,
        when kept (``remember_expansion``) and it decodes; else None (derive it)."""
        found = self.expansions.get(key)
        if found is None:
            return None
        try:
            kept_kernel, deployed, settings, refs = found
            own = {
                model.Target(target): model.ArtifactRef(
                    workload.name, model.Target(target), str(digest), dict(inputs)
                )
                for target, digest, inputs in refs
            }
            deployed_ref = own.get(model.Target(deployed))
        except (TypeError, ValueError, KeyError):
            deployed_ref = None
        if deployed_ref is None or kept_kernel != kernel or not isinstance(settings, dict):
            del self.expansions[key]
            self.changed = True
            return None
        return workload, kernel, own, deployed_ref, settings

    def remember_expansion(self, key: str, expansion: Expansion) -> None:
        """Keep what ``assemble_fleet`` derived from the workload under ``key`` (``expansion``)
        for ``expansion`` to give back, as plain data."""
        _, kernel, own, deployed, settings = expansion
        if deployed.target not in own:
            return  # not built, so not keyable here (and a manifest error anyway)
        kept = self.expansions.get(key)
        if isinstance(kept, tuple) and kept and kept[0] == kernel:
            return
        refs = tuple((t.value, ref.input_digest, ref.inputs) for t, ref in own.items())
        self.expansions[key] = (kernel, deployed.target.value, settings, refs)
        self.changed = True


def revision_key(*parts: str) -> str:
    """The key of a whole revision's load: the commit (which names its whole tree), the fleet
    path and the limits, under the compiler's version."""
    return workload_key("revision", *parts)


def workload_key(*parts: str) -> str:
    """The key of a compiled workload: the compiler's version and every input (see the module
    docstring), each part length-prefixed so that no two lists of parts collide."""
    hasher = hashlib.sha256(compiler_version().encode())
    for part in parts:
        data = part.encode()
        hasher.update(len(data).to_bytes(8, "big") + data)
    return hasher.hexdigest()


# -- Workload <-> plain data (marshal) --------------------------------------------------------
#
# Generic over the model's dataclasses and enums, so that a field added to a ``Workload`` is
# kept without touching this module (and, since ``model.py`` is an input of
# ``compiler_version``, a changed model never reads an older file). Tuples only ever come from
# the model (YAML gives lists), so they carry the tags: ``(_DATACLASS, name, fields)``,
# ``(_ENUM, name, value)``, ``(_TUPLE, items)``.

_DATACLASS, _ENUM, _TUPLE = "\0dataclass", "\0enum", "\0tuple"
_MODEL_TYPES: dict[str, type] = {
    name: value
    for name, value in vars(model).items()
    if isinstance(value, type)
    and value.__module__ == model.__name__
    and (dataclasses.is_dataclass(value) or issubclass(value, Enum))
}


_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))
    for cls in _MODEL_TYPES.values()
    if dataclasses.is_dataclass(cls)
}
_GETTERS: dict[type, Any] = {
    cls: (lambda value, get=operator.attrgetter(*names): get(value))
    if len(names) > 1
    else (lambda value, name=names[0]: (getattr(value, name),))
    for cls, names in _FIELDS.items()
    if names
}
_PLAIN = frozenset({str, int, float, bool, type(None)})
_new = object.__new__
_CONTAINERS = frozenset({tuple, dict, list})
# Dispatch on the exact type, and leaves (most values) without a call: ten thousand workloads
# are some half a million values each way.


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    get = _GETTERS.get(kind)
    if get is not None:
        fields = [v if type(v) in _PLAIN else _encode(v) for v in get(value)]
        return (_DATACLASS, kind.__name__, tuple(fields))
    if kind in _FIELDS:
        return (_DATACLASS, kind.__name__, ())
    if isinstance(value, Enum):
        return (_ENUM, kind.__name__, value.value)
    if kind is tuple:
        return (_TUPLE, tuple([v if type(v) in _PLAIN else _encode(v) for v in value]))
    if isinstance(value, Mapping):
        return {k: v if type(v) in _PLAIN else _encode(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _PLAIN else _encode(v) for v in value]
    return value  # not plain data: ``marshal`` refuses it and the workload is not saved


def _decode(value: Any) -> Any:
    kind = type(value)
    if kind is tuple:
        tag = value[0]
        if tag == _TUPLE:
            return tuple([_decode(v) if type(v) in _CONTAINERS else v for v in value[1]])
        cls = _MODEL_TYPES[value[1]]  # KeyError: not ours, the entry is dropped
        names = _FIELDS.get(cls)
        if tag == _DATACLASS and names is not None:
            # What the frozen dataclass's ``__init__`` does (none of the model's has more to
            # do), without a guarded ``__setattr__`` per field: half a million values. A
            # wrong number of fields raises ValueError (``strict``): the entry is dropped.
            fields = [_decode(v) if type(v) in _CONTAINERS else v for v in value[2]]
            decoded: Any = _new(cls)
            decoded.__dict__.update(zip(names, fields, strict=True))
            return decoded
        if tag == _ENUM and issubclass(cls, Enum):
            return cls._value2member_map_[value[2]]  # KeyError: not one of its values
        raise ValueError(f"unknown tag {tag!r}")
    if kind is dict:
        return {k: _decode(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if kind is list:
        return [_decode(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def _plain(encoded: Any) -> bool:
    try:
        marshal.dumps(encoded)
    except ValueError:
        return False
    return True


def cacheable(workload: Workload) -> bool:
    """Whether the cache keeps ``workload``: never one with secrets, whose references depend
    on the decrypted files rather than on its key."""
    return not (workload.deploy.secret_env or workload.deploy.secret_files)


def encode_workload(workload: Workload) -> Any | None:
    """``workload`` as plain data, or ``None`` when some value is not (it is not saved)."""
    if not cacheable(workload):
        return None
    encoded = _encode(workload)
    return encoded if _plain(encoded) else None


def decode_workload(encoded: Any) -> Workload | None:
    """The workload ``encode_workload`` wrote, or ``None`` for anything else."""
    try:
        decoded = _decode(encoded)
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return decoded if isinstance(decoded, Workload) else None


def _remove_abandoned(path: Path) -> None:
    """Remove the temporary files of writers of ``path`` that died before renaming theirs (a
    detached write cut short when the CI job that started it ended): each is named after its
    writer's process id, and one whose process is gone is never finished."""
    prefix = f".{path.name}."
    for stray in path.parent.glob(f"{prefix}*.tmp"):
        pid = stray.name[len(prefix) : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                stray.unlink()
        except OSError:  # alive under another user, or no such pid at all
            continue
