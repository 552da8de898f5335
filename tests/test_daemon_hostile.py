"""A running daemon fed hostile or mistaken revisions: a misspelt key, template bombs, a plan
that deletes too much. Each is refused; the last good revision keeps running and the daemon
keeps serving. Real daemon process, real fleet repository, real host-process VMs."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from support.daemons import daemons, fleet_repo, fleet_text, healthy_names
from support.waiting import eventually, free_port
from test_manifests import BOMBS

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_bad_revisions_are_refused_and_the_last_good_one_keeps_running(tmp_path: Path) -> None:
    ports = {"alpha": free_port()}
    repo = fleet_repo(tmp_path / "fleet", ports)
    good = repo.git("rev-parse", "HEAD")
    state = tmp_path / "state"
    with daemons(repo.path, state, tmp_path, 1, ["--poll-interval", "300"]) as (daemon,):
        eventually(lambda: healthy_names(daemon.status()) == {"alpha-0"}, 120, "first converge")
        vm = daemon.status()["vms"][0]
        pid, address = vm["pid"], (vm["address"] or "127.0.0.1").split("/")[0]

        def answers() -> bool:
            with socket.create_connection((address, ports["alpha"]), timeout=5) as conn:
                conn.sendall(b"ping\n")
                return conn.recv(16) == b"ping\n"

        def refused(revision: str, why: str) -> None:
            status = eventually(
                lambda: (s := daemon.status())["attempted_revision"] == revision and s,
                90,
                f"{revision[:12]} being attempted",
            )
            assert status["applied_revision"] == good
            assert why in status["daemon"]["last_error"], status["daemon"]["last_error"]
            assert answers()
            assert daemon.status()["vms"][0]["pid"] == pid  # never restarted, never deleted
            assert daemon.serving()

        # 1. A misspelt apiVersion: the workload is not silently dropped (and pruned).
        repo.write("fleet.yaml", fleet_text(ports).replace("---\napiVersion", "---\napiVerison"))
        refused(repo.commit("typo"), "did you mean apiVersion (found 'apiVerison')?")

        # 2. Template bombs, all in one revision: the daemon serves while they are rendered.
        repo.write("fleet.yaml", fleet_text(ports))
        for name, text in BOMBS.items():
            repo.write(f"bombs/{name}", text)
        served: list[bool] = []
        stop = threading.Event()

        def watch_healthz() -> None:
            while not stop.is_set():
                served.append(daemon.serving())
                stop.wait(0.2)

        watcher = threading.Thread(target=watch_healthz)
        watcher.start()
        try:
            refused(repo.commit("template bombs"), "template")
        finally:
            stop.set()
            watcher.join()
        assert served
        assert all(served)
        events = daemon.get("/api/events")
        failed = [e for e in events if e["kind"] == "revision-failed"]
        assert any("bombs/loops.yaml.j2: template exceeded" in e["message"] for e in failed)

        # 3. A plan that deletes more than the Fleet allows.
        for name in BOMBS:
            (repo.path / "bombs" / name).unlink()
        replaced = fleet_text({"beta": free_port()})
        assert "\nspec: {" in replaced  # the harness's Fleet spec, in flow style
        repo.write("fleet.yaml", replaced.replace("\nspec: {", "\nspec: {maxDeletions: 0, ", 1))
        refused(repo.commit("replace alpha"), "over the Fleet's spec.maxDeletions (0)")
