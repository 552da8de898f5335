"""``reconciler daemon``: converge forever, with exactly one acting replica.

    threads:  elector ── Lease (file | postgresql) ──▶ Fence per term
              poller (APScheduler), repository watcher, HTTP server ──▶ TriggerQueue
    main:     worker ── waits on the queue ──▶ ReconcileCycle.run(fence) ──▶ store, runtimes

Only the worker (the main thread) writes the state store or touches runtimes, and only while its
fence is valid; followers never observe or act, they read the store for status. The HTTP threads
read through connections of their own. On SIGTERM the worker finishes the cycle in flight, then
the lease is released so a follower takes over at once; the VMs keep running throughout.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from reconciler.daemon.cycle import CommitVerifier, CycleResult, ReconcileCycle
from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.leader_file import TOKEN_FILE, write_leader
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.redaction import Redactor, env_values
from reconciler.daemon.settings import DaemonSettings
from reconciler.daemon.triggers import Poller, RepositoryWatcher, TriggerQueue
from reconciler.errors import LeadershipError, ReconcilerError, StaleTermError
from reconciler.execution.host import Host, open_host_at
from reconciler.execution.status import fleet_status
from reconciler.leadership.elector import Elector
from reconciler.leadership.fence import Fence
from reconciler.leadership.file_lease import FileLease
from reconciler.leadership.protocol import Lease
from reconciler.model import DesiredFleet, ObservedFleet
from reconciler.pipeline import RevisionLoader
from reconciler.source import open_source
from reconciler.source.signatures import SignatureVerifier, TrustedKeys
from reconciler.state import FLEET_WIDE, SQLiteStateStore

log = logging.getLogger("reconciler.daemon")

HEAD_CHECK_SECONDS = 3.0


def open_lease(settings: DaemonSettings) -> Lease:
    if settings.lease == "file":
        return FileLease(
            settings.state_dir, holder=settings.identity, settings=settings.lease_settings
        )
    # Imported here: a host on the file lease never loads psycopg and libpq.
    from reconciler.leadership.postgres_lease import PostgresLease  # noqa: PLC0415

    return PostgresLease(settings.lease, holder=settings.identity, settings=settings.lease_settings)


def api_token(settings: DaemonSettings) -> str:
    """The token of state-changing endpoints: given, or one shared by the replicas of a state
    directory (created once, readable by its owner only) so ``reconciler reconcile`` finds it."""
    if settings.token:
        return settings.token
    path = settings.state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


class Daemon:
    """The loop, and the ``DaemonView`` the HTTP server shows."""

    def __init__(
        self,
        settings: DaemonSettings,
        lease: Lease | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.settings = settings.validated()
        self.started_at = time.time()
        # Shared with the log handler (cli) and the HTTP server: what it learns is masked in
        # logs, events and every answer.
        self.redactor = redactor or Redactor()
        self.metrics = DaemonMetrics()
        self.queue = TriggerQueue()
        self._stopping = threading.Event()
        self.host: Host = open_host_at(settings.state_dir)
        source = open_source(
            settings.repo,
            ref=settings.ref,
            cache_dir=settings.state_dir / "git",
            fetch=False,
            credential=settings.repo_credential,
        )
        self.source = source
        if not source.remote:
            source.resolve(None)  # a local repository that is not there is a typo: fail now
        self.cycle = ReconcileCycle(
            RevisionLoader(source=source, subpath=settings.path),
            self.host,
            settings.cache_dir,
            verify=self._verifier(),
            newer_than=self._newer_head_waits,
            event=self._event,
            loaded=self._remember_desired,
            force_deletions=settings.force_deletions,
            allow_non_descendant=settings.allow_non_descendant,
        )
        self._head_checked_at = 0.0
        self._newer_head: str | None = None
        self.lease = lease if lease is not None else open_lease(settings)
        self.elector = Elector(
            self.lease,
            on_elected=self._on_elected,
            on_lost=self._on_lost,
            on_refused=self._on_refused,
        )
        self.server = OperatorServer(
            self,
            self.metrics,
            listen=settings.listen,
            token=api_token(settings),
            webhook_secret=settings.webhook_secret,
            allowed_hosts=settings.allowed_hosts,
            redactor=self.redactor,
        )
        self._remember_observed(self.host.store.observed())  # VMs adopted from a previous run
        self._claimed: Fence | None = None
        self._lost_reason: str | None = None
        self.last_result: CycleResult | None = None
        self.last_error: str | None = None
        self.last_cycle_at: float | None = None

    def _verifier(self) -> CommitVerifier | None:
        if not self.settings.trusted_keys:
            return None
        verifier = SignatureVerifier(
            TrustedKeys.from_paths(self.settings.trusted_keys, self.settings.revoked_keys),
            self.settings.state_dir / "signatures",
        )
        verifier.prepare()  # a bad key file or a missing gpg fails the start, not the first poll
        repo_path = self.source.repo_path
        return lambda sha: verifier.verify(repo_path, sha)

    def _newer_head_waits(self, revision: str) -> bool:
        """Asked while a rollout of ``revision`` waits for health: has a trigger (a webhook, a
        commit seen by the file watch, a poll) brought a different head? Checked at most every
        few seconds, since a remote needs a fetch."""
        if not self.queue.pending() or self._stopping.is_set():
            return False
        now = time.monotonic()
        if now - self._head_checked_at >= HEAD_CHECK_SECONDS:
            self._head_checked_at = now
            try:
                self.source.fetch()
                self._newer_head = self.source.resolve(None)
            except ReconcilerError:
                self._newer_head = None
        return self._newer_head is not None and self._newer_head != revision

    # -- elector callbacks (elector thread: no store, no runtimes here) ---------------------

    def _on_elected(self, fence: Fence) -> None:
        self.metrics.set_leader(True, fence.term)
        self.queue.wake()

    def _on_lost(self, fence: Fence, why: str) -> None:
        self._lost_reason = why
        self.metrics.set_leader(False, fence.term)
        self.queue.wake()

    def _on_refused(self, what: str) -> None:
        self.metrics.count_fenced()
        log.warning("fencing refused %s", what, extra={"event": "fenced"})

    # -- the worker ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        poller = Poller(
            self.queue, interval=self.settings.poll_interval, jitter=self.settings.poll_jitter
        )
        watcher = (
            RepositoryWatcher(self.queue, self.source.repo_path)
            if self.settings.watch and not self.source.remote
            else None
        )
        elector_thread = threading.Thread(target=self.elector.run, name="elector", daemon=True)
        try:
            self.server.start()
            log.info(
                "daemon %s serving on %s, lease %s",
                self.settings.identity,
                self.server.url,
                self.settings.lease_kind,
            )
            elector_thread.start()
            poller.start()
            if watcher is not None:
                watcher.start()
            while not self._stopping.is_set():
                self._work_once()
        finally:
            poller.stop()
            if watcher is not None:
                watcher.stop()
            self.elector.stop()
            self.elector.resign("shutting down")
            self._notice_leadership()
            elector_thread.join(timeout=5)
            self.server.close()
            self.lease.close()
            self.host.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("daemon %s stopped", self.settings.identity)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            return  # the same signal sent to the process and to its group
        log.info(
            "%s: finishing the cycle in flight, then releasing the lease",
            signal.Signals(signum).name,
        )
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self.queue.wake()

    def _work_once(self) -> None:
        fence = self._notice_leadership()
        if fence is None:
            self.queue.take(timeout=1.0)
            return
        retry_at = self.cycle.backoff.retry_at(self.cycle.backoff.revision or "")
        wait = 1.0 if not retry_at else max(0.0, min(1.0, retry_at - time.time()))
        reasons = self.queue.take(timeout=wait)
        if retry_at and time.time() >= retry_at and not reasons:
            reasons = ["retry"]
        if reasons and not self._stopping.is_set() and fence.valid:
            self._run_cycle(fence, reasons)

    def _notice_leadership(self) -> Fence | None:
        """Claim the store for a new term, or let go of it after losing the lease; returns the
        fence to act under, or None while following."""
        fence = self.elector.fence
        store = self.host.store
        if self._claimed is not None and fence is not self._claimed:
            old, self._claimed = self._claimed, None
            store.release_fence()
            why = self._lost_reason or "the lease was lost"
            self._event("stepped-down", self.settings.identity, why, term=old.term)
            level = logging.INFO if self._stopping.is_set() else logging.WARNING
            log.log(level, "stepped down from term %d: %s", old.term, why, extra={"term": old.term})
        if fence is None or not fence.valid:
            return None
        if self._claimed is not fence:
            try:
                store.claim_term(fence)
            except StaleTermError as err:
                self.elector.resign(str(err))
                return None
            self._claimed = fence
            self.queue.request("elected")  # a new leader converges at once, not at the next poll
            self._write_leader_file(fence)
            self._event("elected", self.settings.identity, f"leads with term {fence.term}")
            log.info("leading with term %d", fence.term, extra={"term": fence.term})
        return fence

    def _run_cycle(self, fence: Fence, reasons: list[str]) -> None:
        started, cpu = time.monotonic(), time.process_time()
        try:
            result = self.cycle.run(fence)
        except ReconcilerError as err:  # a refused (stale-term) write among them
            result = CycleResult("failed", None, None, error=str(err))
        except Exception as exc:  # the daemon outlives any one bug; the operator sees it
            log.exception("reconcile cycle crashed")
            result = CycleResult("failed", None, None, error=f"internal error: {exc!r}")
        duration = time.monotonic() - started
        self.last_result, self.last_error = result, result.error
        self.last_cycle_at = time.time()
        self.metrics.observe_cycle(duration, result.outcome)
        self.metrics.count_builds(
            result.builds.get("built", 0),
            result.builds.get("cached", 0),
            result.builds.get("failed", 0),
        )
        self._refresh_metrics(self.host.store)
        log.log(
            logging.WARNING if result.outcome == "failed" else logging.INFO,
            "cycle %s%s",
            result.outcome,
            f": {result.error}" if result.error else "",
            extra={
                "trigger": ",".join(reasons),
                "head": (result.head or "")[:12],
                "converged_to": (result.converged_to or "")[:12],
                "duration_s": round(duration, 3),
                "cpu_s": round(time.process_time() - cpu, 3),
                "term": fence.term,
            },
        )

    def _remember_desired(self, desired: DesiredFleet) -> None:
        for vm in desired.vms.values():
            self.redactor.remember(env_values(vm.settings))

    def _remember_observed(self, observed: ObservedFleet) -> None:
        for vm in observed.vms.values():
            self.redactor.remember(env_values(vm.settings))

    def _refresh_metrics(self, store: SQLiteStateStore) -> None:
        observed = store.observed()
        self._remember_observed(observed)
        applied, attempted = store.applied_revision(), store.attempted_revision()
        self.metrics.set_revisions(
            applied.revision if applied else None,
            attempted.revision if attempted else None,
            self.last_error is not None,
        )
        self.metrics.set_vms((vm.state.value, vm.healthy) for vm in observed.vms.values())
        suspended = store.suspensions()
        self.metrics.set_suspended(
            FLEET_WIDE in suspended, (w for w in suspended if w != FLEET_WIDE)
        )

    def _event(self, kind: str, subject: str, message: str, term: int | None = None) -> None:
        fence = self._claimed
        self.host.store.record_event(
            kind,
            self.redactor.text(subject),
            self.redactor.text(message),
            term=term if term is not None else (fence.term if fence else None),
        )

    def _write_leader_file(self, fence: Fence) -> None:
        """Where ``reconciler reconcile --now`` finds the leader of this state directory."""
        write_leader(
            self.settings.state_dir,
            {
                "holder": self.settings.identity,
                "term": fence.term,
                "url": self.server.url,
                "pid": os.getpid(),
            },
        )

    # -- DaemonView (HTTP threads) ------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[SQLiteStateStore]:
        store = SQLiteStateStore(self.settings.state_dir / "state.db")
        try:
            yield store
        finally:
            store.close()

    def _leader(self) -> dict[str, Any]:
        fence = self.elector.fence
        is_leader = fence is not None and fence.valid
        holder = self.elector.holder
        return {
            "is_leader": is_leader,
            "term": fence.term if is_leader and fence else (holder.term if holder else 0),
            "holder": self.settings.identity if is_leader else (holder.holder if holder else ""),
            "me": self.settings.identity,
            "lease": self.settings.lease_kind,
            "lease_error": self.elector.last_error,
        }

    def status(self) -> dict[str, Any]:
        with self._reader() as store:
            observed = store.observed()
            self._remember_observed(observed)
            status = fleet_status(
                observed,
                store.applied_revision(),
                store.attempted_revision(),
                store.suspensions(),
            )
        status["fleet"] = self.cycle.fleet_name
        status["leader"] = self._leader()
        result = self.last_result
        status["daemon"] = {
            "id": self.settings.identity,
            "started_at": self.started_at,
            "last_error": self.last_error,
            "last_outcome": result.outcome if result else None,
            "last_cycle_at": self.last_cycle_at,
            "head": result.head if result else None,
            "converged_to": result.converged_to if result else None,
            "backoff_until": self.cycle.backoff.retry_at(self.cycle.backoff.revision or "") or None,
            "repo": self.redactor.text(self.source.describe()),
            "poll_interval": self.settings.poll_interval,
        }
        return status

    def ready(self) -> tuple[bool, str]:
        try:
            with self._reader() as store:
                store.version()
        except ReconcilerError as err:
            return False, str(err)
        if self.elector.last_error:
            return False, self.elector.last_error
        if self._claimed is not None:
            if self.last_cycle_at is None:
                return False, "leading; the first cycle has not finished"
            return True, f"leading with term {self._claimed.term}"
        holder = self.elector.holder
        return True, f"following {holder.holder} (term {holder.term})" if holder else "following"

    def events(self, limit: int) -> list[dict[str, Any]]:
        with self._reader() as store:
            return [
                {
                    "id": e.id,
                    "at": e.at,
                    "kind": e.kind,
                    "subject": e.subject,
                    "message": e.message,
                    "term": e.term,
                }
                for e in store.events(limit)
            ]

    def _require_leader(self) -> None:
        if self._claimed is None:
            holder = self.elector.holder
            leader = f"{holder.holder} (term {holder.term})" if holder else "unknown"
            raise LeadershipError(f"this replica does not lead; the leader is {leader}")

    def request_reconcile(self, reason: str) -> None:
        self._require_leader()
        self.queue.request(reason)

    def suspend(self, workload: str | None, reason: str) -> None:
        with self._reader() as store:
            store.suspend(workload, reason)

    def resume(self, workload: str | None) -> None:
        with self._reader() as store:
            if not store.resume(workload):
                raise ReconcilerError(f"{workload or 'the fleet'} is not suspended")
        if self._claimed is not None:
            self.queue.request("resumed")
