"""The fleet's secret digest key on a PostgreSQL store: every host digests a secret under the
same key (else the leader sees drift forever), the first host to need it stores it once even
when several start together, and the SQLite store keeps the state directory's key.

Every test gets a fresh database (the ``lease_dsn`` fixture) on the server CI starts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from reconciler.secrets import (
    DIGEST_KEY_FILE,
    SecretKeyMissingError,
    digest_key,
    fleet_digest_key,
    fleet_digest_keys,
    open_resolver,
)
from reconciler.state import StoreLocation, open_state_store
from reconciler.state.postgres import PostgresStateStore

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def stores(lease_dsn: str) -> Iterator[list[PostgresStateStore]]:
    opened: list[PostgresStateStore] = []
    yield opened
    for store in opened:
        store.close()


def host_store(dsn: str, host: str, opened: list[PostgresStateStore]) -> PostgresStateStore:
    store = PostgresStateStore(dsn, host=host)
    opened.append(store)
    return store


def test_two_hosts_digest_a_secret_alike(
    lease_dsn: str, stores: list[PostgresStateStore], tmp_path: Path
) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = open_resolver(
        a_dir,
        age_key_file=None,
        create_digest_key=True,
        fleet=fleet_digest_keys(host_store(lease_dsn, "a", stores)),
    )
    b = open_resolver(
        b_dir,
        age_key_file=None,
        create_digest_key=True,
        fleet=fleet_digest_keys(host_store(lease_dsn, "b", stores)),
    )
    assert a.digest("hunter2") == b.digest("hunter2")
    assert a.digest("hunter2") != a.digest("hunter3")
    # Each host's own (state directory) key would have told them apart.
    own_a = open_resolver(a_dir, age_key_file=None, create_digest_key=True)
    own_b = open_resolver(b_dir, age_key_file=None, create_digest_key=True)
    assert own_a.digest("hunter2") != own_b.digest("hunter2")


def test_a_restarted_host_keeps_the_fleets_key(
    lease_dsn: str, stores: list[PostgresStateStore], tmp_path: Path
) -> None:
    first = open_resolver(
        tmp_path / "a",
        age_key_file=None,
        create_digest_key=True,
        fleet=host_store(lease_dsn, "a", stores),
    ).digest("hunter2")
    later = open_resolver(
        tmp_path / "a-reinstalled",
        age_key_file=None,
        create_digest_key=True,
        fleet=host_store(lease_dsn, "a", stores),
    ).digest("hunter2")
    assert first == later


def test_the_first_host_offers_its_own_key(
    lease_dsn: str, stores: list[PostgresStateStore], tmp_path: Path
) -> None:
    """A fleet that grows from one host onto PostgreSQL keeps that host's digests."""
    before = open_resolver(tmp_path, age_key_file=None, create_digest_key=True).digest("pw")
    after = open_resolver(
        tmp_path,
        age_key_file=None,
        create_digest_key=True,
        fleet=host_store(lease_dsn, "a", stores),
    ).digest("pw")
    assert after == before


def test_hosts_starting_together_store_one_key(
    lease_dsn: str, stores: list[PostgresStateStore]
) -> None:
    handles = [host_store(lease_dsn, f"host-{n}", stores) for n in range(8)]
    start = threading.Barrier(len(handles))
    got: list[bytes] = []

    def first_use(store: PostgresStateStore, candidate: bytes) -> None:
        start.wait()
        got.append(store.fleet_digest_key(candidate))

    threads = [
        threading.Thread(target=first_use, args=(store, bytes([n]) * 32))
        for n, store in enumerate(handles)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == len(handles)
    assert len(set(got)) == 1
    assert got[0] in {bytes([n]) * 32 for n in range(len(handles))}
    with psycopg.connect(lease_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM fleet_digest_key").fetchone() == (1,)


def test_a_damaged_stored_key_is_refused_without_showing_it(
    lease_dsn: str, stores: list[PostgresStateStore], tmp_path: Path
) -> None:
    store = host_store(lease_dsn, "a", stores)
    with psycopg.connect(lease_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO fleet_digest_key (key) VALUES (%s)", (b"\xab" * 5,))
    resolver = open_resolver(tmp_path, age_key_file=None, create_digest_key=True, fleet=store)
    with pytest.raises(SecretKeyMissingError, match="5-byte secret digest key") as caught:
        resolver.digest("pw")
    said = str(caught.value)
    assert "abab" not in said.lower()
    assert "\\xab" not in said


def test_sqlite_keeps_the_state_directorys_key(tmp_path: Path) -> None:
    with open_state_store(StoreLocation(tmp_path)) as store:
        assert fleet_digest_keys(store) is None
    resolver = open_resolver(
        tmp_path, age_key_file=None, create_digest_key=True, fleet=fleet_digest_keys(None)
    )
    resolver.digest("pw")
    assert (tmp_path / DIGEST_KEY_FILE).read_bytes() == digest_key(tmp_path, create=False)


def test_daemons_on_one_store_digest_alike(lease_dsn: str, tmp_path: Path) -> None:
    """The wiring: the leader's cycle and each host's agent digest under the fleet's key."""
    from reconciler.daemon.loop import open_daemon
    from reconciler.daemon.settings import (
        ApiSettings,
        DaemonSettings,
        HostSettings,
        SourceSettings,
    )

    digests = []
    for host in ("a", "b"):
        settings = DaemonSettings(
            # Never fetched here: the daemons are opened, not run.
            source=SourceSettings(repo="https://127.0.0.1:9/org/fleet.git", watch=False),
            state_dir=tmp_path / host / "state",
            cache_dir=tmp_path / host / "cache",
            api=ApiSettings(listen="127.0.0.1:0", token="t"),
            store=lease_dsn,
            hosts=HostSettings(name=host),
        )
        with open_daemon(settings) as daemon:
            assert daemon.agent is not None
            for loader in (daemon.cycle.loader, daemon.agent.loader):
                assert loader.secrets is not None
                digests.append(loader.secrets.digest("hunter2"))
        assert not (tmp_path / host / "state" / DIGEST_KEY_FILE).exists()
    assert len(digests) == 4
    assert len(set(digests)) == 1


def test_commands_with_a_postgres_store_digest_under_the_fleets_key(
    lease_dsn: str, tmp_path: Path
) -> None:
    """``diff``/``apply --store postgresql://...`` digest secrets as the hosts do: under the
    store's key, not the state directory's, or every secret would show as a change."""
    import argparse

    from reconciler.cli.options import revision_loader

    with open_state_store(StoreLocation(tmp_path / "leader", url=lease_dsn, host="a")) as store:
        keys = fleet_digest_keys(store)
        assert keys is not None
        fleet_key = fleet_digest_key(keys, tmp_path / "leader")
    args = argparse.Namespace(
        repo=str(tmp_path / "repo"),
        ref="main",
        path=".",
        state_dir=tmp_path / "cli",
        store=lease_dsn,
        age_key_file=None,
        repo_credential_file=None,
        trusted_keys=None,
    )
    loader = revision_loader(args, create_digest_key=True)
    assert loader.secrets is not None
    expected = open_resolver(
        tmp_path / "other", age_key_file=None, create_digest_key=False, fleet=_Fixed(fleet_key)
    )
    assert loader.secrets.digest("pw") == expected.digest("pw")
    assert not (tmp_path / "cli" / DIGEST_KEY_FILE).exists()


class _Fixed:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def fleet_digest_key(self, candidate: bytes) -> bytes:
        return self.key
