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
same name, by a restart elsewhere or another process, or the leader declared the host lost and
ended its epoch). Re-registering makes it a member again. With a host agent attached
(``hold_ended``, multi-host mode: ``daemon.agent``) the thread does not re-register on its own:
it tells the agent (``on_ended``), which stops the VMs the ended epoch ran *before* anything
else, and only then lets it register anew (``register_again``), so a host that was paused or
partitioned never runs its stale VMs alongside their replacements under a fresh epoch. Each
beat that succeeds is told to ``on_alive`` with when it was sent (the agent's fence counts its
renew deadline from there).
"""

from __future__ import annotations

import logging
import threading
import time
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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_registry = open_registry
        self._facts = facts  # probed at each registration: a restart may bring a new disk
        self.interval = interval
        self._monotonic = monotonic
        self.hold_ended = False
        """Set by a host agent: an ended epoch waits for ``register_again``."""
        self.ended_epoch: int | None = None
        self.on_ended: Callable[[int], None] = lambda epoch: None
        self.on_alive: Callable[[int, float], None] = lambda epoch, sent_at: None
        self._lock = threading.Lock()  # the thread's beats and the agent's register_again
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

    def register_again(self) -> None:
        """The agent stopped what the ended epoch ran: register anew now (a new epoch)."""
        with self._lock:
            self.ended_epoch = None
            self.epoch = None
        self.beat()

    def beat(self) -> None:
        """One beat: register when not registered, else heartbeat (registering anew when the
        epoch ended, unless an agent holds that for ``register_again``). Never raises a
        ``ReconcilerError``: the next beat tries again."""
        with self._lock:
            self._beat()

    def _beat(self) -> None:
        try:
            if self.ended_epoch is not None:
                return  # the agent is stopping the ended epoch's VMs
            if self._registry is None:
                self._registry = self._open_registry()
            sent_at = self._monotonic()
            if self.epoch is not None and self.name is not None:
                if self._registry.heartbeat(self.name, self.epoch):
                    self._recovered()
                    self.on_alive(self.epoch, sent_at)
                    return
                log.warning(
                    "host %s: registration epoch %d ended (the host was registered again, or "
                    "declared lost); %s",
                    self.name,
                    self.epoch,
                    "its VMs stop before it registers anew"
                    if self.hold_ended
                    else "registering anew",
                    extra={"event": "host-epoch-ended"},
                )
                if self.hold_ended:
                    self.ended_epoch = self.epoch
                    self.on_ended(self.epoch)
                    return
                self.epoch = None
            facts = self._facts()
            sent_at = self._monotonic()
            self.epoch, self.name = self._registry.register_host(facts), facts.name
            self._recovered()
            self.on_alive(self.epoch, sent_at)
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
