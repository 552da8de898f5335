"""The uncommitted working tree of a local fleet checkout, served as one more revision.

    reconciler diff --worktree [--base REV]
    WorktreeSource(GitSource) ──resolve(WORKTREE)──▶ "" ──checkout──▶ <cache>/worktrees/<id>/

An author sees the plan of what they are editing before committing it. What counts is what the
next ``git add -A && git commit`` would record: tracked files as they are on disk (deleted ones
are gone), and untracked files that no ``.gitignore`` excludes. The files are packed into a tar
exactly as ``git archive`` packs a commit, and unpacked by the same ``export.extract_tree``, so
the manifest loader applies the same rules as to a commit: symlinks are kept as symlinks and
judged there (one out of the tree is refused), only regular files, directories and symlinks
exist, and the result is read-only. Files are opened with ``O_NOFOLLOW`` and checked after
opening, so a file swapped for a symlink while it is packed is refused rather than followed.
Submodules (a directory where git records a commit) are skipped, as ``git archive`` does.

The revision of the working tree is the empty string: plans and renderings show it as
"working tree". It is never signed, so a source with trusted keys does not offer it, and it
has no Git tree ids, so ``WorktreeSource`` deliberately lists none (``tree_entries``): the
compile cache must not reuse a workload by the id of a tree the edits may have changed.
"""

from __future__ import annotations

import os
import secrets
import stat
import tarfile
import tempfile
import time
from pathlib import Path

from reconciler.errors import SourceError
from reconciler.source.export import extract_tree, remove_tree
from reconciler.source.git import GitCommandError, Source, run_git

WORKTREE = ":worktree"
"""The revision name that selects the working tree (``:`` starts no ref or SHA)."""
WORKTREE_REVISION = ""
_STALE_SECONDS = 24 * 3600  # exports a killed command left behind


class WorktreeSource:
    """A ``Source`` that serves ``WORKTREE`` from the working tree of a local repository and
    every other revision from ``inner``. ``close`` removes what it exported."""

    def __init__(self, inner: Source, cache_dir: Path) -> None:
        if inner.remote:
            raise SourceError(
                "--worktree needs a local checkout: pass --repo PATH of a clone, not a URL"
            )
        self.inner = inner
        self.cache_dir = cache_dir
        self._exported: list[Path] = []
        self._root: Path | None = None

    # Source -------------------------------------------------------------------------------

    @property
    def remote(self) -> bool:
        return False

    @property
    def repo_path(self) -> Path:
        return self.inner.repo_path

    def resolve(self, rev: str | None = None) -> str:
        if rev in (WORKTREE, WORKTREE_REVISION):
            return WORKTREE_REVISION
        return self.inner.resolve(rev)

    def checkout(self, rev: str) -> Path:
        if rev not in (WORKTREE, WORKTREE_REVISION):
            return self.inner.checkout(rev)
        if self._root is None:
            self._root = self._export()
        return self._root

    def fetch(self) -> None:
        self.inner.fetch()

    def describe(self) -> str:
        return f"the working tree of {self.inner.describe()}"

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self.inner.is_ancestor(ancestor, descendant)

    def changed_paths(self, base: str, head: str) -> list[str]:
        return self.inner.changed_paths(base, head)

    def close(self) -> None:
        for path in self._exported:
            remove_tree(path)
        self._exported.clear()
        self._root = None

    # --------------------------------------------------------------------------------------

    def _export(self) -> Path:
        top, names = _worktree_files(self.inner.repo_path)
        parent = self.cache_dir / "worktrees"
        _prune_stale(parent)
        destination = parent / f"{os.getpid()}-{secrets.token_hex(6)}"
        with tempfile.TemporaryFile() as packed:
            with tarfile.open(fileobj=packed, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for name in names:
                    _add(archive, top, name)
            packed.seek(0)
            extract_tree(packed, destination)
        self._exported.append(destination)
        return destination


def _worktree_files(repo_path: Path) -> tuple[Path, list[str]]:
    """The top of the working tree and the files a commit of everything would hold."""
    where = ["-C", str(repo_path)]
    try:
        answer = run_git([*where, "rev-parse", "--is-bare-repository", "--show-prefix"])
    except GitCommandError as exc:
        raise SourceError(f"{repo_path} is not a git repository") from exc
    bare, _, prefix = answer.partition("\n")
    if prefix.strip():  # a sub-directory of a repository, not the repository
        raise SourceError(f"{repo_path} is not a git repository")
    if bare.strip() == "true":
        raise SourceError(f"{repo_path} is a bare repository: it has no working tree")
    try:
        top = Path(run_git([*where, "rev-parse", "--show-toplevel"]).strip())
        listed = run_git(
            ["-C", str(top), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        )
    except GitCommandError as exc:
        raise SourceError(f"cannot list the working tree of {repo_path}: {exc.stderr}") from exc
    # An unmerged path is listed once per stage; the working tree holds it once.
    return top, sorted({name for name in listed.split("\0") if name})


def _add(archive: tarfile.TarFile, top: Path, name: str) -> None:
    path = top / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return  # deleted in the working tree: the next commit drops it
    entry = tarfile.TarInfo(name)
    entry.mtime = 0
    if stat.S_ISLNK(info.st_mode):
        entry.type = tarfile.SYMTYPE
        entry.linkname = os.readlink(path)  # kept as written; the manifest loader judges it
        archive.addfile(entry)
        return
    if not stat.S_ISREG(info.st_mode):
        return  # a submodule's directory, a fifo ...: nothing a commit would hold as a file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SourceError(f"cannot read {name} in the working tree: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if not stat.S_ISREG(opened.st_mode):
            raise SourceError(f"{name} changed while the working tree was read; try again")
        entry.size = opened.st_size
        entry.mode = 0o755 if opened.st_mode & stat.S_IXUSR else 0o644
        try:
            archive.addfile(entry, handle)
        except OSError as exc:  # shrank while read: tarfile finds fewer bytes than announced
            raise SourceError(f"{name} changed while the working tree was read; try again") from exc


def _prune_stale(parent: Path) -> None:
    """Remove exports left by commands that were killed: their process is gone (the name
    starts with its pid), or they are older than a day (a pid may be reused)."""
    if not parent.is_dir():
        return
    cutoff = time.time() - _STALE_SECONDS
    for old in parent.iterdir():
        try:
            if not _alive(old.name.split("-")[0]) or old.lstat().st_mtime < cutoff:
                remove_tree(old)
        except OSError:
            continue


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
