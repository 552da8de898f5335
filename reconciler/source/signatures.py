"""Commit signature verification: the public entry point of the source layer's trust checks.

    --trusted-key / --revoked-key files ──TrustedKeys──▶ SignatureVerifier ──▶ VerifiedSource

The work is split by concern: ``keys`` (what the operator's key files hold), ``gpg`` (OpenPGP:
keyring, verdict over gpg's status lines), ``ssh`` (SSH: ssh-keygen at the current time,
revocation, verdict over its output), ``verifier`` (reading the commit, dispatching, caching,
and the verifying ``Source`` wrapper). Import from here.
"""

from reconciler.source.keys import TrustedKeys
from reconciler.source.verifier import SignatureVerifier, VerifiedSource, split_signed_commit

__all__ = ["SignatureVerifier", "TrustedKeys", "VerifiedSource", "split_signed_commit"]
