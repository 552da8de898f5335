"""The errors of decrypting a fleet's secrets, in the project's one tree (``reconciler.errors``).

Each is one line that names the secret and its file and says what to do; none ever carries a
decrypted value. A revision whose secrets cannot be decrypted is refused as a whole (the daemon
keeps the last good one running).
"""

from __future__ import annotations

from reconciler.errors import ReconcilerError


class SecretError(ReconcilerError):
    """A secret cannot be decrypted or used. Transient by default: installing the right age key
    (or fixing its file's mode) makes the same revision work."""


class SecretKeyMissingError(SecretError):
    """No age identity is configured, or its file cannot be read."""


class SecretIntegrityError(SecretError):
    """A file that is not what ``sops`` or ``age`` wrote: a broken MAC, a malformed value, an
    unsupported feature. The same commit fails the same way: terminal."""

    terminal = True
