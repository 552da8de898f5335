"""Shared fixtures: scratch fleet repositories built with the real git CLI."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
FLEET_EXAMPLE = PROJECT / "fleet-example"


class FleetRepo:
    """A git repository in a temporary directory, with helpers to edit and commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "operator@example.invalid")
        self.git("config", "user.name", "Operator")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def write(self, relative: str, text: str) -> Path:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()

    def edit(self, relative: str, old: str, new: str) -> None:
        text = self.read(relative)
        assert old in text, f"{old!r} not in {relative}"
        self.write(relative, text.replace(old, new, 1))

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


@pytest.fixture
def fleet_repo(tmp_path: Path) -> FleetRepo:
    """A scratch repository holding a copy of fleet-example/ at its root, committed once."""
    repo_dir = tmp_path / "fleet"
    shutil.copytree(FLEET_EXAMPLE, repo_dir)
    repo = FleetRepo(repo_dir)
    repo.commit("fleet-example")
    return repo


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


TEST_CACHE = Path(
    os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")
)


@pytest.fixture(scope="session")
def kernel_deb() -> Path:
    """Debian's cloud kernel package, downloaded once into a cache shared across runs."""
    script = PROJECT / "deploy" / "fetch-debian-kernel.sh"
    result = subprocess.run(
        ["bash", str(script), str(TEST_CACHE / "kernels")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"cannot fetch the Debian kernel: {result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def session_state(tmp_path_factory: pytest.TempPathFactory, kernel_deb: Path) -> Path:
    """A state directory with the Debian kernel registered, shared by the build tests."""
    from builders.kernels import KernelRegistry

    state = tmp_path_factory.mktemp("session-state")
    KernelRegistry(state / "kernels").import_path(kernel_deb)
    return state


@pytest.fixture(scope="session")
def echo_unikernel(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> Path:
    """fleet-example's echo server built as a unikernel (the fastest image to build and boot)."""
    from builders.cache import ArtifactCache
    from reconciler.cli import main

    root = tmp_path_factory.mktemp("echo-unikernel")
    shutil.copytree(FLEET_EXAMPLE, root / "fleet")
    repo = FleetRepo(root / "fleet")
    repo.commit("fleet")
    argv = [
        "build",
        "--repo",
        str(repo.path),
        "--state-dir",
        str(session_state),
        "--cache-dir",
        str(root / "cache"),
        "--target",
        "unikernel",
        "echo",
    ]
    assert main(argv) == 0
    return next(
        e.path
        for e in ArtifactCache(root / "cache").entries()
        if e.manifest["target"] == "unikernel"
    )


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
