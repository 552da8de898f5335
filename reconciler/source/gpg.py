"""OpenPGP commit signatures: the keyring of the trusted keys, and the verdict over gpg's
``--status-fd`` lines.

    trusted key files ──gpg --show-keys, each file, before any import──▶ trusted fingerprints
                      ──gpg --import (then the revocations) into a private GNUPGHOME──▶ keyring
    signature + signed payload ──gpg --verify --status-fd 1──▶ status lines
                               ──openpgp_verdict (pure)──▶ Verdict

The fingerprints that count are computed from the files the operator named, not listed from
the keyring: whatever else reaches the keyring (a key smuggled in an import, one added by hand)
can never make a signature good. A good signature must name a trusted primary key in its
``VALIDSIG`` line *and* come from that key or one of the subkeys its own file lists. Keys are
never fetched (no keyserver, no WKD) and no agent is started.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.errors import ConfigError, SourceError
from reconciler.source.keys import TrustedKeys, read_key_file
from reconciler.source.tools import Verdict, isolated_env, last_reason, missing, private_dir, run

log = logging.getLogger("reconciler.source")

_GPG_CONF = "no-auto-key-retrieve\nno-autostart\nno-greeting\n"
_ERR_NO_PUBKEY = "9"
_ERR_UNKNOWN_ALGO = "4"
_UNTRUSTED = "sign it with a trusted key, or trust this one with --trusted-key"


@dataclass(frozen=True)
class PrimaryKey:
    """One OpenPGP certificate as its key file describes it."""

    fingerprint: str
    signing: frozenset[str]  # the primary's fingerprint and those of its subkeys
    uid: str
    revoked: bool


@dataclass
class _Certificate:
    fingerprint: str = ""
    signing: set[str] = field(default_factory=set)
    uid: str = ""
    revoked: bool = False


def parse_show_keys(text: str) -> list[PrimaryKey]:
    """The certificates in ``gpg --with-colons --show-keys`` (or ``--list-keys``) output.

    A revoked subkey (``sub:r:``) is left out of ``signing``: nothing it signs is good.
    """
    keys: list[PrimaryKey] = []
    current: _Certificate | None = None
    pending = ""  # the pub/sub record whose fingerprint the next fpr line gives

    def close() -> None:
        if current is not None and current.fingerprint:
            keys.append(
                PrimaryKey(
                    current.fingerprint, frozenset(current.signing), current.uid, current.revoked
                )
            )

    for line in text.splitlines():
        fields = line.split(":")
        kind = fields[0]
        if kind == "pub":
            close()
            current = _Certificate(revoked=fields[1:2] == ["r"])
            pending = "pub"
        elif kind == "sub":
            pending = "sub" if fields[1:2] != ["r"] else ""
        elif kind == "fpr" and current is not None and len(fields) > 9:
            if pending == "pub":
                current.fingerprint = fields[9]
            if pending:
                current.signing.add(fields[9])
            pending = ""
        elif kind == "uid" and current is not None and len(fields) > 9:
            current.uid = current.uid or _unescape(fields[9])
        else:
            pending = ""
    close()
    return keys


def _unescape(text: str) -> str:
    """gpg escapes control characters and ``%``/``:`` in status lines and colon listings."""
    text = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
    return re.sub(r"\\x([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def openpgp_verdict(
    short: str, status: str, code: int, trusted: Mapping[str, PrimaryKey]
) -> Verdict:
    """Judge ``gpg --verify --status-fd 1`` output (pure).

    ``short``: the commit as messages name it; ``trusted``: fingerprint -> certificate, as
    computed from the trusted key files. ``SourceError`` when gpg could not judge at all.
    """
    lines: dict[str, list[str]] = {}
    signatures = 0
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        keyword, *args = line.removeprefix("[GNUPG:] ").split(" ")
        signatures += keyword == "NEWSIG"
        lines.setdefault(keyword, args)

    def key_and_uid(keyword: str) -> str:
        keyid, *uid = lines[keyword]
        return f"{_unescape(' '.join(uid))}, key {keyid}" if uid else f"key {keyid}"

    if signatures > 1:
        return Verdict(
            False,
            f"commit {short} carries {signatures} OpenPGP signatures; one signature by a trusted "
            "key is expected",
        )
    if "BADSIG" in lines:
        return Verdict(
            False,
            f"commit {short} has a bad OpenPGP signature ({key_and_uid('BADSIG')}): its content "
            "is not what was signed; it was altered after signing and is not applied",
        )
    if "ERRSIG" in lines:
        args = lines["ERRSIG"]
        key = args[6] if len(args) > 6 and args[6] != "-" else args[0]
        if "NO_PUBKEY" in lines or args[5:6] == [_ERR_NO_PUBKEY]:
            return Verdict(
                False,
                f"commit {short} is signed by OpenPGP key {key}, which is not trusted; "
                f"{_UNTRUSTED}",
            )
        if args[5:6] == [_ERR_UNKNOWN_ALGO]:
            return Verdict(
                False,
                f"commit {short} is signed by OpenPGP key {key} with an algorithm gpg does not "
                "support; sign it with a trusted ed25519 or RSA key",
            )
        raise SourceError(
            f"cannot check the OpenPGP signature of commit {short} (key {key}): "
            f"{last_reason(status)}"
        )
    if "VALIDSIG" not in lines:
        raise SourceError(
            f"cannot check the OpenPGP signature of commit {short}: {last_reason(status)}"
        )
    signed_by, primary = lines["VALIDSIG"][0], lines["VALIDSIG"][-1]
    certificate = trusted.get(primary)
    if certificate is None or signed_by not in certificate.signing:
        said = [k for k in ("GOODSIG", "EXPKEYSIG", "REVKEYSIG") if k in lines]
        named = f" ({_unescape(' '.join(lines[said[0]][1:]))})" if said else ""
        return Verdict(
            False,
            f"commit {short} is signed by OpenPGP key {primary}{named}, which is not trusted; "
            f"{_UNTRUSTED}",
        )
    if "REVKEYSIG" in lines or certificate.revoked:
        shown = key_and_uid("REVKEYSIG") if "REVKEYSIG" in lines else f"key {primary}"
        return Verdict(
            False,
            f"commit {short} is signed by a revoked OpenPGP key ({shown}); sign it again with a "
            "trusted key that is not revoked",
        )
    if "EXPKEYSIG" in lines:
        return Verdict(
            False,
            f"commit {short} is signed by an expired OpenPGP key ({key_and_uid('EXPKEYSIG')}); "
            "extend the key's expiry and trust the updated key, or sign again",
        )
    if "EXPSIG" in lines:
        return Verdict(
            False,
            f"commit {short} has an expired OpenPGP signature ({key_and_uid('EXPSIG')}); "
            "sign it again",
        )
    if "GOODSIG" in lines and code == 0:
        uid = _unescape(" ".join(lines["GOODSIG"][1:]))
        return Verdict(True, f"good OpenPGP signature by {uid} (key {primary})")
    raise SourceError(
        f"cannot check the OpenPGP signature of commit {short}: {last_reason(status)}"
    )


@dataclass(frozen=True)
class Keyring:
    home: Path
    trusted: Mapping[str, PrimaryKey]


class OpenPgpChecker:
    """Verifies OpenPGP signatures against the trusted keys (see the module docstring).

    The keyring is built once, under ``work_dir`` with a name carrying a digest of the key and
    revocation files, so a changed set of keys never meets a stale keyring and replicas sharing
    a directory agree.
    """

    def __init__(self, trusted: TrustedKeys, work_dir: Path) -> None:
        self.trusted = trusted
        self.work_dir = work_dir
        self._keyring: Keyring | None = None
        self._lock = threading.Lock()

    def gpg(self) -> str:
        gpg = shutil.which("gpg")
        if gpg is None:
            raise SourceError(missing("gpg"))
        return gpg

    def keyring(self) -> Keyring:
        with self._lock:
            if self._keyring is None:
                self._keyring = self._build(self.gpg())
            return self._keyring

    def verify(self, short: str, signature: str, payload: bytes) -> Verdict:
        if not self.trusted.openpgp and shutil.which("gpg") is None:
            # With gpg, an empty keyring names the signing key in the refusal.
            return Verdict(
                False,
                f"commit {short} is signed with an OpenPGP key, but no OpenPGP key is trusted; "
                "sign it with a trusted key (--trusted-key)",
            )
        keyring = self.keyring()
        with tempfile.TemporaryDirectory(dir=private_dir(self.work_dir)) as scratch:
            signature_file = Path(scratch) / "signature.asc"
            signature_file.write_text(signature)
            options = ["--batch", "--no-tty", "--trust-model", "always", "--status-fd", "1"]
            verify = ["--verify", str(signature_file), "-"]
            code, out, err = run(
                [self.gpg(), "--homedir", str(keyring.home), *options, *verify],
                env=isolated_env(keyring.home),
                stdin=payload,
            )
        return openpgp_verdict(short, out + err, code, keyring.trusted)

    # -- the keyring -------------------------------------------------------------------------

    def _build(self, gpg: str) -> Keyring:
        keys = [(path, read_key_file(path)) for path in self.trusted.openpgp]
        revocations = [
            (path, read_key_file(path, "--revoked-key")) for path in self.trusted.revoked_openpgp
        ]
        digest = hashlib.sha256()
        for _, data in [*keys, (Path(), b"revocations"), *revocations]:
            digest.update(hashlib.sha256(data).digest())
        work_dir = private_dir(self.work_dir)
        trusted: dict[str, PrimaryKey] = {}
        for path, data in keys:
            shown = self._show_keys(gpg, data, work_dir)
            if not shown:
                raise ConfigError(
                    f"the trusted key {path} holds no OpenPGP public key gpg can import; "
                    "export it with gpg --export --armor KEYID"
                )
            for key in shown:
                log.info("trusting OpenPGP key %s (%s) from %s", key.fingerprint, key.uid, path)
                trusted[key.fingerprint] = key
        home = work_dir / f"gnupg-{digest.hexdigest()[:16]}"
        if not home.is_dir():
            self._import(gpg, keys, revocations, home)
        code, out, err = run(
            [gpg, "--homedir", str(home), "--batch", "--with-colons", "--list-keys"],
            env=isolated_env(home),
        )
        if code != 0:
            raise SourceError(f"cannot read the keyring {home}: {last_reason(err)}")
        # Revocations come from the keyring (the certificates were imported into it); trust
        # never does: a key there that no trusted file holds is simply not in ``trusted``.
        revoked = {key.fingerprint for key in parse_show_keys(out) if key.revoked}
        for fingerprint in sorted(revoked & trusted.keys()):
            log.warning("trusted OpenPGP key %s is revoked", fingerprint)
            trusted[fingerprint] = PrimaryKey(
                fingerprint,
                trusted[fingerprint].signing,
                trusted[fingerprint].uid,
                revoked=True,
            )
        return Keyring(home, trusted)

    @staticmethod
    def _show_keys(gpg: str, data: bytes, work_dir: Path) -> list[PrimaryKey]:
        with tempfile.TemporaryDirectory(prefix=".show-", dir=work_dir) as empty:
            home = Path(empty)
            home.chmod(0o700)
            (home / "gpg.conf").write_text(_GPG_CONF)
            code, out, _ = run(
                [gpg, "--homedir", str(home), "--batch", "--with-colons", "--show-keys"],
                env=isolated_env(home),
                stdin=data,
            )
        return parse_show_keys(out) if code == 0 else []

    @staticmethod
    def _import(
        gpg: str,
        keys: list[tuple[Path, bytes]],
        revocations: list[tuple[Path, bytes]],
        home: Path,
    ) -> None:
        """Import the keys, then the revocations, into a staging directory renamed into place
        when complete, so an interrupted build never leaves a half keyring behind."""
        try:
            staging = Path(tempfile.mkdtemp(prefix=".gnupg-", dir=home.parent))
            (staging / "gpg.conf").write_text(_GPG_CONF)
        except OSError as exc:
            raise SourceError(
                f"cannot create a keyring under {home.parent}: {exc.strerror}; "
                "check free space and permissions of the state directory"
            ) from exc
        try:
            argv = [gpg, "--homedir", str(staging), "--batch", "--no-tty", "--status-fd", "1"]
            env = isolated_env(staging)
            for path, data in keys:
                _, out, err = run([*argv, "--import"], env=env, stdin=data)
                if "[GNUPG:] IMPORT_OK " not in out:
                    raise ConfigError(
                        f"the trusted key {path} holds no OpenPGP public key gpg can import "
                        f"({last_reason(err)}); export it with gpg --export --armor KEYID"
                    )
            for path, data in revocations:
                _, out, err = run([*argv, "--import"], env=env, stdin=data)
                if "[GNUPG:] IMPORT_OK " not in out:
                    log.warning(
                        "the revocation %s applies to no trusted OpenPGP key (%s)",
                        path,
                        last_reason(err),
                    )
            try:
                staging.rename(home)
            except OSError as exc:
                if not home.is_dir():  # else another replica finished the same keyring first
                    raise SourceError(
                        f"cannot create the keyring {home}: {exc.strerror}; "
                        "check permissions of the state directory"
                    ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
