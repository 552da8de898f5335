"""Is a VM healthy? Judged from the guest, never from the VMM process alone.

First the guest init must report "workload started" on the console (a kernel that panicked, a
missing library, a bad exec never get there); then the declared probe must pass over the VM
network: a TCP connection, or an HTTP GET answered with 2xx/3xx. A batch job that already exited
with code 0 is healthy; any other exit is not.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from reconciler.errors import SupersededError
from reconciler.execution.events import EventKind, ExecutionEvent, Reporter
from reconciler.execution.launch import launch_config
from reconciler.execution.vms import runtime_for, spec_of
from reconciler.log_context import log_fields
from reconciler.model import HealthCheck, HealthKind, RuntimeKind, VMState
from reconciler.state import StateStore
from runtime.console import last_event, read_markers
from runtime.protocol import Runtime

DEFAULT_START_SECONDS = 120.0  # TCG boots of a PyInstaller service take tens of seconds
# Waits between looks at the console and between failed probes: the first look comes at once,
# then the wait doubles from FIRST_WAIT up to the check's interval (the console: FIRST_WAIT up
# to CONSOLE_WAIT). A workload that listens a few milliseconds after "workload started" is
# seen healthy a few milliseconds later, not a whole interval later; one that takes long is
# not probed more often than its interval says.
FIRST_WAIT = 0.005
CONSOLE_WAIT = 0.1


class Backoff:
    """The next wait: ``first`` doubled at each call, never above ``ceiling``."""

    def __init__(self, first: float, ceiling: float) -> None:
        self._next, self._ceiling = first, ceiling

    def next(self) -> float:
        wait = min(self._next, self._ceiling)
        self._next = wait * 2
        return wait


def probe(check: HealthCheck, address: str) -> tuple[bool, str]:
    """One try of ``check`` against the VM at ``address``: ``(passed, what was seen)``."""
    kind, port, path, timeout = check.kind, check.port, check.path or "/", check.timeout_seconds
    if kind == HealthKind.CONSOLE or port is None:
        return True, "workload started"
    try:
        if kind == HealthKind.TCP:
            with socket.create_connection((address, port), timeout=timeout):
                return True, f"tcp {address}:{port} accepts connections"
        connection = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            connection.request("GET", path)
            status = connection.getresponse().status
        finally:
            connection.close()
        if 200 <= status < 400:
            return True, f"GET {path} answered {status}"
        return False, f"GET {path} answered {status}"
    except OSError as exc:
        return False, f"{kind} probe of {address}:{port} failed: {exc}"


def wait_healthy(
    console_log: Path,
    health: HealthCheck | None,
    address: str | None,
    *,
    alive: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    superseded: Callable[[], bool] = lambda: False,
    on_marker: Callable[[str, Mapping[str, object] | None], None] = lambda name, marker: None,
) -> tuple[bool, str]:
    """Wait until the VM is healthy or cannot become so; ``(healthy, why)``. Raises
    ``SupersededError`` as soon as ``superseded()`` says a newer revision waits.
    ``on_marker`` hears, once each and in order, when "booted" and "workload-started" were
    first seen (with the marker) and when the VM was first seen "healthy" (the timeline)."""
    seen: set[str] = set()

    def saw(name: str, marker: Mapping[str, object] | None = None) -> None:
        if name not in seen:
            seen.add(name)
            on_marker(name, marker)

    check = health or HealthCheck(HealthKind.CONSOLE)
    # A VM gets at least DEFAULT_START_SECONDS whatever it declares: under TCG a boot alone
    # can take longer than a start period written for KVM.
    patience = max(check.start_period_seconds, DEFAULT_START_SECONDS)
    deadline = now() + patience
    last = "the guest has not reported yet"
    console_wait = Backoff(FIRST_WAIT, CONSOLE_WAIT)
    probe_wait = Backoff(FIRST_WAIT, check.interval_seconds or HealthCheck.interval_seconds)
    while now() < deadline:
        if superseded():
            raise SupersededError(f"a newer revision arrived; stopped waiting ({last})")
        markers = read_markers(console_log)
        exited = last_event(markers, "workload-exited")
        started = last_event(markers, "workload-started")
        error = last_event(markers, "error")
        booted = last_event(markers, "booted")
        if booted is not None:
            saw("booted", booted)
        if started is not None:
            saw("workload-started", started)
        crashed = [m for m in markers if m["event"] == "workload-exited" and m.get("code")]
        if crashed:
            # Even when the init restarted it, a workload that crashed once is not healthy.
            return False, f"workload exited with code {crashed[-1]['code']}"
        if exited is not None and (started is None or exited["t"] >= started["t"]):
            saw("healthy")
            return True, "workload exited with code 0"
        if started is None:
            if error is not None and not alive():
                return False, f"guest failed: {error.get('message')}"
            if not alive():
                return False, "the VM stopped before its workload started"
            sleep(console_wait.next())
            continue
        if address is None:
            saw("healthy")
            return True, "workload started (no network to probe)"
        ok, last = probe(check, address)
        if ok:
            saw("healthy")
            return True, last
        if not alive():
            return False, f"the VM stopped; last probe: {last}"
        sleep(probe_wait.next())
    return False, f"not healthy within {patience:g} s: {last}"


def describe_problems(unhealthy: Mapping[str, str]) -> str:
    """``vm: why; vm: why`` in name order, for one-line errors and revision records."""
    return "; ".join(f"{vm}: {why}" for vm, why in sorted(unhealthy.items()))


def judge_health(
    store: StateStore,
    runtimes: Mapping[RuntimeKind, Runtime],
    state_dir: Path,
    name: str,
    *,
    on_event: Reporter,
    superseded: Callable[[], bool] = lambda: False,
) -> tuple[bool, str]:
    """Wait for the verdict on VM ``name`` and record it (with its state and pid) in the store."""
    with log_fields(vm=name):  # the probe's and the runtime's lines name the VM
        vm = store.observed().vms[name]
        runtime = runtime_for(runtimes, vm.runtime)
        spec = spec_of(vm, state_dir)
        phases = _PhaseClock(name, vm.started_at, vm.runtime, on_event)
        healthy, why = wait_healthy(
            spec.vm_dir / "console.log",
            launch_config(vm.settings).health,
            vm.address,
            alive=lambda: runtime.status(spec).state is VMState.RUNNING,
            superseded=superseded,
            on_marker=phases.saw,
        )
        status = runtime.status(spec)
        store.put_vm(replace(vm, healthy=healthy, state=status.state, pid=status.pid, detail=why))
        on_event(ExecutionEvent(EventKind.HEALTH, name, healthy=healthy, detail=why))
        return healthy, why


# The timeline phase that ends when the health wait first sees each marker.
_PHASE_OF = {"booted": "boot", "workload-started": "workload", "healthy": "probe"}


class _PhaseClock:
    """Turns the moments ``wait_healthy`` first sees a marker into the timeline's phases of one
    VM: boot (VMM started → "booted"), workload ("booted" → "workload started"), probe
    ("workload started" → healthy). Host wall-clock time, measured from the VM's ``started_at``;
    a VM adopted without one has no phases. For a VM the guest's own clock (seconds since its
    kernel started) is added to the boot phase's detail."""

    def __init__(
        self, vm: str, started_at: float | None, runtime: RuntimeKind, on_event: Reporter
    ) -> None:
        self.vm, self.last, self.runtime, self.on_event = vm, started_at, runtime, on_event

    def saw(self, name: str, marker: Mapping[str, object] | None) -> None:
        if self.last is None:
            return
        seen = time.time()
        detail = ""
        if name == "booted" and marker is not None and self.runtime is not RuntimeKind.PROCESS:
            detail = f"guest clock {marker.get('t')} s"
        self.on_event(
            ExecutionEvent(
                EventKind.PHASE,
                self.vm,
                phase=_PHASE_OF[name],
                seconds=max(0.0, seen - self.last),
                detail=detail,
            )
        )
        self.last = seen
