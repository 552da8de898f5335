"""``SecretResolver``: a revision's secret files in, plaintext values (in memory) and their
keyed digests out.

Where it sits: ``manifests.compile`` asks it, for every ``deploy.secretEnv`` and
``deploy.secretFiles`` reference, for the value and its digest. The digest goes into the VM's
settings (so the planner sees a changed secret as a changed setting, and the state store and
plans hold only the digest); the value goes into the desired fleet's ``SensitiveValues``, which
the executor hands to the guest's per-VM configuration at start time and which nothing stores,
prints or serialises.

Each distinct file content is decrypted once per resolver (the daemon keeps one across cycles,
and ``diff --base --head`` loads two revisions that mostly share their files).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from reconciler.secrets.keys import (
    FleetDigestKeys,
    age_key_path,
    digest_key,
    fleet_digest_key,
    load_identities,
)
from reconciler.secrets.sops import Identity, decrypt_file

DIGEST_PREFIX = "hmac-sha256:"


class SecretResolver:
    """Decrypts with the age identities of the file ``age_key()`` names and digests under
    ``digest_key()``. Both are asked on first use only: building one does no I/O, and a fleet
    without secrets never needs a key."""

    def __init__(
        self,
        *,
        age_key: Callable[[], Path | None],
        digest_key: Callable[[], bytes],
        identities: Callable[[Path | None], Sequence[Identity]] = load_identities,
    ) -> None:
        self._age_key = age_key
        self._digest_key_source = digest_key
        self._digest_key: bytes | None = None
        self._load_identities = identities
        self._identities: Sequence[Identity] | None = None
        self._files: dict[str, Mapping[str, str]] = {}

    def __repr__(self) -> str:  # never the keys, never the values
        return f"SecretResolver(files={len(self._files)})"

    def values(self, data: bytes, fmt: str, *, origin: str) -> Mapping[str, str]:
        """The plaintext values of one secret file (``sops.decrypt_file``), cached by content."""
        content = hashlib.sha256(fmt.encode() + b"\0" + data).hexdigest()
        cached = self._files.get(content)
        if cached is None:
            if self._identities is None:
                self._identities = self._load_identities(self._age_key())
            cached = MappingProxyType(decrypt_file(data, fmt, self._identities, origin=origin))
            self._files[content] = cached
        return cached

    def digest(self, value: str) -> str:
        """The keyed digest that stands for ``value`` wherever it would show."""
        if self._digest_key is None:
            self._digest_key = self._digest_key_source()
        mac = hmac.new(self._digest_key, value.encode(), hashlib.sha256).hexdigest()
        return DIGEST_PREFIX + mac


def open_resolver(
    state_dir: Path,
    *,
    age_key_file: Path | None,
    create_digest_key: bool,
    fleet: FleetDigestKeys | None = None,
) -> SecretResolver:
    """The resolver of a command or the daemon: the age key where ``keys.age_key_path`` finds
    it (``age_key_file``: the option, else ``$SOPS_AGE_KEY_FILE``, both already chosen by the
    caller), the fleet's digest key from ``state_dir`` (created only by commands that apply),
    or from ``fleet``, the store shared by the fleet's hosts, when given (``keys``)."""

    def key() -> bytes:
        if fleet is not None:
            return fleet_digest_key(fleet, state_dir)
        return digest_key(state_dir, create=create_digest_key)

    return SecretResolver(
        age_key=lambda: age_key_path(age_key_file, None, state_dir), digest_key=key
    )
