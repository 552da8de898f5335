"""``HostHeartbeat``: the thread that keeps this host registered in the fleet's PostgreSQL store.

    heartbeat thread ──register_host(facts probed now)──▶ hosts row, new epoch
                     ──every interval: heartbeat(name, epoch)──▶ True: alive
                                                              └─ False: the epoch ended ──▶
                                                                 one log line, register anew

Every replica heartbeats, leader or follower: the registry says which hosts are alive, which
has nothing to do with which one leads, so this thread never looks at the elector or the fence
and writes only its own host's row (never fenced). It talks to the store through a handle of
its own (a psycopg connection is not shared between threads), so a slow cycle of the worker
never delays a heartbeat. A store that cannot be reached is logged once per outage and tried
again at the next beat: the host turns lost in the registry after the grace period, which is
the registry's verdict to make, not this thread's.

A refused heartbeat means this host's registration ended (it was registered again under the
same name, by a restart elsewhere or another process). Re-registering makes it a member again;
stopping the VMs it ran under the old epoch first is the next step of host failover and is not
done here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from reconciler.errors import ReconcilerError
from reconciler.state.hosts import HostRegistration

log = logging.getLogger("reconciler.daemon")


class HostRegistry(Protocol):
    """What the heartbeat needs of the store (``PostgresStateStore``)."""

    def register_host(self, host: HostRegistration) -> int: ...

    def heartbeat(self, host: str, epoch: int) -> bool: ...

    def close(self) -> None: ...


class HostHeartbeat:
    def __init__(
        self,
        open_registry: Callable[[], HostRegistry],
        facts: Callable[[], HostRegistration],
        *,
        interval: float,
    ) -> None:
        self._open_registry = open_registry
        self._facts = facts  # probed at each registration: a restart may bring a new disk
        self.interval = interval
        self.epoch: int | None = None
        self.name: str | None = None
        self._registry: HostRegistry | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval)

    def beat(self) -> None:
        """One beat: register when not registered, else heartbeat (registering anew when the
        epoch ended). Never raises a ``ReconcilerError``: the next beat tries again."""
        try:
            if self._registry is None:
                self._registry = self._open_registry()
            if self.epoch is not None and self.name is not None:
                if self._registry.heartbeat(self.name, self.epoch):
                    self._recovered()
                    return
                log.warning(
                    "host %s: registration epoch %d ended (the host was registered again); "
                    "registering anew",
                    self.name,
                    self.epoch,
                    extra={"event": "host-epoch-ended"},
                )
                self.epoch = None
            facts = self._facts()
            self.epoch, self.name = self._registry.register_host(facts), facts.name
            self._recovered()
            log.info(
                "host %s registered with epoch %d (%d vCPU, %d MiB, runtimes %s%s)",
                facts.name,
                self.epoch,
                facts.vcpus,
                facts.memory_mib,
                ",".join(sorted(r.value for r in facts.runtimes)) or "none",
                ", KVM" if facts.kvm else "",
            )
        except ReconcilerError as err:
            if not self._failing:
                log.warning("host heartbeat failed: %s; trying again every %gs", err, self.interval)
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("host %s heartbeats again", self.name)
        self._failing = False
