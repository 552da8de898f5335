"""``Notifier``: notices in, outbox messages out, in the step that records what happened.

    cycle.record / elector ──Notice──▶ Notifier.notice ──render per endpoint──▶ store.enqueue

The endpoints a notice goes to are those of the configuration in force, the last applied
revision's: a refused revision cannot choose where its own failure is reported. A notice that
comes before any configuration is known (a leader change, at the start of a daemon) waits in
memory for the end of the cycle that loads one. Commit statuses are the operator's settings and
need no revision's. Enqueueing is a fenced write of the worker's own store handle: a replica
that lost its term enqueues nothing, and a new leader enqueueing the same keys adds nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace

from reconciler.errors import ReconcilerError
from reconciler.model import DesiredFleet
from reconciler.notify.notices import COMMIT_STATUS, Notice
from reconciler.notify.payloads import render
from reconciler.state.protocol import OutboxMessage, StateStore

log = logging.getLogger("reconciler.notify")

_HELD = 100  # notices waiting for a configuration: a bound, not a queue
_SEEN = 10_000


class Notifier:
    def __init__(
        self,
        store: Callable[[], StateStore],
        *,
        commit_statuses: bool,
        redact: Callable[[str], str] = lambda text: text,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self.commit_statuses = commit_statuses
        self._redact = redact
        self._wake = wake
        self._held: list[Notice] = []
        self._seen: dict[str, None] = {}  # keys enqueued by this process: no write to repeat

    def messages(self, notice: Notice, desired: DesiredFleet | None) -> list[OutboxMessage]:
        """What ``notice`` sends under the configuration ``desired`` (pure)."""
        notice = self._masked(notice)
        found: list[OutboxMessage] = []
        if self.commit_statuses and notice.status is not None and notice.revision:
            body = {
                "sha": notice.revision,
                "state": notice.status,
                "description": notice.message or notice.title,
            }
            key = f"commit-status:{notice.revision}:{notice.status}"
            found.append(OutboxMessage(key, COMMIT_STATUS, "commit-status", json.dumps(body)))
        if desired is not None and notice.event is not None:
            for spec in desired.fleet.notifications:
                if notice.event in spec.events:
                    body_text = render(spec.format, notice, desired.fleet.name)
                    key = f"{notice.key}|{spec.name}"
                    found.append(OutboxMessage(key, spec.name, str(notice.event), body_text))
        return found

    def notice(self, notice: Notice, desired: DesiredFleet | None) -> None:
        """Enqueue what ``notice`` sends; its webhooks wait for ``flush`` while no
        configuration is known. Never raises: a notice is not worth stopping a cycle for (a
        fenced replica's is the new leader's to enqueue again)."""
        if notice.key in self._seen:
            return
        if desired is None and notice.event is not None:
            if len(self._held) < _HELD:
                self._held.append(notice)
            if notice.status is None or not self.commit_statuses:
                return
            self._enqueue(self.messages(replace(notice, event=None), None))
            return
        self._enqueue(self.messages(notice, desired))

    def flush(self, desired: DesiredFleet | None) -> None:
        """Enqueue the webhooks of notices that waited for a configuration, once there is one
        (their commit statuses went already)."""
        if desired is None or not self._held:
            return
        held, self._held = self._held, []
        messages = [
            m for n in held for m in self.messages(n, desired) if m.destination != COMMIT_STATUS
        ]
        self._enqueue(messages)

    def _enqueue(self, messages: list[OutboxMessage]) -> None:
        if not messages:
            return
        try:
            added = self._store().enqueue(messages)
        except ReconcilerError as err:
            log.warning("notifications not enqueued: %s", err)
            return
        for message in messages:
            self._seen[message.key.split("|")[0]] = None
        while len(self._seen) > _SEEN:
            del self._seen[next(iter(self._seen))]
        if added:
            self._wake()

    def _masked(self, notice: Notice) -> Notice:
        return replace(
            notice, title=self._redact(notice.title), message=self._redact(notice.message)
        )
