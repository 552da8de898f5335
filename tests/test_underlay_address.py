"""A host's underlay address, which the other hosts of a fleet route its VMs' subnet via:
``--underlay-address``, or found as the source address towards the database; none, said in
one line, when the database is reached over a UNIX socket or is this host. No root, no
database: nothing here connects."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.daemon.loop import database_address, with_underlay_address
from reconciler.daemon.settings import DaemonSettings, HostSettings, SourceSettings
from reconciler.errors import NetworkError


@pytest.fixture(autouse=True)
def _no_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGHOST", "PGHOSTADDR", "RECONCILER_STORE"):
        monkeypatch.delenv(name, raising=False)


def settings(tmp_path: Path, store: str, underlay: str | None = None) -> DaemonSettings:
    return DaemonSettings(
        source=SourceSettings(repo=str(tmp_path)),
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        store=store,
        hosts=HostSettings(name="host-a", underlay_address=underlay),
    )


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("postgresql://10.20.30.40:5433/fleet", "10.20.30.40"),
        ("host=10.20.30.40,10.20.30.41 dbname=fleet", "10.20.30.40"),  # the first host
        ("host=db.example hostaddr=10.9.8.7 dbname=fleet", "10.9.8.7"),  # hostaddr wins
        ("postgresql://localhost/fleet", "127.0.0.1"),
        ("host=/var/run/postgresql dbname=fleet", None),
        ("dbname=fleet", None),  # libpq's default: its UNIX socket
    ],
)
def test_the_database_address_is_read_from_the_store_url(url: str, address: str | None) -> None:
    assert database_address(url) == address


def test_a_database_name_that_does_not_resolve_is_one_line() -> None:
    with pytest.raises(NetworkError, match=r"cannot resolve the database host 'db\.invalid'"):
        database_address("postgresql://db.invalid/fleet")


def test_a_given_underlay_address_is_kept(tmp_path: Path) -> None:
    given = settings(tmp_path, "host=/var/run/postgresql dbname=fleet", "192.0.2.7")
    assert with_underlay_address(given).hosts.underlay_address == "192.0.2.7"


@pytest.mark.parametrize(
    ("store", "why"),
    [
        ("host=/var/run/postgresql dbname=fleet", "the database is reached over a UNIX socket"),
        ("postgresql://127.0.0.1/fleet", "no underlay address towards 127.0.0.1 (it is this host)"),
    ],
)
def test_without_an_underlay_address_the_host_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, store: str, why: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="reconciler.daemon"):
        found = with_underlay_address(settings(tmp_path, store))
    assert found.hosts.underlay_address is None
    (record,) = caplog.records
    assert record.getMessage() == (
        "host host-a registers no underlay address, so the other hosts cannot route to its "
        f"VMs: {why}; give one with --underlay-address"
    )


def test_the_daemon_checks_its_underlay_address_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["daemon", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    assert main([*argv, "--underlay-address", "192.0.2.7"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: --underlay-address is where the other hosts of a shared store route"
    )
    store = ["--store", "postgresql://192.0.2.1/fleet"]
    assert main([*argv, *store, "--underlay-address", "eth0"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --underlay-address must be an IPv4 address, not 'eth0'"
    ]
