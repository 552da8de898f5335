"""``open_forge``: a ``Forge`` from the operator's settings, checked before any request.

The API base URL must be HTTPS (plain http only to a loopback address, a local test server),
without a user, query or fragment; the repository name must have the provider's shape, so
nothing but a name reaches the URL path; the token travels only in the provider's header.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

from reconciler.forge.api import Forge
from reconciler.forge.github import GitHubForge
from reconciler.forge.gitlab import GitLabForge
from reconciler.forge.http import ForgeError, JsonClient

PROVIDERS = ("github", "gitlab")
_GITHUB_REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
# A numeric project id, or a namespace path (group/subgroup/project).
_GITLAB_PROJECT = re.compile(
    r"^(?:[0-9]{1,20}|[A-Za-z0-9_.-]{1,255}(?:/[A-Za-z0-9_.-]{1,255}){1,20})$"
)


def open_forge(
    provider: str, api_url: str, repository: str, token: str, *, timeout: float = 30.0
) -> Forge:
    """The forge of ``provider`` (``github`` or ``gitlab``) at ``api_url`` (GitHub:
    ``https://api.github.com`` or ``https://HOST/api/v3``; GitLab: ``https://gitlab.com/api/v4``
    or ``https://HOST/api/v4``) for ``repository`` (``OWNER/NAME``; GitLab: a project id or
    path)."""
    if provider not in PROVIDERS:
        raise ForgeError(f"unknown forge provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if not token or any(c.isspace() for c in token):
        raise ForgeError(f"{provider}: the API token is empty or holds whitespace")
    base = check_api_url(api_url)
    client = JsonClient(
        base, token_headers(provider, token), provider, secret=token, timeout=timeout
    )
    if provider == "github":
        if not _GITHUB_REPOSITORY.match(repository) or ".." in repository:
            raise ForgeError(f"github: repository {repository!r} is not OWNER/NAME")
        return GitHubForge(client, repository)
    if not _GITLAB_PROJECT.match(repository) or ".." in repository:
        raise ForgeError(f"gitlab: project {repository!r} is not a project id or GROUP/NAME path")
    return GitLabForge(client, repository)


def token_headers(provider: str, token: str) -> dict[str, str]:
    if provider == "github":
        return {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
    return {"PRIVATE-TOKEN": token, "Accept": "application/json"}


def check_api_url(api_url: str) -> str:
    """The API base without a trailing slash. HTTPS only, except to a loopback address (a
    local test server): a token must not cross a network in clear text."""
    parts = urllib.parse.urlsplit(api_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ForgeError(f"the forge API URL {api_url!r} is not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ForgeError("the forge API URL must not carry a user or token; pass the token apart")
    if parts.query or parts.fragment:
        raise ForgeError(f"the forge API URL {api_url!r} must not have a query or fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ForgeError(
            f"the forge API URL {api_url!r} is plain http to another host: the token would "
            "travel in clear text; use https"
        )
    return api_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
