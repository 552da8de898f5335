"""``Sender``: the thread that delivers the outbox, off the reconcile cycle's critical path.

    Sender thread ──(leads? claim the term on its own store handle)──▶ due_messages
        ──▶ post_json (webhooks) | Forge.set_commit_status ──▶ settle_message (fenced)
                                                            └─ gave up ──▶ event

Only the leader sends: the thread asks for the fence of the term the worker acts under and does
nothing without one; its writes (marking delivered, rescheduling) go through a store handle of
its own that claims the same term, so a replica that lost its term can neither settle nor
re-send what the new leader owns. A slow or dead endpoint holds up only this thread (each
request has a timeout), never reconciling. Delivery is at least once: a leader killed between
an endpoint's answer and the write that marks it delivered leaves that message to be sent
again by the next leader (``X-Reconciler-Delivery`` carries the key for receivers that
deduplicate); everything else is sent once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from reconciler.errors import ReconcilerError, StaleTermError
from reconciler.forge import CommitStatus
from reconciler.leadership.fence import Fence
from reconciler.notify.endpoints import Endpoints
from reconciler.notify.http import DeliveryError, post_json
from reconciler.notify.notices import COMMIT_STATUS
from reconciler.notify.policy import RetryPolicy
from reconciler.state.protocol import OutboxEntry, StateStore

log = logging.getLogger("reconciler.notify")

IDLE_SECONDS = 1.0  # how often an idle sender looks for due messages and for leadership
MAX_ROUNDS = 100  # rounds of one send_due: a destination's backlog goes without waiting


class StatusForge(Protocol):
    """What the sender needs of a ``reconciler.forge.Forge``."""

    def set_commit_status(self, status: CommitStatus) -> None: ...


Post = Callable[..., None]


class Sender:
    def __init__(
        self,
        open_store: Callable[[], StateStore],
        fence: Callable[[], Fence | None],
        endpoints: Endpoints,
        *,
        policy: RetryPolicy,
        forge: StatusForge | None = None,
        context: str = "reconciler",
        target_url: str | None = None,
        clock: Callable[[], float] = time.time,
        post: Post = post_json,
    ) -> None:
        self._open_store = open_store
        self._fence = fence
        self.endpoints = endpoints
        self.policy = policy
        self._forge = forge
        self._context = context
        self._target_url = target_url
        self._clock = clock
        self._post = post
        self._store: StateStore | None = None
        self._claimed: Fence | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notify-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.policy.timeout + 5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(IDLE_SECONDS)
                self._wake.clear()
                try:
                    self.send_due()
                except ReconcilerError as err:
                    log.warning("notification sender: %s", err)
                except Exception:  # the sender outlives any one bug, as the worker does
                    log.exception("notification sender crashed; retrying")
        finally:
            self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- one round ----------------------------------------------------------------------------

    def send_due(self) -> int:
        """Attempt every message due now, while this replica leads (each destination's in
        order: the next one once the one before it is delivered); returns how many were
        attempted."""
        fence = self._fence()
        store = self._leading_store(fence)
        if store is None or fence is None:
            return 0
        attempted = 0
        for _ in range(MAX_ROUNDS):
            delivered = 0
            for entry in store.due_messages(self._clock()):
                if self._stop.is_set() or not fence.valid:
                    return attempted
                if entry.message.destination != COMMIT_STATUS and not self.endpoints.known:
                    continue  # waits, its attempts uncounted, for the first revision to load
                error = self._deliver(entry)
                attempted += 1
                try:
                    self._settle(store, entry, error, fence.term)
                except StaleTermError:
                    return attempted
                delivered += error is None
            if not delivered:
                break
        return attempted

    def _leading_store(self, fence: Fence | None) -> StateStore | None:
        if fence is None or not fence.valid:
            if self._claimed is not None and self._store is not None:
                self._store.release_fence()
            self._claimed = None
            return None
        if self._store is None:
            self._store = self._open_store()
        if self._claimed is not fence:
            try:
                self._store.claim_term(fence)
            except StaleTermError:
                return None
            self._claimed = fence
        return self._store

    def _deliver(self, entry: OutboxEntry) -> str | None:
        """``None`` when delivered, else what went wrong (never the endpoint's URL)."""
        message = entry.message
        try:
            if message.destination == COMMIT_STATUS:
                self._set_status(message.body)
                return None
            endpoint = self.endpoints.get(message.destination)
            if endpoint is None:
                return f"endpoint {message.destination!r} is not in the configuration in force"
            if endpoint.url is None:
                return f"endpoint {message.destination!r}: {endpoint.problem}"
            self._post(endpoint.url, message.body, timeout=self.policy.timeout, key=message.key)
        except DeliveryError as err:
            return f"endpoint {message.destination!r} {err}"
        except ReconcilerError as err:  # a ForgeError
            return str(err)
        return None

    def _set_status(self, body: str) -> None:
        if self._forge is None:
            raise DeliveryError("commit statuses are not configured (--commit-status)")
        fields = json.loads(body)
        self._forge.set_commit_status(
            CommitStatus(
                sha=fields["sha"],
                state=fields["state"],
                description=fields["description"],
                context=self._context,
                target_url=self._target_url,
            )
        )

    def _settle(self, store: StateStore, entry: OutboxEntry, error: str | None, term: int) -> None:
        destination = entry.message.destination
        what = (
            "commit status"
            if destination == COMMIT_STATUS
            else f"{entry.message.kind} to {destination}"
        )
        if error is None:
            store.settle_message(entry.id, delivered=True)
            log.info("notification sent: %s", what, extra={"key": entry.message.key})
            return
        now = self._clock()
        retry_at = self.policy.retry_at(entry.attempts + 1, entry.created_at, now)
        store.settle_message(entry.id, delivered=False, error=error, retry_at=retry_at)
        if retry_at is None:
            why = f"gave up after {entry.attempts + 1} attempt(s): {error}"
            log.warning("notification abandoned: %s: %s", what, why)
            store.record_event("notification-abandoned", what, why, term=term)
        else:
            log.warning("notification failed: %s: %s; retry in %.0f s", what, error, retry_at - now)
