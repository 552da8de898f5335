"""The two keys behind a fleet's secrets: the host's age identity and the fleet's digest key.

Where it sits: the CLI and the daemon build a ``SecretResolver`` (``resolver.py``) from these
when they load a revision. Both live on the host, never in the fleet repository:

* the **age identity** decrypts secret files. Found, first match wins, at ``--age-key-file``,
  at ``$SOPS_AGE_KEY_FILE`` (the variable ``sops`` itself reads) or at
  ``<state dir>/age-key.txt``; read only when a revision actually declares a secret.
* the **digest key** (``<state dir>/secret-digest.key``, 32 random bytes, 0600) keys the HMAC
  that stands for a secret value in a VM's settings, the state store and every plan. A bare
  hash of a short password could be reversed by guessing; an HMAC under a key that never
  leaves the host cannot. Commands that must not write (``diff``) use the key if it exists and
  otherwise an ephemeral one, which is enough to compare two revisions with each other.

  On a PostgreSQL store the hosts share the fleet, so they must share this key too: with keys
  of their own, two hosts would digest one secret differently and the leader would see drift
  forever. There the key is the fleet's, stored once in the store (``FleetDigestKeys``): the
  first host to need it offers its state directory's key (a fleet that grows from one host
  keeps its digests) or a fresh one, and every host, that one included, uses what was stored.
  The key then leaves the host for the store, which holds the digests too: guessing a secret
  from its digest needs the database's contents, not only the plans and status that show it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol, runtime_checkable

from reconciler.defaults import AGE_KEY_ENV, AGE_KEY_FILE
from reconciler.secrets.errors import SecretKeyMissingError
from reconciler.secrets.sops import Identity

DIGEST_KEY_FILE = "secret-digest.key"
_DIGEST_KEY_BYTES = 32


def age_key_path(option: Path | None, environment: str | None, state_dir: Path) -> Path | None:
    """Where the age identity is: the option, else the variable, else the state directory's
    file when it exists; None when there is none."""
    if option is not None:
        return option
    if environment:
        return Path(environment)
    default = state_dir / AGE_KEY_FILE
    return default if default.exists() else None


def load_identities(path: Path | None) -> list[Identity]:
    """Every ``AGE-SECRET-KEY-1...`` line of an age key file (``age-keygen`` writes comments
    around it); raises ``SecretKeyMissingError`` in one line when there is none to use."""
    if path is None:
        raise SecretKeyMissingError(
            "the fleet declares secrets but no age key is configured: give --age-key-file, "
            f"set ${AGE_KEY_ENV} or put the key at <state dir>/{AGE_KEY_FILE}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecretKeyMissingError(f"cannot read the age key file {path}: {why}") from exc
    import pyrage  # noqa: PLC0415 (imported when a key is read, not by every command)

    identities = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError as exc:
            # The line is a key: never echo it.
            raise SecretKeyMissingError(
                f"{path}:{number}: not an age identity (AGE-SECRET-KEY-1...)"
            ) from exc
    if not identities:
        raise SecretKeyMissingError(f"{path}: no age identity (AGE-SECRET-KEY-1...) in it")
    return identities


def digest_key(state_dir: Path, *, create: bool) -> bytes:
    """The fleet's digest key; created (0600, atomically) when ``create`` and missing, else an
    ephemeral key for this process only (see the module docstring)."""
    path = state_dir / DIGEST_KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    except OSError as exc:
        raise SecretKeyMissingError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(key) == _DIGEST_KEY_BYTES:
        return key
    if key:
        raise SecretKeyMissingError(f"{path} is not a {_DIGEST_KEY_BYTES}-byte key; remove it")
    fresh = secrets.token_bytes(_DIGEST_KEY_BYTES)
    if not create:
        return fresh
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{DIGEST_KEY_FILE}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, fresh)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # never replaces a key another process wrote meanwhile
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return digest_key(state_dir, create=False)


@runtime_checkable
class FleetDigestKeys(Protocol):
    """A state store that holds the fleet's digest key (the PostgreSQL store)."""

    def fleet_digest_key(self, candidate: bytes) -> bytes:
        """The stored key; ``candidate`` is stored first when there is none."""
        ...


def fleet_digest_keys(store: object) -> FleetDigestKeys | None:
    """``store`` when it holds the fleet's digest key, else None (SQLite: one host, whose state
    directory holds the key)."""
    return store if isinstance(store, FleetDigestKeys) else None


def fleet_digest_key(store: FleetDigestKeys, state_dir: Path) -> bytes:
    """The fleet's digest key from ``store``, stored there first if no host did yet (with this
    host's own key when it has one, see the module docstring)."""
    key = store.fleet_digest_key(digest_key(state_dir, create=False))
    if len(key) != _DIGEST_KEY_BYTES:
        # Never the key itself: only its length says what is wrong.
        raise SecretKeyMissingError(
            f"the state store holds a {len(key)}-byte secret digest key, not "
            f"{_DIGEST_KEY_BYTES}; remove its fleet_digest_key row"
        )
    return key
