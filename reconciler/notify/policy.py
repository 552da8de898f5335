"""What the operator decides about delivery: how long to retry, and where commit statuses go.

Both are daemon settings, never manifest fields. The commit status target in particular: the
token is the operator's, so the API URL and the repository it is sent to are the operator's
too; a commit cannot redirect statuses (and the token with them) to a server of its choosing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from reconciler.errors import ConfigError

DEFAULT_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter, bounded: ``base`` doubling to ``ceiling`` seconds,
    each delay drawn from its upper half (so replicas and messages do not retry in step);
    abandoned after ``max_attempts`` failed attempts or ``max_age`` seconds since enqueued."""

    base: float = 5.0
    ceiling: float = 300.0
    max_attempts: int = 12
    max_age: float = 24 * 3600.0
    timeout: float = 10.0  # of one request

    def validated(self) -> RetryPolicy:
        if not 0 < self.base <= self.ceiling:
            raise ConfigError("notification retries: 0 < base <= ceiling")
        if self.max_attempts < 1 or self.max_age <= 0 or self.timeout <= 0:
            raise ConfigError("notification retries: attempts, age and timeout must be positive")
        return self

    def retry_at(
        self, attempts: int, created_at: float, now: float, rng: random.Random | None = None
    ) -> float | None:
        """When to try again after ``attempts`` failed attempts (this one included); ``None``
        to give up."""
        if attempts >= self.max_attempts or now - created_at >= self.max_age:
            return None
        delay = min(self.ceiling, self.base * 2 ** (attempts - 1))
        delay *= float((rng or random).uniform(0.5, 1.0))
        return float(min(now + delay, created_at + self.max_age))


@dataclass(frozen=True)
class CommitStatusTarget:
    """Where the daemon writes commit statuses: a ``reconciler.forge`` provider, its API base
    URL (GitHub Enterprise, self-hosted GitLab), the repository, and the token."""

    provider: str
    repository: str
    token: str = field(repr=False)
    api_url: str = ""  # empty: the provider's public API
    context: str = "reconciler"
    target_url: str | None = None

    @property
    def api(self) -> str:
        return self.api_url or DEFAULT_API.get(self.provider, "")

    def validated(self) -> CommitStatusTarget:
        if self.provider not in DEFAULT_API:
            raise ConfigError(
                f"--commit-status must be one of {', '.join(DEFAULT_API)}, not {self.provider!r}"
            )
        if not self.repository:
            raise ConfigError("--commit-status needs --commit-status-repo")
        if not self.token:
            raise ConfigError(
                "--commit-status needs a token: --commit-status-token-file or "
                "$RECONCILER_COMMIT_STATUS_TOKEN"
            )
        return self
