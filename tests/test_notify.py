"""Notifications: ``Fleet.spec.notifications`` as the manifests take it, the payload of each
format, where a URL may come from (and where it may not), and the outbox delivered by the
sender to a real local HTTP receiver, with retries, give-up, fencing and no URL in any error."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyrage
import pytest
from support.fakes import MemoryStateStore, fleet
from support.receiver import Receiver

from reconciler.cli.environment import read_environment
from reconciler.errors import ManifestError
from reconciler.leadership.fence import Fence
from reconciler.manifests.loader import load_fleet
from reconciler.model import DesiredFleet, FleetSettings, NotificationEvent, NotificationSpec
from reconciler.notify import (
    Endpoints,
    Notifier,
    RetryPolicy,
    Sender,
    host_lost,
    leader_change,
    resolve_endpoints,
    revision_failed,
)
from reconciler.notify.payloads import render
from reconciler.secrets import SecretResolver
from reconciler.state import StateStore, open_state_store
from reconciler.state.protocol import OutboxState

HERE = Path(__file__).parent / "secrets"
SHA = "0123456789abcdef0123456789abcdef01234567"
FAST = RetryPolicy(base=0.01, ceiling=0.02, max_attempts=3, timeout=5)


def _resolver() -> SecretResolver:
    return SecretResolver(age_key=lambda: HERE / "age-key.txt", digest_key=lambda: b"d" * 32)


def _fleet_dir(tmp_path: Path, notifications: str, *, secret_url: str | None = None) -> Path:
    root = tmp_path / "fleet"
    root.mkdir()
    secrets = ""
    if secret_url is not None:
        recipient = pyrage.x25519.Recipient.from_str((HERE / "recipient.txt").read_text().strip())
        (root / "hook.age").write_bytes(pyrage.encrypt(secret_url.encode(), [recipient]))
        secrets = "  secrets:\n    hook: {path: hook.age}\n"
    (root / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: ops}\n"
        f"spec:\n  allowEmpty: true\n{secrets}  notifications:\n{notifications}"
    )
    return root


def _problems(tmp_path: Path, notifications: str, **kwargs: str) -> str:
    with pytest.raises(ManifestError) as caught:
        load_fleet(_fleet_dir(tmp_path, notifications, **kwargs), secrets=_resolver())
    return "\n".join(str(p) for p in caught.value.problems)


# -- the manifests -----------------------------------------------------------------------------


def test_endpoints_compile_with_their_url_from_a_secret_or_a_prefixed_variable(
    tmp_path: Path,
) -> None:
    url = "https://hooks.slack.example/services/T000/B000/s3cr3t"
    desired = load_fleet(
        _fleet_dir(
            tmp_path,
            "  - {name: slack, format: slack, events: [revision-failed, rollback],"
            " url: {secret: hook}}\n"
            "  - {name: teams, format: teams, events: [host-lost], url: {env: TEAMS_OPS}}\n",
            secret_url=url,
        ),
        secrets=_resolver(),
    )
    slack, teams = desired.fleet.notifications
    assert (slack.name, slack.format, slack.url_env) == ("slack", "slack", None)
    assert slack.events == (NotificationEvent.REVISION_FAILED, NotificationEvent.ROLLBACK)
    assert slack.url_secret is not None
    assert slack.url_secret.digest.startswith("hmac-sha256:")
    assert url not in repr(desired.fleet)  # the value is only in the sensitive values
    assert desired.sensitive.get(slack.url_secret.digest) == url
    assert (teams.url_env, teams.url_secret) == ("TEAMS_OPS", None)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        # A URL is never a plain manifest value.
        ("url: https://hooks.example/x", "url: expected object, got string"),
        ("url: {url: 'https://hooks.example/x'}", "url"),
        # Only the suffix of RECONCILER_NOTIFY_*: no other variable of the daemon.
        ("url: {env: ../GIT_CREDENTIAL}", "url.env is the suffix of RECONCILER_NOTIFY_<env>"),
        ("url: {env: api_token}", "url.env is the suffix of RECONCILER_NOTIFY_<env>"),
        ("url: {env: A, secret: hook}", "name exactly one of url.secret or url.env"),
        ("url: {secret: nope}", "unknown secret 'nope'"),
    ],
)
def test_a_url_that_is_not_a_secret_reference_is_refused(
    tmp_path: Path, entry: str, message: str
) -> None:
    problems = _problems(
        tmp_path,
        f"  - {{name: ops, format: generic, events: [revision-failed], {entry}}}\n",
        secret_url="https://hooks.example/x",
    )
    assert message in problems


def test_a_secret_that_is_not_an_http_url_is_refused_without_being_quoted(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "  - {name: ops, format: generic, events: [revision-failed], url: {secret: hook}}\n",
        secret_url="file:///etc/shadow-s3cr3t",
    )
    assert "the secret's value is not an http:// or https:// URL" in problems
    assert "s3cr3t" not in problems


def test_unknown_events_and_formats_are_refused(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "  - {name: ops, format: discord, events: [revision-failed], url: {env: A}}\n"
        "  - {name: ops2, format: slack, events: [everything], url: {env: A}}\n",
    )
    assert "discord" in problems
    assert "everything" in problems


# -- where a URL may come from -----------------------------------------------------------------


def _desired(*specs: NotificationSpec, sensitive: dict[str, str] | None = None) -> DesiredFleet:
    from reconciler.model import SensitiveValues

    base = fleet(notifications=tuple(specs))
    return DesiredFleet(
        base.revision,
        base.fleet,
        base.workloads,
        base.vms,
        base.artifacts,
        SensitiveValues(sensitive or {}),
    )


def _spec(name: str, env: str, events: tuple[NotificationEvent, ...] = ()) -> NotificationSpec:
    return NotificationSpec(
        name, "generic", events or (NotificationEvent.REVISION_FAILED,), None, env
    )


def test_no_commit_can_name_a_daemon_variable_outside_the_notify_prefix() -> None:
    """A hostile commit naming the daemon's credentials gets nothing: only RECONCILER_NOTIFY_*
    variables ever reach the notifier, by suffix."""
    environ = read_environment(
        {
            "RECONCILER_GIT_CREDENTIAL": "git-s3cr3t",
            "RECONCILER_API_TOKEN": "api-s3cr3t",
            "RECONCILER_LEASE": "postgresql://u:pw-s3cr3t@db/x",
            "RECONCILER_NOTIFY_OPS": "https://hooks.example/ops",
            "HOME": "/root",
        }
    ).notify_urls
    assert environ == {"OPS": "https://hooks.example/ops"}
    names = ("GIT_CREDENTIAL", "RECONCILER_GIT_CREDENTIAL", "API_TOKEN", "LEASE", "HOME")
    found = resolve_endpoints(_desired(*(_spec(n.lower(), n) for n in names)), environ)
    for endpoint in found.values():
        assert endpoint.url is None
        assert endpoint.problem.startswith("$RECONCILER_NOTIFY_")
        assert "s3cr3t" not in endpoint.problem
    ops = resolve_endpoints(_desired(_spec("ops", "OPS")), environ)["ops"]
    assert ops.url == "https://hooks.example/ops"
    assert "hooks.example" not in repr(ops)


def test_a_variable_that_is_not_an_http_url_is_not_sent_to() -> None:
    found = resolve_endpoints(_desired(_spec("ops", "OPS")), {"OPS": "gopher://x/s3cr3t"})
    assert found["ops"].url is None
    assert found["ops"].problem == "$RECONCILER_NOTIFY_OPS is not an http:// or https:// URL"


# -- payloads ----------------------------------------------------------------------------------


def test_the_slack_payload_is_an_incoming_webhook_message_with_mrkdwn_escaped() -> None:
    notice = revision_failed(SHA, "w.yaml:3: <!channel> & <https://evil.example|click>")
    body = json.loads(render("slack", notice, "ops"))
    assert set(body) == {"text", "blocks"}
    section, context = body["blocks"]
    assert section["type"] == "section"
    assert section["text"]["type"] == "mrkdwn"
    text = section["text"]["text"]
    assert text.startswith("*revision 0123456789ab failed*\n")
    assert "<!channel>" not in text
    assert "<https://" not in body["text"]
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in text
    assert context["type"] == "context"
    assert context["elements"][0]["text"] == (
        "fleet *ops* · revision-failed · revision `0123456789ab`"
    )


def test_the_teams_payload_is_an_adaptive_card_message() -> None:
    body = json.loads(render("teams", revision_failed(SHA, "invalid manifests"), "ops"))
    assert body["type"] == "message"
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    title, message, facts = card["body"]
    assert (title["type"], title["text"], title["weight"]) == (
        "TextBlock",
        "revision 0123456789ab failed",
        "Bolder",
    )
    assert message["text"] == "invalid manifests"
    assert facts["type"] == "FactSet"
    assert {f["title"]: f["value"] for f in facts["facts"]}["Revision"] == "0123456789ab"


def test_the_generic_payload_has_the_fields_of_the_event() -> None:
    notice = revision_failed(SHA, "invalid manifests")
    body = json.loads(render("generic", notice, "ops"))
    assert body == {
        "event": "revision-failed",
        "title": "revision 0123456789ab failed",
        "message": "invalid manifests",
        "fleet": "ops",
        "revision": SHA,
        "vm": None,
        "host": None,
        "at": body["at"],
        "key": f"revision-failed:{SHA}",
    }
    assert body["at"].endswith("+00:00")


def test_host_lost_is_keyed_by_its_epoch_and_names_the_vms_to_move() -> None:
    notice = host_lost("host-b", 7, ["web-2", "api-0"], "no heartbeat for 41 s")
    assert notice.event is NotificationEvent.HOST_LOST
    assert notice.key == "host-lost:host-b:7"  # whichever leader ends that epoch
    assert host_lost("host-b", 7, [], "").key == notice.key
    assert host_lost("host-b", 8, [], "").key != notice.key  # lost again after it came back
    assert notice.title == "host host-b lost"
    assert notice.message == "no heartbeat for 41 s; its 2 VMs go to other hosts: api-0, web-2"
    assert host_lost("host-b", 7, [], "").message == "it ran no VM"


def test_host_lost_payloads_name_the_host_in_every_format() -> None:
    notice = host_lost("<!channel>-host", 3, ["web-0"], "no heartbeat for 31 s")
    generic = json.loads(render("generic", notice, "ops"))
    assert (generic["event"], generic["host"], generic["vm"]) == (
        "host-lost",
        "<!channel>-host",
        None,
    )
    assert generic["key"] == "host-lost:<!channel>-host:3"
    assert generic["message"] == "no heartbeat for 31 s; its VM web-0 goes to another host"
    slack = json.loads(render("slack", notice, "ops"))
    section, context = slack["blocks"]
    assert section["text"]["text"].startswith("*host &lt;!channel&gt;-host lost*\n")
    assert "<!channel>" not in json.dumps(slack)
    assert context["elements"][0]["text"] == (
        "fleet *ops* · host-lost · host `&lt;!channel&gt;-host`"
    )
    teams = json.loads(render("teams", notice, "ops"))
    title, message, facts = teams["attachments"][0]["content"]["body"]
    assert title["text"] == "host <!channel>-host lost"
    assert message["text"].endswith("web-0 goes to another host")
    shown = {f["title"]: f["value"] for f in facts["facts"]}
    assert (shown["Event"], shown["Host"]) == ("host-lost", "<!channel>-host")


# -- the outbox and its sender -----------------------------------------------------------------


class Leader:
    """A store, a notifier on it and a sender of its own handle, leading with ``fence``."""

    def __init__(self, store: MemoryStateStore, desired: DesiredFleet, environ: dict[str, str]):
        self.fence: Fence | None = Fence(1, renew_deadline=60)
        self.store = store
        store.claim_term(self.fence)
        self.notifier = Notifier(lambda: store, commit_statuses=False)
        self.endpoints = Endpoints(environ)
        self.endpoints.configure(desired)
        self.sender = Sender(store.handle, lambda: self.fence, self.endpoints, policy=FAST)
        self.desired = desired


def _hooked(receiver: Receiver, path: str = "/hook/s3cr3t") -> tuple[DesiredFleet, dict[str, str]]:
    return _desired(_spec("ops", "OPS")), {"OPS": receiver.url(path)}


def test_a_notice_is_delivered_once_to_each_subscribed_endpoint() -> None:
    with Receiver() as hooks:
        desired, environ = _hooked(hooks)
        leader = Leader(MemoryStateStore(), desired, environ)
        leader.notifier.notice(revision_failed(SHA, "invalid"), desired)
        leader.notifier.notice(revision_failed(SHA, "invalid again"), desired)
        leader.notifier.notice(leader_change("d1", 2), desired)  # not subscribed
        assert leader.sender.send_due() == 1
        assert leader.sender.send_due() == 0
        (request,) = hooks.requests
        assert (request.method, request.path) == ("POST", "/hook/s3cr3t")
        assert request.header("Content-Type") == "application/json"
        assert request.header("X-Reconciler-Delivery") == f"revision-failed:{SHA}|ops"
        assert request.json()["message"] == "invalid"
        # Another notifier (a new leader's) enqueues the same notice: the outbox has it.
        Notifier(lambda: leader.store, commit_statuses=False).notice(
            revision_failed(SHA, "invalid"), desired
        )
        assert leader.sender.send_due() == 0
        assert [e.state for e in leader.store.outbox()] == [OutboxState.DELIVERED]


def test_a_failing_endpoint_is_retried_then_abandoned_with_an_event_and_no_url() -> None:
    with Receiver(statuses=(503, 200)) as hooks:
        desired, environ = _hooked(hooks)
        leader = Leader(MemoryStateStore(), desired, environ)
        leader.notifier.notice(revision_failed(SHA, "invalid"), desired)
        leader.sender.send_due()
        (entry,) = leader.store.outbox()
        assert (entry.state, entry.attempts, entry.last_error) == (
            OutboxState.PENDING,
            1,
            "endpoint 'ops' answered HTTP 503",
        )
        time.sleep(0.05)  # the (tiny) back-off of FAST
        leader.sender.send_due()
        assert hooks.count() == 2
        assert leader.store.outbox()[0].state is OutboxState.DELIVERED
    # The receiver is gone: connection refused, three times, then abandoned.
    leader.notifier.notice(revision_failed("f" * 40, "bad"), desired)
    for _ in range(3):
        time.sleep(0.05)
        leader.sender.send_due()
    abandoned = leader.store.outbox()[0]
    assert (abandoned.state, abandoned.attempts) == (OutboxState.ABANDONED, 3)
    event = leader.store.events(1)[0]
    assert (event.kind, event.subject, event.term) == (
        "notification-abandoned",
        "revision-failed to ops",
        1,
    )
    assert event.message.startswith("gave up after 3 attempt(s): endpoint 'ops' unreachable")
    for text in (event.message, abandoned.last_error):
        assert "s3cr3t" not in text
        assert "127.0.0.1" not in text


def test_a_redirect_is_not_followed() -> None:
    with (
        Receiver() as elsewhere,
        Receiver(statuses=(302,), headers={"Location": elsewhere.url("/stolen")}) as hooks,
    ):
        desired, environ = _hooked(hooks)
        leader = Leader(MemoryStateStore(), desired, environ)
        leader.notifier.notice(revision_failed(SHA, "invalid"), desired)
        leader.sender.send_due()
        assert elsewhere.count() == 0
        assert leader.store.outbox()[0].last_error == (
            "endpoint 'ops' answered a redirect (not followed)"
        )


def test_only_the_leader_sends_and_a_stale_one_cannot_settle() -> None:
    with Receiver() as hooks:
        desired, environ = _hooked(hooks)
        leader = Leader(MemoryStateStore(), desired, environ)
        leader.notifier.notice(revision_failed(SHA, "invalid"), desired)
        leader.fence = None  # stepped down
        assert leader.sender.send_due() == 0
        assert hooks.count() == 0
        # A newer term claims the store: the old fence (still valid by its own clock) sends
        # nothing it could not record, and the new leader's sender delivers.
        leader.fence = Fence(1, renew_deadline=60)
        newer = leader.store.handle()
        newer.claim_term(Fence(2, renew_deadline=60))
        assert leader.sender.send_due() == 0
        assert hooks.count() == 0
        new_fence = Fence(2, renew_deadline=60)
        successor = Sender(newer.handle, lambda: new_fence, leader.endpoints, policy=FAST)
        assert successor.send_due() == 1
        assert hooks.count() == 1


def test_messages_wait_uncounted_until_a_configuration_is_known() -> None:
    with Receiver() as hooks:
        desired, environ = _hooked(hooks)
        store = MemoryStateStore()
        fence = Fence(1, renew_deadline=60)
        store.claim_term(fence)
        Notifier(lambda: store, commit_statuses=False).notice(
            revision_failed(SHA, "invalid"), desired
        )
        endpoints = Endpoints(environ)  # a restarted daemon: nothing loaded yet
        sender = Sender(store.handle, lambda: fence, endpoints, policy=FAST)
        assert sender.send_due() == 0
        assert store.outbox()[0].attempts == 0
        endpoints.configure(desired)
        assert sender.send_due() == 1
        assert hooks.count() == 1


def test_a_notice_before_any_configuration_waits_for_one() -> None:
    with Receiver() as hooks:
        desired, environ = _hooked(hooks)
        desired = _desired(_spec("ops", "OPS", (NotificationEvent.LEADER_CHANGE,)))
        leader = Leader(MemoryStateStore(), desired, environ)
        leader.notifier.notice(leader_change("d1", 1), None)  # elected: no revision loaded
        assert leader.store.outbox() == []
        leader.notifier.flush(desired)
        leader.sender.send_due()
        assert hooks.requests[0].json()["title"] == "d1 leads"


def test_a_slow_endpoint_does_not_hold_up_enqueueing(tmp_path: Path) -> None:
    """The sender thread is blocked inside a request; the worker's store handle enqueues
    meanwhile (SQLite, two connections), and both are delivered once the endpoint answers."""
    hold = threading.Event()
    with Receiver(hold=hold) as hooks:
        desired, environ = _hooked(hooks)
        worker = open_state_store(tmp_path / "state")
        fence = Fence(1, renew_deadline=60)
        worker.claim_term(fence)
        endpoints = Endpoints(environ)
        endpoints.configure(desired)
        sender = Sender(
            lambda: open_state_store(tmp_path / "state"), lambda: fence, endpoints, policy=FAST
        )
        notifier = Notifier(lambda: worker, commit_statuses=False, wake=sender.wake)
        sender.start()
        try:
            notifier.notice(revision_failed(SHA, "first"), desired)
            assert hooks.started.wait(10)  # the sender is inside the request, held
            notifier.notice(revision_failed("e" * 40, "second"), desired)
            assert [e.state for e in worker.outbox()] == [OutboxState.PENDING] * 2
            hold.set()
            deadline = time.monotonic() + 10
            while hooks.count() < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            sender.stop()
            worker.close()
        assert [r.json()["message"] for r in hooks.requests] == ["first", "second"]


def test_the_retry_policy_backs_off_exponentially_with_jitter_and_gives_up() -> None:
    policy = RetryPolicy(base=5, ceiling=300, max_attempts=12, max_age=3600)
    delays = [policy.retry_at(n, 0.0, 0.0) for n in range(1, 12)]
    assert all(d is not None for d in delays)
    bounds = [min(300, 5 * 2 ** (n - 1)) for n in range(1, 12)]
    assert all(b / 2 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert policy.retry_at(12, 0.0, 0.0) is None  # attempts
    assert policy.retry_at(1, 0.0, 3600.0) is None  # age
    assert policy.retry_at(3, 0.0, 3590.0) == 3600.0  # never past the age limit


def test_stores_are_the_protocol() -> None:
    store: StateStore = MemoryStateStore()
    assert store.due_messages(time.time()) == []
    assert FleetSettings(name="x").notifications == ()
