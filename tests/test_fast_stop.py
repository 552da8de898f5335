"""Stops that do not wait for nothing: a runtime's stop returns because the VM ended, not
because a grace period ran out.

QEMU: the runtime presses the ACPI power button (``system_powerdown``); the guest init reads it
from its evdev device, stops the workload, says "stopped" and powers off, and QEMU exits by
itself. Process VMs: SIGTERM reaches the init, which stops the workload and exits, and the
runtime's wait (a pidfd) ends with it. The grace periods given are far longer than the test's
patience, so a stop that waited one out would fail the test; no wall-clock bound is asserted.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from support.builds import build_artifacts
from support.kernel import register_kernel
from support.process_fleet import remove_deployment, sleeper_spec
from support.qemu import artifact_spec, wait_for_event
from support.repo import FleetRepo

from builders.images import guest_init
from reconciler.model import VMState
from runtime.console import read_markers
from runtime.detached import alive
from runtime.process.driver import ProcessRuntime
from runtime.protocol import Runtime, VMSpec, VMStatus
from runtime.qemu.driver import QemuRuntime

GRACE = 600.0  # what a stop may wait at most; the test gives up long before
PATIENCE = 120.0


def stop_within(runtime: Runtime, spec: VMSpec, patience: float) -> VMStatus:
    """``runtime.stop(spec, grace_seconds=GRACE)``; fails when it has not returned within
    ``patience`` seconds (it would have waited the grace period out)."""
    result: list[VMStatus] = []

    def stop() -> None:
        result.append(runtime.stop(spec, grace_seconds=GRACE))

    worker = threading.Thread(target=stop, daemon=True)
    worker.start()
    worker.join(patience)
    assert result, f"stop of {spec.name} waited for its grace period ({GRACE:g} s)"
    return result[0]


@pytest.fixture(scope="module")
def echo_unikernel_debian(tmp_path_factory: pytest.TempPathFactory, kernel_deb: Path) -> Path:
    """fleet-example's echo unikernel on Debian's kernel (its evdev and button are modules)."""
    root = tmp_path_factory.mktemp("echo-debian")
    state = register_kernel(root / "state", kernel_deb)  # Debian's kernel only
    repo = FleetRepo.of_fleet_example(root / "fleet")
    built = build_artifacts(repo.path, state, root / "cache", "--target", "unikernel", "echo")
    return built["echo/unikernel"].path


@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.parametrize("kernel", ["specialised", "debian"])
def test_a_qemu_vm_powers_itself_off_on_the_power_button(
    kernel: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On the specialised unikernel kernel (button and evdev built in) and on Debian's."""
    image: Path = request.getfixturevalue(
        "echo_unikernel" if kernel == "specialised" else "echo_unikernel_debian"
    )
    booted = json.loads((image / "manifest.json").read_text())["kernel"]["name"]
    assert ("-unikernel-" in booted) == (kernel == "specialised"), booted
    spec = artifact_spec(image, tmp_path / "echo-0", "echo-0")
    runtime = QemuRuntime(state_dir=tmp_path, accel="tcg")
    started = runtime.start(spec)
    assert started.pid is not None
    console = spec.vm_dir / "console.log"
    try:
        wait_for_event(console, "workload-started", PATIENCE)
        stopped = stop_within(runtime, spec, PATIENCE)
    finally:
        if alive(started.pid, spec.vm_dir):
            runtime.stop(spec, grace_seconds=0)
    events = [(m["event"], m.get("by")) for m in read_markers(console)]
    # The init took the button, stopped the echo server and powered off: QEMU was not told to
    # quit, it exited because the guest ended.
    assert events[-3:] == [
        ("workload-exited", None),
        ("stopped", "power-button"),
        ("poweroff", None),
    ]
    assert "reboot: Power down" in console.read_text(errors="replace")
    assert not (spec.vm_dir / "qemu.log").exists() or "quit" not in (
        spec.vm_dir / "qemu.log"
    ).read_text(errors="replace")
    assert (stopped.state, stopped.pid) == (VMState.FAILED, None)
    assert stopped.detail == "workload exited with code 143"  # SIGTERM, as asked


@pytest.mark.root
def test_a_process_vm_stop_returns_when_the_workload_has_ended(tmp_path: Path) -> None:
    spec = sleeper_spec(tmp_path, restart="always")
    init = guest_init(tmp_path / "guest-init.log")
    runtime = ProcessRuntime(init_binary=lambda: init)
    started = runtime.start(spec)
    console = spec.vm_dir / "console.log"
    try:
        assert started.state is VMState.RUNNING
        wait_for_event(console, "workload-started", PATIENCE)
        # The workload sets its trap before it says so; "waiting" is the sign.
        wait_for_output(console, "waiting")
        stopped = stop_within(runtime, spec, PATIENCE)
    finally:
        remove_deployment(tmp_path)
    events = [(m["event"], m.get("by")) for m in read_markers(console)]
    # restart=always did not bring it back: the stop request ends the init's loop.
    assert events[-2:] == [("workload-exited", None), ("stopped", "sigterm")]
    assert "terminated" in console.read_text()
    assert (stopped.state, stopped.detail) == (VMState.STOPPED, "workload exited with code 0")


def wait_for_output(console: Path, text: str) -> None:
    wait_for_event(console, "workload-started", PATIENCE)
    import time

    deadline = time.monotonic() + PATIENCE
    while text not in console.read_text(errors="replace"):
        assert time.monotonic() < deadline, console.read_text(errors="replace")
        time.sleep(0.05)
