"""The SQLite state store: what it records survives reopening, and its version moves."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import fleet, running, workload

from reconciler.errors import StateError
from reconciler.model import VMState
from reconciler.state import default_state_dir, open_state_store


def test_empty_store_means_nothing_runs(tmp_path: Path) -> None:
    store = open_state_store(tmp_path)
    observed = store.observed()
    assert observed.vms == {}
    assert observed.applied_revision is None
    store.close()


def test_vms_and_revisions_survive_reopening(tmp_path: Path) -> None:
    vm = running(fleet(workload("web"))).vms["web-0"]
    store = open_state_store(tmp_path)
    before = store.version()
    store.put_vm(replace(vm, state=VMState.RUNNING, pid=1234, address="10.88.0.2"))
    store.record_revision("a" * 40, outcome="applied")
    store.record_revision("b" * 40, outcome="failed", message="build failed")
    assert store.version() == before + 3
    store.close()

    reopened = open_state_store(tmp_path)
    observed = reopened.observed()
    assert observed.vms["web-0"] == replace(vm, pid=1234, address="10.88.0.2")
    assert observed.applied_revision == "a" * 40
    attempted = reopened.attempted_revision()
    assert attempted is not None
    assert attempted.outcome == "failed"
    reopened.remove_vm("web-0")
    assert reopened.observed().vms == {}
    reopened.close()


def test_store_uses_wal_and_full_sync(tmp_path: Path) -> None:
    store = open_state_store(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError, match="cannot open the state store"):
        open_state_store(blocker / "state")


def test_state_dir_comes_from_the_environment() -> None:
    assert default_state_dir({"RECONCILER_STATE_DIR": "/srv/rc"}) == Path("/srv/rc")
    assert default_state_dir({"HOME": "/home/op"}) == Path("/home/op/.local/state/reconciler")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/reconciler")


def test_intents_survive_a_crash_until_completed(tmp_path: Path) -> None:
    store = open_state_store(tmp_path)
    done = store.begin_intent("web-0", "create")
    store.complete_intent(done)
    store.begin_intent("web-1", "create")
    store.close()  # as if the process died here
    reopened = open_state_store(tmp_path)
    assert [(i.vm, i.action) for i in reopened.open_intents()] == [("web-1", "create")]
    reopened.close()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_state_directory_is_private(tmp_path: Path) -> None:
    """Env values, events and the API token live here: nobody else may read them, whatever
    the umask of the process that made them."""
    state = tmp_path / "state"
    store = open_state_store(state)
    store.put_vm(running(fleet(workload("web", env={"DB_PASSWORD": "x"}))).vms["web-0"])
    store.close()
    assert _mode(state) == 0o700
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (state / name).exists():
            assert _mode(state / name) == 0o600, name


def test_an_open_state_directory_is_made_private_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    open_state_store(state).close()
    state.chmod(0o755)
    (state / "state.db").chmod(0o644)
    open_state_store(state).close()
    assert (_mode(state), _mode(state / "state.db")) == (0o700, 0o600)
    assert "made private" in caplog.text


@pytest.mark.root
def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "theirs"
    state.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.fail("this test needs root to make a directory of another user (CI runs as root)")
    os.chown(state, 4321, 4321)
    with pytest.raises(StateError, match="belongs to uid 4321"):
        open_state_store(state)


def test_checking_modes_never_creates_sqlites_companion_files(tmp_path: Path) -> None:
    """SQLite's last connection deletes ``-wal`` and ``-shm`` on close; a mode check that
    recreated one behind its back (an empty ``-shm`` beside no ``-wal``) left a store that no
    connection could open while a daemon was reading it."""
    from reconciler.state.paths import private_file

    shm = tmp_path / "state.db-shm"
    assert private_file(shm, create=False) == []
    assert not shm.exists()
    store = open_state_store(tmp_path)
    store.close()
    assert not shm.exists()
    assert not (tmp_path / "state.db-wal").exists()
