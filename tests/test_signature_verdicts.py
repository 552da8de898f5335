"""The verdicts over gpg's status lines and ssh-keygen's output, from recorded cases (fast, pure).

Every case below was recorded from the real tools (gpg 2.2, OpenSSH 9.2) on signatures made for
the purpose: a good one, one over altered content, by an expired key, by a revoked key, by a key
nobody trusted, with an algorithm gpg does not know (a signature packet's algorithm byte set to
100). ``test_signatures.py`` runs the same situations end to end.
"""

from __future__ import annotations

import pytest

from reconciler.errors import SourceError
from reconciler.source.gpg import PrimaryKey, openpgp_verdict, parse_show_keys
from reconciler.source.signatures import split_signed_commit
from reconciler.source.ssh import SshReport, ssh_verdict, verify_time

GOOD_FPR = "E88A459747EC07263C3CCEC2057EC226408B933C"
OLD_FPR = "940C386A3B51C249EAABFD416A817DC05DE94909"
REV_FPR = "EA06F9D387FF147AF528204BB7555E3C116D72B5"
STRANGER_FPR = "54085A2A97163092EB07B8ED4B0C3604B8189B0C"


def _key(fpr: str, *subkeys: str, revoked: bool = False) -> PrimaryKey:
    return PrimaryKey(fpr, frozenset({fpr, *subkeys}), "someone", revoked)


TRUSTED = {k.fingerprint: k for k in (_key(GOOD_FPR), _key(OLD_FPR), _key(REV_FPR))}

GPG_GOOD = f"""\
[GNUPG:] NEWSIG good@example.invalid
[GNUPG:] KEY_CONSIDERED {GOOD_FPR} 0
[GNUPG:] SIG_ID 8KKc5pvjyrx4xWCRyYc4mJKBJoQ 2026-11-30 1796059381
[GNUPG:] GOODSIG 057EC226408B933C Good <good@example.invalid>
[GNUPG:] VALIDSIG {GOOD_FPR} 2026-11-30 1796059381 0 4 0 22 8 00 {GOOD_FPR}
[GNUPG:] TRUST_ULTIMATE 0 pgp
"""
GPG_BAD = """\
[GNUPG:] NEWSIG good@example.invalid
[GNUPG:] BADSIG 057EC226408B933C Good <good@example.invalid>
[GNUPG:] FAILURE gpg-exit 33554433
"""
GPG_EXPIRED_KEY = f"""\
[GNUPG:] NEWSIG old@example.invalid
[GNUPG:] KEYEXPIRED 1577923200
[GNUPG:] SIG_ID B6LFsZYnAPf8mo/UK3hAzY3N8wo 2020-01-01 1577836860
[GNUPG:] EXPKEYSIG 6A817DC05DE94909 Old <old@example.invalid>
[GNUPG:] VALIDSIG {OLD_FPR} 2020-01-01 1577836860 0 4 0 22 8 00 {OLD_FPR}
"""
GPG_REVOKED_KEY = f"""\
[GNUPG:] NEWSIG rev@example.invalid
[GNUPG:] SIG_ID vuE+vCe2TWbw+m5yaIiLuJqtr/o 2026-11-30 1796059383
[GNUPG:] REVKEYSIG B7555E3C116D72B5 Revoked <rev@example.invalid>
[GNUPG:] VALIDSIG {REV_FPR} 2026-11-30 1796059383 0 4 0 22 8 00 {REV_FPR}
[GNUPG:] KEYREVOKED
[GNUPG:] TRUST_ULTIMATE 0 pgp
"""
GPG_UNKNOWN_KEY = f"""\
[GNUPG:] NEWSIG good@example.invalid
[GNUPG:] ERRSIG 057EC226408B933C 22 8 00 1796059381 9 {GOOD_FPR}
[GNUPG:] NO_PUBKEY 057EC226408B933C
"""
GPG_UNSUPPORTED_ALGORITHM = f"""\
[GNUPG:] NEWSIG good@example.invalid
[GNUPG:] ERRSIG 057EC226408B933C 100 8 00 1796059381 4 {GOOD_FPR}
"""


@pytest.mark.parametrize(
    ("status", "code", "good", "message"),
    [
        (
            GPG_GOOD,
            0,
            True,
            f"good OpenPGP signature by Good <good@example.invalid> (key {GOOD_FPR})",
        ),
        (
            GPG_BAD,
            1,
            False,
            "commit abc has a bad OpenPGP signature (Good <good@example.invalid>, key "
            "057EC226408B933C): its content is not what was signed; it was altered after signing "
            "and is not applied",
        ),
        (
            # gpg exits 0 for a signature by an expired key: the status line decides.
            GPG_EXPIRED_KEY,
            0,
            False,
            "commit abc is signed by an expired OpenPGP key (Old <old@example.invalid>, key "
            "6A817DC05DE94909); extend the key's expiry and trust the updated key, or sign again",
        ),
        (
            GPG_REVOKED_KEY,
            0,
            False,
            "commit abc is signed by a revoked OpenPGP key (Revoked <rev@example.invalid>, key "
            "B7555E3C116D72B5); sign it again with a trusted key that is not revoked",
        ),
        (
            GPG_UNKNOWN_KEY,
            2,
            False,
            f"commit abc is signed by OpenPGP key {GOOD_FPR}, which is not trusted; sign it with "
            "a trusted key, or trust this one with --trusted-key",
        ),
        (
            GPG_UNSUPPORTED_ALGORITHM,
            2,
            False,
            f"commit abc is signed by OpenPGP key {GOOD_FPR} with an algorithm gpg does not "
            "support; sign it with a trusted ed25519 or RSA key",
        ),
    ],
    ids=["good", "bad", "expired-key", "revoked-key", "unknown-key", "unsupported-algorithm"],
)
def test_openpgp_verdicts(status: str, code: int, good: bool, message: str) -> None:
    verdict = openpgp_verdict("abc", status, code, TRUSTED)
    assert (verdict.good, verdict.message) == (good, message)


def test_a_good_signature_by_a_key_not_computed_from_the_key_files_is_refused() -> None:
    """The keyring may hold more than the files (an import by hand): only the files count."""
    verdict = openpgp_verdict("abc", GPG_GOOD, 0, {OLD_FPR: _key(OLD_FPR)})
    assert not verdict.good
    assert verdict.message == (
        f"commit abc is signed by OpenPGP key {GOOD_FPR} (Good <good@example.invalid>), which is "
        "not trusted; sign it with a trusted key, or trust this one with --trusted-key"
    )


def test_a_subkey_must_belong_to_the_trusted_certificate_in_its_own_file() -> None:
    subkey = "1" * 40
    status = GPG_GOOD.replace(f"VALIDSIG {GOOD_FPR}", f"VALIDSIG {subkey}")
    assert not openpgp_verdict("abc", status, 0, TRUSTED).good
    with_subkey = {GOOD_FPR: _key(GOOD_FPR, subkey)}
    assert openpgp_verdict("abc", status, 0, with_subkey).good


def test_a_key_revoked_in_its_file_is_refused_even_if_gpg_says_good() -> None:
    verdict = openpgp_verdict("abc", GPG_GOOD, 0, {GOOD_FPR: _key(GOOD_FPR, revoked=True)})
    assert not verdict.good
    assert "revoked OpenPGP key" in verdict.message


def test_more_than_one_signature_is_refused() -> None:
    verdict = openpgp_verdict("abc", GPG_GOOD + GPG_BAD, 1, TRUSTED)
    assert verdict.message.startswith("commit abc carries 2 OpenPGP signatures")


def test_gpg_output_that_says_nothing_is_an_error_not_a_verdict() -> None:
    with pytest.raises(SourceError, match="cannot check the OpenPGP signature of commit abc"):
        openpgp_verdict("abc", "gpg: no valid OpenPGP data found.\n", 2, TRUSTED)
    with pytest.raises(SourceError, match="cannot check"):
        openpgp_verdict("abc", GPG_GOOD.replace("VALIDSIG", "X"), 0, TRUSTED)


SHOW_KEYS = f"""\
pub:-:255:22:057EC226408B933C:1796059375:::-:::scSC:::::ed25519:::0:
fpr:::::::::{GOOD_FPR}:
uid:-::::1796059375::2753611093233516FE78::Good <good@example.invalid>::::::::::0:
sub:-:255:22:AAAAAAAAAAAAAAAA:1796059375::::::s:::::ed25519::
fpr:::::::::{"A" * 40}:
sub:r:255:22:BBBBBBBBBBBBBBBB:1796059375::::::s:::::ed25519::
fpr:::::::::{"B" * 40}:
pub:r:255:22:B7555E3C116D72B5:1796059380:::-:::sc:::::ed25519:::0:
fpr:::::::::{REV_FPR}:
uid:r::::1796059380::EA74C5ECA851C9D7021E::Revoked <rev@example.invalid>::::::::::0:
"""


def test_show_keys_listing_gives_each_certificate_with_its_signing_keys() -> None:
    good, revoked = parse_show_keys(SHOW_KEYS)
    assert good == PrimaryKey(
        GOOD_FPR, frozenset({GOOD_FPR, "A" * 40}), "Good <good@example.invalid>", revoked=False
    )
    assert revoked.fingerprint == REV_FPR
    assert revoked.revoked
    assert parse_show_keys("") == []


SSH_KEY = "ed25519 key SHA256:65r5Bk/oh3nn2onw92l+fK13NmxCaBgjcG6eSQLCr20"
SSH_GOOD = f'Good "git" signature for * with ED25519 key {SSH_KEY.rsplit(maxsplit=1)[-1]}\n'


def _report(**changes: object) -> SshReport:
    fields: dict[str, object] = {
        "key": SSH_KEY,
        "label": "deploy@example.invalid",
        "known": True,
        "revoked": False,
        "principals": (0, "*\n"),
        "verified": (0, SSH_GOOD),
        "allowed_file": "/state/allowed",
    }
    fields.update(changes)
    return SshReport(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("report", "good", "message"),
    [
        (_report(), True, f"good SSH signature by {SSH_KEY} (deploy@example.invalid)"),
        (
            _report(
                verified=(
                    255,
                    "Signature verification failed: incorrect signature\n"
                    "Could not verify signature.\n",
                )
            ),
            False,
            f"commit abc has a bad SSH signature ({SSH_KEY}): its content is not what was "
            "signed; it was altered after signing and is not applied",
        ),
        (
            _report(
                principals=(
                    255,
                    "/state/allowed:1: key has expired: verify time 2026-11-30T17:22:32 > "
                    "valid-before 2021-01-01T00:00:00\nNo principal matched.\n",
                ),
                verified=None,
            ),
            False,
            f"commit abc is signed by SSH {SSH_KEY}, which is trusted but not valid now (key "
            "has expired: verify time 2026-11-30T17:22:32 > valid-before 2021-01-01T00:00:00); "
            "sign it again with a key that is valid",
        ),
        (
            _report(revoked=True, verified=None),
            False,
            f"commit abc is signed by SSH {SSH_KEY}, which is revoked (--revoked-key); sign it "
            "again with a trusted key that is not revoked",
        ),
        (
            _report(
                known=False, label="", principals=(255, "No principal matched.\n"), verified=None
            ),
            False,
            f"commit abc is signed by SSH {SSH_KEY}, which is not trusted; sign it with a "
            "trusted key, or trust this one with --trusted-key",
        ),
        (
            _report(
                verified=(
                    255,
                    '/state/allowed:1: key is not permitted for use in signature namespace "git"\n'
                    "Could not verify signature.\n",
                )
            ),
            False,
            f"commit abc has an SSH signature by {SSH_KEY} that the trusted keys do not accept: "
            'key is not permitted for use in signature namespace "git"',
        ),
        (
            # What ssh-keygen -r says for a revoked key: nothing more.
            _report(verified=(255, "Could not verify signature.\n")),
            False,
            f"commit abc has an SSH signature by {SSH_KEY} that the trusted keys do not accept: "
            "Could not verify signature.",
        ),
    ],
    ids=["good", "bad", "expired", "revoked", "unknown-key", "namespace", "refused-by-r"],
)
def test_ssh_verdicts(report: SshReport, good: bool, message: str) -> None:
    verdict = ssh_verdict("abc", report)
    assert (verdict.good, verdict.message) == (good, message)


def test_ssh_output_that_says_nothing_is_an_error_not_a_verdict() -> None:
    with pytest.raises(SourceError, match="cannot check the SSH signature of commit abc"):
        ssh_verdict("abc", _report(principals=(255, "Couldn't load signature\n")))
    with pytest.raises(SourceError, match="cannot check"):
        ssh_verdict("abc", _report(verified=(0, "something else\n")))


def test_verify_time_is_utc() -> None:
    assert verify_time(0) == "19700101000000Z"
    assert verify_time(1577836800) == "20200101000000Z"


RAW = (
    b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
    b"author a <a@b> 1577836800 +0000\n"
    b"committer a <a@b> 1577836800 +0000\n"
    b"gpgsig -----BEGIN SSH SIGNATURE-----\n"
    b" U1NIU0lH\n"
    b" \n"
    b" -----END SSH SIGNATURE-----\n"
    b"gpgsig-sha256 -----BEGIN PGP SIGNATURE-----\n"
    b" other\n"
    b" -----END PGP SIGNATURE-----\n"
    b"encoding latin-1\n"
    b"\n"
    b"caf\xe9\n"
)


def test_split_signed_commit_cuts_every_signature_header_out_of_the_payload() -> None:
    signature, payload = split_signed_commit(RAW, "a" * 40)
    assert signature == "-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n\n-----END SSH SIGNATURE-----\n"
    assert payload == (
        b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
        b"author a <a@b> 1577836800 +0000\n"
        b"committer a <a@b> 1577836800 +0000\n"
        b"encoding latin-1\n"
        b"\n"
        b"caf\xe9\n"
    )
    sha256_signature, same = split_signed_commit(RAW, "a" * 64)
    assert sha256_signature == "-----BEGIN PGP SIGNATURE-----\nother\n-----END PGP SIGNATURE-----\n"
    assert same == payload
    unsigned = b"tree 4b82\nauthor a\n\nmessage\n"
    assert split_signed_commit(unsigned, "a" * 40) == (None, unsigned)
