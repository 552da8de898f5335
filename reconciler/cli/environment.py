"""The environment variables reconciler reads, all of them, read in one function.

    os.environ ──read_environment──▶ Environment ──▶ options (state dir, cache, credential)
                                                 └─▶ daemon settings (lease, token, webhooks)

An option on the command line wins over its variable; a variable wins over the built-in
default. Secrets are best passed here rather than as arguments, which every user sees in
``ps``. (The build sandbox's ``RECONCILER_BUILD_NETWORK`` is read by the builder itself, at
build time, so that no caller can forget it.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.secrets import AGE_KEY_ENV
from reconciler.source.credentials import CREDENTIAL_ENV
from reconciler.state import default_state_dir

STATE_DIR_ENV = "RECONCILER_STATE_DIR"
CACHE_DIR_ENV = "RECONCILER_CACHE_DIR"
LEASE_ENV = "RECONCILER_LEASE"
API_TOKEN_ENV = "RECONCILER_API_TOKEN"
WEBHOOK_SECRET_ENV = "RECONCILER_WEBHOOK_SECRET"


@dataclass(frozen=True)
class Environment:
    state_dir: Path  # $RECONCILER_STATE_DIR, else the user's state directory
    cache_dir: Path | None = None
    lease: str | None = field(default=None, repr=False)  # a URL may hold a password
    api_token: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    git_credential: str | None = field(default=None, repr=False)
    age_key_file: Path | None = None  # $SOPS_AGE_KEY_FILE, the variable sops itself reads


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """What the environment sets; an empty variable counts as unset."""
    env = os.environ if environ is None else environ

    def value(name: str) -> str | None:
        return env.get(name) or None

    cache = value(CACHE_DIR_ENV)
    return Environment(
        state_dir=default_state_dir(env),
        cache_dir=Path(cache) if cache else None,
        lease=value(LEASE_ENV),
        api_token=value(API_TOKEN_ENV),
        webhook_secret=value(WEBHOOK_SECRET_ENV),
        git_credential=value(CREDENTIAL_ENV),
        age_key_file=Path(age_key) if (age_key := value(AGE_KEY_ENV)) else None,
    )
