"""The operator's key files: which are trusted, which are revoked, and what they hold (pure
apart from reading the files).

    --trusted-key FILE ... --revoked-key FILE ... ──TrustedKeys.from_paths──▶ TrustedKeys
        ──▶ reconciler.source.gpg (keyring) / reconciler.source.ssh (allowed signers)
        ──▶ reconciler.source.verifier

Trust comes only from these files. A trusted key file is an OpenPGP public key (armored or
binary) or OpenSSH public keys / an allowed-signers file; a private key is refused, since its
presence means someone is about to hand a signing key to a daemon that only needs to verify. A
revocation file is an OpenPGP revocation certificate (or an updated public key carrying one), a
list of SSH public keys, or an OpenSSH KRL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from reconciler.errors import ConfigError

# Options and principals of an allowed-signers line may hold quoted spaces.
_TOKEN = re.compile(r'(?:[^\s"]|"[^"]*")+')
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_KRL_MAGIC = b"SSHKRL\n\0"
_PGP_PUBLIC = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
_PGP_SIGNATURE_TAG = 2  # a bare revocation certificate is one signature packet
_PGP_SECRET_KEY_TAG = 5
_PGP_PUBLIC_KEY_TAG = 6


@dataclass(frozen=True)
class SshSigner:
    """One line of the generated allowed-signers file, with what messages call its key."""

    line: str
    fingerprint: str
    label: str


def read_key_file(path: Path, option: str = "--trusted-key") -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        what = "trusted key" if option == "--trusted-key" else "revoked key"
        raise ConfigError(
            f"cannot read the {what} {path}: {exc.strerror or exc}; check the {option} path"
        ) from exc


def first_packet_tag(data: bytes) -> int | None:
    """The OpenPGP packet tag of a binary file's first packet (6 public, 5 secret key)."""
    if not data or not data[0] & 0x80:
        return None
    if data[0] & 0x40:  # new packet format
        return data[0] & 0x3F
    return (data[0] >> 2) & 0x0F


def ssh_fingerprint(blob: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it, for a public key in wire format."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ssh_string(blob: bytes, pos: int) -> tuple[bytes, int]:
    """One length-prefixed string of the SSH wire format, and the position after it."""
    if pos + 4 > len(blob):
        raise ValueError("truncated")
    size = int.from_bytes(blob[pos : pos + 4], "big")
    end = pos + 4 + size
    if end > len(blob):
        raise ValueError("truncated")
    return blob[pos + 4 : end], end


def _key_blob(keytype: str, encoded: str | None, number: int) -> bytes:
    try:
        blob = base64.b64decode(encoded or "", validate=True)
        embedded, _ = ssh_string(blob, 0)
    except (binascii.Error, ValueError):
        embedded, blob = b"", b""
    if embedded.decode(errors="replace") != keytype:
        raise ValueError(f"line {number}: the {keytype} key data is missing or damaged")
    return blob


def ssh_signers(text: str) -> list[SshSigner]:
    """Parse OpenSSH public key lines and allowed-signers lines; ``ValueError`` names the line.

    A bare public key is trusted for any principal but only for git's signature namespace, as
    ``git commit -S`` signs with namespace ``git``. An allowed-signers line is kept as written,
    so the operator's own restrictions (namespaces, validity, cert-authority) still apply.
    """
    signers = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = _TOKEN.findall(line)
        if tokens[0] in SSH_KEY_TYPES:
            principals, options, rest = "*", 'namespaces="git"', tokens
        elif len(tokens) > 1 and tokens[1] in SSH_KEY_TYPES:
            principals, options, rest = tokens[0], "", tokens[1:]
        elif len(tokens) > 2 and tokens[2] in SSH_KEY_TYPES:
            principals, options, rest = tokens[0], tokens[1], tokens[2:]
        else:
            raise ValueError(
                f"line {number} is neither an SSH public key nor an allowed-signers entry"
            )
        blob = _key_blob(rest[0], rest[1] if len(rest) > 1 else None, number)
        comment = " ".join(rest[2:])
        signers.append(
            SshSigner(
                line=" ".join(t for t in (principals, options, rest[0], rest[1]) if t),
                fingerprint=ssh_fingerprint(blob),
                label=comment if principals == "*" else principals,
            )
        )
    if not signers:
        raise ValueError("it holds no key")
    return signers


def ssh_public_keys(text: str) -> list[tuple[str, str]]:
    """``(line, fingerprint)`` of each ``keytype base64 [comment]`` line (a revocation list)."""
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        tokens = raw.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if tokens[0] not in SSH_KEY_TYPES:
            raise ValueError(f"line {number} is not an SSH public key")
        blob = _key_blob(tokens[0], tokens[1] if len(tokens) > 1 else None, number)
        keys.append((f"{tokens[0]} {tokens[1]}", ssh_fingerprint(blob)))
    if not keys:
        raise ValueError("it holds no key")
    return keys


def signature_key(armored: str) -> tuple[str, bytes] | None:
    """The key type and the public key (wire format) embedded in an armored SSH signature."""
    body = "".join(ln.strip() for ln in armored.splitlines() if not ln.startswith("-----"))
    try:
        blob = base64.b64decode(body, validate=True)
        if not blob.startswith(b"SSHSIG"):
            return None
        public, _ = ssh_string(blob, 10)  # after the magic and the uint32 version
        keytype, _ = ssh_string(public, 0)
    except (binascii.Error, ValueError):
        return None
    return keytype.decode(errors="replace"), public


def _kind(path: Path) -> Literal["openpgp", "ssh"]:
    data = read_key_file(path)
    tag = first_packet_tag(data)
    if b"-----BEGIN PGP PRIVATE KEY BLOCK-----" in data or tag == _PGP_SECRET_KEY_TAG:
        raise ConfigError(
            f"the trusted key {path} is an OpenPGP private key; "
            "give its public key instead (gpg --export --armor KEYID)"
        )
    if _PGP_PUBLIC in data or tag == _PGP_PUBLIC_KEY_TAG:
        return "openpgp"
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"the trusted key {path} is a private key; give the public key (the .pub file)"
        )
    try:
        ssh_signers(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        why = "binary data" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise ConfigError(
            f"the trusted key {path} is neither an OpenPGP public key nor an SSH public key or "
            f"allowed-signers file ({why})"
        ) from None
    return "ssh"


def _revocation_kind(path: Path) -> Literal["openpgp", "ssh", "krl"]:
    data = read_key_file(path, "--revoked-key")
    if data.startswith(_KRL_MAGIC):
        return "krl"
    tag = first_packet_tag(data)
    if _PGP_PUBLIC in data or tag in (_PGP_SIGNATURE_TAG, _PGP_PUBLIC_KEY_TAG):
        return "openpgp"
    if b"PRIVATE" in data or tag == _PGP_SECRET_KEY_TAG:
        raise ConfigError(f"the revoked key {path} is a private key; give the public key")
    try:
        ssh_public_keys(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        why = "binary data" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise ConfigError(
            f"the revoked key {path} is neither an OpenPGP revocation certificate, SSH public "
            f"keys nor an OpenSSH KRL ({why})"
        ) from None
    return "ssh"


@dataclass(frozen=True)
class TrustedKeys:
    """The key files whose signatures make a revision appliable, and those that no longer do.

    ``openpgp``: armored or binary OpenPGP public keys (``gpg --export [--armor]``).
    ``ssh``: OpenSSH public keys, one ``ssh-ed25519 AAAA... comment`` per line, or
    allowed-signers files (``principals [options] keytype key``).
    ``revoked_openpgp``: revocation certificates (or public keys carrying one), imported after
    the trusted keys. ``revoked_ssh``: SSH public keys that must not sign any more.
    ``revoked_krl``: OpenSSH key revocation lists (``ssh-keygen -k``).
    """

    openpgp: tuple[Path, ...] = ()
    ssh: tuple[Path, ...] = ()
    revoked_openpgp: tuple[Path, ...] = ()
    revoked_ssh: tuple[Path, ...] = ()
    revoked_krl: tuple[Path, ...] = ()

    @classmethod
    def from_paths(cls, paths: Sequence[Path], revoked: Sequence[Path] = ()) -> TrustedKeys:
        """Sort key files by what they hold; ``ConfigError`` for one that holds no usable key,
        holds a private key, or cannot be read. Revocations without any trusted key are refused:
        they would suggest a verification that does not happen."""
        if revoked and not paths:
            raise ConfigError("--revoked-key needs --trusted-key: nothing is verified without it")
        sorted_paths: dict[str, list[Path]] = {"openpgp": [], "ssh": []}
        for path in paths:
            sorted_paths[_kind(path)].append(path)
        gone: dict[str, list[Path]] = {"openpgp": [], "ssh": [], "krl": []}
        for path in revoked:
            gone[_revocation_kind(path)].append(path)
        return cls(
            openpgp=tuple(sorted_paths["openpgp"]),
            ssh=tuple(sorted_paths["ssh"]),
            revoked_openpgp=tuple(gone["openpgp"]),
            revoked_ssh=tuple(gone["ssh"]),
            revoked_krl=tuple(gone["krl"]),
        )

    def __bool__(self) -> bool:
        return bool(self.openpgp or self.ssh)
