"""Read-only commands stay read-only: observing the fleet returns a value, and only the acting
reconciler records it (a ``diff`` while a daemon leads must not write the daemon's store)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from support.fakes import MemoryStateStore, fleet, workload
from support.repo import FleetRepo

from reconciler.cli import main
from reconciler.execution.observer import observe, record_observation
from reconciler.model import ObservedVM, RuntimeKind, Target, VMState
from reconciler.planning import observed_from_desired
from reconciler.state import open_state_store
from runtime.protocol import VMSpec, VMStatus


class _AllGone:
    """A runtime whose every VM has died since it was recorded."""

    kind = RuntimeKind.QEMU

    def status(self, spec: VMSpec) -> VMStatus:
        return VMStatus(spec.name, VMState.MISSING, detail="killed by hand")


def _running_web(tmp_path: Path) -> tuple[MemoryStateStore, ObservedVM]:
    desired = fleet(workload("web"))
    vm = replace(observed_from_desired(desired).vms["web-0"], state=VMState.RUNNING, pid=4242)
    return MemoryStateStore([vm]), vm


def test_observe_returns_the_dead_vm_and_writes_nothing(tmp_path: Path) -> None:
    store, vm = _running_web(tmp_path)
    before = store.version()
    observed = observe(store, {RuntimeKind.QEMU: _AllGone()}, tmp_path)  # type: ignore[dict-item]
    assert observed.vms["web-0"].state is VMState.MISSING
    assert observed.version == before
    assert store.version() == before
    assert store.observed().vms["web-0"] == vm


def test_only_recording_an_observation_writes(tmp_path: Path) -> None:
    store, _ = _running_web(tmp_path)
    observed = observe(store, {RuntimeKind.QEMU: _AllGone()}, tmp_path)  # type: ignore[dict-item]
    stored = record_observation(store, observed)
    assert stored.vms["web-0"].state is VMState.MISSING
    assert stored.version > observed.version
    # Recording the same observation again changes nothing.
    assert record_observation(store, observe(store, {}, tmp_path)).version == stored.version


def test_diff_does_not_write_the_state_store(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VM recorded as running whose process is gone: ``diff`` plans its recreation from what
    it sees, and the store (and its file) stay exactly as they were."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = open_state_store(state_dir)
    vm = ObservedVM(
        name="echo-0",
        fleet="example",
        workload="echo",
        runtime=RuntimeKind.PROCESS,
        target=Target.EXECUTABLE,
        artifact_digest="sha256:" + "0" * 64,
        artifact_inputs={},
        settings={},
        state=VMState.RUNNING,
        pid=dead.pid,
    )
    store.put_vm(vm)
    version = store.version()
    store.close()
    files = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in state_dir.glob("state.db*")}

    code = main(
        ["diff", "--repo", str(fleet_repo.path), "--path", ".", "--state-dir", str(state_dir)]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert "echo-0" in out

    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files} == files
    store = open_state_store(state_dir)
    try:
        assert store.version() == version
        assert store.observed().vms["echo-0"].state is VMState.RUNNING
    finally:
        store.close()
    assert os.path.exists(state_dir / "state.db")
