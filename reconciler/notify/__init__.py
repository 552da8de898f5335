"""Notifications and commit statuses, delivered from a durable outbox in the state store.

    daemon cycle / elector ──Notice──▶ Notifier ──OutboxMessage (fenced enqueue, deduplicated)──▶
        StateStore outbox ◀──due / settle (fenced)── Sender thread ──▶ webhooks (generic, Slack,
                                                                        Teams) | forge statuses

What happened is recorded as a ``Notice`` by the step that records it (``notices.py``); the
``Notifier`` (``outbox.py``) renders it for every endpoint of the configuration in force
(``payloads.py``: pure) and enqueues one message per endpoint under a key that a new leader
re-evaluating the same revision produces again, so nothing is enqueued twice. The ``Sender``
(``sender.py``) runs in a thread of its own, off the cycle's critical path: only while this
replica leads, its writes fenced by the leader's term, it posts what is due (``http.py``,
``endpoints.py`` resolves the secret URLs) and retries with bounded, jittered back-off
(``policy.py``) until it gives up and records so in the events.
"""

from reconciler.notify.endpoints import Endpoints, resolve_endpoints
from reconciler.notify.notices import (
    COMMIT_STATUS,
    Notice,
    host_lost,
    leader_change,
    revision_applied,
    revision_attempted,
    revision_failed,
    revision_rolled_back,
    rollback,
    rollout_rolled_back,
    vm_unhealthy,
)
from reconciler.notify.outbox import Notifier
from reconciler.notify.policy import CommitStatusTarget, RetryPolicy
from reconciler.notify.sender import Sender

__all__ = [
    "COMMIT_STATUS",
    "CommitStatusTarget",
    "Endpoints",
    "Notice",
    "Notifier",
    "RetryPolicy",
    "Sender",
    "host_lost",
    "leader_change",
    "resolve_endpoints",
    "revision_applied",
    "revision_attempted",
    "revision_failed",
    "revision_rolled_back",
    "rollback",
    "rollout_rolled_back",
    "vm_unhealthy",
]
