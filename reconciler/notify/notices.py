"""``Notice``: one thing that happened that people may want to hear of, with the key that makes
it happen once.

The key is derived from what happened, never from when or by whom: a revision's failure is
``revision-failed:<sha>`` whichever leader refuses it and however often, a VM's ill health is
keyed by its incarnation (the artifact and start time the store records), a leader change by its
term, a host's loss by its registration epoch. So a new leader that re-evaluates the same failing
revision produces the same key, and the outbox (which holds one message per key) sends nothing
twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from reconciler.formatting import short_sha
from reconciler.model import NotificationEvent, short_digest

COMMIT_STATUS = ":commit-status"
"""The outbox destination of commit statuses; no endpoint name can start with ':'."""

StatusState = Literal["pending", "success", "failure"]


@dataclass(frozen=True)
class Notice:
    """``event`` is what endpoints subscribe to (``None``: it only sets a commit status);
    ``status`` the commit status of ``revision`` it sets, if any."""

    event: NotificationEvent | None
    key: str
    title: str  # one line: what happened
    message: str  # the detail (an error, a health verdict)
    revision: str | None = None
    vm: str | None = None
    status: StatusState | None = None
    host: str | None = None  # the host it is about (multi-host mode)
    at: float = field(default_factory=time.time)


def revision_attempted(sha: str) -> Notice:
    return Notice(
        None,
        f"revision-attempted:{sha}",
        f"revision {short_sha(sha)} is being applied",
        "",
        revision=sha,
        status="pending",
    )


def revision_applied(sha: str, detail: str) -> Notice:
    return Notice(
        NotificationEvent.REVISION_APPLIED,
        f"revision-applied:{sha}",
        f"revision {short_sha(sha)} applied",
        detail,
        revision=sha,
        status="success",
    )


def revision_failed(sha: str, reason: str) -> Notice:
    return Notice(
        NotificationEvent.REVISION_FAILED,
        f"revision-failed:{sha}",
        f"revision {short_sha(sha)} failed",
        reason,
        revision=sha,
        status="failure",
    )


def vm_unhealthy(vm: str, incarnation: str, detail: str) -> Notice:
    return Notice(
        NotificationEvent.VM_UNHEALTHY,
        f"vm-unhealthy:{vm}:{incarnation}",
        f"VM {vm} is unhealthy",
        detail,
        vm=vm,
    )


def rollback(vm: str, artifact: str | None, revision: str) -> Notice:
    return Notice(
        NotificationEvent.ROLLBACK,
        f"rollback:{vm}:{revision}:{artifact}",
        f"VM {vm} rolled back",
        f"back to artifact {short_digest(artifact)}, the last it ran healthy",
        vm=vm,
    )


def revision_rolled_back(sha: str, previous: str | None) -> Notice:
    """The operator's rollback (``reconciler rollback``) converged: the fleet runs ``sha``
    again, after ``previous``; keyed by both, so each rollback is told once."""
    return Notice(
        NotificationEvent.ROLLBACK,
        f"revision-rollback:{previous}:{sha}",
        f"fleet rolled back to {short_sha(sha)}",
        f"pinned by the operator; it ran {short_sha(previous)} before",
        revision=sha,
    )


def rollout_rolled_back(workload: str, revision: str | None, reason: str) -> Notice:
    """A progressive rollout of ``revision`` put ``workload`` back on its previous version
    (a canary failed, the operator aborted, the deadline passed): the commit is not deployed,
    so its status is a failure, not a ``pending`` left for ever. Keyed by workload and
    revision, so a new leader re-deciding it sends nothing twice."""
    return Notice(
        NotificationEvent.ROLLBACK,
        f"rollout-rolled-back:{workload}:{revision}",
        f"rollout of {workload} rolled back",
        f"{workload}: {reason}",  # also the commit status's description: it names the workload
        revision=revision,
        status="failure" if revision is not None else None,
    )


def leader_change(holder: str, term: int) -> Notice:
    return Notice(
        NotificationEvent.LEADER_CHANGE,
        f"leader-change:{term}",
        f"{holder} leads",
        f"term {term}",
    )


def host_lost(host: str, epoch: int, vms: Iterable[str], detail: str) -> Notice:
    """The leader declared ``host`` lost and ended its registration ``epoch``: the ``vms`` it
    ran are placed on the other hosts. Keyed by host and epoch, so a new leader ending the same
    epoch sends nothing twice, and the host lost again after it came back is news again."""
    names = sorted(set(vms))
    if not names:
        moved = "it ran no VM"
    elif len(names) == 1:
        moved = f"its VM {names[0]} goes to another host"
    else:
        moved = f"its {len(names)} VMs go to other hosts: {', '.join(names)}"
    return Notice(
        NotificationEvent.HOST_LOST,
        f"host-lost:{host}:{epoch}",
        f"host {host} lost",
        f"{detail}; {moved}" if detail else moved,
        host=host,
    )
