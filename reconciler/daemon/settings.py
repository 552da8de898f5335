"""The daemon's settings, validated once at start-up (bad values are a ``ConfigError``)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.leadership import LeaseSettings
from reconciler.source.credentials import GitCredential

_HOST_NAME = re.compile(r"(?i)[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_.])?")


@dataclass(frozen=True)
class DaemonSettings:
    repo: str
    state_dir: Path
    cache_dir: Path
    path: str = ""
    ref: str | None = None
    # "file" or a postgresql:// URL (or libpq DSN). Secrets stay out of repr(): settings end up
    # in log lines and tracebacks.
    lease: str = field(default="file", repr=False)
    lease_settings: LeaseSettings = field(default_factory=LeaseSettings)
    listen: str = "127.0.0.1:9180"
    poll_interval: float = 30.0
    poll_jitter: float = 5.0
    token: str | None = field(default=None, repr=False)
    webhook_secret: bytes | None = field(default=None, repr=False)
    trusted_keys: tuple[Path, ...] = ()
    revoked_keys: tuple[Path, ...] = ()  # --revoked-key: revocations of trusted keys
    repo_credential: GitCredential | None = field(default=None, repr=False)
    allow_non_descendant: bool = False  # apply a head that does not descend from the applied
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    watch: bool = True  # file watch when the repository is a local path
    force_deletions: bool = False  # lift the Fleet's maxDeletions guard (planning.guard)
    # Names the HTTP server answers to besides IP addresses and localhost (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()

    @property
    def lease_kind(self) -> str:
        return "file" if self.lease == "file" else "postgresql"

    def validated(self) -> DaemonSettings:
        self.lease_settings.validated()
        if self.poll_interval < 1:
            raise ConfigError(f"--poll-interval must be at least 1 s, not {self.poll_interval:g}")
        if not 0 <= self.poll_jitter < self.poll_interval:
            raise ConfigError(
                f"--poll-jitter must be between 0 and the poll interval ({self.poll_interval:g} s)"
            )
        is_url = self.lease.startswith(("postgresql://", "postgres://"))
        if self.lease != "file" and not is_url and "=" not in self.lease:  # or a libpq DSN
            raise ConfigError(f"--lease must be 'file' or a postgresql:// URL, not {self.lease!r}")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"--listen must be HOST:PORT, not {self.listen!r}")
        for name in self.allowed_hosts:
            if not _HOST_NAME.fullmatch(name):
                raise ConfigError(f"--allowed-host must be a DNS name without a port, not {name!r}")
        return self
