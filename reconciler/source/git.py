"""``GitSource``: a fleet repository, local or remote, read at any revision with GitPython.

A local path is read in place (no fetch, refs such as ``origin/main`` resolve as in the user's
clone). A URL is mirrored (``git clone --mirror``, then ``git fetch --prune``) under the cache
directory, so a fetch is incremental and a remote that goes away leaves the last fetched
revisions usable. Exported trees are cached per commit SHA under ``<cache>/trees/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import git

from reconciler.errors import SourceError
from reconciler.source.export import extract_tree, remove_tree

log = logging.getLogger("reconciler.source")

# Never ask for credentials on a terminal: the daemon has none, and CI would hang.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}
if "GIT_SSH_COMMAND" not in os.environ and "GIT_SSH" not in os.environ:
    # The same for ssh (passphrases, unknown host keys); an operator's own ssh command wins.
    GIT_ENV["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)
_SHA = re.compile(r"^[0-9a-f]{40}$")
KEEP_TREES = 32


class Source(Protocol):
    """Where fleet revisions come from. ``pipeline`` depends on this, never on git."""

    def resolve(self, rev: str | None = None) -> str:
        """The full 40-hex commit SHA of ``rev`` (a branch, tag, SHA, ``HEAD~1``,
        ``origin/main`` ...); ``None`` means the configured ref. Unknown: ``SourceError``."""
        ...

    def checkout(self, rev: str) -> Path:
        """A read-only directory holding exactly the whole tree of commit ``rev``, cached per
        SHA. Symlinks are kept as symlinks, never followed; the caller applies any sub-path."""
        ...

    def fetch(self) -> None:
        """Bring a remote's mirror up to date (nothing for a local repository); an unreachable
        remote raises ``SourceError`` and leaves the last fetch in place."""
        ...

    def describe(self) -> str:
        """``the remote URL`` or ``the repository at PATH``, for messages."""
        ...


def is_url(location: str) -> bool:
    """True for ``scheme://...`` and scp-like ``user@host:path``; anything else is a path."""
    return bool(_URL.match(location))


def _reason(exc: git.GitCommandError) -> str:
    """The last ``fatal:``/``error:`` line git printed: short enough for a one-line error."""
    stderr = str(exc.stderr or "").strip().strip("'").strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
    text = (fatal or lines or [f"git exited with {exc.status}"])[-1]
    return text.removeprefix("stderr: ").removeprefix("fatal: ").removeprefix("error: ")


class GitSource:
    """A ``Source`` over one git repository (see the module docstring)."""

    def __init__(
        self,
        location: str,
        *,
        ref: str | None = None,
        cache_dir: Path,
        fetch_timeout: float = 60.0,
    ) -> None:
        self.location = location
        self.ref = ref
        self.cache_dir = cache_dir
        self.fetch_timeout = fetch_timeout
        self.remote = is_url(location)
        if self.remote:
            key = hashlib.sha256(location.encode()).hexdigest()[:16]
            self.repo_path = cache_dir / "mirrors" / f"{key}.git"
        else:
            self.repo_path = Path(location).expanduser().resolve()
        self._repo: git.Repo | None = None

    def describe(self) -> str:
        return (
            f"the remote {self.location}" if self.remote else f"the repository at {self.location}"
        )

    @property
    def repo(self) -> git.Repo:
        if self._repo is None:
            self._repo = self._open()
        return self._repo

    def _open(self) -> git.Repo:
        if self.remote and not self.repo_path.exists():
            raise SourceError(
                f"{self.location} has never been fetched; check the URL and the network"
            )
        try:
            repo = git.Repo(self.repo_path)
        except git.NoSuchPathError as exc:
            raise SourceError(f"{self.location} does not exist; pass --repo PATH|URL") from exc
        except git.InvalidGitRepositoryError as exc:
            raise SourceError(
                f"{self.location} is not a git repository; pass --repo with the repository's "
                "top directory (and --path for a sub-directory)"
            ) from exc
        repo.git.update_environment(**GIT_ENV)
        return repo

    def fetch(self) -> None:
        """Bring the mirror of a remote up to date; a local repository needs no fetch.

        The first call clones a bare mirror (under a temporary name, renamed when complete);
        later calls fetch only what is new and prune deleted branches.
        """
        if not self.remote:
            return
        env = {**os.environ, **GIT_ENV}
        runner = git.Git()
        staging = self.repo_path.with_name(self.repo_path.name + ".tmp")
        try:
            if (self.repo_path / "HEAD").exists():
                log.info("fetching %s", self.location)
                runner.execute(
                    ["git", "-C", str(self.repo_path), "fetch", "--prune", "--quiet", "origin"],
                    kill_after_timeout=self.fetch_timeout,
                    env=env,
                )
            else:
                log.info("cloning %s", self.location)
                self.repo_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(staging, ignore_errors=True)  # left by a clone that was killed
                runner.execute(
                    ["git", "clone", "--mirror", "--quiet", "--", self.location, str(staging)],
                    kill_after_timeout=self.fetch_timeout,
                    env=env,
                )
                os.rename(staging, self.repo_path)
        except git.GitCommandError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = _reason(exc)
            # GitPython kills the command with SIGKILL when kill_after_timeout expires.
            if exc.status == -9 or "did not complete in" in str(exc):
                reason = f"no answer within {self.fetch_timeout:g} s"
            raise SourceError(
                f"cannot fetch {self.location}: {reason}; check the URL and network, "
                "or use the last fetched revision"
            ) from exc
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise SourceError(
                f"cannot write the mirror of {self.location} under {self.repo_path.parent}: "
                f"{exc.strerror}; check free space and permissions of the state directory"
            ) from exc
        self._repo = None  # reopen: refs and packs changed under the cached Repo

    def resolve(self, rev: str | None = None) -> str:
        wanted = rev or self.ref or "HEAD"
        candidates = [wanted]
        if self.remote and wanted.startswith("origin/"):
            # A mirror holds the remote's branches as local heads.
            candidates.append(wanted.removeprefix("origin/"))
        for candidate in candidates:
            try:
                sha = str(
                    self.repo.git.rev_parse(
                        "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}"
                    )
                ).strip()
            except git.GitCommandError:
                continue
            if _SHA.match(sha):
                return sha
        raise SourceError(
            f"unknown revision {wanted!r} in {self.describe()}; "
            "give a branch, tag or commit that exists"
        )

    def checkout(self, rev: str) -> Path:
        if not _SHA.match(rev):
            rev = self.resolve(rev)
        destination = self.cache_dir / "trees" / rev
        if destination.is_dir():
            os.utime(destination)  # recently used trees survive pruning
            return destination
        # A full SHA that is not in the repository fails here with a clear message, rather
        # than as an empty archive.
        rev = self.resolve(rev)
        try:
            process = self.repo.git.archive("--format=tar", rev, as_process=True)
        except git.GitCommandError as exc:
            raise SourceError(
                f"cannot export {rev[:12]} from {self.describe()}: {_reason(exc)}"
            ) from exc
        try:
            stream = process.proc.stdout
            if stream is None:
                raise SourceError(f"cannot export {rev[:12]} from {self.describe()}")
            extract_tree(stream, destination)
            process.wait()  # raises GitCommandError when git archive failed
        except git.GitCommandError as exc:
            remove_tree(destination)
            raise SourceError(
                f"cannot export {rev[:12]} from {self.describe()}: {_reason(exc)}"
            ) from exc
        except OSError as exc:
            raise SourceError(
                f"cannot write the checkout of {rev[:12]} under {destination.parent}: "
                f"{exc.strerror}; check free space and permissions of the state directory"
            ) from exc
        finally:
            if process.proc.poll() is None:  # extraction stopped early: do not leave git behind
                process.proc.kill()
                process.proc.wait()
        self._prune_trees()
        return destination

    def _prune_trees(self) -> None:
        trees = [p for p in (self.cache_dir / "trees").iterdir() if _SHA.match(p.name)]
        if len(trees) <= KEEP_TREES:
            return
        trees.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in trees[KEEP_TREES:]:
            remove_tree(old)

    def changed_paths(self, base: str, head: str) -> list[str]:
        """Paths that differ between two revisions (for logs)."""
        try:
            out = str(self.repo.git.diff("--name-only", base, head))
        except git.GitCommandError as exc:
            raise SourceError(f"cannot compare {base} and {head}: {_reason(exc)}") from exc
        return [line for line in out.splitlines() if line]


def open_source(
    location: str,
    *,
    ref: str | None,
    cache_dir: Path,
    fetch: bool = True,
    fetch_timeout: float = 60.0,
) -> GitSource:
    """A ready ``GitSource``. A remote is fetched first; when that fails but an earlier fetch
    left a mirror, a warning is logged and the last fetched revisions are served."""
    source = GitSource(location, ref=ref, cache_dir=cache_dir, fetch_timeout=fetch_timeout)
    if fetch and source.remote:
        try:
            source.fetch()
        except SourceError as err:
            if not (source.repo_path / "HEAD").exists():
                raise
            log.warning("%s; using the last fetched revisions", err)
    return source
