"""Running real ``reconciler daemon`` processes in tests and benchmarks: a fleet of host-process
echo servers (``process_fleet``) on a pool of its own, daemons as subprocesses, and their HTTP
view."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from support.process_fleet import (
    echo_repo,
    echo_workload,
    fleet_document,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.repo import FleetRepo
from support.waiting import free_port

# Host-process VMs live on a bridge with pool addresses: one of their own for this run.
BRIDGE, CIDR = new_pool()
FLEET = fleet_document("daemon-test", network_yaml(BRIDGE, CIDR))


def fleet_text(
    workloads: dict[str, int],
    env: dict[str, str] | None = None,
    *,
    slow: dict[str, int] | None = None,
) -> str:
    """A fleet of echo servers on the given ports; ``slow`` ones (in ``slow/``, the repository
    must hold ``slow_echo_source()`` there) wait ``ECHO_DELAY`` seconds before listening."""
    extra = "".join(f', {k}: "{v}"' for k, v in (env or {}).items())
    fast = [echo_workload(name, port, extra_env=extra) for name, port in sorted(workloads.items())]
    delayed = [
        echo_workload(name, port, source="slow", extra_env=extra + ', ECHO_DELAY: "8"')
        for name, port in sorted((slow or {}).items())
    ]
    return FLEET + "".join(fast + delayed)


def fleet_repo(path: Path, workloads: dict[str, int]) -> FleetRepo:
    """A repository at ``path`` with ``fleet_text(workloads)``, the echo server and the slow
    one, committed once."""
    return echo_repo(path, fleet_text(workloads), slow=True)


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
        signal_daemon(self.process, sig)

    def stop(self) -> None:
        stop_daemon(self.process, timeout=30)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


def leader_among(group: Iterable[Daemon]) -> Daemon | None:
    """The replica of ``group`` that says it leads; None when none does. When none does and
    some did not answer, the last such error is raised instead, so that a wait that times out
    says why (``eventually`` keeps it)."""
    unanswered: OSError | None = None
    for daemon in group:
        try:
            if daemon.status()["leader"]["is_leader"]:
                return daemon
        except OSError as err:
            unanswered = OSError(f"{daemon.name} did not answer: {err}")
    if unanswered is not None:
        raise unanswered
    return None


def signal_daemon(process: subprocess.Popen[bytes], sig: int) -> None:
    """``sig`` to a daemon's process, which may have ended already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)


def stop_daemon(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Stop a daemon as its supervisor would: woken if paused, SIGTERM, SIGKILL after
    ``timeout`` seconds."""
    if process.poll() is None:
        signal_daemon(process, signal.SIGCONT)
        signal_daemon(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    except BaseException:
        # pytest shows this beside the failure: what each replica saw, for a timing that does
        # not come back on a second run.
        for daemon in started:
            print(f"--- the log of {daemon.name}, last lines ---\n{daemon.log()[-6000:]}")
        raise
    finally:
        for daemon in started:
            daemon.stop()
        kill_vms(state)
