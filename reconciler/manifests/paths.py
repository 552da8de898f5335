"""Finding manifest files and source trees inside one revision, and never leaving it.

Every path a manifest names, and every symlink met on the way, is resolved and refused when it
leaves the revision's root. Nothing outside the root is ever read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reconciler.errors import Problem
from reconciler.manifests.limits import Limits

MANIFEST_SUFFIXES = (".yaml", ".yml", ".yaml.j2")


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it, lexically (resolve first to follow links)."""
    # Strings, not ``root in path.parents``: this runs for every file of a revision.
    here, top = str(path), str(root)
    return here == top or here.startswith(top if top.endswith("/") else top + "/")


def resolved(path: Path) -> Path | None:
    """``path`` with every symlink resolved; ``None`` for a symlink loop, which resolves to
    nothing (pathlib raises for one: a commit holding ``a -> a`` must be a problem reported,
    not a crash)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (``.`` for the root itself), or whole when not below it."""
    here, top = str(path), str(root)
    if here == top:
        return "."
    prefix = top if top.endswith("/") else top + "/"
    return here[len(prefix) :] if here.startswith(prefix) else path.as_posix()


@dataclass
class ManifestFiles:
    files: list[Path] = field(default_factory=list)  # resolved, inside the root
    problems: list[Problem] = field(default_factory=list)


def find_manifests(root: Path, fleet_dir: Path, limits: Limits) -> ManifestFiles:
    """Manifest files under ``fleet_dir`` in a stable order, plus escaping-symlink problems."""
    found = ManifestFiles()
    total = 0
    for directory, dirnames, filenames in os.walk(fleet_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(directory)
        filenames.sort()
        # One ``lstat`` per file: a directory os.walk enters is no symlink (it does not follow
        # them), so a file that is not one itself is where it is, inside the root.
        modes: dict[str, os.stat_result | None] = {}
        for name in [*dirnames, *filenames]:
            path = here / name
            try:
                info: os.stat_result | None = os.lstat(path)
            except OSError:
                info = None
            modes[name] = info
            if info is None or not stat.S_ISLNK(info.st_mode):
                continue
            target = resolved(path)
            if target is None:
                found.problems.append(
                    Problem(relative(path, root), 0, "", "symlink loop; refusing it")
                )
            elif not is_inside(target, root):
                found.problems.append(
                    Problem(
                        relative(path, root),
                        0,
                        "",
                        f"symlink to {os.readlink(path)} leaves the repository; refusing it",
                    )
                )
        for name in filenames:
            if not name.endswith(MANIFEST_SUFFIXES) or name.startswith("."):
                continue
            info = modes.get(name)
            if info is None:
                continue  # gone since os.walk listed it
            if stat.S_ISLNK(info.st_mode):
                real = resolved(here / name)
                if real is None or not is_inside(real, root) or not real.is_file():
                    continue  # reported above, or a dangling link
                size = real.stat().st_size
            elif stat.S_ISREG(info.st_mode):
                size = info.st_size
            else:
                continue  # a FIFO or a device node is no manifest
            rel = relative(here / name, root)
            if size > limits.max_file_bytes:
                found.problems.append(
                    Problem(
                        rel,
                        0,
                        "",
                        f"file is {size} bytes, over the limit of {limits.max_file_bytes}",
                    )
                )
                continue
            total += size
            found.files.append(here / name)
    if len(found.files) > limits.max_files:
        found.problems.append(
            Problem(
                relative(fleet_dir, root) or ".",
                0,
                "",
                f"{len(found.files)} manifest files, over the limit of {limits.max_files}",
            )
        )
    if total > limits.max_total_bytes:
        found.problems.append(
            Problem(
                relative(fleet_dir, root) or ".",
                0,
                "",
                f"manifests total {total} bytes, over the limit of {limits.max_total_bytes}",
            )
        )
    return found


class KnownDigests(Protocol):
    """Source digests by Git tree id, kept across revisions (``compile_cache.CompileCache``)."""

    def digest(self, tree: str) -> str | None: ...

    def remember_digest(self, tree: str, digest: str) -> None: ...


class ListedTrees(Protocol):
    """The directories Git lists in a revision (``compile_cache.TreeIndex``)."""

    def source_tree(self, fleet_rel: str, declared: str) -> tuple[str, str] | None: ...


class SourceTrees:
    """Resolves workload source directories and digests their content, once per directory.

    With ``tree_ids`` (relative path -> Git tree id of the revision's directories that hold no
    symlink) and ``known``, a directory whose tree was digested before, in any revision, is not
    read again: equal tree ids mean equal content.

    With ``listed`` (the same listing), a source path whose every step Git lists as a directory
    and below which Git lists no symlink is resolved without asking the file system about each
    step: there is no link on the way to resolve, so the lexical path is the real one (and the
    same holds for the entrypoint inside it). It must still exist as a directory on disk."""

    def __init__(
        self,
        root: Path,
        *,
        tree_ids: Mapping[str, str] | None = None,
        known: KnownDigests | None = None,
        listed: ListedTrees | None = None,
    ) -> None:
        self.root = root
        self._digests: dict[Path, tuple[str, list[str]]] = {}
        self._tree_ids = tree_ids or {}
        self._known = known
        self._listed = listed
        self._fleet_rels: dict[Path, str] = {}
        self._plain: dict[str, str] = {}  # resolved directory -> its path relative to the root

    def resolve(self, fleet_dir: Path, declared: str) -> Path | str:
        """The resolved directory, or a message saying why it is refused."""
        if os.path.isabs(declared):
            return f"source path {declared!r} must be relative to the fleet directory"
        root = str(self.root)
        if self._listed is not None:
            fleet_rel = self._fleet_rels.get(fleet_dir)
            if fleet_rel is None:
                fleet_rel = self._fleet_rels[fleet_dir] = relative(fleet_dir, self.root)
            found = self._listed.source_tree("" if fleet_rel == "." else fleet_rel, declared)
            if found is not None:
                lexical = os.path.join(root, found[0])
                if os.path.isdir(lexical):
                    self._plain[lexical] = found[0]
                    return Path(lexical)
        # os.path rather than pathlib: this runs once per workload of fleets of thousands.
        real = os.path.realpath(os.path.join(fleet_dir, declared))
        if real != root and not real.startswith(root + os.sep):
            return f"source path {declared!r} leaves the repository; refusing it"
        if not os.path.isdir(real):
            return f"source path {declared!r} is not a directory in this revision"
        return Path(real)

    def inside(self, directory: Path, name: str) -> str:
        """The real path of ``name`` relative to ``directory`` (a result of ``resolve``)."""
        joined = os.path.join(directory, name)
        if str(directory) in self._plain:
            return os.path.normpath(joined)  # no symlink in or below it (see the class)
        return os.path.realpath(joined)

    def relative(self, directory: Path) -> str:
        """``directory`` (a result of ``resolve``) relative to the root."""
        known = self._plain.get(str(directory))
        return known if known is not None else relative(directory, self.root)

    def digest(self, directory: Path) -> tuple[str, list[str]]:
        """``sha256:`` of the tree (relative paths, kinds, exec bits, contents) and the
        messages of symlinks inside it that leave the repository."""
        known = self._digests.get(directory)
        if known is not None:
            return known
        tree = self._tree_ids.get(self.relative(directory)) if self._known else None
        if tree is not None and self._known is not None:
            digest = self._known.digest(tree)
            if digest is not None:
                self._digests[directory] = (digest, [])
                return digest, []
        hasher = hashlib.sha256()
        escapes: list[str] = []
        # Depth first, each directory's entries in name order before its subdirectories, in
        # name order too (what ``os.walk`` top-down gives; one ``scandir`` and one ``lstat``
        # per entry, since this runs for every source tree of a first load). Symlinks are
        # hashed as links and never followed.
        pending: list[tuple[str, str]] = [(str(directory), "")]
        while pending:
            current, prefix = pending.pop()
            try:
                with os.scandir(current) as listing:
                    entries = sorted(listing, key=_name)
            except OSError:
                continue  # as os.walk: a directory that cannot be listed adds nothing
            below: list[tuple[str, str]] = []
            for entry in entries:
                rel = prefix + entry.name
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    link = os.readlink(entry.path)
                    target = resolved(Path(entry.path))
                    if target is None:
                        escapes.append(f"symlink {rel} -> {link} is a loop")
                    elif not is_inside(target, self.root):
                        escapes.append(f"symlink {rel} -> {link} leaves the repository")
                    hasher.update(f"L {rel}\0{link}\0".encode())
                elif stat.S_ISREG(info.st_mode):
                    executable = "x" if info.st_mode & 0o111 else "-"
                    hasher.update(f"F {rel} {executable}\0".encode())
                    with open(entry.path, "rb") as content:
                        hasher.update(hashlib.sha256(content.read()).digest())
                elif stat.S_ISDIR(info.st_mode):
                    hasher.update(f"D {rel}\0".encode())
                    below.append((entry.path, rel + "/"))
            pending.extend(reversed(below))
        result = ("sha256:" + hasher.hexdigest(), escapes)
        self._digests[directory] = result
        if tree is not None and self._known is not None and not escapes:
            self._known.remember_digest(tree, result[0])
        return result


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name
