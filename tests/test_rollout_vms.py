"""Progressive rollouts on real VMs, driven by a real ``reconciler daemon``: a canary serves the
new version while the other replicas serve the old one; a broken version stops at the canary
and is rolled back while the others keep serving; ``maxSurge: 1, maxUnavailable: 0`` keeps the
workload's full capacity answering through a replace.

Two runtimes: host processes (bubblewrap sandboxes in network namespaces; fast, the C echo
server tagged with its version) and QEMU microVMs (fleet-example's ``web``, under TCG here:
slow, so it runs the issue's scenario once). Every deployment has its own bridge and pool and
is removed afterwards. A background poller asks every replica for its version all along.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.daemons import Daemon, healthy_names, supervisor_counts
from support.process_fleet import (
    ECHO,
    echo_workload,
    fleet_document,
    netns_names,
    network_yaml,
    new_pool,
    remove_deployment,
)
from support.repo import FLEET_EXAMPLE, FleetRepo
from support.waiting import eventually

from reconciler.state import open_state_store
from runtime.network import scope_for

Probe = Callable[[str], str | None]


# -- the poller -------------------------------------------------------------------------------


@dataclass
class Poller:
    """Asks VMs for their version, round after round, in a thread: every VM ``names`` picks
    from the daemon's status, and every one it picked before (at the address it had: a VM
    restarted keeps its address), all at once; ``rounds`` keeps each round's answers (``None``:
    no answer within a generous timeout, since a guest under TCG on a busy host is slow, not
    down)."""

    daemon: Daemon
    probe: Probe
    names: Callable[[dict[str, Any]], list[str]]
    rounds: list[dict[str, str | None]] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            while not self._stop.is_set():
                try:
                    status = self.daemon.status()
                except (OSError, ValueError):
                    continue
                vms = {vm["name"]: vm for vm in status["vms"]}
                for name in self.names(status):
                    if name in vms and vms[name]["address"]:
                        self.addresses[name] = vms[name]["address"]
                known = sorted(self.addresses.items())
                answers = pool.map(lambda item: self.probe(item[1]), known)
                self.rounds.append(dict(zip([n for n, _ in known], answers, strict=True)))
                time.sleep(0.2)

    def saw(self, wanted: dict[str, str]) -> bool:
        return any(all(r.get(k) == v for k, v in wanted.items()) for r in self.rounds)


def web_replicas(status: dict[str, Any]) -> list[str]:
    return ["web-0", "web-1", "web-2"]


def every_web_vm(status: dict[str, Any]) -> list[str]:
    """The replicas and any surge stand-in the daemon reports."""
    return sorted(vm["name"] for vm in status["vms"] if vm["name"].startswith("web-"))


def rollouts(daemon: Daemon) -> list[dict[str, Any]]:
    return list(daemon.status()["rollouts"])


# -- host processes ---------------------------------------------------------------------------

TAGGED_ECHO = ECHO.read_text().replace(
    "            if (write(client, buffer, (size_t)n) != n) break;",
    '            const char *tag = getenv("ECHO_TAG");\n'
    '            dprintf(client, "%s:", tag ? tag : "");\n'
    "            if (write(client, buffer, (size_t)n) != n) break;",
)
PORT = 7007


def echo_version(address: str) -> str | None:
    try:
        with socket.create_connection((address, PORT), timeout=10) as conn:
            conn.sendall(b"ping\n")
            return conn.recv(64).decode().split(":", 1)[0]
    except OSError:
        return None


@dataclass
class Deployment:
    repo: FleetRepo
    state: Path
    daemon: Daemon
    bridge: str = ""
    cidr: str = ""

    def head(self) -> str:
        return self.repo.git("rev-parse", "HEAD")

    def applied(self) -> bool:
        return bool(self.daemon.status()["applied_revision"] == self.head())


def _process_fleet(bridge: str, cidr: str, rollout: str, tag: str, port: int = PORT) -> str:
    web = echo_workload(
        "web",
        PORT,
        extra_env=f', ECHO_TAG: "{tag}"',
        health=f"{{type: tcp, port: {PORT}, startPeriodSeconds: 4, intervalSeconds: 1}}",
        extra_deploy=f"    rollout: {rollout}\n",
    )
    web = web.replace("replicas: 1", "replicas: 3").replace(
        f'ECHO_PORT: "{PORT}"', f'ECHO_PORT: "{port}"'
    )
    return fleet_document("rollout-test", network_yaml(bridge, cidr)) + web


@pytest.fixture
def process_deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    bridge, cidr = new_pool()
    rollout: str = request.param
    repo = FleetRepo.create(
        tmp_path / "fleet",
        {"fleet.yaml": _process_fleet(bridge, cidr, rollout, "v1"), "echo/echo.c": TAGGED_ECHO},
        "web v1",
    )
    state = tmp_path / "state"
    daemon = Daemon(
        repo.path, state, tmp_path, "d0", ["--poll-interval", "1", "--poll-jitter", "0"]
    )
    deployment = Deployment(repo, state, daemon, bridge, cidr)
    try:
        eventually(deployment.applied, 180, "the first revision applied")
        eventually(lambda: len(healthy_names(daemon.status())) == 3, 60, "3 healthy replicas")
        yield deployment
    finally:
        deployment.daemon.stop()  # the test may have started another
        remove_deployment(state, bridge)


CANARY = "{canary: 1, soakSeconds: 10}"
SURGE = "{maxSurge: 1, maxUnavailable: 0}"


@pytest.mark.root
@pytest.mark.parametrize("process_deployment", [CANARY], indirect=True)
def test_process_canary_then_broken_version_rolls_back(process_deployment: Deployment) -> None:
    d = process_deployment
    bridge, cidr = d.bridge, d.cidr

    def commit(tag: str, port: int = PORT) -> None:
        d.repo.write("fleet.yaml", _process_fleet(bridge, cidr, CANARY, tag, port))
        d.repo.commit(f"web {tag}")

    _canary_scenario(
        d,
        echo_version,
        commit_new=lambda: commit("v2"),
        commit_broken=lambda: commit("v2", 7998),
        old="v1",
        new="v2",
    )


@pytest.mark.root
@pytest.mark.parametrize("process_deployment", [SURGE], indirect=True)
def test_process_surge_keeps_every_replica_answering(process_deployment: Deployment) -> None:
    d = process_deployment
    bridge, cidr = d.bridge, d.cidr

    def commit() -> None:
        d.repo.write("fleet.yaml", _process_fleet(bridge, cidr, SURGE, "v2"))
        d.repo.commit("web v2")

    _surge_scenario(d, echo_version, commit, "v2")


# -- the scenarios, on either runtime ---------------------------------------------------------


def _canary_scenario(
    d: Deployment,
    probe: Probe,
    *,
    commit_new: Callable[[], None],
    commit_broken: Callable[[], None],
    old: str,
    new: str,
) -> None:
    with Poller(d.daemon, probe, web_replicas) as poller:
        commit_new()
        eventually(
            lambda: poller.saw({"web-0": new, "web-1": old, "web-2": old}),
            300,
            "the canary serving the new version while the others serve the old",
        )
        phases = [r["phase"] for r in rollouts(d.daemon)]
        assert phases == ["canary"], phases
        eventually(d.applied, 600, "the rollout finished and the revision applied")
        assert rollouts(d.daemon) == []
        assert poller.saw({"web-0": new, "web-1": new, "web-2": new})
        # The service stayed up: every round, at least two of three replicas answered.
        assert all(sum(v is not None for v in r.values()) >= 2 for r in poller.rounds)

    with Poller(d.daemon, probe, web_replicas) as poller:
        commit_broken()

        def aborted() -> list[dict[str, Any]]:
            return [r for r in rollouts(d.daemon) if r["phase"] == "aborted"]

        (rolled_back,) = eventually(aborted, 600, "the broken version rolled back")
        assert "web-0 failed its health check" in rolled_back["message"]
        eventually(
            lambda: (
                poller.saw({"web-0": new, "web-1": new, "web-2": new})
                and poller.rounds[-1] == {"web-0": new, "web-1": new, "web-2": new}
            ),
            300,
            "the canary back on the previous version",
        )
    # Only the canary was ever touched: the others answered in every round.
    assert poller.rounds
    assert all(r.get("web-1") == new and r.get("web-2") == new for r in poller.rounds)
    kinds = [e["kind"] for e in d.daemon.get("/api/events?limit=200")]
    assert "rollout-aborted" in kinds


def _surge_scenario(d: Deployment, probe: Probe, commit_new: Callable[[], None], new: str) -> None:
    with Poller(d.daemon, probe, every_web_vm) as poller:
        commit_new()
        eventually(d.applied, 900, "the replace finished and the revision applied")
        eventually(
            lambda: all(poller.rounds[-1].get(f"web-{i}") == new for i in range(3)),
            60,
            "every replica on the new version",
        )
    # Every round, three VMs answered: the replicas, or a stand-in in place of one.
    short = [r for r in poller.rounds if sum(v is not None for v in r.values()) < 3]
    assert not short, short
    assert any("web-0-surge" in r for r in poller.rounds)  # the stand-ins did serve
    names = {vm["name"] for vm in d.daemon.status()["vms"]}
    assert names == {"web-0", "web-1", "web-2"}  # no stand-in left


# -- QEMU microVMs: fleet-example's web ---------------------------------------------------------


def greeting(address: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}:8080/", timeout=10) as response:
            return str(json.loads(response.read())["greeting"])
    except (OSError, ValueError, KeyError, http.client.HTTPException):  # a guest stopping
        return None


@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
def test_qemu_canary_broken_version_and_surge(tmp_path: Path, session_state: Path) -> None:
    bridge, cidr = new_pool()
    shutil.copytree(FLEET_EXAMPLE, tmp_path / "fleet")
    repo = FleetRepo(tmp_path / "fleet")
    repo.edit("fleet.yaml", "bridge: rcbr0", f"bridge: {bridge}")
    repo.edit("fleet.yaml", "cidr: 10.88.0.0/24", f"cidr: {cidr}")
    # Only web: under TCG every boot counts.
    (repo.path / "workloads" / "echo.yaml").unlink()
    (repo.path / "workloads" / "report.yaml.j2").unlink()
    web = "workloads/web.yaml"
    repo.edit(web, "replicas: 2", "replicas: 3\n    rollout: {canary: 1, soakSeconds: 10}")
    repo.commit("web: 3 replicas, canary 1")
    state = tmp_path / "state"
    shutil.copytree(session_state / "kernels", state / "kernels")
    daemon = Daemon(
        repo.path, state, tmp_path, "d0", ["--poll-interval", "1", "--poll-jitter", "0"]
    )
    d = Deployment(repo, state, daemon)
    try:
        eventually(d.applied, 1200, "fleet-example's web applied")
        eventually(lambda: len(healthy_names(daemon.status())) == 3, 120, "3 healthy replicas")

        def commit_new() -> None:
            repo.edit(web, "GREETING: hello", "GREETING: hola")
            repo.commit("web: hola")

        def commit_broken() -> None:
            repo.write(
                "services/web/app.py",
                repo.read("services/web/app.py").replace(
                    "def main() -> None:\n", "def main() -> None:\n    raise SystemExit(3)\n"
                ),
            )
            repo.commit("web: broken")

        _canary_scenario(
            d,
            greeting,
            commit_new=commit_new,
            commit_broken=commit_broken,
            old="hello",
            new="hola",
        )

        repo.git("revert", "--no-edit", "HEAD")  # back to a good app, then a surged replace
        repo.edit(
            web,
            "rollout: {canary: 1, soakSeconds: 10}",
            "rollout: {maxSurge: 1, maxUnavailable: 0}",
        )
        repo.commit("web: surge")
        eventually(d.applied, 600, "the reverted revision applied")

        def commit_surged() -> None:
            repo.edit(web, "GREETING: hola", "GREETING: salut")
            repo.commit("web: salut")

        _surge_scenario(d, greeting, commit_surged, "salut")
    finally:
        daemon.stop()
        remove_deployment(state, bridge)


@pytest.mark.root
@pytest.mark.parametrize("process_deployment", [SURGE], indirect=True)
def test_process_surge_interrupted_resumes_without_orphans_or_duplicates(
    process_deployment: Deployment, tmp_path: Path
) -> None:
    d = process_deployment

    d.repo.write("fleet.yaml", _process_fleet(d.bridge, d.cidr, SURGE, "v2"))
    d.repo.commit("web v2")
    # Killed as it starts web-0's stand-in: the VM is recorded before its sandbox starts. The
    # kill lands either inside the start (an intent is left open) or in the health wait after it.
    eventually(lambda: "create   web-0-surge" in d.daemon.log(), 60, "the stand-in started")
    d.daemon.signal(signal.SIGKILL)
    d.daemon.stop()
    left_open = [i.vm for i in open_state_store(d.state).open_intents()]
    d.daemon = Daemon(
        d.repo.path, d.state, tmp_path, "d1", ["--poll-interval", "1", "--poll-jitter", "0"]
    )
    eventually(d.applied, 120, "the surge finished by the next daemon")
    status = d.daemon.status()
    assert {vm["name"] for vm in status["vms"]} == {"web-0", "web-1", "web-2"}
    assert all(echo_version(vm["address"]) == "v2" for vm in status["vms"])
    # One supervisor per VM, none for a stand-in, and no network namespace left for one.
    assert supervisor_counts(d.state) == {"web-0": 1, "web-1": 1, "web-2": 1}
    scope = scope_for(str(d.state.resolve()))
    assert len([n for n in netns_names() if n.startswith(f"rc{scope}-")]) == 3
    if left_open:  # the interrupted action was found and finished
        assert "intent-resumed" in d.daemon.log()
