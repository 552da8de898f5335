"""Per-VM configuration for the guest init: what it is, what it may hold, and its wire format.

Where it sits: the execution layer builds a ``GuestConfig`` from a VM's settings and its network
attachment; every runtime hands ``encode(config)`` to the init (QEMU and Firecracker in a cpio
segment appended to the artifact's initramfs, the process runtime as a file, see
``runtime/guest_config.py``); the manifests check the same limits at validate time, so a value
that cannot be carried is refused before any VM is stopped. Pure: no I/O.

Why not the kernel command line (where this data used to travel): the kernel splits it on any
whitespace, including TAB, newline and U+00A0's UTF-8 bytes, so a value could add parameters
such as ``init=``; quoting cannot carry ``"``; it has a small size limit; and it shows in ``ps``.

The wire format (guest/README.md, parsed by guest/init.c) is length-prefixed, so any byte
string except NUL arrives byte for byte::

    reconciler-vm-config 1\\n
    <key> <decimal length>\\n<value bytes>\\n     (repeated)
    end 0\\n\\n

Keys: ``hostname``, ``ip``, ``gateway``, ``restart``, ``boot-only``, ``snapshot-template``,
``mac``, ``realtime``, ``entropy`` (scalars), ``env``
(``NAME=value``), ``arg`` (repeatable, in order) and ``volume`` (``<serial> <fs> <path>``,
repeatable: a disk the init mounts before the workload starts) and ``secret-file``
(``<path> <content>``, repeatable: written by the init, mode 0400, under ``/run/secrets/``
before the workload starts; the path is plain names, so the first space ends it); the limits
are those the
manifests are checked against (``reconciler.guest_values``). The init refuses any other key,
a record cut short, or a missing ``end``, so a new kind of entry (secret env, files) is a new
key that both sides learn together; the init's digest is part of every artifact's cache key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.errors import VMRuntimeError
from reconciler.guest_values import (
    MAX_CONFIG_BYTES,
    VOLUME_NAME,
    mount_path_problem,
    value_problems,
)

HEADER = b"reconciler-vm-config 1\n"
RESTART_POLICIES = ("always", "on-failure", "never")
MAX_ENTROPY = 512  # bytes; what guest/init.c's entropy record takes
SECRET_DIR = "/run/secrets/"
# Plain names under SECRET_DIR: what guest/init.c's valid_secret_file accepts.
SECRET_FILE_PATH = re.compile(
    r"/run/secrets/[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*"
)
_MAC = re.compile(r"[0-9a-f][02468ace](:[0-9a-f]{2}){5}")  # unicast, as init.c's valid_mac
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # a DNS label


class GuestConfigError(VMRuntimeError):
    """A per-VM value that the guest init cannot be given."""


@dataclass(frozen=True)
class GuestVolume:
    """A disk for the init to mount: found by ``serial`` (its virtio serial, or else its ext4
    label), whatever order the disks appear in."""

    serial: str
    mount_path: str
    filesystem: str = "ext4"


@dataclass(frozen=True)
class GuestConfig:
    """What one VM's init needs beyond its artifact: identity, network, the workload's env,
    args and restart policy. ``boot_only``: boot, report "booted" and power off without running
    the workload (the KVM canary)."""

    hostname: str = ""
    address: str | None = None  # "10.88.0.5/24"
    gateway: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    restart: str = "always"
    # Decrypted on the host at start time, never stored: they travel like env, in the 0600
    # per-VM file only, kept apart so that nothing logs or compares them with the settings.
    secret_env: Mapping[str, str] = field(default_factory=dict)
    boot_only: bool = False
    volumes: tuple[GuestVolume, ...] = ()
    # Path under SECRET_DIR -> content; secret like ``secret_env`` (the init writes them 0400).
    secret_files: Mapping[str, str] = field(default_factory=dict)
    # A QEMU snapshot restore (runtime/qemu/snapshot.py): the template boots with only
    # ``snapshot_template`` and waits for its real configuration on the console; a restored VM's
    # configuration carries its own ``mac`` (the device state still holds the template's).
    snapshot_template: bool = False
    mac: str | None = None
    # Also at a restore: the host's clock (ns since the epoch) and fresh randomness for the
    # kernel, or every VM of one snapshot would share the template's stopped clock and its
    # random state.
    clock_ns: int | None = None
    entropy: bytes = b""

    def __repr__(self) -> str:
        # The dataclass repr would print every secret: name them, never their values.
        return (
            f"GuestConfig(hostname={self.hostname!r}, address={self.address!r}, "
            f"env={sorted(self.env)}, secret_env={sorted(self.secret_env)}, "
            f"secret_files={sorted(self.secret_files)}, volumes={len(self.volumes)})"
        )


def _record(key: str, value: str) -> bytes:
    data = value.encode()
    return b"%s %d\n%s\n" % (key.encode(), len(data), data)


def _check(config: GuestConfig) -> list[str]:
    problems = []
    if config.hostname and not _HOSTNAME.fullmatch(config.hostname):
        problems.append(f"hostname {config.hostname!r} is not a DNS label")
    if config.restart not in RESTART_POLICIES:
        problems.append(f"unknown restart policy {config.restart!r}")
    try:
        if config.address is not None:
            ipaddress.IPv4Interface(config.address)
        if config.gateway is not None:
            ipaddress.IPv4Address(config.gateway)
    except ValueError as exc:
        problems.append(f"bad address: {exc}")
    if config.mac is not None and not _MAC.fullmatch(config.mac):
        problems.append(f"MAC address {config.mac!r} is not a unicast xx:xx:xx:xx:xx:xx")
    if len(config.entropy) > MAX_ENTROPY or (config.clock_ns or 0) < 0:
        problems.append(f"at most {MAX_ENTROPY} bytes of entropy and a clock after 1970")
    overlap = sorted(set(config.env) & set(config.secret_env))
    if overlap:
        problems.append(f"env {overlap[0]} is both a plain and a secret value")
    for volume in config.volumes:
        if not VOLUME_NAME.fullmatch(volume.serial) or volume.filesystem != "ext4":
            problems.append(f"volume {volume.serial!r} ({volume.filesystem}) cannot be mounted")
        problem = mount_path_problem(volume.mount_path)
        if problem:
            problems.append(f"volume {volume.serial}: {problem}")
    for file_path, content in config.secret_files.items():
        if not SECRET_FILE_PATH.fullmatch(file_path) or len(file_path) > 200:
            problems.append(f"secret file {file_path!r} is not a plain path under {SECRET_DIR}")
        elif "\0" in content:
            problems.append(f"secret file {file_path} holds a NUL byte")
    env = {**config.env, **config.secret_env}
    for path, message in value_problems(env, config.args):
        at = ".".join(str(p) for p in path)
        problems.append(f"{at}: {message}" if at else message)
    return problems


def encode(config: GuestConfig) -> bytes:
    """The bytes the init reads; raises ``GuestConfigError`` for what it cannot carry."""
    problems = _check(config)
    if problems:
        where = f"VM {config.hostname}: " if config.hostname else ""
        raise GuestConfigError(f"{where}cannot configure the guest: " + "; ".join(problems))
    parts = [HEADER]
    if config.hostname:
        parts.append(_record("hostname", config.hostname))
    if config.address and config.gateway:
        parts += [_record("ip", config.address), _record("gateway", config.gateway)]
    for env in (config.env, config.secret_env):
        parts += [_record("env", f"{k}={v}") for k, v in sorted(env.items())]
    parts += [_record("arg", a) for a in config.args]
    parts += [
        _record("volume", f"{v.serial} {v.filesystem} {v.mount_path}") for v in config.volumes
    ]
    parts += [_record("secret-file", f"{p} {c}") for p, c in sorted(config.secret_files.items())]
    parts.append(_record("restart", config.restart))
    if config.boot_only:
        parts.append(_record("boot-only", "1"))
    if config.snapshot_template:
        parts.append(_record("snapshot-template", "1"))
    if config.mac is not None:
        parts.append(_record("mac", config.mac))
    if config.clock_ns is not None:
        seconds, nanoseconds = divmod(config.clock_ns, 1_000_000_000)
        parts.append(_record("realtime", f"{seconds}.{nanoseconds:09d}"))
    if config.entropy:
        parts.append(_record("entropy", config.entropy.hex()))
    parts.append(b"end 0\n\n")
    blob = b"".join(parts)
    if len(blob) > MAX_CONFIG_BYTES:
        raise GuestConfigError(
            f"the guest configuration is {len(blob)} bytes, over the {MAX_CONFIG_BYTES}-byte cap "
            "(env and args together)"
        )
    return blob
