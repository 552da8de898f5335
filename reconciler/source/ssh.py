"""SSH commit signatures: ``ssh-keygen -Y`` against the trusted keys, at the current time.

    trusted SSH keys / allowed-signers files ──▶ <work>/allowed_signers-<digest>
    --revoked-key public keys ──▶ <work>/revoked_keys-<digest>; KRLs are queried as they are
    signature + signed payload ──ssh-keygen -Y find-principals, -Y verify──▶ SshReport
                               ──ssh_verdict (pure)──▶ Verdict

Why not ``git verify-commit``: git passes ``-Overify-time=<committer date>`` to ssh-keygen, and
the committer date is whatever the signer wrote. A key whose ``valid-before`` has passed (a
departed employee's, a leaked one) would still sign "in the past" with a backdated commit. Here
the verify time is now (the injected clock). ssh-keygen also cannot be told about more than one
revocation file, and says only "Could not verify signature." for a revoked key, so revocation is
decided here first (fingerprints of the revoked public keys; ``ssh-keygen -Q`` for each KRL) and
the merged public-key list is passed to ``-Y verify -r`` as well.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ConfigError, SourceError
from reconciler.source.keys import (
    TrustedKeys,
    read_key_file,
    signature_key,
    ssh_fingerprint,
    ssh_public_keys,
    ssh_signers,
)
from reconciler.source.tools import Verdict, isolated_env, last_reason, missing, private_dir, run

NAMESPACE = "git"  # what `git commit -S` signs with
_GOOD = re.compile(r'Good "git" signature for (?P<who>.+) with \S+ key SHA256:\S+')
_UNTRUSTED = "sign it with a trusted key, or trust this one with --trusted-key"


@dataclass(frozen=True)
class SshReport:
    """What the tools said about one SSH signature: the input of :func:`ssh_verdict`."""

    key: str  # "ed25519 key SHA256:..."
    label: str  # the trusted key's comment or principals ("" when not trusted)
    known: bool  # the key is one of the trusted keys (at any time)
    revoked: bool
    principals: tuple[int, str]  # ssh-keygen -Y find-principals: exit code, output
    verified: tuple[int, str] | None  # ssh-keygen -Y verify (None: not run)
    allowed_file: str  # the prefix of ssh-keygen's messages about allowed-signers lines


def ssh_verdict(short: str, report: SshReport) -> Verdict:
    """Judge a signature from ssh-keygen's exit codes and output (pure); ``SourceError`` when
    ssh-keygen could not judge at all."""
    key = report.key
    if report.revoked:
        return Verdict(
            False,
            f"commit {short} is signed by SSH {key}, which is revoked (--revoked-key); sign it "
            "again with a trusted key that is not revoked",
        )
    code, output = report.principals
    details = _details(output, report.allowed_file)
    if code != 0:
        if report.known and details:
            return Verdict(
                False,
                f"commit {short} is signed by SSH {key}, which is trusted but not valid now "
                f"({details[-1]}); sign it again with a key that is valid",
            )
        if "No principal matched" in output:
            return Verdict(
                False, f"commit {short} is signed by SSH {key}, which is not trusted; {_UNTRUSTED}"
            )
        raise SourceError(
            f"cannot check the SSH signature of commit {short}: {last_reason(output)}"
        )
    if report.verified is None:
        raise SourceError(f"cannot check the SSH signature of commit {short}: no principal")
    code, output = report.verified
    if code == 0:
        match = _GOOD.search(output)
        if match is None:
            raise SourceError(
                f"cannot check the SSH signature of commit {short}: {last_reason(output)}"
            )
        who = match.group("who")
        if who != "*":
            return Verdict(True, f"good SSH signature by {who} ({key})")
        label = f" ({report.label})" if report.label else ""
        return Verdict(True, f"good SSH signature by {key}{label}")
    details = _details(output, report.allowed_file)
    failed = re.search(r"Signature verification failed: (.+)", output)
    if failed and "incorrect signature" in failed.group(1):
        return Verdict(
            False,
            f"commit {short} has a bad SSH signature ({key}): its content is not what was "
            "signed; it was altered after signing and is not applied",
        )
    why = details[-1] if details else failed.group(1) if failed else last_reason(output)
    return Verdict(
        False,
        f"commit {short} has an SSH signature by {key} that the trusted keys do not accept: {why}",
    )


def _details(output: str, allowed_file: str) -> list[str]:
    """ssh-keygen's complaints about lines of the allowed-signers file, prefix removed."""
    prefix = f"{allowed_file}:"
    return [
        re.sub(r"^\d+: ", "", line.removeprefix(prefix))
        for line in output.splitlines()
        if line.startswith(prefix)
    ]


def verify_time(now: float) -> str:
    """``-Overify-time`` value for ``now`` (UTC, as ssh-keygen reads it with the ``Z``)."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(now))


@dataclass(frozen=True)
class _Files:
    allowed: Path
    revoked: Path | None
    labels: dict[str, str]  # fingerprint -> label of the trusted keys
    revoked_fingerprints: frozenset[str]


class SshChecker:
    """Verifies SSH signatures against the trusted keys (see the module docstring)."""

    def __init__(
        self, trusted: TrustedKeys, work_dir: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.trusted = trusted
        self.work_dir = work_dir
        self.clock = clock
        self._files: _Files | None = None
        self._lock = threading.Lock()

    def keygen(self) -> str:
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise SourceError(missing("ssh-keygen"))
        return keygen

    def files(self) -> _Files:
        with self._lock:
            if self._files is None:
                self._files = self._write()
            return self._files

    def verify(self, short: str, signature: str, payload: bytes) -> Verdict:
        found = signature_key(signature)
        if found is None:
            return Verdict(False, f"commit {short} carries an SSH signature that cannot be read")
        keytype, public = found
        fingerprint = ssh_fingerprint(public)
        key = f"{keytype.removeprefix('ssh-')} key {fingerprint}"
        if not self.trusted.ssh:
            return Verdict(
                False, f"commit {short} is signed by SSH {key}, which is not trusted; {_UNTRUSTED}"
            )
        keygen = self.keygen()
        files = self.files()
        env = isolated_env()
        at = f"-Overify-time={verify_time(self.clock())}"
        with tempfile.TemporaryDirectory(dir=private_dir(self.work_dir)) as scratch:
            signature_file = Path(scratch) / "signature"
            signature_file.write_text(signature)
            revoked = fingerprint in files.revoked_fingerprints or self._in_krl(
                keygen, keytype, public, Path(scratch), env
            )
            find = ["-Y", "find-principals", "-f", str(files.allowed), "-s", str(signature_file)]
            code, out, _ = run(
                [keygen, *find, at],
                env=env,
                merge=True,
            )
            verified: tuple[int, str] | None = None
            if code == 0 and not revoked:
                revocation = ["-r", str(files.revoked)] if files.revoked else []
                for principal in [p for p in out.splitlines() if p.strip()]:
                    argv = [keygen, "-Y", "verify", "-n", NAMESPACE, "-f", str(files.allowed)]
                    argv += ["-I", principal, "-s", str(signature_file), *revocation, at]
                    result = run(argv, env=env, stdin=payload, merge=True)
                    verified = (result[0], result[1])
                    if result[0] == 0:
                        break
        report = SshReport(
            key=key,
            label=files.labels.get(fingerprint, ""),
            known=fingerprint in files.labels,
            revoked=revoked,
            principals=(code, out),
            verified=verified,
            allowed_file=str(files.allowed),
        )
        return ssh_verdict(short, report)

    def _in_krl(
        self, keygen: str, keytype: str, public: bytes, scratch: Path, env: dict[str, str]
    ) -> bool:
        if not self.trusted.revoked_krl:
            return False
        key_file = scratch / "signer.pub"
        key_file.write_text(f"{keytype} {base64.b64encode(public).decode()}\n")
        for krl in self.trusted.revoked_krl:
            code, out, _ = run([keygen, "-Q", "-f", str(krl), str(key_file)], env=env, merge=True)
            if code == 1 and "REVOKED" in out:
                return True
            if code != 0:
                raise SourceError(f"cannot read the key revocation list {krl}: {last_reason(out)}")
        return False

    def _write(self) -> _Files:
        signers = []
        for path in self.trusted.ssh:
            try:
                signers += ssh_signers(read_key_file(path).decode())
            except (UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"the trusted SSH key file {path}: {exc}") from None
        revoked_lines: list[str] = []
        revoked_fingerprints: set[str] = set()
        for path in self.trusted.revoked_ssh:
            try:
                listed = ssh_public_keys(read_key_file(path, "--revoked-key").decode())
            except (UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"the revoked SSH key file {path}: {exc}") from None
            revoked_lines += [line for line, _ in listed]
            revoked_fingerprints |= {fingerprint for _, fingerprint in listed}
        work_dir = private_dir(self.work_dir)
        allowed = _write_once(work_dir, "allowed_signers", "".join(f"{s.line}\n" for s in signers))
        revoked = (
            _write_once(work_dir, "revoked_keys", "".join(f"{line}\n" for line in revoked_lines))
            if revoked_lines
            else None
        )
        return _Files(
            allowed,
            revoked,
            {s.fingerprint: s.label for s in signers},
            frozenset(revoked_fingerprints),
        )


def _write_once(directory: Path, name: str, content: str) -> Path:
    """``directory/name-<digest>`` holding ``content``, written atomically if missing."""
    data = content.encode()
    path = directory / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}"
    try:
        if not (path.is_file() and path.read_bytes() == data):
            staging = path.with_name(f".{path.name}.{os.getpid()}")
            staging.write_bytes(data)
            staging.replace(path)
    except OSError as exc:
        raise SourceError(
            f"cannot write {path}: {exc.strerror}; "
            "check free space and permissions of the state directory"
        ) from exc
    return path
