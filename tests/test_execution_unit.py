"""Fast tests of the execution layer at its own seams: kernel command lines, guest-judged
health from console logs, and refusing a plan whose runtime does not exist before any change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.fakes import MemoryStateStore, fleet, workload

from builders.cache import ArtifactCache
from builders.kernels import KernelRegistry
from builders.matrix import MatrixBuilder
from reconciler.errors import NotImplementedFeatureError, VMRuntimeError
from reconciler.execution.events import ignore_event
from reconciler.execution.executor import Executor
from reconciler.execution.health import wait_healthy
from reconciler.execution.launch import guest_config, kernel_cmdline, launch_config
from reconciler.model import HealthCheck, HealthKind, RuntimeKind, Target
from reconciler.planning import diff


def test_per_vm_data_goes_to_the_init_not_the_kernel_command_line() -> None:
    desired = fleet(workload("web", env={"GREETING": 'say "hi"\tthere', "MODE": "x"}))
    config = launch_config(desired.vms["web-0"].settings)
    assert kernel_cmdline("console=ttyS0", config) == "console=ttyS0"
    guest = guest_config(config, hostname="web-0", address="10.88.0.2/24", gateway="10.88.0.1")
    assert dict(guest.env) == {"GREETING": 'say "hi"\tthere', "MODE": "x"}
    assert (guest.hostname, guest.address, guest.restart) == ("web-0", "10.88.0.2/24", "always")
    # Settings read back from a state store are checked again before anything starts.
    bad = fleet(workload("web", env={"Q": "a\0b"}))
    with pytest.raises(VMRuntimeError, match="NUL"):
        guest_config(
            launch_config(bad.vms["web-0"].settings), hostname="web-0", address=None, gateway=None
        )


def _console(tmp_path: Path, *events: dict[str, object]) -> Path:
    log = tmp_path / "console.log"
    log.write_text("".join(f"@@reconciler {json.dumps(e)}\n" for e in events))
    return log


def test_health_comes_from_the_guest(tmp_path: Path) -> None:
    started = {"event": "workload-started", "pid": 5, "t": 1.0}
    crashed = {"event": "workload-exited", "code": 3, "t": 2.0}
    restarted = {"event": "workload-started", "pid": 6, "t": 3.0}
    log = _console(tmp_path, {"event": "booted", "t": 0.9}, started, crashed, restarted)
    # A service that crashed once is unhealthy even though the init restarted it.
    assert wait_healthy(log, None, None, alive=lambda: True) == (
        False,
        "workload exited with code 3",
    )
    log = _console(tmp_path, started, {"event": "workload-exited", "code": 0, "t": 2.0})
    assert wait_healthy(log, None, None, alive=lambda: False) == (
        True,
        "workload exited with code 0",
    )
    log = _console(tmp_path, {"event": "booted", "t": 0.9})
    assert wait_healthy(log, None, None, alive=lambda: False) == (
        False,
        "the VM stopped before its workload started",
    )


def test_probe_failure_times_out_with_the_reason(tmp_path: Path) -> None:
    log = _console(tmp_path, {"event": "workload-started", "pid": 5, "t": 1.0})
    clock = iter(float(t) for t in range(0, 1000, 10))
    healthy, why = wait_healthy(
        log,
        HealthCheck(HealthKind.TCP, port=9, timeout_seconds=0.2, start_period_seconds=1),
        "127.0.0.1",
        alive=lambda: True,
        sleep=lambda s: None,
        now=lambda: next(clock),
    )
    assert not healthy
    assert "tcp probe of 127.0.0.1:9 failed" in why


def test_a_missing_runtime_is_refused_before_anything_changes(tmp_path: Path) -> None:
    desired = fleet(
        workload(
            "tool",
            target=Target.EXECUTABLE,
            targets=[Target.EXECUTABLE],
            runtime=RuntimeKind.PROCESS,
        )
    )
    store = MemoryStateStore()
    plan = diff(desired, store.observed())
    builder = MatrixBuilder(
        tmp_path, ArtifactCache(tmp_path / "cache"), KernelRegistry(tmp_path / "kernels")
    )
    executor = Executor(store, tmp_path, builder, runtimes={}, network=None, on_event=ignore_event)
    with pytest.raises(NotImplementedFeatureError, match="the process runtime"):
        executor.apply(plan, desired)
    assert store.observed().vms == {}
    attempted = store.attempted_revision()
    assert attempted is not None
    assert attempted.outcome == "failed"
