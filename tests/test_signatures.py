"""Commit signature verification on real repositories with real OpenPGP and SSH signatures.

Keys are generated once per module (ed25519, no passphrase) in temporary homes; commits are
signed by git itself. Nothing is mocked: the verifier runs git, gpg and ssh-keygen.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.errors import ConfigError, SourceError
from reconciler.source.signatures import SignatureVerifier, TrustedKeys
from reconciler.source.verifier import VERDICT_SECONDS

# Signing must not depend on the machine's git configuration either.
ISOLATED = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def run(*argv: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        argv, check=True, capture_output=True, input=stdin, env={**os.environ, **(env or {})}
    )
    return done.stdout.decode()


@dataclass(frozen=True)
class Keys:
    gnupg: Path  # the signer's own GNUPGHOME: holds and ultimately trusts both OpenPGP keys
    pgp_fpr: str
    pgp_armored: Path
    pgp_binary: Path
    pgp_secret: Path
    stranger_fpr: str
    ssh_key: Path  # private; the public key is ssh_key.pub
    ssh_fpr: str
    stranger_ssh_key: Path
    stranger_ssh_fpr: str


def _gen_pgp(gnupg: Path, uid: str) -> str:
    gpg = ("gpg", "--homedir", str(gnupg), "--batch", "--pinentry-mode", "loopback")
    run(*gpg, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = run(*gpg, "--with-colons", "--list-keys", uid)
    return next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))


def _gen_ssh(path: Path, comment: str) -> str:
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return run("ssh-keygen", "-l", "-f", f"{path}.pub").split()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    root = tmp_path_factory.mktemp("keys")
    gnupg = root / "gnupg"
    gnupg.mkdir(mode=0o700)
    pgp_fpr = _gen_pgp(gnupg, "Fleet Signer <signer@example.invalid>")
    stranger_fpr = _gen_pgp(gnupg, "Stranger <stranger@example.invalid>")
    gpg = ("gpg", "--homedir", str(gnupg), "--batch")
    (root / "signer.asc").write_text(run(*gpg, "--export", "--armor", pgp_fpr))
    (root / "signer.gpg").write_bytes(
        subprocess.run([*gpg, "--export", pgp_fpr], check=True, capture_output=True).stdout
    )
    secret = run(
        *gpg, "--pinentry-mode", "loopback", "--passphrase", "", "--export-secret-keys", "-a"
    )
    (root / "secret.asc").write_text(secret)
    ssh_fpr = _gen_ssh(root / "deploy", "deploy@example.invalid")
    stranger_ssh_fpr = _gen_ssh(root / "stranger", "stranger@example.invalid")
    yield Keys(
        gnupg=gnupg,
        pgp_fpr=pgp_fpr,
        pgp_armored=root / "signer.asc",
        pgp_binary=root / "signer.gpg",
        pgp_secret=root / "secret.asc",
        stranger_fpr=stranger_fpr,
        ssh_key=root / "deploy",
        ssh_fpr=ssh_fpr,
        stranger_ssh_key=root / "stranger",
        stranger_ssh_fpr=stranger_ssh_fpr,
    )
    # Key generation and signing started an agent for this home; do not leave it running.
    subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)


@dataclass(frozen=True)
class Repo:
    path: Path
    shas: dict[str, str]


def _git(repo: Path, *args: str, keys: Keys, stdin: bytes | None = None) -> str:
    env = {**ISOLATED, "GNUPGHOME": str(keys.gnupg)}
    return run("git", "-C", str(repo), *args, env=env, stdin=stdin).strip()


def _commit(repo: Path, message: str, *signing: str, keys: Keys) -> str:
    _git(repo, *signing, "commit", "-q", "--allow-empty", "-m", message, keys=keys)
    return _git(repo, "rev-parse", "HEAD", keys=keys)


def _tampered(repo: Path, sha: str, keys: Keys) -> str:
    """A commit object with the signature of ``sha`` over a different message."""
    raw = _git(repo, "cat-file", "commit", sha, keys=keys) + "\n"
    assert raw.endswith("\nsigned\n")
    forged = raw.removesuffix("signed\n") + "forged\n"
    return _git(
        repo, "hash-object", "-t", "commit", "-w", "--stdin", keys=keys, stdin=forged.encode()
    )


def _openpgp(fpr: str) -> tuple[str, ...]:
    return ("-c", "gpg.format=openpgp", "-c", f"user.signingkey={fpr}", "-c", "commit.gpgsign=true")


def _ssh(key: Path) -> tuple[str, ...]:
    return ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "-c", "commit.gpgsign=true")


@pytest.fixture(scope="module")
def repo(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Repo:
    path = tmp_path_factory.mktemp("fleet")
    _git(path, "init", "-q", "-b", "main", keys=keys)
    _git(path, "config", "user.name", "Operator", keys=keys)
    _git(path, "config", "user.email", "operator@example.invalid", keys=keys)
    shas = {
        "unsigned": _commit(path, "unsigned", keys=keys),
        "pgp": _commit(path, "signed", *_openpgp(keys.pgp_fpr), keys=keys),
        "pgp_stranger": _commit(path, "signed", *_openpgp(keys.stranger_fpr), keys=keys),
        "ssh": _commit(path, "signed", *_ssh(keys.ssh_key), keys=keys),
        "ssh_stranger": _commit(path, "signed", *_ssh(keys.stranger_ssh_key), keys=keys),
    }
    shas["pgp_tampered"] = _tampered(path, shas["pgp"], keys)
    shas["ssh_tampered"] = _tampered(path, shas["ssh"], keys)
    return Repo(path, shas)


@pytest.fixture
def trusted(keys: Keys) -> TrustedKeys:
    return TrustedKeys(openpgp=(keys.pgp_armored,), ssh=(Path(f"{keys.ssh_key}.pub"),))


@pytest.fixture
def verifier(trusted: TrustedKeys, tmp_path: Path) -> SignatureVerifier:
    return SignatureVerifier(trusted, tmp_path / "signatures")


# -- trusted key files -------------------------------------------------------------------------


def test_from_paths_sorts_openpgp_and_ssh_key_files(keys: Keys, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed_signers"
    public = Path(f"{keys.ssh_key}.pub").read_text().split()
    allowed.write_text(
        "# deployers\n\n"
        f'deploy@example.invalid,ci namespaces="git",valid-after="20200101" {public[0]} '
        f"{public[1]}\n"
    )
    ssh_pub = Path(f"{keys.ssh_key}.pub")
    found = TrustedKeys.from_paths([ssh_pub, keys.pgp_armored, allowed, keys.pgp_binary])
    assert found == TrustedKeys(openpgp=(keys.pgp_armored, keys.pgp_binary), ssh=(ssh_pub, allowed))
    assert TrustedKeys.from_paths([]) == TrustedKeys()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello world\n", "neither an OpenPGP public key nor an SSH public key"),
        (b"", "holds no key"),
        (b"\x00\x01binary\xff", "binary data"),
        (b"ssh-ed25519 AAAAnotbase64!! x\n", "key data is missing or damaged"),
        (b"ssh-ed25519\n", "key data is missing or damaged"),
    ],
)
def test_from_paths_rejects_files_that_hold_no_public_key(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(reason)) as caught:
        TrustedKeys.from_paths([junk])
    assert str(junk) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_from_paths_rejects_private_and_unreadable_files(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OpenPGP private key; give its public key"):
        TrustedKeys.from_paths([keys.pgp_secret])
    with pytest.raises(ConfigError, match=r"is a private key; give the public key \(the .pub"):
        TrustedKeys.from_paths([keys.ssh_key])
    with pytest.raises(ConfigError, match=r"cannot read the trusted key .*missing\.pub"):
        TrustedKeys.from_paths([tmp_path / "missing.pub"])
    with pytest.raises(ConfigError, match="Is a directory"):
        TrustedKeys.from_paths([tmp_path])


def test_an_openpgp_file_gpg_cannot_import_is_a_config_error(repo: Repo, tmp_path: Path) -> None:
    broken = tmp_path / "broken.asc"
    broken.write_text(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n"
    )
    verifier = SignatureVerifier(TrustedKeys.from_paths([broken]), tmp_path / "sig")
    with pytest.raises(
        ConfigError, match=r"broken\.asc holds no OpenPGP public key gpg can import"
    ):
        verifier.prepare()
    assert not list((tmp_path / "sig").glob("*gnupg*"))  # no half keyring left behind


# -- verdicts ------------------------------------------------------------------------------------


def test_a_trusted_openpgp_signature_verifies(
    verifier: SignatureVerifier, repo: Repo, keys: Keys
) -> None:
    assert verifier.verify(repo.path, repo.shas["pgp"]) == (
        f"good OpenPGP signature by Fleet Signer <signer@example.invalid> (key {keys.pgp_fpr})"
    )


def test_a_binary_openpgp_key_is_trusted_too(repo: Repo, keys: Keys, tmp_path: Path) -> None:
    verifier = SignatureVerifier(TrustedKeys.from_paths([keys.pgp_binary]), tmp_path)
    assert keys.pgp_fpr in verifier.verify(repo.path, repo.shas["pgp"])


def test_a_trusted_ssh_signature_verifies(
    verifier: SignatureVerifier, repo: Repo, keys: Keys
) -> None:
    assert verifier.verify(repo.path, repo.shas["ssh"]) == (
        f"good SSH signature by ed25519 key {keys.ssh_fpr} (deploy@example.invalid)"
    )


def test_allowed_signers_files_keep_their_principals_and_restrictions(
    repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    keytype, key = Path(f"{keys.ssh_key}.pub").read_text().split()[:2]
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'deploy@example.invalid namespaces="git" {keytype} {key}\n')
    named = SignatureVerifier(TrustedKeys.from_paths([allowed]), tmp_path / "a")
    assert named.verify(repo.path, repo.shas["ssh"]) == (
        f"good SSH signature by deploy@example.invalid (ed25519 key {keys.ssh_fpr})"
    )
    allowed.write_text(f'deploy@example.invalid namespaces="file" {keytype} {key}\n')
    restricted = SignatureVerifier(TrustedKeys.from_paths([allowed]), tmp_path / "b")
    with pytest.raises(SourceError, match='not permitted for use in signature namespace "git"'):
        restricted.verify(repo.path, repo.shas["ssh"])


def test_an_unsigned_commit_is_refused(verifier: SignatureVerifier, repo: Repo) -> None:
    sha = repo.shas["unsigned"]
    with pytest.raises(SourceError) as caught:
        verifier.verify(repo.path, sha)
    assert str(caught.value) == (
        f"commit {sha[:12]} is not signed; only revisions signed by a trusted key are applied "
        "(--trusted-key)"
    )


@pytest.mark.parametrize(("commit", "kind"), [("pgp_stranger", "OpenPGP"), ("ssh_stranger", "SSH")])
def test_a_commit_signed_by_an_untrusted_key_is_refused(
    verifier: SignatureVerifier, repo: Repo, keys: Keys, commit: str, kind: str
) -> None:
    sha = repo.shas[commit]
    key = keys.stranger_fpr if kind == "OpenPGP" else f"ed25519 key {keys.stranger_ssh_fpr}"
    with pytest.raises(SourceError) as caught:
        verifier.verify(repo.path, sha)
    assert str(caught.value) == (
        f"commit {sha[:12]} is signed by {kind} {'key ' if kind == 'OpenPGP' else ''}{key}, "
        "which is not trusted; sign it with a trusted key, or trust this one with --trusted-key"
    )


@pytest.mark.parametrize(("commit", "kind"), [("pgp_tampered", "OpenPGP"), ("ssh_tampered", "SSH")])
def test_a_commit_altered_after_signing_has_a_bad_signature(
    verifier: SignatureVerifier, repo: Repo, commit: str, kind: str
) -> None:
    sha = repo.shas[commit]
    with pytest.raises(SourceError) as caught:
        verifier.verify(repo.path, sha)
    message = str(caught.value)
    assert message.startswith(f"commit {sha[:12]} has a bad {kind} signature (")
    assert message.endswith("it was altered after signing and is not applied")


def test_signatures_of_a_kind_with_no_trusted_key_are_refused(
    repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    only_ssh = SignatureVerifier(TrustedKeys(ssh=(Path(f"{keys.ssh_key}.pub"),)), tmp_path / "s")
    with pytest.raises(SourceError, match=f"signed by OpenPGP key {keys.pgp_fpr}, which is not"):
        only_ssh.verify(repo.path, repo.shas["pgp"])
    only_pgp = SignatureVerifier(TrustedKeys(openpgp=(keys.pgp_armored,)), tmp_path / "p")
    with pytest.raises(
        SourceError, match=re.escape(f"signed by SSH ed25519 key {keys.ssh_fpr}, which is")
    ):
        only_pgp.verify(repo.path, repo.shas["ssh"])


def test_user_and_repository_configuration_cannot_widen_trust(
    trusted: TrustedKeys, repo: Repo, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signer's GNUPGHOME trusts the stranger ultimately, the user's and the repository's
    git config allow the stranger's SSH key and point gpg at ``true``: none of it counts."""
    stranger = tmp_path / "stranger_signers"
    stranger.write_text(f"* {Path(f'{keys.stranger_ssh_key}.pub').read_text()}")
    user_config = tmp_path / "gitconfig"
    user_config.write_text(f'[gpg "ssh"]\n\tallowedSignersFile = {stranger}\n')
    clone = tmp_path / "clone"
    shutil.copytree(repo.path, clone)
    for name, value in (
        ("gpg.ssh.allowedSignersFile", str(stranger)),
        ("gpg.program", "true"),
        ("gpg.ssh.program", "true"),
        ("gpg.minTrustLevel", "ultimate"),
    ):
        _git(clone, "config", name, value, keys=keys)
    monkeypatch.setenv("GNUPGHOME", str(keys.gnupg))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(user_config))
    verifier = SignatureVerifier(trusted, tmp_path / "signatures")
    for commit in ("pgp_stranger", "ssh_stranger"):
        with pytest.raises(SourceError, match="which is not trusted"):
            verifier.verify(clone, repo.shas[commit])
    assert verifier.verify(clone, repo.shas["pgp"]).startswith("good OpenPGP signature")
    assert verifier.verify(clone, repo.shas["ssh"]).startswith("good SSH signature")


def test_unknown_commits_and_missing_repositories_are_source_errors(
    verifier: SignatureVerifier, repo: Repo, tmp_path: Path
) -> None:
    with pytest.raises(SourceError, match="cannot read commit 000000000000 in"):
        verifier.verify(repo.path, "0" * 40)
    with pytest.raises(SourceError, match=r"cannot read commit .* not a git repository"):
        verifier.verify(tmp_path, repo.shas["pgp"])


def test_keyring_is_built_once_and_verdicts_are_cached(
    trusted: TrustedKeys, repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    work = tmp_path / "signatures"
    first = SignatureVerifier(trusted, work)
    first.prepare()
    good = first.verify(repo.path, repo.shas["pgp"])
    # Cached per SHA: the repository is not even read again.
    assert first.verify(tmp_path / "gone", repo.shas["pgp"]) == good
    with pytest.raises(SourceError, match="is not signed"):
        first.verify(repo.path, repo.shas["unsigned"])
    with pytest.raises(SourceError, match="is not signed"):
        first.verify(tmp_path / "gone", repo.shas["unsigned"])
    second = SignatureVerifier(trusted, work)
    assert second.verify(repo.path, repo.shas["pgp"]) == good
    assert len(list(work.glob("gnupg-*"))) == 1
    # Another set of trusted keys gets its own keyring: a key no longer trusted stays out.
    third = SignatureVerifier(TrustedKeys(ssh=trusted.ssh), work)
    with pytest.raises(SourceError, match="not trusted"):
        third.verify(repo.path, repo.shas["pgp"])
    assert len(list(work.glob("gnupg-*"))) == 2
    assert not list(work.glob(".*"))  # no staging left behind


def test_missing_tools_name_their_debian_package(
    trusted: TrustedKeys, repo: Repo, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = shutil.which("git")
    assert git is not None
    (bin_dir / "git").symlink_to(git)
    monkeypatch.setenv("PATH", str(bin_dir))
    verifier = SignatureVerifier(trusted, tmp_path / "signatures")
    with pytest.raises(SourceError, match="gpg is not installed; install the Debian package gnupg"):
        verifier.verify(repo.path, repo.shas["pgp"])
    with pytest.raises(SourceError, match=r"ssh-keygen is not installed; .* openssh-client"):
        verifier.verify(repo.path, repo.shas["ssh"])
    with pytest.raises(SourceError, match="ssh-keygen is not installed"):
        SignatureVerifier(TrustedKeys(ssh=trusted.ssh), tmp_path / "s").prepare()
    # Without keys of that kind nothing could be trusted anyway: refused, not a tool error.
    only_ssh = SignatureVerifier(TrustedKeys(ssh=trusted.ssh), tmp_path / "s")
    with pytest.raises(
        SourceError, match="signed with an OpenPGP key, but no OpenPGP key is trusted"
    ):
        only_ssh.verify(repo.path, repo.shas["pgp"])
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(SourceError, match="git is not installed; install the Debian package git"):
        SignatureVerifier(trusted, tmp_path / "g").verify(repo.path, repo.shas["pgp"])


# -- time, revocation and where trust comes from ---------------------------------------------------


def _backdated(repo: Path, key: Path, keys: Keys) -> str:
    env = {
        **ISOLATED,
        "GNUPGHOME": str(keys.gnupg),
        "GIT_COMMITTER_DATE": "2020-06-01T00:00:00Z",
        "GIT_AUTHOR_DATE": "2020-06-01T00:00:00Z",
    }
    run("git", "-C", str(repo), *_ssh(key), "commit", "-q", "--allow-empty", "-m", "old", env=env)
    return run("git", "-C", str(repo), "rev-parse", "HEAD", env=env).strip()


def test_an_ssh_key_past_its_valid_before_cannot_sign_by_backdating(
    keys: Keys, tmp_path: Path
) -> None:
    """git verify-commit checks SSH validity at the committer date, which the signer writes."""
    clone = tmp_path / "fleet"
    _git(clone.parent, "init", "-q", "-b", "main", str(clone), keys=keys)
    _git(clone, "config", "user.name", "Operator", keys=keys)
    _git(clone, "config", "user.email", "operator@example.invalid", keys=keys)
    sha = _backdated(clone, keys.ssh_key, keys)
    keytype, key = Path(f"{keys.ssh_key}.pub").read_text().split()[:2]
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'* namespaces="git",valid-before="20210101" {keytype} {key}\n')
    # What git itself says: good, since the commit claims to be from 2020.
    config = f"gpg.ssh.allowedSignersFile={allowed}"
    done = subprocess.run(
        ["git", "-C", str(clone), "-c", config, "verify-commit", "--", sha],
        capture_output=True,
        env={**os.environ, **ISOLATED},
        check=False,
    )
    assert done.returncode == 0
    verifier = SignatureVerifier(TrustedKeys.from_paths([allowed]), tmp_path / "signatures")
    with pytest.raises(SourceError) as caught:
        verifier.verify(clone, sha)
    assert str(caught.value).startswith(
        f"commit {sha[:12]} is signed by SSH ed25519 key {keys.ssh_fpr}, which is trusted but "
        "not valid now (key has expired: verify time "
    )


def test_ssh_validity_is_judged_at_the_injected_now_and_remembered_briefly(
    repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    keytype, key = Path(f"{keys.ssh_key}.pub").read_text().split()[:2]
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'* namespaces="git",valid-before="20300101Z" {keytype} {key}\n')
    now = [1893456000.0 - 60]  # a minute before 2030-01-01T00:00:00Z
    verifier = SignatureVerifier(
        TrustedKeys.from_paths([allowed]), tmp_path / "signatures", clock=lambda: now[0]
    )
    assert verifier.verify(repo.path, repo.shas["ssh"]).startswith("good SSH signature")
    now[0] += 120  # past valid-before, but the verdict is still remembered
    assert verifier.verify(repo.path, repo.shas["ssh"]).startswith("good SSH signature")
    now[0] += VERDICT_SECONDS
    with pytest.raises(SourceError, match="which is trusted but not valid now"):
        verifier.verify(repo.path, repo.shas["ssh"])


def test_revoked_ssh_keys_are_refused_from_a_key_list_or_a_krl(
    repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    public = Path(f"{keys.ssh_key}.pub")
    krl = tmp_path / "revoked.krl"
    run("ssh-keygen", "-q", "-k", "-f", str(krl), str(public))
    other = tmp_path / "other.krl"
    run("ssh-keygen", "-q", "-k", "-f", str(other), f"{keys.stranger_ssh_key}.pub")
    for name, revoked in (("list", [public]), ("krl", [other, krl])):
        trusted = TrustedKeys.from_paths([public], revoked)
        verifier = SignatureVerifier(trusted, tmp_path / name)
        with pytest.raises(SourceError) as caught:
            verifier.verify(repo.path, repo.shas["ssh"])
        assert str(caught.value) == (
            f"commit {repo.shas['ssh'][:12]} is signed by SSH ed25519 key {keys.ssh_fpr}, which "
            "is revoked (--revoked-key); sign it again with a trusted key that is not revoked"
        )
    # A KRL that revokes someone else changes nothing.
    trusted = TrustedKeys.from_paths([public], [other])
    assert SignatureVerifier(trusted, tmp_path / "o").verify(repo.path, repo.shas["ssh"])


def _revocation(keys: Keys) -> str:
    """The revocation certificate gpg made when it generated the signer's key."""
    made = keys.gnupg / "openpgp-revocs.d" / f"{keys.pgp_fpr}.rev"
    return made.read_text().replace(":-----BEGIN", "-----BEGIN")


def test_openpgp_revocation_certificates_are_honoured(
    repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    certificate = tmp_path / "signer.rev"
    certificate.write_text(_revocation(keys))
    bundled = tmp_path / "signer-revoked.asc"
    bundled.write_text(keys.pgp_armored.read_text() + _revocation(keys))
    expected = (
        f"commit {repo.shas['pgp'][:12]} is signed by a revoked OpenPGP key (Fleet Signer "
        f"<signer@example.invalid>, key {keys.pgp_fpr[-16:]}); sign it again with a trusted key "
        "that is not revoked"
    )
    for name, trusted in (
        ("given", TrustedKeys.from_paths([keys.pgp_armored], [certificate])),
        ("in-the-key-file", TrustedKeys.from_paths([bundled])),
    ):
        verifier = SignatureVerifier(trusted, tmp_path / name)
        with pytest.raises(SourceError) as caught:
            verifier.verify(repo.path, repo.shas["pgp"])
        assert str(caught.value) == expected, name


def test_a_key_added_to_the_keyring_by_other_means_is_not_trusted(
    trusted: TrustedKeys, repo: Repo, keys: Keys, tmp_path: Path
) -> None:
    """Trust is computed from the key files, not listed from the keyring."""
    work = tmp_path / "signatures"
    SignatureVerifier(trusted, work).prepare()
    (keyring,) = work.glob("gnupg-*")
    stranger = subprocess.run(
        ["gpg", "--homedir", str(keys.gnupg), "--export", keys.stranger_fpr],
        capture_output=True,
        check=True,
    ).stdout
    imported = subprocess.run(
        ["gpg", "--homedir", str(keyring), "--batch", "--import"],
        input=stranger,
        capture_output=True,
        check=False,
    )
    assert b"imported: 1" in imported.stderr  # (gpg also complains that no agent runs)
    verifier = SignatureVerifier(trusted, work)  # reuses the keyring, now holding the stranger
    with pytest.raises(SourceError) as caught:
        verifier.verify(repo.path, repo.shas["pgp_stranger"])
    assert str(caught.value) == (
        f"commit {repo.shas['pgp_stranger'][:12]} is signed by OpenPGP key {keys.stranger_fpr} "
        "(Stranger <stranger@example.invalid>), which is not trusted; sign it with a trusted "
        "key, or trust this one with --trusted-key"
    )
    assert verifier.verify(repo.path, repo.shas["pgp"]).startswith("good OpenPGP signature")


def test_revocation_files_are_sorted_and_checked(keys: Keys, tmp_path: Path) -> None:
    public = Path(f"{keys.ssh_key}.pub")
    krl = tmp_path / "k.krl"
    run("ssh-keygen", "-q", "-k", "-f", str(krl), str(public))
    cert = tmp_path / "signer.rev"
    cert.write_text(_revocation(keys))
    found = TrustedKeys.from_paths([public], [public, krl, cert])
    assert found.revoked_ssh == (public,)
    assert found.revoked_krl == (krl,)
    assert found.revoked_openpgp == (cert,)
    with pytest.raises(ConfigError, match="--revoked-key needs --trusted-key"):
        TrustedKeys.from_paths([], [public])
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="neither an OpenPGP revocation certificate"):
        TrustedKeys.from_paths([public], [junk])
    with pytest.raises(ConfigError, match="cannot read the revoked key"):
        TrustedKeys.from_paths([public], [tmp_path / "missing"])
