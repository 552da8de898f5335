"""Shared fixtures over the test kit (``support``): scratch fleet repositories built with the
real git CLI, Debian's kernel, a built unikernel, and PostgreSQL databases."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.builds import build_artifacts
from support.kernel import fetch_kernel_deb, register_kernel, register_specialised
from support.repo import FleetRepo

# fleet-example's web reads a secret encrypted for the TEST-ONLY age key committed under
# tests/secrets/; every command a test runs (in process or as a subprocess) finds it here.
TEST_AGE_KEY = Path(__file__).resolve().parent / "secrets" / "age-key.txt"
os.environ.setdefault("SOPS_AGE_KEY_FILE", str(TEST_AGE_KEY))


@pytest.fixture
def fleet_repo(tmp_path: Path) -> FleetRepo:
    """A scratch repository holding a copy of fleet-example/ at its root, committed once."""
    return FleetRepo.of_fleet_example(tmp_path / "fleet")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="session")
def kernel_deb() -> Path:
    """Debian's cloud kernel package, downloaded once into a cache shared across runs."""
    return fetch_kernel_deb()


@pytest.fixture(scope="session")
def session_state(tmp_path_factory: pytest.TempPathFactory, kernel_deb: Path) -> Path:
    """A state directory shared by the build tests, with Debian's kernel and the specialised
    kernels (microvm, unikernel) registered: images built in it boot the specialised kernel of
    their target by default, and ``support.kernel.debian_kernel`` finds Debian's for the tests
    that compare with it. The specialised kernels come from the machine's kernel cache (built
    there first if missing: ``make kernel`` and ``.ci/run`` fill it before the tests)."""
    state = register_kernel(tmp_path_factory.mktemp("session-state"), kernel_deb)
    return register_specialised(state)


@pytest.fixture(scope="session")
def specialised_state(session_state: Path) -> Path:
    """The shared state directory, named for the tests about the specialised kernels."""
    return session_state


@pytest.fixture(scope="session")
def echo_unikernel(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> Path:
    """fleet-example's echo server built as a unikernel (the fastest image to build and boot)."""
    root = tmp_path_factory.mktemp("echo-unikernel")
    repo = FleetRepo.of_fleet_example(root / "fleet")
    built = build_artifacts(
        repo.path, session_state, root / "cache", "--target", "unikernel", "echo"
    )
    return built["echo/unikernel"].path


ADMIN_DSN = os.environ.get("RECONCILER_TEST_POSTGRES", "host=/var/run/postgresql dbname=postgres")


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    """A superuser connection to the test PostgreSQL server (``deploy/start-postgres.sh``)."""
    import psycopg

    try:
        with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"no PostgreSQL server answers at RECONCILER_TEST_POSTGRES={ADMIN_DSN!r}: "
            f"{str(exc).strip()}\nrun `bash deploy/start-postgres.sh` (CI does), or point "
            "RECONCILER_TEST_POSTGRES at a superuser connection",
            pytrace=False,
        )
    return ADMIN_DSN


@pytest.fixture
def lease_dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh database, dropped afterwards even if connections to it are still open."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"reconciler_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
