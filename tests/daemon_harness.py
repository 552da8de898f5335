"""Running real ``reconciler daemon`` processes in tests and benchmarks: a fleet of host-process
echo servers (fast to build and start), daemons as subprocesses, and their HTTP view."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from process_fleet import network_yaml, new_pool, remove_deployment

ECHO = Path(__file__).resolve().parents[1] / "fleet-example" / "services" / "echo" / "echo.c"

# Host-process VMs live on a bridge with pool addresses: one of their own for this run.
BRIDGE, CIDR = new_pool()
FLEET = f"""apiVersion: reconciler/v1alpha1
kind: Fleet
metadata: {{name: daemon-test}}
{network_yaml(BRIDGE, CIDR)}
"""

WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: {source}, language: c, entrypoint: echo.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    replicas: 1
    env: {{ECHO_PORT: "{port}"{extra_env}}}
    health: {{type: tcp, port: {port}, startPeriodSeconds: 30}}
"""

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int, address: str) -> bytes:
    """Ask the echo server of the VM at ``address`` (its pool address, see ``address_of``)."""
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(b"ping\n")
        return conn.recv(16)


def slow_echo_source() -> str:
    """The echo server, sleeping ``$ECHO_DELAY`` seconds before it listens: a VM that takes a
    while to get healthy, so a test can catch a leader in the middle of a rollout."""
    return ECHO.read_text().replace(
        "    signal(SIGPIPE, SIG_IGN);",
        '    if (getenv("ECHO_DELAY")) sleep((unsigned)atoi(getenv("ECHO_DELAY")));\n'
        "    signal(SIGPIPE, SIG_IGN);",
    )


def fleet_text(
    workloads: dict[str, int],
    env: dict[str, str] | None = None,
    *,
    slow: dict[str, int] | None = None,
) -> str:
    """A fleet of echo servers on the given ports; ``slow`` ones (in ``slow/``, the repository
    must hold ``slow_echo_source()`` there) wait ``ECHO_DELAY`` seconds before listening."""
    extra = "".join(f', {k}: "{v}"' for k, v in (env or {}).items())
    fast = [
        WORKLOAD.format(name=name, port=port, extra_env=extra, source="echo")
        for name, port in sorted(workloads.items())
    ]
    delayed = [
        WORKLOAD.format(name=name, port=port, extra_env=extra + ', ECHO_DELAY: "8"', source="slow")
        for name, port in sorted((slow or {}).items())
    ]
    return FLEET + "".join(fast + delayed)


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns a truthy value; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError) as exc:
            last_error, value = exc, None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g} s (last error: {last_error})")


class Daemon:
    """One ``reconciler daemon`` subprocess with its own port and log file."""

    def __init__(
        self, repo: Path, state: Path, log_dir: Path, name: str, extra: Iterable[str] = ()
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "reconciler",
            "daemon",
            "--repo",
            str(repo),
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--id",
            name,
            "--log-format",
            "json",
            *extra,
        ]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/api/status")
        return result

    def is_leader(self) -> bool:
        try:
            return bool(self.status()["leader"]["is_leader"])
        except (OSError, ValueError):
            return False

    def serving(self) -> bool:
        try:
            return self.get("/healthz").strip() == "ok"
        except (OSError, ValueError):
            return False

    def metric(self, name: str, labels: str = "") -> float | None:
        for line in str(self.get("/metrics")).splitlines():
            if line.startswith(name + (f"{{{labels}}}" if labels else "")) and " " in line:
                key = line.rsplit(" ", 1)[0]
                if labels or key == name:
                    return float(line.rsplit(" ", 1)[1])
        return None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


def vms_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vm["name"]: vm for vm in status["vms"]}


def healthy_names(status: dict[str, Any]) -> set[str]:
    return {vm["name"] for vm in status["vms"] if vm["healthy"] and vm["state"] == "running"}


def address_of(status: dict[str, Any], vm: str) -> str:
    return str(vms_by_name(status)[vm]["address"])


def kill_vms(state: Path) -> None:
    """Stop every host-process VM a test started (they outlive daemons by design), and remove
    their network namespaces, veths, bridge and firewall tables."""
    remove_deployment(state, BRIDGE)


def supervisor_counts(state: Path) -> dict[str, int]:
    """How many live VM supervisors each VM of ``state`` has: more than one is a duplicate."""
    counts: dict[str, int] = {}
    prefix = str(state / "vms") + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--supervisor" not in argv or Path(argv[0]).name == "bwrap":
            continue
        config = argv[argv.index("--config") + 1] if "--config" in argv else ""
        if config.startswith(prefix):
            name = config[len(prefix) :].split("/")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


@contextlib.contextmanager
def daemons(
    repo: Path, state: Path, log_dir: Path, count: int, extra: Iterable[str] = ()
) -> Iterator[list[Daemon]]:
    started = [Daemon(repo, state, log_dir, f"d{i}", extra) for i in range(count)]
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()
        kill_vms(state)
