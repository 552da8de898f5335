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
from reconciler.execution.launch import launch_config
from reconciler.execution.vms import runtime_for, spec_of
from reconciler.model import RuntimeKind, VMState
from reconciler.state import StateStore
from runtime.console import last_event, read_markers
from runtime.protocol import Runtime

DEFAULT_START_SECONDS = 120.0  # TCG boots of a PyInstaller service take tens of seconds


def probe(
    kind: str, address: str, port: int | None, path: str | None, timeout: float
) -> tuple[bool, str]:
    if kind == "console" or port is None:
        return True, "workload started"
    try:
        if kind == "tcp":
            with socket.create_connection((address, port), timeout=timeout):
                return True, f"tcp {address}:{port} accepts connections"
        connection = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            connection.request("GET", path or "/")
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
    health: dict[str, object] | None,
    address: str | None,
    *,
    alive: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    superseded: Callable[[], bool] = lambda: False,
) -> tuple[bool, str]:
    """Wait until the VM is healthy or cannot become so; ``(healthy, why)``. Raises
    ``SupersededError`` as soon as ``superseded()`` says a newer revision waits."""
    health = health or {"kind": "console"}
    start_period = float(str(health.get("startPeriodSeconds") or DEFAULT_START_SECONDS))
    interval = float(str(health.get("intervalSeconds") or 2.0))
    timeout = float(str(health.get("timeoutSeconds") or 5.0))
    kind = str(health.get("kind", "console"))
    port = health.get("port")
    deadline = now() + max(start_period, DEFAULT_START_SECONDS)
    last = "the guest has not reported yet"
    while now() < deadline:
        if superseded():
            raise SupersededError(f"a newer revision arrived; stopped waiting ({last})")
        markers = read_markers(console_log)
        exited = last_event(markers, "workload-exited")
        started = last_event(markers, "workload-started")
        error = last_event(markers, "error")
        crashed = [m for m in markers if m["event"] == "workload-exited" and m.get("code")]
        if crashed:
            # Even when the init restarted it, a workload that crashed once is not healthy.
            return False, f"workload exited with code {crashed[-1]['code']}"
        if exited is not None and (started is None or exited["t"] >= started["t"]):
            return True, "workload exited with code 0"
        if started is None:
            if error is not None and not alive():
                return False, f"guest failed: {error.get('message')}"
            if not alive():
                return False, "the VM stopped before its workload started"
            sleep(0.5)
            continue
        if address is None:
            return True, "workload started (no network to probe)"
        ok, last = probe(
            kind, address, int(str(port)) if port else None, str(health.get("path") or "/"), timeout
        )
        if ok:
            return True, last
        if not alive():
            return False, f"the VM stopped; last probe: {last}"
        sleep(interval)
    return False, f"not healthy within {max(start_period, DEFAULT_START_SECONDS):g} s: {last}"


def describe_problems(unhealthy: Mapping[str, str]) -> str:
    """``vm: why; vm: why`` in name order, for one-line errors and revision records."""
    return "; ".join(f"{vm}: {why}" for vm, why in sorted(unhealthy.items()))


def judge_health(
    store: StateStore,
    runtimes: Mapping[RuntimeKind, Runtime],
    state_dir: Path,
    name: str,
    *,
    say: Callable[[str], None],
    superseded: Callable[[], bool] = lambda: False,
) -> tuple[bool, str]:
    """Wait for the verdict on VM ``name`` and record it (with its state and pid) in the store."""
    vm = store.observed().vms[name]
    runtime = runtime_for(runtimes, vm.runtime)
    spec = spec_of(vm, state_dir)
    healthy, why = wait_healthy(
        spec.vm_dir / "console.log",
        launch_config(vm.settings).health,
        vm.address,
        alive=lambda: runtime.status(spec).state is VMState.RUNNING,
        superseded=superseded,
    )
    status = runtime.status(spec)
    store.put_vm(replace(vm, healthy=healthy, state=status.state, pid=status.pid, detail=why))
    say(f"{'healthy' if healthy else 'UNHEALTHY':<8} {name}: {why}")
    return healthy, why
