"""Commit signature verification: only revisions signed by a trusted key are acted upon.

    location + ref ──resolve──▶ sha ──SignatureVerifier.verify──▶ sha ──checkout──▶ tree
                                       │ git cat-file commit: the raw object
                                       │ split_signed_commit (pure): signature, signed payload
                                       ├─ OpenPGP ──▶ reconciler.source.gpg
                                       └─ SSH ──────▶ reconciler.source.ssh

A head that is unsigned, signed by a key nobody trusted, signed by a revoked or expired key, or
whose signature does not match its content is refused in one line; the daemon keeps the last
good revision running. Git reads the commit object and nothing else: the signature and the
payload are cut from the raw object here and handed to gpg or ssh-keygen directly, so neither
the repository's configuration (``gpg.program``, ``gpg.ssh.allowedSignersFile``, a minimum trust
level) nor git's choice of verify time (the committer date, which the signer writes) has any
say. Trust comes only from the key files the operator names (``reconciler.source.keys``).

:class:`VerifiedSource` wraps a ``Source`` so that no tree is ever exported from a commit that
did not verify: ``apply``, ``build`` and ``daemon`` read the fleet through it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.errors import SignatureError, SourceError
from reconciler.source.git import Source
from reconciler.source.gpg import OpenPgpChecker
from reconciler.source.keys import TrustedKeys
from reconciler.source.ssh import SshChecker
from reconciler.source.tools import Verdict, isolated_env, last_reason, run, run_bytes

_SHORT = 12
_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_OPENPGP_ARMOR = ("-----BEGIN PGP SIGNATURE-----", "-----BEGIN PGP MESSAGE-----")
_SSH_ARMOR = "-----BEGIN SSH SIGNATURE-----"
_X509_ARMOR = "-----BEGIN SIGNED MESSAGE-----"
_SIGNATURE_HEADERS = (b"gpgsig", b"gpgsig-sha256")
# A verdict can change with time (a key's valid-before passes, it expires): remember it for a
# while only, so a long-running daemon notices within minutes without re-running gpg per poll.
VERDICT_SECONDS = 300.0


def split_signed_commit(raw: bytes, sha: str) -> tuple[str | None, bytes]:
    """The signature of a raw commit object and the payload it signs (pure).

    The signature is the ``gpgsig`` header (``gpgsig-sha256`` in a SHA-256 repository, told by
    the length of ``sha``) with its continuation lines; the payload is the object without any
    signature header, exactly as ``git commit -S`` handed it to the signing program.
    """
    wanted = b"gpgsig-sha256" if len(sha) == 64 else b"gpgsig"
    header, separator, body = raw.partition(b"\n\n")
    signature: list[bytes] = []
    payload: list[bytes] = []
    current: bytes | None = None
    for line in header.split(b"\n"):
        if current is not None and line.startswith(b" "):
            if current == wanted:
                signature.append(line[1:])
            continue
        name, _, value = line.partition(b" ")
        if name in _SIGNATURE_HEADERS:
            current = name
            if name == wanted and not signature:
                signature.append(value)
            continue
        current = None
        payload.append(line)
    signed = b"\n".join(payload) + separator + body
    if not signature:
        return None, signed
    return (b"\n".join(signature) + b"\n").decode(errors="replace"), signed


class SignatureVerifier:
    """Decides whether a commit carries a good signature by a trusted key (module docstring).

    The keyring and the allowed-signers file are built on first use (or by :meth:`prepare`)
    under ``work_dir`` and reused. Verdicts are remembered per full SHA for a few minutes.
    """

    def __init__(
        self, trusted: TrustedKeys, work_dir: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.trusted = trusted
        self.work_dir = work_dir
        self.clock = clock
        self.openpgp = OpenPgpChecker(trusted, work_dir)
        self.ssh = SshChecker(trusted, work_dir, clock)
        self._safe_directories: list[str] | None = None
        self._verdicts: dict[str, tuple[float, Verdict]] = {}
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the keyring and the allowed-signers file now, so that a bad key file or a
        missing tool fails a command's start rather than its first revision."""
        if self.trusted.openpgp:
            self.openpgp.keyring()
        if self.trusted.ssh:
            self.ssh.keygen()
            self.ssh.files()

    def verify(self, repo_path: Path, sha: str) -> str:
        """A one-line description of the good signature of commit ``sha`` in ``repo_path``.

        ``SignatureError`` (one line naming the commit and what to do) when the commit is
        unsigned, signed by a key that is not trusted (or revoked, or expired), or its signature
        is bad; ``SourceError`` when it cannot be checked. ``ConfigError`` for a key file the
        tools cannot read.
        """
        with self._lock:
            now = self.clock()
            remembered = self._verdicts.get(sha)
            if remembered is not None and now - remembered[0] < VERDICT_SECONDS:
                verdict = remembered[1]
            else:
                verdict = self._judge(repo_path, sha)
                if _FULL_SHA.match(sha):
                    self._verdicts[sha] = (now, verdict)
        if not verdict.good:
            raise SignatureError(verdict.message)
        return verdict.message

    def _judge(self, repo_path: Path, sha: str) -> Verdict:
        short = sha[:_SHORT]
        if not _FULL_SHA.match(sha):
            raise SourceError(f"{sha!r} is not a full commit SHA")
        safe = [arg for d in self._safe() for arg in ("-c", f"safe.directory={d}")]
        code, raw, err = run_bytes(
            ["git", "-C", str(repo_path), *safe, "cat-file", "commit", sha], env=isolated_env()
        )
        if code != 0:
            raise SourceError(f"cannot read commit {short} in {repo_path}: {last_reason(err)}")
        signature, payload = split_signed_commit(raw, sha)
        if signature is None:
            return Verdict(
                False,
                f"commit {short} is not signed; only revisions signed by a trusted key are "
                "applied (--trusted-key)",
            )
        armor = signature.split("\n", 1)[0].strip()
        if armor in _OPENPGP_ARMOR:
            return self.openpgp.verify(short, signature, payload)
        if armor == _SSH_ARMOR:
            return self.ssh.verify(short, signature, payload)
        if armor == _X509_ARMOR:
            return Verdict(
                False,
                f"commit {short} is signed with an X.509 certificate, which is not verified "
                "here; sign it with a trusted OpenPGP or SSH key",
            )
        return Verdict(
            False,
            f"commit {short} carries a signature of an unknown kind ({armor[:40]!r}); "
            "sign it with a trusted OpenPGP or SSH key",
        )

    def _safe(self) -> list[str]:
        """The operator's ``safe.directory`` entries (system and global git config).

        Isolating the configuration would otherwise make git refuse a repository owned by
        another user that the source layer reads fine. These entries only say which
        repositories git may open; no signature decision depends on them.
        """
        if self._safe_directories is None:
            env = {k: v for k, v in os.environ.items() if k not in {"GIT_DIR", "GIT_WORK_TREE"}}
            code, out, _ = run(
                ["git", "config", "--get-all", "safe.directory"], env=env, cwd=Path("/")
            )
            self._safe_directories = out.splitlines() if code == 0 else []
        return self._safe_directories


class VerifiedSource:
    """A ``Source`` whose trees come only from commits with a good signature by a trusted key.

    ``resolve`` and ``fetch`` pass through (naming a revision is harmless); ``checkout``
    verifies the commit first, every time, so a cached tree of a commit that no longer verifies
    (a key revoked since) is not served either.
    """

    def __init__(self, inner: Source, verifier: SignatureVerifier, repo_path: Path) -> None:
        self.inner = inner
        self.verifier = verifier
        self.repo_path = repo_path

    def resolve(self, rev: str | None = None) -> str:
        return self.inner.resolve(rev)

    def checkout(self, rev: str) -> Path:
        sha = self.inner.resolve(rev) if not _FULL_SHA.match(rev) else rev
        self.verifier.verify(self.repo_path, sha)
        return self.inner.checkout(sha)

    def tree_entries(self, rev: str) -> dict[str, tuple[str, str]]:
        """The inner source's listing (``GitSource.tree_entries``), of a verified commit only."""
        sha = self.inner.resolve(rev) if not _FULL_SHA.match(rev) else rev
        self.verifier.verify(self.repo_path, sha)
        listing = getattr(self.inner, "tree_entries", None)
        entries: dict[str, tuple[str, str]] = {} if listing is None else listing(sha)
        return entries  # empty: nothing is known by tree id, everything is compiled

    def fetch(self) -> None:
        self.inner.fetch()

    def describe(self) -> str:
        return self.inner.describe()

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self.inner.is_ancestor(ancestor, descendant)

    @property
    def remote(self) -> bool:
        return self.inner.remote

    def changed_paths(self, base: str, head: str) -> list[str]:
        return self.inner.changed_paths(base, head)

    def verify(self, sha: str) -> str:
        """The daemon's ``CommitVerifier``: a description of the good signature of ``sha``."""
        return self.verifier.verify(self.repo_path, sha)
