"""``daemon``, ``reconcile --now``, ``suspend``, ``resume`` and ``events``.

``daemon`` builds ``DaemonSettings`` from the options and runs ``reconciler.daemon.loop``.
``reconcile --now`` asks the leading daemon of a state directory over its HTTP API (the URL and
the token are in the state directory). ``suspend`` and ``resume`` write the state store
directly, so they work whether or not a daemon runs; the daemon reads them every cycle.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from reconciler.cli.build_commands import add_cache_option, cache_dir
from reconciler.cli.environment import (
    API_TOKEN_ENV,
    COMMIT_STATUS_TOKEN_ENV,
    LEASE_ENV,
    WEBHOOK_SECRET_ENV,
    read_environment,
)
from reconciler.cli.options import (
    add_history_option,
    add_repo_options,
    add_state_option,
    age_key_file,
    repo_credential,
    state_dir,
    store_location,
)
from reconciler.daemon.leader_file import TOKEN_FILE, running_leader
from reconciler.daemon.logs import LOG_FORMATS, log_redactor
from reconciler.daemon.settings import (
    ApiSettings,
    DaemonSettings,
    HostSettings,
    LeaderSettings,
    NotifySettings,
    PollingSettings,
    SourceSettings,
)
from reconciler.errors import EXIT_OK, ConfigError, LeadershipError
from reconciler.http_client import NoRedirect
from reconciler.leadership import LeaseSettings
from reconciler.notify import CommitStatusTarget
from reconciler.redact import redact_url
from reconciler.state import StoreLocation, open_state_store
from reconciler.state.hosts import HOST_GRACE_SECONDS
from reconciler.state.location import SQLITE


def register(commands: Any) -> None:
    daemon = commands.add_parser(
        "daemon", help="converge forever: poll, watch and serve webhooks, one replica acting"
    )
    add_repo_options(daemon)
    add_state_option(daemon)
    add_cache_option(daemon)
    daemon.add_argument(
        "--lease",
        default=None,
        help="leader election: 'file' (flock in the state directory, one host) or a "
        f"postgresql:// URL (replicas on several hosts); default: ${LEASE_ENV}, else file. "
        "Prefer the variable (or ~/.pgpass) for a URL with a password: arguments are visible "
        "to every user in ps",
    )
    timing = LeaseSettings()
    daemon.add_argument("--lease-duration", type=float, default=timing.duration, metavar="S")
    daemon.add_argument("--renew-deadline", type=float, default=timing.renew_deadline, metavar="S")
    daemon.add_argument("--retry-period", type=float, default=timing.retry, metavar="S")
    daemon.add_argument(
        "--listen", default=ApiSettings.listen, help="HTTP address of the API, metrics and page"
    )
    daemon.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name the HTTP server answers to (repeatable); requests naming any other "
        "host than an IP address or localhost are refused (DNS rebinding)",
    )
    polling = PollingSettings()
    daemon.add_argument("--poll-interval", type=float, default=polling.interval, metavar="S")
    daemon.add_argument("--poll-jitter", type=float, default=polling.jitter, metavar="S")
    daemon.add_argument(
        "--token-file",
        type=Path,
        help=f"token for state-changing API calls (default: ${API_TOKEN_ENV}, else one "
        "generated in the state directory)",
    )
    daemon.add_argument(
        "--webhook-secret-file",
        type=Path,
        help=f"shared secret of webhooks (default: ${WEBHOOK_SECRET_ENV}; none: disabled)",
    )
    add_history_option(daemon)  # --trusted-key/--revoked-key come with the repo options
    daemon.add_argument("--no-watch", action="store_true", help="no file watch on a local repo")
    daemon.add_argument(
        "--force-deletions",
        action="store_true",
        help="apply plans that delete more VMs than the Fleet's maxDeletions allows (for a "
        "one-off restart; never overrides a workload's preventDestroy)",
    )
    daemon.add_argument(
        "--commit-status",
        choices=("github", "gitlab"),
        default=None,
        help="write each attempted revision's status (pending, success, failure) to this forge",
    )
    daemon.add_argument(
        "--commit-status-api",
        default="",
        metavar="URL",
        help="the forge's API base URL (GitHub Enterprise: https://HOST/api/v3, self-hosted "
        "GitLab: https://HOST/api/v4; default: the public one)",
    )
    daemon.add_argument(
        "--commit-status-repo", default="", metavar="REPO", help="OWNER/NAME (GitLab: a project)"
    )
    daemon.add_argument(
        "--commit-status-token-file",
        type=Path,
        help=f"the forge token (default: ${COMMIT_STATUS_TOKEN_ENV})",
    )
    daemon.add_argument("--id", default=None, help="this replica's name (default: host-pid)")
    daemon.add_argument(
        "--host",
        default=None,
        metavar="NAME",
        help="this host's name in the fleet's registry, under which it heartbeats and keeps "
        "its VMs (default: the machine's hostname); needs --store postgresql://...",
    )
    daemon.add_argument(
        "--host-grace-seconds",
        type=float,
        default=HOST_GRACE_SECONDS,
        metavar="SECONDS",
        help="how long a host's heartbeat may be silent before the leader declares it lost and "
        f"places its VMs elsewhere (default: {HOST_GRACE_SECONDS:g})",
    )
    daemon.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of this host, which a workload's deploy.placement.hostSelector can ask "
        "for (repeatable; Kubernetes label syntax); needs --store postgresql://...",
    )
    daemon.add_argument(
        "--underlay-address",
        default=None,
        metavar="ADDR",
        help="the IPv4 address the other hosts reach this one at, via which they route its "
        "VMs' subnet (default: this host's source address towards the database; none for a "
        "database on a UNIX socket); needs --store postgresql://...",
    )
    daemon.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=LOG_FORMATS[0],
        help="plain lines, or one JSON object per line with every field (revision, term, vm)",
    )
    daemon.set_defaults(handler=run_daemon, log_level=logging.INFO)  # a service says what it does

    reconcile = commands.add_parser(
        "reconcile", help="ask the running daemon to reconcile now (not waiting for a poll)"
    )
    add_state_option(reconcile)
    reconcile.add_argument("--now", action="store_true", required=True)
    reconcile.add_argument("--url", default=None, help="the daemon's URL (default: the leader)")
    reconcile.set_defaults(handler=run_reconcile)

    for name, verb in (("suspend", "stop converging"), ("resume", "converge again")):
        command = commands.add_parser(name, help=f"{verb}: one workload, or the whole fleet")
        add_state_option(command)
        command.add_argument("workload", nargs="?", default=None)
        if name == "suspend":
            command.add_argument("--reason", default="", help="shown in status and events")
        command.set_defaults(handler=run_suspend if name == "suspend" else run_resume)

    events = commands.add_parser("events", help="the daemon's recent events, newest last")
    add_state_option(events)
    events.add_argument("--limit", type=int, default=30)
    events.set_defaults(handler=run_events)


def _read_secret(path: Path | None, default: str | None) -> str | None:
    """The secret in ``path`` when given, else ``default`` (from the environment)."""
    if path is None:
        return default
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{path} is empty")
    return value


def host_labels(values: list[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` options as a mapping (checked by ``HostSettings``); a key given
    twice is refused rather than one of its values silently winning."""
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--label must be KEY=VALUE, not {item!r}")
        if key in labels:
            raise ConfigError(f"--label {key} is given twice")
        labels[key] = value
    return labels


def host_settings(args: argparse.Namespace, store: StoreLocation) -> HostSettings:
    """``--host``, ``--label``, ``--underlay-address``: this host in a shared store's registry,
    which the SQLite store (one host) does not have, so they are refused there, not ignored."""
    if store.kind == SQLITE and (args.host is not None or args.label):
        raise ConfigError(
            "--host and --label register this host in the fleet's shared store: they need "
            "--store postgresql://... (or $RECONCILER_STORE)"
        )
    if store.kind == SQLITE and args.underlay_address is not None:
        raise ConfigError(
            "--underlay-address is where the other hosts of a shared store route this host's "
            "VMs: it needs --store postgresql://... (or $RECONCILER_STORE)"
        )
    name = {"name": args.host} if args.host is not None else {}  # else the hostname
    return HostSettings(
        labels=host_labels(args.label),
        grace=args.host_grace_seconds,
        underlay_address=args.underlay_address,
        **name,
    )


def daemon_settings(args: argparse.Namespace) -> DaemonSettings:
    env = read_environment()
    secret = _read_secret(args.webhook_secret_file, env.webhook_secret)
    identity = {"identity": args.id} if args.id else {}  # else LeaderSettings' own default
    store = store_location(args)
    return DaemonSettings(
        source=SourceSettings(
            repo=args.repo,
            path=args.path,
            ref=args.ref,
            credential=repo_credential(args),
            trusted_keys=tuple(args.trusted_key),
            revoked_keys=tuple(args.revoked_key),
            allow_non_descendant=args.allow_non_descendant,
            watch=not args.no_watch,
            age_key_file=age_key_file(args),
        ),
        state_dir=state_dir(args),
        store=store.url,
        hosts=host_settings(args, store),
        cache_dir=cache_dir(args),
        api=ApiSettings(
            listen=args.listen,
            token=_read_secret(args.token_file, env.api_token),
            webhook_secret=secret.encode() if secret else None,
            allowed_hosts=tuple(args.allowed_host),
        ),
        polling=PollingSettings(args.poll_interval, args.poll_jitter),
        lease=LeaderSettings(
            backend=args.lease or env.lease or LeaderSettings.backend,
            timing=LeaseSettings(args.lease_duration, args.renew_deadline, args.retry_period),
            **identity,
        ),
        force_deletions=args.force_deletions,
        notify=NotifySettings(
            endpoints_env=env.notify_urls,
            commit_status=CommitStatusTarget(
                provider=args.commit_status,
                repository=args.commit_status_repo,
                token=_read_secret(args.commit_status_token_file, env.commit_status_token) or "",
                api_url=args.commit_status_api,
            )
            if args.commit_status
            else None,
        ),
    ).validated()


def run_daemon(args: argparse.Namespace) -> int:
    from reconciler.daemon.loop import open_daemon  # noqa: PLC0415 (psycopg, APScheduler)

    settings = daemon_settings(args)
    # The redactor of the log handler (``cli.main``): what the daemon learns to be secret is
    # masked in its log from then on.
    with open_daemon(settings, redactor=log_redactor()) as daemon:
        return daemon.run()


# No redirect (``reconciler.http_client``), and no proxy either: $http_proxy would receive the
# token; the daemon is asked directly.
_TOKEN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
TOKEN_OPENER = _TOKEN_OPENER  # for the other commands that talk to the daemon (``logs``)


def leader_endpoint(args: argparse.Namespace) -> tuple[str, str, str]:
    """The leading daemon's URL (``--url``, else ``leader.json``), the API token, and the URL
    as it may be shown (credentials masked)."""
    directory = state_dir(args)
    url = args.url if getattr(args, "url", None) else None
    if url is None:
        leader = running_leader(directory)
        if leader is None:
            raise LeadershipError(
                f"no daemon leads {directory}; start `reconciler daemon` or pass --url"
            )
        url = str(leader["url"])
    token = read_environment().api_token
    if not token:
        try:
            token = (directory / TOKEN_FILE).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"no API token: set {API_TOKEN_ENV} or read {directory / TOKEN_FILE} "
                f"({exc.strerror})"
            ) from exc
    shown = redact_url(url)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"--url must be an http:// or https:// URL, not {shown!r}")
    return url, token, shown


def call_leader(args: argparse.Namespace, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON to ``path`` of the daemon ``leader_endpoint`` finds, with the API
    token; its JSON answer (``{}`` for none). Redirects are refused, not followed, so the token
    reaches no other address; every failure is one ``LeadershipError`` naming the daemon by its
    password-free URL."""
    url, token, shown = leader_endpoint(args)
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _TOKEN_OPENER.open(request, timeout=10) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            if 300 <= exc.code < 400:
                target = redact_url(exc.headers.get("Location") or "elsewhere")
                raise LeadershipError(
                    f"the daemon at {shown} redirects to {target}; not followed, so the API "
                    "token goes nowhere else: pass the daemon's own address with --url"
                ) from exc
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError, RecursionError):
                reason = exc.reason
        raise LeadershipError(f"the daemon at {shown} refused: {reason}") from exc
    except OSError as exc:
        raise LeadershipError(f"cannot reach the daemon at {shown}: {exc}") from exc
    try:
        answer: dict[str, Any] = json.loads(payload or b"{}")
    except ValueError:
        answer = {}
    return answer


def nudge_leader(args: argparse.Namespace, reason: str) -> None:
    """After an operator's change in the store: ask a running daemon to reconcile now. It
    would at its next poll anyway, so no daemon is fine and an unreachable one is one line."""
    if running_leader(state_dir(args)) is None:
        return
    try:
        call_leader(args, "/api/reconcile", {"reason": reason})
    except (LeadershipError, ConfigError) as err:
        print(f"the daemon acts on it at its next poll ({err})")


def run_reconcile(args: argparse.Namespace) -> int:
    call_leader(args, "/api/reconcile", {"reason": "reconciler reconcile --now"})
    print("the daemon reconciles now; follow with `reconciler status` or `reconciler events`")
    return EXIT_OK


def run_suspend(args: argparse.Namespace) -> int:
    store = open_state_store(store_location(args))
    try:
        store.suspend(args.workload, args.reason)
    finally:
        store.close()
    what = args.workload or "the whole fleet"
    print(f"suspended {what}: the daemon leaves it as it runs until `reconciler resume`")
    return EXIT_OK


def run_resume(args: argparse.Namespace) -> int:
    store = open_state_store(store_location(args))
    try:
        if not store.resume(args.workload):
            raise ConfigError(f"{args.workload or 'the fleet'} is not suspended")
    finally:
        store.close()
    print(f"resumed {args.workload or 'the whole fleet'}")
    nudge_leader(args, "resumed")
    return EXIT_OK


def run_events(args: argparse.Namespace) -> int:
    store = open_state_store(store_location(args), existing=True)
    try:
        events = store.events(args.limit)
    finally:
        store.close()
    for event in reversed(events):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        term = f" term={event.term}" if event.term is not None else ""
        print(f"{when} {event.kind:<16} {event.subject:<14} {event.message}{term}")
    return EXIT_OK
