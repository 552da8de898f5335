"""A revision's secret references, checked and resolved while its workloads compile.

Where it sits: ``loader.load_fleet`` builds one ``FleetSecrets`` from the Fleet's
``spec.secrets`` (name -> encrypted file, relative to the fleet directory) and
``compile.compile_workload`` asks it for every ``deploy.secretEnv`` and ``deploy.secretFiles``
reference. With a ``SecretResolver`` (``diff``, ``apply``, the daemon) each reference is
decrypted and becomes a ``SecretRef`` with its keyed digest, the value kept aside for
``DesiredFleet.sensitive``. Without one (``validate``, which needs no key) the names are
checked against the file's clear-text keys and the digest is a placeholder.

The files are untrusted input like every manifest: their paths stay inside the repository
(symlinks resolved), their size is capped, and a file that cannot be read, parsed or decrypted
refuses the revision.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from reconciler.model import SecretRef
from reconciler.secrets import (
    SecretError,
    SecretResolver,
    format_of,
    names_in,
)
from reconciler.secrets.sops import MAX_SECRET_FILE_BYTES

UNRESOLVED = "unresolved"
"""The digest of a reference checked without a key (``validate``): never compared or started."""


class FleetSecrets:
    def __init__(
        self,
        declared: Mapping[str, str],
        *,
        root: Path,
        fleet_dir: Path,
        resolver: SecretResolver | None,
    ) -> None:
        self.declared = dict(declared)
        self.root = root
        self.fleet_dir = fleet_dir
        self.resolver = resolver
        self.sensitive: dict[str, str] = {}
        self._names: dict[str, set[str] | str] = {}
        self._files: dict[str, tuple[bytes, str, str] | str] = {}  # each file read once

    def __repr__(self) -> str:
        return f"FleetSecrets({sorted(self.declared)})"

    def _read(self, name: str) -> tuple[bytes, str, str] | str:
        if name not in self._files:
            self._files[name] = self._read_file(name)
        return self._files[name]

    def _read_file(self, name: str) -> tuple[bytes, str, str] | str:
        declared = self.declared[name]
        path = Path(os.path.realpath(self.fleet_dir / declared))
        if not (path == self.root or str(path).startswith(str(self.root) + os.sep)):
            return f"secret {name!r}: {declared!r} leaves the repository"
        try:
            if path.stat().st_size > MAX_SECRET_FILE_BYTES:
                return f"secret {name!r}: {declared!r} is larger than {MAX_SECRET_FILE_BYTES} bytes"
            data = path.read_bytes()
        except OSError as exc:
            return f"secret {name!r}: cannot read {declared!r}: {exc.strerror or exc}"
        origin = os.path.relpath(path, self.root)
        try:
            return data, format_of(declared), origin
        except SecretError as exc:
            return str(exc)

    def names(self, name: str) -> set[str] | str:
        """The value names secret ``name`` offers, or a problem."""
        if name not in self._names:
            read = self._read(name)
            if isinstance(read, str):
                self._names[name] = read
            else:
                data, fmt, origin = read
                try:
                    self._names[name] = names_in(data, fmt, origin=origin)
                except SecretError as exc:
                    self._names[name] = str(exc)
        return self._names[name]

    def ref(self, secret: str, key: str) -> SecretRef | str:
        """The reference to value ``key`` of ``secret`` (``""``: a whole age file), or a
        problem. Decryption failures raise ``SecretError``: they refuse the revision whatever
        else is wrong with it."""
        if secret not in self.declared:
            known = ", ".join(sorted(self.declared)) or "none"
            return f"unknown secret {secret!r} (the Fleet's spec.secrets declares: {known})"
        names = self.names(secret)
        if isinstance(names, str):
            return names
        if key not in names:
            if names == {""}:
                return f"secret {secret!r} is a whole age-encrypted file: give no key"
            if not key:
                return f"secret {secret!r} holds several values: name one with key"
            return f"secret {secret!r} has no value {key!r}"
        if self.resolver is None:
            return SecretRef(secret, key, UNRESOLVED)
        read = self._read(secret)
        assert not isinstance(read, str)  # names() read it already
        data, fmt, origin = read
        value = self.resolver.values(data, fmt, origin=origin)[key]
        digest = self.resolver.digest(value)
        self.sensitive[digest] = value
        return SecretRef(secret, key, digest)
