"""``GitSource``: a fleet repository, local or remote, read at any revision with the git CLI.

A local path is read in place (no fetch, refs such as ``origin/main`` resolve as in the user's
clone). A URL is mirrored under the cache directory (``git clone --bare``, then ``git fetch
--prune``), so a fetch is incremental and a remote that goes away leaves the last fetched
revisions usable. Exported trees are cached per commit SHA under ``<cache>/trees/``.

The remote is untrusted: it chooses its ref names and what they point to. The mirror therefore
holds only ``refs/heads/*`` and ``refs/tags/*`` (explicit refspecs: no ``refs/pull/*``, notes
or anything else a hosting service publishes), and a revision name is qualified by
``reconciler.source.refs`` before git sees it, so a tag cannot stand in for the followed branch
and no name reaches git's command line as an option. A credential never appears in a URL that
git, a log line or the mirror's configuration sees (``reconciler.source.credentials``), and every
message that quotes git goes through ``reconciler.redact``.

Every read is one ``git`` command run directly (no GitPython: a fleet command that only reads
two revisions pays neither its import nor its per-command overhead).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from reconciler.errors import SourceError
from reconciler.formatting import short_sha
from reconciler.redact import redact_text
from reconciler.source.credentials import GitCredential, RemoteAccess, remote_access
from reconciler.source.export import extract_tree, remove_tree
from reconciler.source.refs import check_revision_syntax, qualify

log = logging.getLogger("reconciler.source")

# Never ask for credentials on a terminal: the daemon has none, and CI would hang.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}
if "GIT_SSH_COMMAND" not in os.environ and "GIT_SSH" not in os.environ:
    # The same for ssh (passphrases, unknown host keys); an operator's own ssh command wins.
    GIT_ENV["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)
_SHA = re.compile(r"^[0-9a-f]{40}$")
KEEP_TREES = 32
# What the mirror holds of the remote: branches and tags, nothing else it may publish.
MIRROR_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
_MIRRORED = ("refs/heads/", "refs/tags/")
_FILE_MODES = frozenset({"100644", "100755", "100664"})  # what a checkout holds as a plain file


class Source(Protocol):
    """Where fleet revisions come from: everything ``pipeline``, ``apply`` and the daemon read
    of a fleet repository. They depend on this, never on git."""

    @property
    def remote(self) -> bool:
        """Whether revisions come from a remote (fetched into a mirror); a local repository is
        read in place, and the daemon watches its refs for new commits."""
        ...

    @property
    def repo_path(self) -> Path:
        """The git directory read: the local repository, or the remote's mirror. Signatures
        are verified there."""
        ...

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

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether commit ``descendant`` is ``ancestor`` or descends from it (both full SHAs).
        ``SourceError`` when either commit is not in the repository."""
        ...

    def changed_paths(self, base: str, head: str) -> list[str]:
        """Paths that differ between two revisions (for logs)."""
        ...


def is_url(location: str) -> bool:
    """True for ``scheme://...`` and scp-like ``user@host:path``; anything else is a path."""
    return bool(_URL.match(location))


class GitCommandError(Exception):
    """A git command that failed: its exit status (-9: killed on timeout) and what it printed
    on stderr. Never leaves this module: each caller turns it into a ``SourceError``."""

    def __init__(self, status: int, stderr: str) -> None:
        super().__init__(f"git exited with {status}: {stderr.strip()}")
        self.status = status
        self.stderr = stderr


def run_git(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    stdin: bytes | None = None,
    check: bool = True,
) -> str:
    """Run ``git args`` and return its stdout without the final newline (as GitPython did);
    ``GitCommandError`` when it fails (unless ``check`` is false) or outlives ``timeout``."""
    try:
        done = subprocess.run(
            ["git", *args],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, **GIT_ENV} if env is None else env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GitCommandError(-9, f"did not complete in {timeout:g} s") from exc
    except OSError as exc:
        raise GitCommandError(127, f"cannot run git: {exc.strerror}") from exc
    if check and done.returncode != 0:
        raise GitCommandError(done.returncode, done.stderr.decode(errors="replace"))
    out = done.stdout.decode(errors="surrogateescape")
    return out[:-1] if out.endswith("\n") else out


def _reason(exc: GitCommandError) -> str:
    """The last ``fatal:``/``error:`` line git printed: short enough for a one-line error."""
    stderr = str(exc.stderr or "").strip().strip("'").strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
    text = (fatal or lines or [f"git exited with {exc.status}"])[-1]
    return redact_text(
        text.removeprefix("stderr: ").removeprefix("fatal: ").removeprefix("error: ")
    )


class GitSource:
    """A ``Source`` over one git repository (see the module docstring)."""

    def __init__(
        self,
        location: str,
        *,
        ref: str | None = None,
        cache_dir: Path,
        fetch_timeout: float = 60.0,
        credential: GitCredential | None = None,
    ) -> None:
        if ref is not None:
            check_revision_syntax(ref, "--ref")
        self.ref = ref
        self.cache_dir = cache_dir
        self.fetch_timeout = fetch_timeout
        self.remote = is_url(location)
        self._access = RemoteAccess(location, credential)
        if self.remote:
            self._access = remote_access(location, credential)
            if self._access.from_url:
                log.warning(
                    "the --repo URL carries a user name or token, which every user of this "
                    "host can read in the process list; put it in --repo-credential-file or "
                    "$RECONCILER_GIT_CREDENTIAL and give the URL without it"
                )
            location = self._access.location
            # Keyed by the URL without credential: a rotated token keeps the same mirror.
            key = hashlib.sha256(location.encode()).hexdigest()[:16]
            self.repo_path = cache_dir / "mirrors" / f"{key}.git"
        else:
            if credential is not None:
                log.warning("a repository credential is given but --repo is a local path")
            self.repo_path = Path(location).expanduser().resolve()
        self.location = location  # never holds a credential
        self._opened = False

    def describe(self) -> str:
        return (
            f"the remote {self.location}" if self.remote else f"the repository at {self.location}"
        )

    def _git(self, *args: str) -> str:
        """``git args`` in the repository (checked to be one the first time)."""
        if not self._opened:
            self._open()
        return run_git(["-C", str(self.repo_path), *args])

    def _open(self) -> None:
        if self.remote and not self.repo_path.exists():
            raise SourceError(
                f"{self.location} has never been fetched; check the URL and the network"
            )
        if not self.repo_path.exists():
            raise SourceError(f"{self.location} does not exist; pass --repo PATH|URL")
        try:
            # The top of a work tree, or a git directory itself: git's answer for a
            # sub-directory of a repository is a non-empty prefix, and that is refused.
            prefix: str | None = run_git(["-C", str(self.repo_path), "rev-parse", "--show-prefix"])
        except GitCommandError:
            prefix = None
        if prefix is None or prefix.strip():
            raise SourceError(
                f"{self.location} is not a git repository; pass --repo with the repository's "
                "top directory (and --path for a sub-directory)"
            )
        self._opened = True

    def fetch(self) -> None:
        """Bring the mirror of a remote up to date; a local repository needs no fetch.

        The first call clones a bare mirror (under a temporary name, renamed when complete);
        later calls fetch only what is new and prune deleted branches.
        """
        if not self.remote:
            return
        # The credential travels in this environment only (see reconciler.source.credentials).
        env = {**os.environ, **GIT_ENV, **self._access.git_env()}
        auth = self._access.git_config_args()
        staging = self.repo_path.with_name(self.repo_path.name + ".tmp")
        try:
            if (self.repo_path / "HEAD").exists():
                log.info("fetching %s", self.location)
                self._configure_mirror(self.repo_path)
                fetch = ["fetch", "--prune", "--no-tags", "--quiet", "--end-of-options", "origin"]
                run_git(
                    ["-C", str(self.repo_path), *auth, *fetch, *MIRROR_REFSPECS],
                    timeout=self.fetch_timeout,
                    env=env,
                )
            else:
                log.info("cloning %s", self.location)
                self.repo_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(staging, ignore_errors=True)  # left by a clone that was killed
                # A bare clone takes branches and tags only, and the remote's default branch
                # as HEAD; the URL it records is the one without credential.
                run_git(
                    [*auth, "clone", "--bare", "--quiet", "--", self.location, str(staging)],
                    timeout=self.fetch_timeout,
                    env=env,
                )
                self._configure_mirror(staging)
                os.rename(staging, self.repo_path)
        except GitCommandError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = _reason(exc)
            if exc.status == -9:  # killed when the timeout expired
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
        self._opened = False  # check again: the mirror may have just been made

    def _configure_mirror(self, path: Path) -> None:
        """Make the mirror's configuration and refs what this module promises, also for a
        mirror made by an older version (``clone --mirror``: every ref, and the URL as given,
        credential included)."""
        config = ["--git-dir", str(path), "config"]
        run_git([*config, "remote.origin.url", self.location])
        run_git([*config, "--unset-all", "remote.origin.mirror"], check=False)
        run_git([*config, "--replace-all", "remote.origin.fetch", MIRROR_REFSPECS[0]])
        run_git([*config, "--add", "remote.origin.fetch", MIRROR_REFSPECS[1]])
        listed = run_git(["--git-dir", str(path), "for-each-ref", "--format=%(refname)"])
        stray = [ref for ref in listed.splitlines() if ref and not ref.startswith(_MIRRORED)]
        if stray:
            commands = "".join(f"delete {ref}\n" for ref in stray).encode()
            run_git(["--git-dir", str(path), "update-ref", "--stdin"], stdin=commands)

    def _refs(self) -> set[str]:
        try:
            listed = self._git("for-each-ref", "--format=%(refname)")
        except GitCommandError as exc:
            raise SourceError(f"cannot list the refs of {self.describe()}: {_reason(exc)}") from exc
        return {ref for ref in listed.splitlines() if ref}

    def resolve(self, rev: str | None = None) -> str:
        wanted = rev or self.ref or "HEAD"
        what = "revision" if rev else "--ref"
        qualified = qualify(
            wanted, self._refs(), mirror=self.remote, what=what, where=self.describe()
        )
        expression = qualified.expression
        if qualified.abbreviation is not None:
            expression = self._expand(qualified.abbreviation, wanted) + qualified.steps
        try:
            sha = self._git(
                "rev-parse", "--verify", "--quiet", "--end-of-options", f"{expression}^{{commit}}"
            ).strip()
        except GitCommandError:
            sha = ""
        if not _SHA.match(sha):
            raise SourceError(
                f"unknown revision {wanted!r} in {self.describe()}; "
                "give a branch, tag or commit that exists"
            )
        return sha

    def _expand(self, prefix: str, wanted: str) -> str:
        """The one commit whose SHA starts with ``prefix``; looked up among objects only, so
        no ref of that name can stand in for it."""
        try:
            listed = self._git("rev-parse", f"--disambiguate={prefix}")
        except GitCommandError:
            listed = ""
        commits = []
        for sha in listed.split():
            try:
                if self._git("cat-file", "-t", sha).strip() == "commit":
                    commits.append(sha)
            except GitCommandError:
                continue
        if len(commits) > 1:
            raise SourceError(
                f"the revision {wanted!r} is ambiguous in {self.describe()}: "
                f"{len(commits)} commits start with it; give more digits"
            )
        if not commits:
            raise SourceError(
                f"unknown revision {wanted!r} in {self.describe()}; "
                "give a branch, tag or commit that exists"
            )
        return commits[0]

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        for sha in (ancestor, descendant):
            if not _SHA.match(sha):
                raise SourceError(f"{sha!r} is not a full commit SHA")
        try:
            self._git("merge-base", "--is-ancestor", "--end-of-options", ancestor, descendant)
        except GitCommandError as exc:
            if exc.status == 1:
                return False
            raise SourceError(
                f"cannot tell whether {short_sha(descendant)} descends from "
                f"{short_sha(ancestor)} in "
                f"{self.describe()}: {_reason(exc)}"
            ) from exc
        return True

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
        if not self._opened:
            self._open()
        # stderr goes to a file: a pipe nobody reads while the tar streams could fill and stall.
        with tempfile.TemporaryFile() as errors:
            try:
                process = subprocess.Popen(
                    ["git", "-C", str(self.repo_path), "archive", "--format=tar", rev],
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    env={**os.environ, **GIT_ENV},
                )
            except OSError as exc:
                raise SourceError(f"cannot run git: {exc.strerror}") from exc
            try:
                stream = process.stdout
                if stream is None:
                    raise SourceError(f"cannot export {short_sha(rev)} from {self.describe()}")
                extract_tree(stream, destination)
                if process.wait() != 0:
                    errors.seek(0)
                    failed = GitCommandError(process.returncode, errors.read().decode("replace"))
                    remove_tree(destination)
                    raise SourceError(
                        f"cannot export {short_sha(rev)} from {self.describe()}: {_reason(failed)}"
                    )
            except OSError as exc:
                raise SourceError(
                    f"cannot write the checkout of {short_sha(rev)} under "
                    f"{destination.parent}: {exc.strerror}; check free space and permissions of "
                    "the state directory"
                ) from exc
            finally:
                if process.poll() is None:  # extraction stopped early: do not leave git behind
                    process.kill()
                    process.wait()
                if process.stdout is not None:
                    process.stdout.close()
        self._prune_trees()
        return destination

    def _prune_trees(self) -> None:
        trees = [p for p in (self.cache_dir / "trees").iterdir() if _SHA.match(p.name)]
        if len(trees) <= KEEP_TREES:
            return
        trees.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in trees[KEEP_TREES:]:
            remove_tree(old)

    def tree_entries(self, rev: str) -> dict[str, tuple[str, str]]:
        """Every directory, symlink and submodule of commit ``rev``: path -> (mode, object id).

        Git names a tree by the hash of its content, so a directory that did not change keeps
        its id from one revision to the next: the manifests layer keys reused work on it
        (``manifests.compile_cache``) instead of hashing files Git has already hashed. Files
        are left out: the checkout holds them. One ``git ls-tree`` per revision."""
        if not _SHA.match(rev):
            rev = self.resolve(rev)
        try:
            listed = self._git("ls-tree", "-r", "-t", "-z", "--full-tree", "--end-of-options", rev)
        except GitCommandError as exc:
            raise SourceError(
                f"cannot list the tree of {short_sha(rev)} in {self.describe()}: {_reason(exc)}"
            ) from exc
        return parse_tree_entries(listed)

    def changed_paths(self, base: str, head: str) -> list[str]:
        """Paths that differ between two revisions (for logs)."""
        old, new = self.resolve(base), self.resolve(head)
        try:
            out = self._git("diff", "--name-only", "--end-of-options", old, new)
        except GitCommandError as exc:
            raise SourceError(
                f"cannot compare {short_sha(old)} and {short_sha(new)}: {_reason(exc)}"
            ) from exc
        return [line for line in out.splitlines() if line]


def parse_tree_entries(listed: str) -> dict[str, tuple[str, str]]:
    """The non-file entries of ``git ls-tree -r -t -z`` output (``MODE TYPE ID\tPATH\0``)."""
    entries: dict[str, tuple[str, str]] = {}
    for record in listed.split("\0"):
        meta, _, path = record.partition("\t")
        fields = meta.split(" ")
        if len(fields) != 3 or not path:
            continue
        mode, _, object_id = fields
        if mode not in _FILE_MODES:
            entries[path] = (mode, object_id)
    return entries


def open_source(
    location: str,
    *,
    ref: str | None,
    cache_dir: Path,
    fetch: bool = True,
    fetch_timeout: float = 60.0,
    credential: GitCredential | None = None,
) -> GitSource:
    """A ready ``GitSource``. A remote is fetched first; when that fails but an earlier fetch
    left a mirror, a warning is logged and the last fetched revisions are served."""
    source = GitSource(
        location, ref=ref, cache_dir=cache_dir, fetch_timeout=fetch_timeout, credential=credential
    )
    if fetch and source.remote:
        try:
            source.fetch()
        except SourceError as err:
            if not (source.repo_path / "HEAD").exists():
                raise
            log.warning("%s; using the last fetched revisions", err)
    return source
