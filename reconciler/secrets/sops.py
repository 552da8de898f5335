"""Decrypting files written by ``sops`` 3.x (age recipients) and by plain ``age``.

Where it sits: ``resolver.SecretResolver`` reads a secret's file from the revision and hands its
bytes here with the host's age identities; what comes back is a flat mapping of names to
plaintext values, held in memory only. Nothing here does I/O.

The format, as ``sops`` writes it (getsops/sops: ``aes/cipher.go``, ``sops.go``,
``stores/dotenv/store.go``, ``decrypt/decrypt.go``):

* every value of the document is replaced by
  ``ENC[AES256_GCM,data:<b64>,iv:<b64>,tag:<b64>,type:str|int|float|bool|bytes|time]``,
  AES-256-GCM under one random data key, a 32-byte IV, and as additional data the path of
  mapping keys to the value joined by ``:`` with a trailing ``:`` (``db:password:``; list
  indices add nothing). Keys stay in clear, so the resolver can check a reference without a key.
* the ``sops`` mapping (dotenv: ``sops_*`` lines, flattened with ``__map_``/``__list_N``)
  holds the data key encrypted for each ``age`` recipient (an armored age file), ``lastmodified``
  and ``mac``: the upper-case hex SHA-512 over every value's plaintext in document order
  (comments excluded; only encrypted values, after a fixed prefix, with ``mac_only_encrypted``),
  itself encrypted with the data key and ``lastmodified`` (RFC 3339) as additional data.
* ``unencrypted_suffix``, ``encrypted_suffix``, ``unencrypted_regex`` and ``encrypted_regex``
  choose which values were encrypted, per key on the path.

The MAC is checked before any value is returned: a value swapped, removed or added after
encryption, or one left in clear where sops would have encrypted it, is refused. age and
AES-GCM come from maintained libraries (``pyrage``, ``cryptography``); nothing here is a
cryptographic primitive. Not supported, and refused in one line: Shamir key groups, several
YAML documents in one file, the comment-based encryption rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import yaml

from reconciler.secrets.errors import (
    SecretError,
    SecretIntegrityError,
    SecretKeyMissingError,
)

FORMATS = ("yaml", "json", "dotenv", "age")
MAX_SECRET_FILE_BYTES = 1 << 20
_MAX_YAML_EVENTS = 100_000
_ENC = re.compile(r"^ENC\[AES256_GCM,data:(.+),iv:(.+),tag:(.+),type:(.+)\]")
# sha256(b"sops"): what sops hashes first when ``mac_only_encrypted`` is set.
_MAC_ONLY_ENCRYPTED_INIT = hashlib.sha256(b"sops").digest()
_YAMLLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Identity = Any  # pyrage identities (x25519, ssh); pyrage's stubs type them per class


def format_of(path: str) -> str:
    """The format a secret file's name says it is in."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".age"):
        return "age"
    if name.endswith(".env") or name == ".env":
        return "dotenv"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".yaml", ".yml")):
        return "yaml"
    raise SecretError(
        f"{path}: cannot tell the secret's format from its name "
        "(.yaml, .yml, .json or .env for sops, .age for plain age)"
    )


def decrypt_file(
    data: bytes, fmt: str, identities: Sequence[Identity], *, origin: str
) -> dict[str, str]:
    """The plaintext values of one secret file: ``{name: value}`` (sops; nested names joined
    with ``.``, list items by index), or ``{"": content}`` for a whole file encrypted with age.

    Raises ``SecretKeyMissingError`` when no identity opens it, ``SecretIntegrityError`` when it
    was altered or is not what sops/age writes."""
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretIntegrityError(f"{origin}: larger than {MAX_SECRET_FILE_BYTES} bytes")
    if fmt == "age":
        plain = _age_decrypt(data, identities, origin=origin)
        return {"": _text(plain, origin=origin, what="the decrypted file")}
    if fmt == "dotenv":
        tree, metadata = _load_dotenv(data, origin=origin)
    elif fmt in ("yaml", "json"):
        tree, metadata = _load_yaml(data, origin=origin)
    else:
        raise SecretError(f"{origin}: unknown secret format {fmt!r}")
    return _SopsFile(tree, metadata, origin).decrypt(identities)


# ------------------------------------------------------------------------------- loading --


def _text(data: bytes, *, origin: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretIntegrityError(f"{origin}: {what} is not UTF-8 text") from exc


def _load_yaml(data: bytes, *, origin: str) -> tuple[dict[str, Any], dict[str, Any]]:
    text = _text(data, origin=origin, what="the file")
    try:
        # Aliases are refused outright (sops never writes them): no expansion bomb, and the MAC
        # walk sees each value once, as sops does.
        for count, event in enumerate(yaml.parse(text, Loader=_YAMLLoader)):
            if isinstance(event, yaml.AliasEvent) or count > _MAX_YAML_EVENTS:
                raise SecretIntegrityError(f"{origin}: aliases or too many nodes; not a sops file")
        documents = [d for d in yaml.load_all(text, Loader=_YAMLLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise SecretIntegrityError(f"{origin}: not valid YAML: {_first_line(exc)}") from exc
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise SecretIntegrityError(f"{origin}: a sops file is one YAML or JSON mapping")
    tree = dict(documents[0])
    metadata = tree.pop("sops", None)
    if not isinstance(metadata, dict):
        raise SecretIntegrityError(f"{origin}: no sops metadata; is the file encrypted?")
    return tree, metadata


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _load_dotenv(data: bytes, *, origin: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """sops's dotenv store: ``KEY=value`` lines (``\\n`` escapes a newline), ``#`` comments,
    its metadata as ``sops_``-prefixed flattened keys."""
    text = _text(data, origin=origin, what="the file")
    tree: dict[str, Any] = {}
    flat: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise SecretIntegrityError(f"{origin}:{number}: not a KEY=value line")
        if name in tree or name in flat:
            raise SecretIntegrityError(f"{origin}:{number}: {name} is set twice")
        if name.startswith("sops_"):
            flat[name.removeprefix("sops_")] = value.replace("\\n", "\n")
        else:
            tree[name] = value.replace("\\n", "\n")
    if not flat:
        raise SecretIntegrityError(f"{origin}: no sops metadata; is the file encrypted?")
    return tree, _unflatten(flat, origin=origin)


def _unflatten(flat: dict[str, str], *, origin: str) -> dict[str, Any]:
    """Undo sops's ``__map_``/``__list_N__`` flattening of the metadata (stores/flatten.go)."""
    root: dict[str, Any] = {}
    token = re.compile(r"__map_|__list_(\d+)")
    for path, value in flat.items():
        parts: list[str | int] = []
        at = 0
        for match in token.finditer(path):
            if match.start() > at:
                parts.append(path[at : match.start()])
            if match.group(1) is not None:
                parts.append(int(match.group(1)))
            at = match.end()
        if at < len(path):
            parts.append(path[at:])
        node: Any = root
        for part, following in zip(parts, [*parts[1:], None], strict=True):
            container: Any = {} if not isinstance(following, int) else []
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise SecretIntegrityError(f"{origin}: malformed sops metadata key {path}")
                while len(node) <= part:
                    node.append(None)
                if following is None:
                    node[part] = value
                elif node[part] is None:
                    node[part] = container
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise SecretIntegrityError(f"{origin}: malformed sops metadata key {path}")
                if following is None:
                    node[part] = value
                else:
                    node = node.setdefault(part, container)
    return root


# ---------------------------------------------------------------------------- decryption --


def _age_decrypt(data: bytes, identities: Sequence[Identity], *, origin: str) -> bytes:
    import pyrage  # noqa: PLC0415 (imported when a secret is read, not by every command)

    if not identities:
        raise SecretKeyMissingError(f"{origin}: no age key to decrypt it with")
    try:
        return pyrage.decrypt(data, list(identities))
    except pyrage.DecryptError as exc:
        if "No matching keys" in str(exc):
            raise SecretKeyMissingError(
                f"{origin}: encrypted for another recipient: none of the configured age keys "
                "can open it"
            ) from exc
        raise SecretIntegrityError(f"{origin}: not a valid age file: {exc}") from exc


@dataclass(frozen=True)
class _Value:
    iv: bytes
    sealed: bytes  # the ciphertext followed by the 16-byte GCM tag
    kind: str


def _parse_enc(value: str, *, origin: str, at: str) -> _Value | None:
    match = _ENC.match(value)
    if match is None:
        return None
    try:
        data, iv, tag = (base64.b64decode(match.group(i), validate=True) for i in (1, 2, 3))
    except ValueError as exc:
        raise SecretIntegrityError(f"{origin}: {at}: malformed encrypted value") from exc
    return _Value(iv, data + tag, match.group(4))


class _SopsFile:
    def __init__(self, tree: dict[str, Any], metadata: dict[str, Any], origin: str) -> None:
        self.tree = tree
        self.meta = metadata
        self.origin = origin
        for unsupported in ("key_groups", "shamir_threshold"):
            if metadata.get(unsupported):
                raise SecretIntegrityError(
                    f"{origin}: sops key groups (Shamir) are not supported; "
                    "encrypt for age recipients directly"
                )
        for unsupported in ("unencrypted_comment_regex", "encrypted_comment_regex"):
            if metadata.get(unsupported):
                raise SecretIntegrityError(f"{origin}: sops {unsupported} is not supported")
        self.mac_only_encrypted = str(metadata.get("mac_only_encrypted", "")).lower() == "true"

    def decrypt(self, identities: Sequence[Identity]) -> dict[str, str]:
        key = self._data_key(identities)
        digest = hashlib.sha512()
        if self.mac_only_encrypted:
            digest.update(_MAC_ONLY_ENCRYPTED_INIT)
        values: dict[str, str] = {}
        for path, names, leaf in _leaves(self.tree):
            at = ".".join(str(p) for p in path)
            if self._encrypted(names):
                plain, text = self._open(leaf, key, names, at=at)
                digest.update(plain)
            else:
                plain, text = _clear_bytes(leaf, origin=self.origin, at=at)
                if not self.mac_only_encrypted:
                    digest.update(plain)
            values[at] = text
        self._check_mac(key, digest.hexdigest().upper())
        return values

    def _data_key(self, identities: Sequence[Identity]) -> bytes:
        import pyrage  # noqa: PLC0415 (see _age_decrypt)

        stanzas = self.meta.get("age") or []
        if not isinstance(stanzas, list) or not stanzas:
            raise SecretKeyMissingError(
                f"{self.origin}: encrypted for no age recipient (only age is supported)"
            )
        if not identities:
            raise SecretKeyMissingError(f"{self.origin}: no age key to decrypt it with")
        recipients = []
        for stanza in stanzas:
            if not isinstance(stanza, dict) or not isinstance(stanza.get("enc"), str):
                raise SecretIntegrityError(f"{self.origin}: malformed sops age entry")
            recipients.append(str(stanza.get("recipient", "?")))
            try:
                key = pyrage.decrypt(stanza["enc"].encode(), list(identities))
            except pyrage.DecryptError:
                continue
            if len(key) != 32:
                raise SecretIntegrityError(f"{self.origin}: the sops data key is not 32 bytes")
            return key
        raise SecretKeyMissingError(
            f"{self.origin}: encrypted for another recipient ({', '.join(recipients)}): none of "
            "the configured age keys can open it"
        )

    def _encrypted(self, names: Sequence[str]) -> bool:
        """sops.go ``shouldBeEncrypted``: the suffix and regex rules, on every key of the path."""
        meta = self.meta
        encrypted = True
        if suffix := meta.get("unencrypted_suffix"):
            encrypted = not any(n.endswith(suffix) for n in names)
        if suffix := meta.get("encrypted_suffix"):
            encrypted = any(n.endswith(suffix) for n in names)
        pattern = meta.get("unencrypted_regex")
        if pattern and any(re.search(pattern, n) for n in names):
            encrypted = False
        if pattern := meta.get("encrypted_regex"):
            encrypted = any(re.search(pattern, n) for n in names)
        return encrypted

    def _open(self, leaf: Any, key: bytes, names: Sequence[str], *, at: str) -> tuple[bytes, str]:
        if leaf == "":
            return b"", ""  # sops leaves empty values empty
        value = _parse_enc(leaf, origin=self.origin, at=at) if isinstance(leaf, str) else None
        if value is None:
            raise SecretIntegrityError(
                f"{self.origin}: {at} is not encrypted where sops would have encrypted it"
            )
        plain = self._aes(value, key, ":".join(names) + ":", at=at)
        text = _text(plain, origin=self.origin, what=at)
        if value.kind == "bool":
            # Go's strconv.ParseBool, then sops's "True"/"False" for the MAC.
            truth = text in ("1", "t", "T", "TRUE", "true", "True")
            if not truth and text not in ("0", "f", "F", "FALSE", "false", "False"):
                raise SecretIntegrityError(f"{self.origin}: {at} is not a boolean")
            return (b"True" if truth else b"False"), ("true" if truth else "false")
        if value.kind not in ("str", "int", "float", "bytes", "time"):
            raise SecretIntegrityError(f"{self.origin}: {at} has unknown type {value.kind}")
        return plain, text

    def _aes(self, value: _Value, key: bytes, aad: str, *, at: str) -> bytes:
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415 (see _age_decrypt)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

        try:
            return AESGCM(key).decrypt(value.iv, value.sealed, aad.encode())
        except (InvalidTag, ValueError) as exc:
            raise SecretIntegrityError(
                f"{self.origin}: {at} does not decrypt: the file was altered after sops "
                "encrypted it"
            ) from exc

    def _check_mac(self, key: bytes, computed: str) -> None:
        stored = self.meta.get("mac")
        modified = self.meta.get("lastmodified")
        if not isinstance(stored, str) or not isinstance(modified, str):
            raise SecretIntegrityError(f"{self.origin}: the sops metadata has no mac")
        value = _parse_enc(stored, origin=self.origin, at="sops.mac")
        if value is None:
            raise SecretIntegrityError(f"{self.origin}: the sops mac is not encrypted")
        expected = self._aes(value, key, _rfc3339(modified, origin=self.origin), at="sops.mac")
        if not hmac.compare_digest(expected, computed.encode()):
            raise SecretIntegrityError(
                f"{self.origin}: MAC mismatch: a value was changed, added or removed after sops "
                "encrypted the file; refused"
            )


def _rfc3339(text: str, *, origin: str) -> str:
    """``lastmodified`` as Go's ``time.Format(time.RFC3339)`` writes it (sops parses, then
    formats it again for the MAC's additional data): no fraction, ``Z`` for UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SecretIntegrityError(f"{origin}: bad sops lastmodified {text!r}") from exc
    offset = moment.utcoffset()
    if offset is None:
        raise SecretIntegrityError(f"{origin}: sops lastmodified {text!r} has no time zone")
    minutes = int(offset.total_seconds()) // 60
    zone = "Z" if minutes == 0 else f"{'+' if minutes > 0 else '-'}{abs(minutes) // 60:02d}:"
    if minutes:
        zone += f"{abs(minutes) % 60:02d}"
    return moment.replace(microsecond=0, tzinfo=None).isoformat() + zone


_Leaf = tuple[tuple[str | int, ...], list[str], Any]


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[_Leaf]:
    """Every leaf in document order with its path, and the mapping keys on it (what sops's
    additional data and suffix rules see: list indices are not part of it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise SecretIntegrityError(f"mapping key {key!r} is not a string")
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    elif node is not None:  # sops does not walk null values
        yield path, [p for p in path if isinstance(p, str)], node


def _clear_bytes(leaf: Any, *, origin: str, at: str) -> tuple[bytes, str]:
    """A value sops left in clear, as sops's ``ToBytes`` hashes it, and as text."""
    if isinstance(leaf, bool):
        return (b"True" if leaf else b"False"), ("true" if leaf else "false")
    if isinstance(leaf, int):
        return str(leaf).encode(), str(leaf)
    if isinstance(leaf, float):
        text = format(Decimal(repr(leaf)).normalize(), "f")  # Go's FormatFloat(v, 'f', -1, 64)
        return text.encode(), text
    if isinstance(leaf, str):
        return leaf.encode(), leaf
    raise SecretIntegrityError(f"{origin}: {at}: unsupported unencrypted value type")


def names_in(data: bytes, fmt: str, *, origin: str) -> set[str]:
    """The value names a secret file offers, read without a key (sops keeps names in clear):
    what ``validate`` checks references against. ``{""}`` for a plain age file."""
    if fmt == "age":
        return {""}
    if fmt == "dotenv":
        tree, _ = _load_dotenv(data, origin=origin)
    elif fmt in ("yaml", "json"):
        tree, _ = _load_yaml(data, origin=origin)
    else:
        raise SecretError(f"{origin}: unknown secret format {fmt!r}")
    return {".".join(str(p) for p in path) for path, _, _ in _leaves(tree)}
