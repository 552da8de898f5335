"""``reconciler daemon``: converge forever, with exactly one acting replica.

    threads:  elector ── Lease (file | postgresql) ──▶ Fence per term
              poller (APScheduler), repository watcher, HTTP server ──▶ TriggerQueue
    main:     worker ── waits on the queue ──▶ ReconcileCycle.reconcile(fence) ──▶ store, runtimes
                                                └─ notices ──▶ Notifier ──▶ the store's outbox
    sender:   notify.Sender ── while leading, fenced ──▶ webhooks, commit statuses
    heartbeat: HostHeartbeat ── leader or not (PostgreSQL store) ──▶ the hosts registry
    agent:    HostAgent ── leader or not (PostgreSQL store) ──▶ this host's assignments,
              converged on this machine's runtimes (``daemon.agent``)

``open_daemon`` opens what a replica holds (the host's state store and runtimes, the repository,
the lease, the API token) and closes it again; ``Daemon`` only wires what it is given, so
building one does no I/O. On the SQLite store only the worker (the main thread) writes the state
store or touches runtimes, and only while its fence is valid; followers never observe or act.
On a PostgreSQL store the fleet spans hosts: the leader's worker converges through a
``FleetHost`` (it places VMs and writes assignments, under its term) and every replica's
``HostAgent`` converges what is assigned to its host (under its registration epoch); one host
alone is the same, with everything placed on it. The HTTP threads
see the ``DaemonView`` (``view_impl.LoopView``), which reads through store connections of its
own. On SIGTERM the worker finishes the cycle in flight, then the lease is released so a
follower takes over at once; the VMs keep running throughout.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from types import FrameType

from reconciler.daemon.agent import RENEW_DEADLINE_SECONDS, HostAgent
from reconciler.daemon.cycle import CommitVerifier, ReconcileCycle
from reconciler.daemon.heartbeat import HostHeartbeat
from reconciler.daemon.http_api import OperatorServer
from reconciler.daemon.leader_file import TOKEN_FILE, write_leader
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.redaction import Redactor, env_values
from reconciler.daemon.settings import DaemonSettings
from reconciler.daemon.triggers import Poller, RepositoryWatcher, TriggerQueue
from reconciler.daemon.view_impl import (
    LoopState,
    LoopView,
    refresh_host_metrics,
    remember_secrets,
)
from reconciler.errors import ConfigError, NetworkError, ReconcilerError, StaleTermError
from reconciler.execution.console_logs import StateDirConsoleLogs
from reconciler.execution.fleet_host import FleetHost
from reconciler.execution.host import LocalHost, open_host_at
from reconciler.execution.protocol import Host
from reconciler.fleet_hosts import placement_hosts
from reconciler.forge import open_forge
from reconciler.leadership.elector import Elector
from reconciler.leadership.fence import Fence
from reconciler.leadership.file_lease import FileLease
from reconciler.leadership.protocol import Lease
from reconciler.log_context import log_fields
from reconciler.manifests.compile_cache import CACHE_FILE
from reconciler.model import DesiredFleet, NotificationEvent, short_digest
from reconciler.notify import (
    Endpoints,
    Notice,
    Notifier,
    Sender,
    leader_change,
    vm_unhealthy,
)
from reconciler.notify.sender import StatusForge
from reconciler.pipeline import RevisionLoader
from reconciler.secrets import SecretResolver, fleet_digest_keys, open_resolver
from reconciler.source import Source, open_source
from reconciler.source.signatures import SignatureVerifier, TrustedKeys
from reconciler.state import FLEET_WIDE, StateStore, open_state_store
from reconciler.state.hosts import HostRegistration
from reconciler.state.location import SQLITE, open_host_registry
from reconciler.state.paths import private_state_dir
from runtime.capacity import probe_machine
from runtime.network.routes import underlay_address_towards

log = logging.getLogger("reconciler.daemon")

HEAD_CHECK_SECONDS = 3.0


def open_lease(settings: DaemonSettings) -> Lease:
    lease = settings.lease
    if lease.backend == "file":
        return FileLease(settings.state_dir, holder=lease.identity, settings=lease.timing)
    # Imported here: a host on the file lease never loads psycopg and libpq.
    from reconciler.leadership.postgres_lease import PostgresLease  # noqa: PLC0415

    return PostgresLease(lease.backend, holder=lease.identity, settings=lease.timing)


def api_token(settings: DaemonSettings) -> str:
    """The token of state-changing endpoints: given, or one shared by the replicas of a state
    directory (created once, readable by its owner only) so ``reconciler reconcile`` finds it."""
    if settings.api.token:
        return settings.api.token
    path = settings.state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def commit_verifier(settings: DaemonSettings, source: Source) -> CommitVerifier | None:
    """The signature check of ``--trusted-key``; a bad key file or a missing gpg fails the
    start, not the first poll."""
    if not settings.source.trusted_keys:
        return None
    verifier = SignatureVerifier(
        TrustedKeys.from_paths(settings.source.trusted_keys, settings.source.revoked_keys),
        settings.state_dir / "signatures",
    )
    verifier.prepare()
    repo_path = source.repo_path
    return lambda sha: verifier.verify(repo_path, sha)


def commit_status_forge(settings: DaemonSettings) -> StatusForge | None:
    """Where commit statuses go (the operator's settings only); ``open_forge`` checks them and
    makes no request."""
    target = settings.notify.commit_status
    if target is None:
        return None
    return open_forge(target.provider, target.api, target.repository, target.token)


def host_registration(settings: DaemonSettings) -> HostRegistration:
    """This host as it registers: its name and labels, and what the machine offers now."""
    machine = probe_machine(settings.state_dir)
    return HostRegistration(
        name=settings.hosts.name,
        vcpus=machine.vcpus,
        memory_mib=machine.memory_mib,
        disk_mib=machine.disk_mib,
        labels=dict(settings.hosts.labels),
        runtimes=machine.runtimes,
        kvm=machine.kvm,
        underlay_address=settings.hosts.underlay_address,
    )


def database_address(url: str) -> str | None:
    """The IPv4 address of the PostgreSQL server ``url`` names (its first host), resolved;
    None when it is reached over a UNIX socket. ``NetworkError`` for a name that does not
    resolve to IPv4."""
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415  (PostgreSQL only)

    try:
        params = conninfo_to_dict(url)
    except Exception as exc:  # psycopg's ProgrammingError; the store names a bad URL first
        raise NetworkError(f"cannot read the database address of the store URL: {exc}") from exc
    # libpq's precedence: hostaddr over host, then the environment; no host is its socket.
    for key, env in (("hostaddr", "PGHOSTADDR"), ("host", "PGHOST")):
        value = str(params.get(key) or os.environ.get(env) or "").split(",")[0].strip()
        if not value:
            continue
        if value.startswith(("/", "@")):
            return None  # a UNIX socket's directory (or an abstract one)
        try:
            found = socket.getaddrinfo(value, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            raise NetworkError(f"cannot resolve the database host {value!r}: {exc}") from exc
        return str(found[0][4][0])
    return None


def with_underlay_address(settings: DaemonSettings) -> DaemonSettings:
    """``settings`` with this host's underlay address found, on a PostgreSQL store without
    ``--underlay-address``: the source address towards the database, which hosts sharing a
    database usually share a network with. Not found (a UNIX socket, the database on this
    host): said in one line, and the host registers none, so no peer routes to its VMs."""
    if settings.hosts.underlay_address is not None or settings.store is None:
        return settings
    if settings.store_location().kind == SQLITE:
        return settings
    try:
        database = database_address(settings.store)
        if database is None:
            raise NetworkError("the database is reached over a UNIX socket")
        address = underlay_address_towards(database)
    except NetworkError as err:
        log.warning(
            "host %s registers no underlay address, so the other hosts cannot route to its "
            "VMs: %s; give one with --underlay-address",
            settings.hosts.name,
            str(err).split(";")[0],
            extra={"event": "no-underlay-address"},
        )
        return settings
    log.info("host %s: underlay address %s (towards the database)", settings.hosts.name, address)
    return replace(settings, hosts=replace(settings.hosts, underlay_address=address))


def host_heartbeat(settings: DaemonSettings) -> HostHeartbeat | None:
    """The heartbeat of this host in the registry; None on the SQLite store (one host)."""
    location = settings.store_location()
    if location.kind == SQLITE:
        return None
    return HostHeartbeat(
        lambda: open_host_registry(location),
        lambda: host_registration(settings),
        interval=settings.hosts.heartbeat,
    )


def fleet_host(local: LocalHost, settings: DaemonSettings) -> Host:
    """The leader's ``Host`` on a PostgreSQL store: the fleet's hosts, through ``local``'s
    store handle (whose writes carry the leader's term)."""
    # Imported here: a host on the SQLite store never loads psycopg and libpq.
    from reconciler.state.postgres import PostgresStateStore  # noqa: PLC0415

    store = local.store
    if not isinstance(store, PostgresStateStore):
        raise ConfigError("a fleet of hosts needs the PostgreSQL store (--store postgresql://)")
    grace = settings.hosts.grace
    return FleetHost(store, lambda records: placement_hosts(records, grace))


def fleet_resolver(settings: DaemonSettings, store: StateStore) -> SecretResolver:
    """The daemon's secret resolver: the fleet's digest key comes from ``store`` when it is
    shared by hosts (PostgreSQL), so every host digests alike; else the state directory's."""
    return open_resolver(
        settings.state_dir,
        age_key_file=settings.source.age_key_file,
        create_digest_key=True,
        fleet=fleet_digest_keys(store),
    )


def host_agent(
    settings: DaemonSettings,
    heartbeat: HostHeartbeat | None,
    local: LocalHost | None,
    source: Source | None,
) -> HostAgent | None:
    """This host's agent (a PostgreSQL store), which converges its assignments; builds a
    thread, opens nothing."""
    if heartbeat is None or local is None or source is None:
        return None
    from reconciler.state.postgres import PostgresStateStore  # noqa: PLC0415

    store = local.store
    if not isinstance(store, PostgresStateStore):
        return None
    loader = RevisionLoader(
        source=source,
        subpath=settings.source.path,
        secrets=fleet_resolver(settings, store),
        # In memory: the worker's loader writes the state directory's compile cache file.
        compile_cache=None,
    )
    return HostAgent(
        settings.hosts.name,
        local=local,
        store=store,
        loader=loader,
        heartbeat=heartbeat,
        cache_dir=settings.cache_dir,
        # Stops acting well before the leader may place this host's VMs elsewhere.
        renew_deadline=min(RENEW_DEADLINE_SECONDS, settings.hosts.grace / 2),
        grace=settings.hosts.grace,
    )


def open_repository(settings: DaemonSettings) -> Source:
    wanted = settings.source
    source = open_source(
        wanted.repo,
        ref=wanted.ref,
        cache_dir=settings.state_dir / "git",
        fetch=False,
        credential=wanted.credential,
    )
    if not source.remote:
        source.resolve(None)  # a local repository that is not there is a typo: fail now
    return source


@contextmanager
def open_daemon(
    settings: DaemonSettings, *, lease: Lease | None = None, redactor: Redactor | None = None
) -> Iterator[Daemon]:
    """A daemon replica with what it holds opened, closed again when the block ends (the HTTP
    server, then the lease, then the host's state store)."""
    settings = with_underlay_address(settings.validated())
    # The daemon keeps its token, repository cache and VMs there whichever store it uses; on
    # PostgreSQL no SQLite store creates it first.
    tightened = private_state_dir(settings.state_dir)
    if tightened:
        log.warning("made private what others could read: %s", ", ".join(tightened))
    with ExitStack() as held:
        location = settings.store_location()
        local = held.enter_context(open_host_at(settings.state_dir, location))
        host: Host = local
        agent_host: LocalHost | None = None
        if location.kind != SQLITE:
            host = fleet_host(local, settings)
            # The agent's own handle (its writes are fenced by this host's epoch) and runtimes.
            agent_host = held.enter_context(open_host_at(settings.state_dir, location))
        source = open_repository(settings)
        verify = commit_verifier(settings, source)
        token = api_token(settings)
        lease = lease if lease is not None else open_lease(settings)
        held.callback(lease.close)
        daemon = Daemon(
            settings,
            host=host,
            source=source,
            lease=lease,
            token=token,
            verify=verify,
            redactor=redactor,
            agent_host=agent_host,
            agent_source=open_repository(settings) if agent_host is not None else None,
        )
        held.callback(daemon.server.close)
        yield daemon


class Daemon:
    """The loop of one replica: the elector, the triggers, the worker and the HTTP server,
    wired together from what ``open_daemon`` opened. Building one does no I/O."""

    def __init__(
        self,
        settings: DaemonSettings,
        *,
        host: Host,
        source: Source,
        lease: Lease,
        token: str,
        verify: CommitVerifier | None = None,
        redactor: Redactor | None = None,
        agent_host: LocalHost | None = None,
        agent_source: Source | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.source = source
        self.lease = lease
        # Shared with the log handler (cli) and the HTTP server: what it learns is masked in
        # logs, events and every answer.
        self.redactor = redactor or Redactor()
        self.metrics = DaemonMetrics()
        self.queue = TriggerQueue()
        self.state = LoopState(started_at=time.time())
        self._stopping = threading.Event()
        self._pid = os.getpid()  # the daemon's own, not a fork's (see _on_signal)
        self._loaded: dict[str, DesiredFleet] = {}  # the revisions loaded last, by commit
        status_target = settings.notify.commit_status
        self.endpoints = Endpoints(settings.notify.endpoints_env)
        self.sender = Sender(
            lambda: open_state_store(settings.store_location()),
            lambda: self.state.claimed,
            self.endpoints,
            policy=settings.notify.retry,
            forge=commit_status_forge(settings),
            context=status_target.context if status_target else "reconciler",
            target_url=status_target.target_url if status_target else None,
        )
        self.notifier = Notifier(
            lambda: self.host.store,
            commit_statuses=status_target is not None,
            redact=self.redactor.text,
            wake=self.sender.wake,
        )
        self.cycle = ReconcileCycle(
            RevisionLoader(
                source=source,
                subpath=settings.source.path,
                secrets=fleet_resolver(settings, host.store),
                compile_cache=settings.state_dir / CACHE_FILE,
            ),
            host,
            settings.cache_dir,
            verify=verify,
            newer_than=self._newer_head_waits,
            event=self._event,
            metrics=self.metrics,
            loaded=self._remember_desired,
            force_deletions=settings.force_deletions,
            allow_non_descendant=settings.source.allow_non_descendant,
            notify=self._notify,
        )
        self._head_checked_at = 0.0
        self._newer_head: str | None = None
        self._newer_than: str | None = None  # the revision ``_newer_head`` was compared with
        self.elector = Elector(
            lease,
            on_elected=self._on_elected,
            on_lost=self._on_lost,
            on_refused=self._on_refused,
        )
        self.view = LoopView(
            settings, self.state, self.elector, self.cycle, source, self.queue, self.redactor
        )
        self.server = OperatorServer(
            self.view,
            self.metrics,
            listen=settings.api.listen,
            token=token,
            webhook_secret=settings.api.webhook_secret,
            allowed_hosts=settings.api.allowed_hosts,
            redactor=self.redactor,
            console_logs=StateDirConsoleLogs(settings.state_dir),
        )
        self._lost_reason: str | None = None
        self._hosts_checked_at = 0.0
        self.heartbeat = host_heartbeat(settings)  # builds a thread, opens nothing yet
        self.agent = host_agent(settings, self.heartbeat, agent_host, agent_source)

    def _newer_head_waits(self, revision: str) -> bool:
        """Asked while a rollout of ``revision`` waits for health: has a trigger (a webhook, a
        commit seen by the file watch, a poll) brought a different head? Checked at most every
        few seconds, since a remote needs a fetch."""
        if not self.queue.pending() or self._stopping.is_set():
            return False
        now = time.monotonic()
        # A head seen during an earlier rollout (often that rollout's own revision) says
        # nothing about this one: look again.
        if now - self._head_checked_at >= HEAD_CHECK_SECONDS or self._newer_than != revision:
            self._head_checked_at, self._newer_than = now, revision
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
        """Serve until SIGTERM/SIGINT; returns the exit code. The caller (``open_daemon``)
        closes the server, the lease and the host afterwards."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        polling = self.settings.polling
        poller = Poller(self.queue, interval=polling.interval, jitter=polling.jitter)
        watcher = (
            RepositoryWatcher(self.queue, self.source.repo_path)
            if self.settings.source.watch and not self.source.remote
            else None
        )
        elector_thread = threading.Thread(target=self.elector.run, name="elector", daemon=True)
        identity = self.settings.lease.identity
        try:
            # VMs adopted from a previous run: their secrets are masked from the first answer.
            remember_secrets(self.redactor, self.host.store.observed())
            if self.heartbeat is not None:
                self.heartbeat.start()  # before the election: followers are hosts too
            if self.agent is not None:
                self.agent.start()  # it acts once the heartbeat registered this host
            self.server.start()
            log.info(
                "daemon %s serving on %s, lease %s",
                identity,
                self.server.url,
                self.settings.lease.kind,
            )
            elector_thread.start()
            self.sender.start()
            poller.start()
            if watcher is not None:
                watcher.start()
            while not self._stopping.is_set():
                self._work_once()
        finally:
            if self.agent is not None:
                self.agent.stop()
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.sender.stop()
            poller.stop()
            if watcher is not None:
                watcher.stop()
            self.elector.stop()
            self.elector.resign("shutting down")
            self._notice_leadership()
            elector_thread.join(timeout=5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("daemon %s stopped", identity)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A fork of the daemon (pyroute2's namespace helper) inherits this handler and is
            # ended with SIGTERM: it dies as it would have without it, and says nothing.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
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
        recheck_at = self.cycle.recheck_at  # a canary's soak ended (cycle.recheck_at)
        if recheck_at and time.time() >= recheck_at and not reasons:
            reasons = ["rollout"]
        if not reasons and self._host_lost():
            reasons = ["host-lost"]
        if reasons and not self._stopping.is_set() and fence.valid:
            self._run_cycle(fence, reasons)

    def _host_lost(self) -> bool:
        """A fleet of hosts: whether a host turned lost with VMs to place elsewhere (looked at
        once per heartbeat interval, one small read)."""
        host = self.host
        if not isinstance(host, FleetHost):
            return False
        now = time.monotonic()
        if now - self._hosts_checked_at < self.settings.hosts.heartbeat:
            return False
        self._hosts_checked_at = now
        try:
            return host.host_lost()
        except ReconcilerError:
            return False  # the cycle reports a store that cannot be read

    def _notice_leadership(self) -> Fence | None:
        """Claim the store for a new term, or let go of it after losing the lease; returns the
        fence to act under, or None while following."""
        fence = self.elector.fence
        store = self.host.store
        identity = self.settings.lease.identity
        claimed = self.state.claimed
        if claimed is not None and fence is not claimed:
            self.state.claimed = None
            store.release_fence()
            why = self._lost_reason or "the lease was lost"
            self._event("stepped-down", identity, why, term=claimed.term)
            level = logging.INFO if self._stopping.is_set() else logging.WARNING
            log.log(
                level,
                "stepped down from term %d: %s",
                claimed.term,
                why,
                extra={"term": claimed.term},
            )
        if fence is None or not fence.valid:
            return None
        if self.state.claimed is not fence:
            try:
                store.claim_term(fence)
            except StaleTermError as err:
                self.elector.resign(str(err))
                return None
            self.state.claimed = fence
            self.queue.request("elected")  # a new leader converges at once, not at the next poll
            self._write_leader_file(fence)
            self._event("elected", identity, f"leads with term {fence.term}")
            self._notify(leader_change(identity, fence.term))
            log.info("leading with term %d", fence.term, extra={"term": fence.term})
        return fence

    def _run_cycle(self, fence: Fence, reasons: list[str]) -> None:
        with log_fields(term=fence.term):  # every line of the cycle says which term it is
            # Records its events, metrics, log and timeline (from when the trigger happened).
            result = self.cycle.reconcile(fence, reasons, self.queue.taken_at)
        self.state.last_result, self.state.last_error = result, result.error
        self.state.last_cycle_at = time.time()
        self._refresh_metrics(self.host.store)
        self._notify_after_cycle()

    def _remember_desired(self, desired: DesiredFleet) -> None:
        if desired.revision is not None:
            self._loaded = dict(list(self._loaded.items())[-2:])  # the head and the applied
            self._loaded[desired.revision] = desired
        for vm in desired.vms.values():
            self.redactor.remember(env_values(vm.settings))
        # A workload that prints its secret: masked in its console lines, logs and events too.
        self.redactor.remember(desired.sensitive.values())

    def _in_force(self) -> DesiredFleet | None:
        """The notification configuration in force: the last applied revision's, once loaded.
        A refused revision never chooses where its own failure is reported."""
        applied = self.host.store.applied_revision()
        return self._loaded.get(applied.revision) if applied else None

    def _notify(self, notice: Notice) -> None:
        self.notifier.notice(notice, self._in_force())

    def _notify_after_cycle(self) -> None:
        """The endpoints in force for the sender, the notices that waited for them, and the VMs
        found unhealthy (once per incarnation: the outbox deduplicates)."""
        desired = self._in_force()
        if desired is None:
            return
        self.endpoints.configure(desired)
        self.notifier.flush(desired)
        if not any(NotificationEvent.VM_UNHEALTHY in n.events for n in desired.fleet.notifications):
            return
        for vm in self.host.store.observed().vms.values():
            if vm.healthy is False:
                incarnation = f"{short_digest(vm.artifact_digest)}@{vm.started_at or 0:.3f}"
                self.notifier.notice(vm_unhealthy(vm.name, incarnation, vm.detail), desired)

    def _refresh_metrics(self, store: StateStore) -> None:
        observed = store.observed()
        remember_secrets(self.redactor, observed)
        applied, attempted = store.applied_revision(), store.attempted_revision()
        self.metrics.set_revisions(
            applied.revision if applied else None,
            attempted.revision if attempted else None,
            self.state.last_error is not None,
        )
        self.metrics.set_vms((vm.state.value, vm.healthy) for vm in observed.vms.values())
        suspended = store.suspensions()
        self.metrics.set_suspended(
            FLEET_WIDE in suspended, (w for w in suspended if w != FLEET_WIDE)
        )
        refresh_host_metrics(self.metrics, store, self.settings.hosts.grace, self.redactor)

    def _event(self, kind: str, subject: str, message: str, term: int | None = None) -> None:
        fence = self.state.claimed
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
                "holder": self.settings.lease.identity,
                "term": fence.term,
                "url": self.server.url,
                "pid": os.getpid(),
            },
        )
