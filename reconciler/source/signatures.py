"""Commit signature verification: only revisions signed by a trusted key are applied.

The daemon refuses a head that is unsigned, signed by a key nobody trusted, or whose signature
does not match its content; the refusal is reported in one line and the last good revision
keeps running. Verification sits in the source layer, between resolving a ref and exporting
its tree::

    location + ref ──resolve──▶ sha ──verify signature──▶ sha ──checkout──▶ <cache>/trees/<sha>/

Trust comes only from the key files the operator names (``--trusted-key``), never from the
user's ``~/.gnupg`` or git configuration. ``git verify-commit --raw`` runs with
``GIT_CONFIG_GLOBAL=/dev/null`` and ``GIT_CONFIG_NOSYSTEM=1``, a private ``GNUPGHOME`` under the
work directory into which only the trusted OpenPGP keys are imported, and an allowed-signers
file generated from the trusted SSH keys; ``-c`` settings on the command line override whatever
the repository's own ``.git/config`` says about signature programs and signer files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reconciler.errors import ConfigError, SourceError

TIMEOUT = 60.0
_SHORT = 12
_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# Options and principals of an allowed-signers line may hold quoted spaces.
_TOKEN = re.compile(r'(?:[^\s"]|"[^"]*")+')
_SSH_KEY_TYPES = frozenset(
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
_OPENPGP_ARMOR = ("-----BEGIN PGP SIGNATURE-----", "-----BEGIN PGP MESSAGE-----")
_SSH_ARMOR = "-----BEGIN SSH SIGNATURE-----"
_X509_ARMOR = "-----BEGIN SIGNED MESSAGE-----"
_SSH_GOOD = re.compile(r'Good "git" signature for (?P<who>.+) with \S+ key SHA256:\S+')
_PACKAGES = {"gpg": "gnupg", "ssh-keygen": "openssh-client", "git": "git"}
# Keys must never be fetched from a keyserver or WKD: a fetched key would verify as good. Nor is
# an agent started: verifying needs none, and a daemon should not leave one running.
_GPG_CONF = "no-auto-key-retrieve\nno-autostart\nno-greeting\n"
_GPG_ERR_NO_PUBKEY = "9"
_GPG_ERR_UNKNOWN_ALGO = "4"


# -- trusted key files --------------------------------------------------------------------------


@dataclass(frozen=True)
class _SshSigner:
    """One line of the generated allowed-signers file, with what messages call its key."""

    line: str
    fingerprint: str
    label: str


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the trusted key {path}: {exc.strerror or exc}; "
            "check the --trusted-key path"
        ) from exc


def _first_packet_tag(data: bytes) -> int | None:
    """The OpenPGP packet tag of a binary key file's first packet (6 public, 5 secret key)."""
    if not data or not data[0] & 0x80:
        return None
    if data[0] & 0x40:  # new packet format
        return data[0] & 0x3F
    return (data[0] >> 2) & 0x0F


def _ssh_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_string(blob: bytes, pos: int) -> tuple[bytes, int]:
    """One length-prefixed string of the SSH wire format, and the position after it."""
    if pos + 4 > len(blob):
        raise ValueError("truncated")
    size = int.from_bytes(blob[pos : pos + 4], "big")
    end = pos + 4 + size
    if end > len(blob):
        raise ValueError("truncated")
    return blob[pos + 4 : end], end


def _ssh_signers(text: str) -> list[_SshSigner]:
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
        if tokens[0] in _SSH_KEY_TYPES:
            principals, options, rest = "*", 'namespaces="git"', tokens
        elif len(tokens) > 1 and tokens[1] in _SSH_KEY_TYPES:
            principals, options, rest = tokens[0], "", tokens[1:]
        elif len(tokens) > 2 and tokens[2] in _SSH_KEY_TYPES:
            principals, options, rest = tokens[0], tokens[1], tokens[2:]
        else:
            raise ValueError(
                f"line {number} is neither an SSH public key nor an allowed-signers entry"
            )
        keytype = rest[0]
        try:
            blob = base64.b64decode(rest[1], validate=True) if len(rest) > 1 else b""
            embedded, _ = _ssh_string(blob, 0)
        except (binascii.Error, ValueError):
            embedded = b""
        if embedded.decode(errors="replace") != keytype:
            raise ValueError(f"line {number}: the {keytype} key data is missing or damaged")
        comment = " ".join(rest[2:])
        signers.append(
            _SshSigner(
                line=" ".join(t for t in (principals, options, keytype, rest[1]) if t),
                fingerprint=_ssh_fingerprint(blob),
                label=comment if principals == "*" else principals,
            )
        )
    if not signers:
        raise ValueError("it holds no key")
    return signers


def _kind(path: Path) -> Literal["openpgp", "ssh"]:
    data = _read(path)
    tag = _first_packet_tag(data)
    if b"-----BEGIN PGP PRIVATE KEY BLOCK-----" in data or tag == 5:
        raise ConfigError(
            f"the trusted key {path} is an OpenPGP private key; "
            "give its public key instead (gpg --export --armor KEYID)"
        )
    if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in data or tag == 6:
        return "openpgp"
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"the trusted key {path} is a private key; give the public key (the .pub file)"
        )
    try:
        _ssh_signers(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        why = "binary data" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise ConfigError(
            f"the trusted key {path} is neither an OpenPGP public key nor an SSH public key or "
            f"allowed-signers file ({why})"
        ) from None
    return "ssh"


@dataclass(frozen=True)
class TrustedKeys:
    """The key files whose signatures make a revision appliable.

    ``openpgp``: armored or binary OpenPGP public keys (``gpg --export [--armor]``).
    ``ssh``: OpenSSH public keys, one ``ssh-ed25519 AAAA... comment`` per line, or
    allowed-signers files (``principals [options] keytype key``).
    """

    openpgp: tuple[Path, ...] = ()
    ssh: tuple[Path, ...] = ()

    @classmethod
    def from_paths(cls, paths: Sequence[Path]) -> TrustedKeys:
        """Sort key files by what they hold; ``ConfigError`` for one that holds neither kind,
        holds a private key, or cannot be read."""
        openpgp: list[Path] = []
        ssh: list[Path] = []
        for path in paths:
            (openpgp if _kind(path) == "openpgp" else ssh).append(path)
        return cls(openpgp=tuple(openpgp), ssh=tuple(ssh))


# -- helpers around the tools -------------------------------------------------------------------


@dataclass(frozen=True)
class _Keyring:
    home: Path
    fingerprints: frozenset[str]


@dataclass(frozen=True)
class _Signers:
    allowed: Path
    revoked: Path
    labels: dict[str, str] = field(default_factory=dict)


def _missing(tool: str) -> str:
    return (
        f"{tool} is not installed; install the Debian package {_PACKAGES[tool]} "
        "to verify commit signatures"
    )


def _reason(output: str) -> str:
    """The last ``fatal:``/``error:`` line of a tool's output, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("fatal:", "error:", "gpg:"))]
    text = (errors or lines or ["no output"])[-1]
    return text.removeprefix("fatal: ").removeprefix("error: ").removeprefix("gpg: ")


def _unescape(text: str) -> str:
    """gpg percent-escapes control characters and ``%`` in status line arguments."""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _ssh_signature_key(armored: str) -> str | None:
    """``ed25519 key SHA256:...`` for the public key embedded in an SSH signature."""
    body = "".join(ln.strip() for ln in armored.splitlines() if not ln.startswith("-----"))
    try:
        blob = base64.b64decode(body, validate=True)
        if not blob.startswith(b"SSHSIG"):
            return None
        public, _ = _ssh_string(blob, 10)  # after the magic and the uint32 version
        keytype, _ = _ssh_string(public, 0)
    except (binascii.Error, ValueError):
        return None
    return f"{keytype.decode(errors='replace').removeprefix('ssh-')} key {_ssh_fingerprint(public)}"


def _signature(commit: str) -> str | None:
    """The signature in a raw commit object's header (``gpgsig``, or ``gpgsig-sha256`` in a
    SHA-256 repository), continuation lines included; ``None`` for an unsigned commit."""
    header = commit.split("\n\n", 1)[0]
    lines: list[str] = []
    for line in header.split("\n"):
        if lines and line.startswith(" "):
            lines.append(line[1:])
        elif lines:
            break
        elif line.startswith(("gpgsig ", "gpgsig-sha256 ")):
            lines.append(line.split(" ", 1)[1])
    return "\n".join(lines) if lines else None


# -- the verifier -------------------------------------------------------------------------------


class SignatureVerifier:
    """Decides whether a commit carries a good signature by a trusted key (see the module doc).

    The keyring and the allowed-signers file are built on first use (or by :meth:`prepare`)
    under ``work_dir`` and reused. Their names carry a digest of the key files, so a changed set
    of trusted keys never meets a stale keyring, and replicas sharing a directory agree.
    Verdicts are cached per full SHA: a commit's signature cannot change.
    """

    def __init__(self, trusted: TrustedKeys, work_dir: Path) -> None:
        self.trusted = trusted
        self.work_dir = work_dir
        self._keyring: _Keyring | None = None
        self._signers: _Signers | None = None
        self._safe_directories: list[str] | None = None
        self._verdicts: dict[str, tuple[bool, str]] = {}
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the keyring and the allowed-signers file now, so that a bad key file or a
        missing tool fails a daemon's start rather than its first poll."""
        with self._lock:
            if self.trusted.openpgp:
                gpg = shutil.which("gpg")
                if gpg is None:
                    raise SourceError(_missing("gpg"))
                self._openpgp(gpg)
            if self.trusted.ssh:
                if shutil.which("ssh-keygen") is None:
                    raise SourceError(_missing("ssh-keygen"))
                self._ssh()

    def verify(self, repo_path: Path, sha: str) -> str:
        """A one-line description of the good signature of commit ``sha`` in ``repo_path``.

        ``SourceError`` (one line naming the commit and what to do) when the commit is unsigned,
        signed by a key that is not trusted, or its signature is bad; also when it cannot be
        checked. ``ConfigError`` for a trusted key file that gpg cannot import.
        """
        with self._lock:
            verdict = self._verdicts.get(sha)
            if verdict is None:
                verdict = self._judge(repo_path, sha)
                if _FULL_SHA.match(sha):
                    self._verdicts[sha] = verdict
        good, line = verdict
        if not good:
            raise SourceError(line)
        return line

    # -- one commit ---------------------------------------------------------------------------

    def _judge(self, repo_path: Path, sha: str) -> tuple[bool, str]:
        """(True, description) or (False, refusal); raises only when nothing can be said."""
        short = sha[:_SHORT]
        if sha.startswith("-"):
            raise SourceError(f"{sha!r} is not a commit; give a commit SHA")
        code, out, err = self._git(repo_path, "cat-file", "commit", sha)
        if code != 0:
            raise SourceError(f"cannot read commit {short} in {repo_path}: {_reason(err)}")
        signature = _signature(out)
        unsigned = (
            False,
            f"commit {short} is not signed; only revisions signed by a trusted key are applied "
            "(--trusted-key)",
        )
        if signature is None:
            return unsigned
        armor = signature.split("\n", 1)[0].strip()
        if armor in _OPENPGP_ARMOR:
            return self._judge_openpgp(repo_path, sha, short) or unsigned
        if armor == _SSH_ARMOR:
            return self._judge_ssh(repo_path, sha, short, signature) or unsigned
        if armor == _X509_ARMOR:
            return (
                False,
                f"commit {short} is signed with an X.509 certificate, which is not verified "
                "here; sign it with a trusted OpenPGP or SSH key",
            )
        return (
            False,
            f"commit {short} carries a signature of an unknown kind ({armor[:40]!r}); "
            "sign it with a trusted OpenPGP or SSH key",
        )

    def _judge_openpgp(self, repo_path: Path, sha: str, short: str) -> tuple[bool, str] | None:
        gpg = shutil.which("gpg")
        if gpg is None:
            if not self.trusted.openpgp:
                return (
                    False,
                    f"commit {short} is signed with an OpenPGP key, but no OpenPGP key is "
                    "trusted; sign it with a trusted key (--trusted-key)",
                )
            raise SourceError(_missing("gpg"))
        keyring = self._openpgp(gpg)
        code, output = self._verify_commit(
            repo_path,
            sha,
            {"gpg.program": gpg, "gpg.openpgp.program": gpg},
            keyring.home,
        )
        status: dict[str, list[str]] = {}
        for line in output.splitlines():
            if line.startswith("[GNUPG:] "):
                keyword, *args = line.removeprefix("[GNUPG:] ").split(" ")
                status.setdefault(keyword, args)

        def key_and_uid(keyword: str) -> str:
            keyid, *uid = status[keyword]
            return f"{_unescape(' '.join(uid))}, key {keyid}" if uid else f"key {keyid}"

        if "BADSIG" in status:
            return (
                False,
                f"commit {short} has a bad OpenPGP signature ({key_and_uid('BADSIG')}): its "
                "content is not what was signed; it was altered after signing and is not applied",
            )
        if "REVKEYSIG" in status:
            return (
                False,
                f"commit {short} is signed by a revoked OpenPGP key ({key_and_uid('REVKEYSIG')}); "
                "sign it again with a trusted key that is not revoked",
            )
        if "EXPKEYSIG" in status:
            return (
                False,
                f"commit {short} is signed by an expired OpenPGP key ({key_and_uid('EXPKEYSIG')}); "
                "extend the key's expiry and trust the updated key, or sign again",
            )
        if "EXPSIG" in status:
            return (
                False,
                f"commit {short} has an expired OpenPGP signature ({key_and_uid('EXPSIG')}); "
                "sign it again",
            )
        if "ERRSIG" in status:
            args = status["ERRSIG"]
            key = args[6] if len(args) > 6 and args[6] != "-" else args[0]
            if "NO_PUBKEY" in status or args[5:6] == [_GPG_ERR_NO_PUBKEY]:
                return (
                    False,
                    f"commit {short} is signed by OpenPGP key {key}, which is not trusted; "
                    "sign it with a trusted key, or trust this one with --trusted-key",
                )
            if args[5:6] == [_GPG_ERR_UNKNOWN_ALGO]:
                return (
                    False,
                    f"commit {short} is signed by OpenPGP key {key} with an algorithm gpg does "
                    "not support; sign it with a trusted ed25519 or RSA key",
                )
            raise SourceError(
                f"cannot check the OpenPGP signature of commit {short} (key {key}): "
                f"{_reason(output)}"
            )
        if "GOODSIG" in status and "VALIDSIG" in status and code == 0:
            primary = status["VALIDSIG"][-1]
            uid = _unescape(" ".join(status["GOODSIG"][1:]))
            # Only trusted keys are in the keyring; checking the fingerprint as well keeps a key
            # that got in some other way (an import by hand) from being trusted silently.
            if primary not in keyring.fingerprints:
                return (
                    False,
                    f"commit {short} is signed by OpenPGP key {primary} ({uid}), which is not "
                    "trusted; sign it with a trusted key, or trust this one with --trusted-key",
                )
            return True, f"good OpenPGP signature by {uid} (key {primary})"
        if not output.strip():
            return None  # git saw no signature for this repository's hash algorithm
        raise SourceError(
            f"cannot check the OpenPGP signature of commit {short}: {_reason(output)}"
        )

    def _judge_ssh(
        self, repo_path: Path, sha: str, short: str, signature: str
    ) -> tuple[bool, str] | None:
        key = _ssh_signature_key(signature) or "an unreadable key"
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            if not self.trusted.ssh:
                return (
                    False,
                    f"commit {short} is signed by SSH {key}, but no SSH key is trusted; "
                    "sign it with a trusted key (--trusted-key)",
                )
            raise SourceError(_missing("ssh-keygen"))
        signers = self._ssh()
        code, output = self._verify_commit(
            repo_path,
            sha,
            {
                "gpg.ssh.program": keygen,
                "gpg.ssh.allowedSignersFile": str(signers.allowed),
                # An empty file of ours, so that a revocation file named by the repository's
                # config is neither needed nor warned about.
                "gpg.ssh.revocationFile": str(signers.revoked),
            },
            None,
        )
        if code == 0:
            match = _SSH_GOOD.search(output)
            who = match.group("who") if match else "*"
            if who != "*":
                return True, f"good SSH signature by {who} ({key})"
            label = signers.labels.get(key.rsplit(" ", 1)[-1], "")
            return True, f"good SSH signature by {key}" + (f" ({label})" if label else "")
        # ssh-keygen names the allowed-signers line that refused the key, with the reason.
        prefix = f"{signers.allowed}:"
        details = [
            re.sub(r"^\d+: ", "", ln.removeprefix(prefix))
            for ln in output.splitlines()
            if ln.startswith(prefix)
        ]
        detail = f" ({details[-1]})" if details else ""
        if "No principal matched" in output:
            return (
                False,
                f"commit {short} is signed by SSH {key}, which is not trusted{detail}; sign it "
                "with a trusted key, or trust this one with --trusted-key",
            )
        failed = re.search(r"Signature verification failed: (.+)", output)
        if failed and "incorrect signature" in failed.group(1):
            return (
                False,
                f"commit {short} has a bad SSH signature ({key}): its content is not what was "
                "signed; it was altered after signing and is not applied",
            )
        if failed or details:
            why = details[-1] if details else failed.group(1) if failed else ""
            return (
                False,
                f"commit {short} has an SSH signature by {key} that the trusted keys do not "
                f"accept: {why}",
            )
        if not output.strip():
            return None
        raise SourceError(f"cannot check the SSH signature of commit {short}: {_reason(output)}")

    # -- running git ---------------------------------------------------------------------------

    def _verify_commit(
        self, repo_path: Path, sha: str, config: dict[str, str], gnupg_home: Path | None
    ) -> tuple[int, str]:
        # A minimum trust level set by the repository's config would refuse good signatures:
        # being in the keyring or the allowed-signers file is all the trust there is here.
        config = {**config, "gpg.minTrustLevel": "undefined"}
        flags = [arg for name, value in config.items() for arg in ("-c", f"{name}={value}")]
        code, output, _ = self._git(
            repo_path, *flags, "verify-commit", "--raw", sha, gnupg_home=gnupg_home, merge=True
        )
        if "fatal: cannot run " in output:  # the tool vanished since it was looked up
            raise SourceError(f"cannot verify commit {sha[:_SHORT]}: {_reason(output)}")
        return code, output

    def _git(
        self, repo_path: Path, *args: str, gnupg_home: Path | None = None, merge: bool = False
    ) -> tuple[int, str, str]:
        safe = [arg for d in self._safe() for arg in ("-c", f"safe.directory={d}")]
        return self._run(
            ["git", "-C", str(repo_path), *safe, *args],
            env=self._env(gnupg_home),
            merge=merge,
        )

    def _env(self, gnupg_home: Path | None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GIT_") and k not in {"GNUPGHOME", "LANGUAGE"}
        }
        env.update(
            GIT_CONFIG_GLOBAL=os.devnull,
            GIT_CONFIG_NOSYSTEM="1",
            GIT_TERMINAL_PROMPT="0",
            LC_ALL="C",  # the output is parsed
        )
        if gnupg_home is not None:
            env["GNUPGHOME"] = str(gnupg_home)
        return env

    def _safe(self) -> list[str]:
        """The operator's ``safe.directory`` entries (system and global git config).

        Isolating the configuration would otherwise make git refuse a repository owned by
        another user that the source layer reads fine. These entries only say which
        repositories git may open; no signature decision depends on them.
        """
        if self._safe_directories is None:
            env = {k: v for k, v in os.environ.items() if k not in {"GIT_DIR", "GIT_WORK_TREE"}}
            code, out, _ = self._run(
                ["git", "config", "--get-all", "safe.directory"], env=env, cwd=Path(os.sep)
            )
            self._safe_directories = out.splitlines() if code == 0 else []
        return self._safe_directories

    def _run(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        stdin: bytes | None = None,
        merge: bool = False,
        cwd: Path | None = None,
    ) -> tuple[int, str, str]:
        """Run a tool; every failure to start it or to finish in time is a ``SourceError``."""
        tool = Path(argv[0]).name
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                env=env,
                cwd=cwd,
                timeout=TIMEOUT,
                check=False,
            )
        except FileNotFoundError as exc:
            raise SourceError(_missing(tool) if tool in _PACKAGES else str(exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise SourceError(
                f"{tool} gave no answer within {TIMEOUT:g} s while checking a signature"
            ) from exc
        except OSError as exc:
            raise SourceError(f"cannot run {tool}: {exc.strerror or exc}") from exc
        return (
            done.returncode,
            done.stdout.decode(errors="replace"),
            (done.stderr or b"").decode(errors="replace"),
        )

    # -- trusted material on disk ---------------------------------------------------------------

    def _work_dir(self) -> Path:
        try:
            self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(
                f"cannot create {self.work_dir} for the trusted keys: {exc.strerror}; "
                "check permissions of the state directory"
            ) from exc
        return self.work_dir

    def _openpgp(self, gpg: str) -> _Keyring:
        """The private keyring holding exactly the trusted OpenPGP keys, built once."""
        if self._keyring is not None:
            return self._keyring
        keys = [(path, _read(path)) for path in self.trusted.openpgp]
        digest = hashlib.sha256(b"".join(hashlib.sha256(d).digest() for _, d in keys))
        home = self._work_dir() / f"gnupg-{digest.hexdigest()[:16]}"
        if not home.is_dir():
            self._build_keyring(gpg, keys, home)
        code, out, err = self._run(
            [gpg, "--homedir", str(home), "--batch", "--with-colons", "--list-keys"],
            env=self._env(home),
        )
        if code != 0:
            raise SourceError(f"cannot read the keyring {home}: {_reason(err)}")
        fingerprints: set[str] = set()
        record = ""
        for line in out.splitlines():
            fields = line.split(":")
            if fields[0] == "fpr" and record == "pub":
                fingerprints.add(fields[9])
            record = fields[0]
        self._keyring = _Keyring(home, frozenset(fingerprints))
        return self._keyring

    def _build_keyring(self, gpg: str, keys: list[tuple[Path, bytes]], home: Path) -> None:
        """Import the keys into a staging directory renamed into place when complete, so an
        interrupted build never leaves a half keyring that a later start would trust."""
        try:
            staging = Path(tempfile.mkdtemp(prefix=".gnupg-", dir=home.parent))
            (staging / "gpg.conf").write_text(_GPG_CONF)
        except OSError as exc:
            raise SourceError(
                f"cannot create a keyring under {home.parent}: {exc.strerror}; "
                "check free space and permissions of the state directory"
            ) from exc
        try:
            gpg_argv = [gpg, "--homedir", str(staging), "--batch", "--no-tty", "--status-fd", "1"]
            env = self._env(staging)
            fingerprints: list[str] = []
            for path, data in keys:
                _, out, err = self._run([*gpg_argv, "--import"], env=env, stdin=data)
                imported = [
                    line.split(" ")[3]
                    for line in out.splitlines()
                    if line.startswith("[GNUPG:] IMPORT_OK ") and len(line.split(" ")) > 3
                ]
                if not imported:
                    raise ConfigError(
                        f"the trusted key {path} holds no OpenPGP public key gpg can import "
                        f"({_reason(err)}); export it with gpg --export --armor KEYID"
                    )
                fingerprints += imported
            # Ultimate ownertrust makes gpg call the trusted keys valid (TRUST_ULTIMATE), which
            # is what they are: the operator named them.
            ownertrust = "".join(f"{fpr}:6:\n" for fpr in fingerprints).encode()
            steps: list[tuple[list[str], bytes | None]] = [
                ([*gpg_argv, "--import-ownertrust"], ownertrust),
                ([*gpg_argv, "--check-trustdb"], None),
            ]
            for argv, stdin in steps:
                code, _, err = self._run(argv, env=env, stdin=stdin)
                if code != 0:
                    raise SourceError(f"cannot set up the keyring {home}: {_reason(err)}")
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

    def _ssh(self) -> _Signers:
        """The allowed-signers file listing exactly the trusted SSH keys, written once."""
        if self._signers is not None:
            return self._signers
        signers: list[_SshSigner] = []
        for path in self.trusted.ssh:
            try:
                signers += _ssh_signers(_read(path).decode())
            except (UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"the trusted SSH key file {path}: {exc}") from None
        content = "".join(f"{s.line}\n" for s in signers).encode()
        work_dir = self._work_dir()
        allowed = work_dir / f"allowed_signers-{hashlib.sha256(content).hexdigest()[:16]}"
        revoked = work_dir / "revoked_keys"
        try:
            for path, data in ((allowed, content), (revoked, b"")):
                if path.is_file() and path.read_bytes() == data:
                    continue
                staging = path.with_name(f".{path.name}.{os.getpid()}")
                staging.write_bytes(data)
                staging.replace(path)
        except OSError as exc:
            raise SourceError(
                f"cannot write the allowed-signers file under {work_dir}: {exc.strerror}; "
                "check free space and permissions of the state directory"
            ) from exc
        self._signers = _Signers(allowed, revoked, {s.fingerprint: s.label for s in signers})
        return self._signers
