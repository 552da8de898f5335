"""The PostgreSQL lease against a real PostgreSQL server: a fresh database per test, nothing mocked.

The server is the libpq DSN in ``RECONCILER_TEST_POSTGRES`` (a superuser connection), by default
the local cluster over its Unix socket, which ``bash deploy/start-postgres.sh`` starts. CI has it,
so a server that does not answer fails these tests instead of skipping them.

Timing settings are short (a 1 s lease) so expiry happens within a test, but the assertions are on
outcomes (who holds which term), never on how long something took, except for a follower that
must wake well before its timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from support.waiting import free_port

from reconciler.errors import ConfigError, LeadershipError
from reconciler.leadership import Lease, LeaseSettings
from reconciler.leadership.postgres_lease import CHANNEL, PostgresLease

SHORT = LeaseSettings(duration=1.0, renew_deadline=0.6, retry=0.2)
LONG = LeaseSettings(duration=60.0, renew_deadline=40.0, retry=0.2)  # only a release frees it
PASSWORD = "s3cret-Pa55word"

MakeLease = Callable[..., PostgresLease]


def seconds_asleep(follower: Lease, timeout: float, wake: Callable[[], object]) -> float:
    """How long ``follower.wait_for_change(timeout)`` slept when ``wake`` ran as it began."""
    waited: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        follower.wait_for_change(timeout)
        waited.append(time.monotonic() - started)

    thread = threading.Thread(target=wait)
    thread.start()
    wake()
    thread.join(timeout + 30)
    assert waited, "wait_for_change did not return"
    return waited[0]


@pytest.fixture
def make_lease(lease_dsn: str) -> Iterator[MakeLease]:
    """Opens leases on the test database and closes them all (listeners too) at the end."""
    leases: list[PostgresLease] = []

    def make(holder: str, settings: LeaseSettings = SHORT, name: str = "fleet") -> PostgresLease:
        lease = PostgresLease(lease_dsn, holder=holder, settings=settings, name=name)
        leases.append(lease)
        return lease

    yield make
    for lease in leases:
        lease.close()


def query(dsn: str, text: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(text.encode())
        return cursor.fetchall() if cursor.description else []


def wait_until(condition: Callable[[], object], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {limit:g} s waiting until {what}"
        time.sleep(0.05)


def test_the_postgres_lease_satisfies_the_protocol() -> None:
    lease: Lease = PostgresLease("host=/nonexistent dbname=x", holder="a")
    lease.close()


@pytest.mark.postgres
def test_one_of_two_holders_gets_the_lease(make_lease: MakeLease) -> None:
    a, b = make_lease("host-a"), make_lease("host-b")
    assert a.current() is None  # no row yet (and no table until the first call created it)

    assert a.try_acquire() == 1
    assert b.try_acquire() is None
    assert a.try_acquire() is None  # a held lease is not taken again, not even by its holder

    seen = b.current()
    assert seen is not None
    assert (seen.holder, seen.term) == ("host-a", 1)
    assert seen.expires_in is not None
    assert 0 < seen.expires_in <= SHORT.duration


@pytest.mark.postgres
def test_terms_grow_on_every_takeover_and_a_released_lease_keeps_its_term(
    make_lease: MakeLease, lease_dsn: str
) -> None:
    a, b = make_lease("host-a", LONG), make_lease("host-b", LONG)
    terms = []
    for lease in [a, b, a, a, b]:
        term = lease.try_acquire()
        assert term is not None
        terms.append(term)
        lease.release(term)
        assert lease.current() is None
        assert query(lease_dsn, "SELECT term FROM reconciler_leases") == [(term,)]
    assert terms == [1, 2, 3, 4, 5]

    a.release(5)  # releasing a lease already given up is not an error
    b.release(1)
    assert a.try_acquire() == 6


@pytest.mark.postgres
def test_three_holders_racing_get_one_winner_and_never_a_repeated_term(
    make_lease: MakeLease,
) -> None:
    # Three fresh leases on an empty database also race to create the table.
    leases = [make_lease(f"host-{n}", LONG) for n in range(3)]
    rounds = 15
    winners: list[tuple[str, int]] = []
    for _ in range(rounds):
        barrier = threading.Barrier(len(leases))
        results: dict[str, int | BaseException | None] = {}

        def race(
            lease: PostgresLease,
            barrier: threading.Barrier = barrier,
            results: dict[str, int | BaseException | None] = results,
        ) -> None:
            barrier.wait()
            try:
                results[lease.holder] = lease.try_acquire()
            except BaseException as exc:
                results[lease.holder] = exc

        threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        won = [(holder, term) for holder, term in results.items() if isinstance(term, int)]
        assert len(results) == 3, results
        assert len(won) == 1, f"expected one winner, got {results}"
        assert [v for v in results.values() if not isinstance(v, int)] == [None, None]
        winners.append(won[0])
        holder, term = won[0]
        next(lease for lease in leases if lease.holder == holder).release(term)
    assert [term for _, term in winners] == list(range(1, rounds + 1))


@pytest.mark.postgres
def test_renew_keeps_the_lease_and_fails_once_another_holder_took_it_after_expiry(
    make_lease: MakeLease,
) -> None:
    a, b = make_lease("host-a"), make_lease("host-b")
    term = a.try_acquire()
    assert term == 1

    # Renewing keeps it past its first expiry: b never gets in while a renews every retry.
    renewed_until = time.monotonic() + 3 * SHORT.duration
    while time.monotonic() < renewed_until:
        assert a.renew(term) is True
        assert b.try_acquire() is None
        time.sleep(SHORT.retry)

    # a stops renewing (a paused leader); b takes the lease once the database says it expired.
    taken: list[int] = []

    def b_takes_over() -> bool:
        got = b.try_acquire()
        if got is not None:
            taken.append(got)
        return bool(taken)

    wait_until(b_takes_over, "b took the expired lease")
    assert taken == [term + 1]
    assert a.renew(term) is False
    now = a.current()
    assert now is not None
    assert (now.holder, now.term) == ("host-b", term + 1)
    a.release(term)  # a late release of a lost term must not free b's lease
    assert b.renew(term + 1) is True


@pytest.mark.postgres
def test_release_wakes_the_follower_which_takes_over_at_once(make_lease: MakeLease) -> None:
    a, b = make_lease("host-a", LONG), make_lease("host-b", LONG)
    term = a.try_acquire()
    assert term == 1
    assert b.try_acquire() is None

    timeout = 60.0
    slept = seconds_asleep(b, timeout, lambda: a.release(term))
    assert slept < timeout / 2, f"the follower slept {slept:.1f} s through the NOTIFY"
    # The lease lasts a minute, so only the release can have freed it.
    assert b.try_acquire() == term + 1


@pytest.mark.postgres
def test_release_sends_a_notify_naming_the_lease(make_lease: MakeLease, lease_dsn: str) -> None:
    a = make_lease("host-a", LONG, name="fleet-eu")
    term = a.try_acquire()
    assert term is not None
    with psycopg.connect(lease_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}".encode())
        a.release(term)
        a.release(term)  # nothing left to release, so nobody is woken twice
        # Stops at a second notify, which would be a bug; waits out the timeout otherwise.
        notifies = list(listener.notifies(timeout=2, stop_after=2))
    assert [(n.channel, n.payload) for n in notifies] == [(CHANNEL, "fleet-eu")]


@pytest.mark.postgres
def test_a_notify_about_another_lease_does_not_wake_the_follower(make_lease: MakeLease) -> None:
    eu_a, eu_b = make_lease("host-a", LONG, name="eu"), make_lease("host-b", LONG, name="eu")
    us_a = make_lease("host-a", LONG, name="us")
    assert eu_a.try_acquire() == 1
    us_term = us_a.try_acquire()
    assert us_term == 1
    eu_b.wait_for_change(1.0)  # starts the listener; "eu" is held, so this runs to its timeout

    timeout = 2.0
    slept = seconds_asleep(eu_b, timeout, lambda: us_a.release(us_term))
    # Only a lower bound, which a slow machine cannot break: the "us" release did not wake it.
    assert slept >= timeout * 0.9
    assert eu_b.try_acquire() is None


@pytest.mark.postgres
def test_the_lease_expires_by_the_database_clock(make_lease: MakeLease, lease_dsn: str) -> None:
    a, b = make_lease("host-a"), make_lease("host-b")
    term = a.try_acquire()
    assert term == 1
    # The row carries the database's timestamps: expiry is acquisition plus the lease duration.
    ((length, lag),) = query(
        lease_dsn,
        "SELECT extract(epoch FROM expires_at - acquired_at)::float8,"
        " extract(epoch FROM clock_timestamp() - acquired_at)::float8 FROM reconciler_leases",
    )
    assert length == pytest.approx(SHORT.duration, abs=0.01)
    assert 0 <= lag < 30  # type: ignore[operator]

    # Move the database's idea of the expiry instead of our clock: an hour left by the database
    # clock means held, whatever the lease duration says...
    set_expiry = "UPDATE reconciler_leases SET expires_at = clock_timestamp() + interval "
    query(lease_dsn, set_expiry + "'1 hour'")
    time.sleep(SHORT.duration)
    assert b.try_acquire() is None
    held = b.current()
    assert held is not None
    assert held.expires_in is not None
    assert 3000 < held.expires_in <= 3600
    assert a.renew(term) is True  # renewing sets it back to one lease duration from now

    # ...and a time in the past by the database clock means expired, at once.
    query(lease_dsn, set_expiry + "'-1 second'")
    assert a.current() is None
    assert a.renew(term) is False
    assert b.try_acquire() == term + 1

    # Left alone, the lease runs out by itself.
    wait_until(lambda: b.current() is None, "the unrenewed lease expired")
    assert b.renew(term + 1) is False
    assert a.try_acquire() == term + 2


@pytest.mark.postgres
def test_a_lost_connection_is_reopened_on_the_next_call(
    make_lease: MakeLease, admin_dsn: str
) -> None:
    a, b = make_lease("host-a", LONG), make_lease("host-b", LONG)
    term = a.try_acquire()
    assert term == 1
    assert b.try_acquire() is None
    b.wait_for_change(1.0)  # b's listener is connected by now, or connecting

    killed = query(
        admin_dsn,
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name LIKE 'reconciler lease %'",
    )
    assert len(killed) >= 2, f"expected both leases' connections, got {killed}"
    # As in a database restart: the backends are gone before anybody uses the lease again.
    wait_until(
        lambda: (
            not query(
                admin_dsn,
                "SELECT 1 FROM pg_stat_activity WHERE pid IN ("
                + ",".join(str(pid) for pid, _ in killed)
                + ")",
            )
        ),
        "the terminated backends exited",
    )
    # The lease notices its idle connection was closed and opens a new one: no failed renewal.
    assert a.renew(term) is True
    assert b.try_acquire() is None

    # The follower's listener reconnects too, and is woken by the next release.
    assert seconds_asleep(b, 60, lambda: a.release(term)) < 30
    assert b.try_acquire() == term + 1


@pytest.mark.parametrize(
    "dsn_for",
    [
        lambda port: f"host=127.0.0.1 port={port} dbname=fleet user=op password={PASSWORD}",
        lambda port: f"postgresql://op:{PASSWORD}@127.0.0.1:{port}/fleet",
    ],
    ids=["libpq", "url"],
)
def test_an_unreachable_database_is_one_line_without_the_password(
    dsn_for: Callable[[int], str],
) -> None:
    port = free_port()  # nothing listens there: connection refused
    lease = PostgresLease(dsn_for(port), holder="host-a", settings=SHORT)
    try:
        calls: list[Callable[[], object]] = [
            lease.try_acquire,
            lambda: lease.renew(1),
            lambda: lease.release(1),
            lease.current,
        ]
        for call in calls:
            with pytest.raises(LeadershipError) as caught:
                call()
            message = str(caught.value)
            assert "\n" not in message
            assert PASSWORD not in message
            assert message.startswith("cannot reach the lease database at host=127.0.0.1")
            assert f"port={port} dbname=fleet user=op" in message
            assert "connection refused; check --lease" in message

        # A follower waiting on a database that is down returns within its timeout, quietly.
        started = time.monotonic()
        lease.wait_for_change(0.3)
        assert time.monotonic() - started < 10
    finally:
        lease.close()


@pytest.mark.slow
def test_a_server_that_never_answers_does_not_hold_up_a_follower() -> None:
    # A socket that accepts connections (the kernel completes the handshake) but never says a
    # word, like a database host that hangs: only timeouts get anybody out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        lease = PostgresLease(
            f"host=127.0.0.1 port={port} dbname=fleet",
            holder="host-a",
            settings=SHORT,
            connect_timeout=2,
        )
        try:
            started = time.monotonic()
            lease.wait_for_change(0.3)
            assert time.monotonic() - started < 1.5  # well before the connect timeout
            with pytest.raises(LeadershipError, match=r"cannot reach .* connection timeout"):
                lease.try_acquire()
        finally:
            lease.close()


@pytest.mark.postgres
def test_a_missing_database_names_it(lease_dsn: str) -> None:
    dsn = make_conninfo(lease_dsn, dbname="no_such_database_here")
    with PostgresLease(dsn, holder="host-a") as lease, pytest.raises(LeadershipError) as caught:
        lease.try_acquire()
    assert str(caught.value).endswith(
        'dbname=no_such_database_here: database "no_such_database_here" does not exist; '
        "check --lease"
    )


def test_invalid_settings_and_dsns_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"lease \(5 s\) > renew deadline \(10 s\)"):
        PostgresLease("dbname=x", holder="a", settings=LeaseSettings(5, 10, 2))
    with pytest.raises(ConfigError, match="retry"):
        PostgresLease("dbname=x", holder="a", settings=LeaseSettings(15, 10, 0))
    with pytest.raises(ConfigError, match="connect timeout"):
        PostgresLease("dbname=x", holder="a", connect_timeout=0)
    with pytest.raises(ConfigError, match="not a valid postgresql:// URL") as caught:
        PostgresLease(f"host=db password={PASSWORD} dbname", holder="a")
    assert PASSWORD not in str(caught.value)
