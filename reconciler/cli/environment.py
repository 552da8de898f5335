"""The environment variables reconciler reads, all of them, read in one function.

    os.environ ──read_environment──▶ Environment ──▶ options (state dir, cache, credential)
                                                 └─▶ daemon settings (lease, token, webhooks)

An option on the command line wins over its variable; a variable wins over the built-in
default. Secrets are best passed here rather than as arguments, which every user sees in
``ps``. (The build sandbox's ``RECONCILER_BUILD_NETWORK`` is read by the builder itself, at
build time, and the QEMU runtime's ``RECONCILER_QEMU_SNAPSHOTS`` by the runtime, so that no
caller can forget them.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.defaults import AGE_KEY_ENV, default_state_dir
from reconciler.source.credentials import CREDENTIAL_ENV

STATE_DIR_ENV = "RECONCILER_STATE_DIR"
CACHE_DIR_ENV = "RECONCILER_CACHE_DIR"
KERNEL_CACHE_ENV = "RECONCILER_KERNEL_CACHE"
LEASE_ENV = "RECONCILER_LEASE"
STORE_ENV = "RECONCILER_STORE"
API_TOKEN_ENV = "RECONCILER_API_TOKEN"
WEBHOOK_SECRET_ENV = "RECONCILER_WEBHOOK_SECRET"
FORGE_TOKEN_ENV = "RECONCILER_FORGE_TOKEN"  # pr-comment: the GitHub/GitLab API token
COMMIT_STATUS_TOKEN_ENV = "RECONCILER_COMMIT_STATUS_TOKEN"  # daemon: commit statuses
NOTIFY_ENV_PREFIX = "RECONCILER_NOTIFY_"  # daemon: notification URLs a Fleet may name


@dataclass(frozen=True)
class Environment:
    state_dir: Path  # $RECONCILER_STATE_DIR, else the user's state directory
    cache_dir: Path | None = None
    kernel_cache: Path | None = None  # built kernels, shared by every state dir of the host
    lease: str | None = field(default=None, repr=False)  # a URL may hold a password
    store: str | None = field(default=None, repr=False)  # postgresql://...: likewise
    api_token: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    forge_token: str | None = field(default=None, repr=False)
    commit_status_token: str | None = field(default=None, repr=False)
    # RECONCILER_NOTIFY_<suffix> by suffix, and no other variable: what notifications may name
    notify_urls: Mapping[str, str] = field(default_factory=dict, repr=False)
    git_credential: str | None = field(default=None, repr=False)
    age_key_file: Path | None = None  # $SOPS_AGE_KEY_FILE, the variable sops itself reads


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """What the environment sets; an empty variable counts as unset."""
    env = os.environ if environ is None else environ

    def value(name: str) -> str | None:
        return env.get(name) or None

    cache = value(CACHE_DIR_ENV)
    kernel_cache = value(KERNEL_CACHE_ENV)
    return Environment(
        state_dir=default_state_dir(env),
        cache_dir=Path(cache) if cache else None,
        kernel_cache=Path(kernel_cache) if kernel_cache else None,
        lease=value(LEASE_ENV),
        store=value(STORE_ENV),
        api_token=value(API_TOKEN_ENV),
        webhook_secret=value(WEBHOOK_SECRET_ENV),
        forge_token=value(FORGE_TOKEN_ENV),
        commit_status_token=value(COMMIT_STATUS_TOKEN_ENV),
        notify_urls={
            name.removeprefix(NOTIFY_ENV_PREFIX): url
            for name, url in env.items()
            if name.startswith(NOTIFY_ENV_PREFIX) and url
        },
        git_credential=value(CREDENTIAL_ENV),
        age_key_file=Path(age_key) if (age_key := value(AGE_KEY_ENV)) else None,
    )
