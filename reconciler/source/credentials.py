"""The credential of an HTTPS fleet repository, kept out of command lines, logs and files.

    --repo-credential-file FILE | $RECONCILER_GIT_CREDENTIAL | userinfo of an --repo URL (warned)
        ──▶ GitCredential ──▶ environment of the one git process that fetches
                          ──▶ answered by our credential helper, for the remote's host only

A URL such as ``https://user:token@host/fleet.git`` puts the token wherever the URL goes: the
``ps`` listing (our argv and git's), log lines, error messages that quote git, and the
``remote.origin.url`` of the mirror on disk. The source layer therefore takes the userinfo out
of an HTTP(S) URL at once and works with the bare URL everywhere. The credential reaches git
only through environment variables of the git process (``/proc/PID/environ`` is readable by
the same user only) and a credential helper given on git's command line as a shell function
that holds no secret. The helper answers only for the host of the configured URL, so a redirect
to another host gets nothing, and it replaces whatever helpers the user's git configuration
names, so a stored credential of the operator's never mixes in.

An SSH URL's user (``ssh://git@host/...``) is a login name, not a secret, and stays in the URL.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from reconciler.errors import ConfigError

CREDENTIAL_ENV = "RECONCILER_GIT_CREDENTIAL"
# With a bare token the user name is a placeholder: GitHub, Gitea and GitLab check only the token.
TOKEN_USERNAME = "x-access-token"
_SCHEMES = frozenset({"http", "https", "ftp", "ftps"})
_HOST_ENV = "RECONCILER_GIT_HELPER_HOST"
_USER_ENV = "RECONCILER_GIT_HELPER_USERNAME"
_PASSWORD_ENV = "RECONCILER_GIT_HELPER_PASSWORD"
# git runs "<helper> get" and writes protocol=/host=/... lines on its stdin. The values come
# from the environment at run time: nothing secret is ever on a command line.
_HELPER = (
    '!f() { test "$1" = get || exit 0; ok=; '
    'while IFS= read -r line; do case "$line" in "host=$' + _HOST_ENV + '") ok=1;; esac; done; '
    'test -n "$ok" || exit 0; '
    'printf "username=%s\\npassword=%s\\n" "$' + _USER_ENV + '" "$' + _PASSWORD_ENV + '"; }; f'
)


@dataclass(frozen=True)
class GitCredential:
    """A user name (``None``: take the URL's, else a placeholder) and a password or token."""

    username: str | None
    secret: str = field(repr=False)

    @classmethod
    def parse(cls, text: str, *, origin: str) -> GitCredential:
        """``user:token`` or a bare ``token`` (surrounding whitespace ignored); ``origin``
        names where it came from, for the ``ConfigError`` of an unusable value."""
        value = text.strip()
        if not value:
            raise ConfigError(f"{origin} is empty; it should hold user:token or a token")
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{origin} must hold one line: user:token or a token")
        user, colon, secret = value.partition(":")
        if not colon:
            return cls(None, value)
        if not user or not secret:
            raise ConfigError(f"{origin} must hold user:token (both parts) or a bare token")
        return cls(user, secret)


@dataclass(frozen=True)
class RemoteAccess:
    """A remote location without userinfo, and what git needs to authenticate to it."""

    location: str
    credential: GitCredential | None = None
    host: str = ""
    from_url: bool = False  # the credential was in the URL: the caller warns about ps

    def git_config_args(self) -> list[str]:
        """``-c`` options for the git process that talks to the remote (no secret in them)."""
        if self.credential is None:
            return []
        # The empty value clears the helpers of the user's and the system's configuration.
        return ["-c", "credential.helper=", "-c", f"credential.helper={_HELPER}"]

    def git_env(self) -> dict[str, str]:
        """Environment variables for that git process: where the secret travels."""
        if self.credential is None:
            return {}
        return {
            _HOST_ENV: self.host,
            _USER_ENV: self.credential.username or TOKEN_USERNAME,
            _PASSWORD_ENV: self.credential.secret,
        }


def remote_access(location: str, credential: GitCredential | None) -> RemoteAccess:
    """Split the userinfo off an HTTP(S) ``location`` and settle which credential is used.

    ``ConfigError`` when the URL carries a password and another credential is given too.
    """
    try:
        parsed = urllib.parse.urlsplit(location)
    except ValueError as exc:
        raise ConfigError(f"--repo is not a valid URL: {exc}") from exc
    if parsed.scheme.lower() not in _SCHEMES:
        return RemoteAccess(location, credential)
    userinfo, at, host = parsed.netloc.rpartition("@")
    clean = urllib.parse.urlunsplit(parsed._replace(netloc=host))
    if not at:
        return RemoteAccess(clean, credential, host)
    user, colon, password = userinfo.partition(":")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    if credential is not None:
        if colon:
            raise ConfigError(
                "--repo carries a password or token and a credential is given as well "
                f"(--repo-credential-file or ${CREDENTIAL_ENV}); keep only the latter"
            )
        # https://user@host plus a bare token: the URL names the user.
        if credential.username is None and user:
            credential = GitCredential(user, credential.secret)
        return RemoteAccess(clean, credential, host)
    return RemoteAccess(clean, GitCredential(user or None, password), host, from_url=True)
