"""A fleet's encrypted secrets: SOPS (age recipients) and plain age files in the repository,
decrypted on the host with its age key, known everywhere else only by keyed digests.

    Fleet.spec.secrets ──▶ manifests.compile ──SecretResolver──▶ digests in VM settings
                                                          └──▶ SensitiveValues (memory only)
                                                                 ──▶ executor ──▶ guest init

``sops.py`` reads the formats, ``keys.py`` finds the keys, ``resolver.py`` caches and digests.
"""

from reconciler.defaults import AGE_KEY_ENV, AGE_KEY_FILE
from reconciler.secrets.errors import SecretError, SecretIntegrityError, SecretKeyMissingError
from reconciler.secrets.keys import (
    DIGEST_KEY_FILE,
    FleetDigestKeys,
    age_key_path,
    digest_key,
    fleet_digest_key,
    fleet_digest_keys,
    load_identities,
)
from reconciler.secrets.resolver import DIGEST_PREFIX, SecretResolver, open_resolver
from reconciler.secrets.sops import FORMATS, decrypt_file, format_of, names_in

__all__ = [
    "AGE_KEY_ENV",
    "AGE_KEY_FILE",
    "DIGEST_KEY_FILE",
    "DIGEST_PREFIX",
    "FORMATS",
    "FleetDigestKeys",
    "SecretError",
    "SecretIntegrityError",
    "SecretKeyMissingError",
    "SecretResolver",
    "age_key_path",
    "decrypt_file",
    "digest_key",
    "fleet_digest_key",
    "fleet_digest_keys",
    "format_of",
    "load_identities",
    "names_in",
    "open_resolver",
]
