"""A secret's journey through a real apply of a process-runtime VM: the workload gets it as env
and as a 0400 file under /run/secrets (a tmpfs of its sandbox), and a ``grep`` for the plaintext
over the state directory, the plan in all three formats, the CLI's output and logs, the
daemon's ``/api/status`` and page, and ``ps`` finds nothing. Changing only the secret makes
``diff`` say ``~ restart`` with ``(sensitive)``.

Own bridge and pool; everything removed at the end (``support.process_fleet``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemons import Daemon
from support.process_fleet import fleet_document, network_yaml, new_pool, remove_deployment
from support.repo import FleetRepo
from support.waiting import eventually, free_port

pytestmark = [pytest.mark.root]

SECRETS = Path(__file__).resolve().parent / "secrets"
KEY = SECRETS / "age-key.txt"
SOPS = Path(sys.executable).parent / "sops"
FIRST = "Pl41ntext-Needle-first-7c1e"
SECOND = "Pl41ntext-Needle-second-93ab"

# Answers every connection with what it was given, never the value: the length of its env
# secret and the mode and size of its file secret.
SECRET_ECHO = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    int port = atoi(getenv("ECHO_PORT") ? getenv("ECHO_PORT") : "7000");
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 8) < 0) return 1;
    printf("secret-echo: listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        const char *v = getenv("DB_PASSWORD");
        struct stat st;
        int mode = -1;
        long size = -1;
        if (stat("/run/secrets/db/user", &st) == 0) {
            mode = st.st_mode & 0777;
            size = (long)st.st_size;
        }
        char out[128];
        int n = snprintf(out, sizeof out, "env=%zu file=%o %ld\n", v ? strlen(v) : 0, mode, size);
        (void)!write(c, out, (size_t)n);
        close(c);
    }
}
"""


def _encrypt(path: Path, text: str) -> None:
    plain = path.with_name("plain.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    plain.write_text(text)
    recipient = (SECRETS / "recipient.txt").read_text().strip()
    done = subprocess.run(
        [str(SOPS), "encrypt", "--age", recipient, str(plain)], capture_output=True, check=True
    )
    path.write_bytes(done.stdout)
    plain.unlink()


def _ask(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=5) as conn:
        return conn.recv(64).decode()


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv], capture_output=True, text=True, check=False
    )


def _grep(needle: str, root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


def test_a_secret_reaches_the_workload_and_nothing_else(tmp_path: Path) -> None:
    bridge, cidr = new_pool()
    port = free_port()
    fleet = fleet_document("secrets", network_yaml(bridge, cidr)).replace(
        "spec: {network:", "spec: {secrets: {db: {path: secrets/db.sops.yaml}}, network:"
    )
    workload = f"""---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: sec}}
spec:
  source: {{path: app, language: c, entrypoint: main.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    env: {{ECHO_PORT: "{port}"}}
    secretEnv: {{DB_PASSWORD: {{secret: db, key: password}}}}
    secretFiles: [{{path: /run/secrets/db/user, secret: db, key: user}}]
    health: {{type: tcp, port: {port}, startPeriodSeconds: 30}}
"""
    repo = FleetRepo.create(
        tmp_path / "fleet", {"fleet.yaml": fleet + workload, "app/main.c": SECRET_ECHO}
    )
    _encrypt(repo.path / "secrets" / "db.sops.yaml", f"password: {FIRST}\nuser: app\n")
    repo.commit("a secret")
    state = tmp_path / "state"
    common = ["--repo", str(repo.path), "--state-dir", str(state), "--age-key-file", str(KEY)]
    outputs: list[str] = []
    daemon: Daemon | None = None
    try:
        applied = _cli("apply", *common)
        outputs += [applied.stdout, applied.stderr]
        assert applied.returncode == 0, applied.stdout + applied.stderr
        status = _cli("status", "--state-dir", str(state), "--format", "json")
        outputs.append(status.stdout)
        address = next(v["address"] for v in json.loads(status.stdout)["vms"])
        # The workload has the secret as env and as a 0400 file of 3 bytes ("app").
        assert _ask(address, port) == f"env={len(FIRST)} file=400 3\n"

        # ps: no command line of any process holds it.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        assert FIRST not in ps.stdout

        # The plan after a change of the secret only: a restart, masked in every format.
        _encrypt(repo.path / "secrets" / "db.sops.yaml", f"password: {SECOND}\nuser: app\n")
        repo.commit("rotate the password")
        for fmt in ("text", "json", "markdown"):
            diff = _cli("diff", *common, "--format", fmt)
            outputs += [diff.stdout, diff.stderr]
            assert diff.returncode == 2, diff.stdout + diff.stderr
            assert "(sensitive)" in diff.stdout
            assert "restart" in diff.stdout
        text = _cli("diff", *common).stdout
        assert "~ deploy.secretEnv.DB_PASSWORD = (sensitive) -> (sensitive)" in text
        saved = tmp_path / "plan.json"
        planned = _cli("plan", *common, "-o", str(saved))
        outputs += [planned.stdout, planned.stderr, saved.read_text()]

        # The daemon applies the rotation: the workload gets the new value; its API and page
        # show the fleet without either value.
        daemon = Daemon(repo.path, state, tmp_path, "d0", extra=["--age-key-file", str(KEY)])
        eventually(
            lambda: _ask(address, port) == f"env={len(SECOND)} file=400 3\n" or None,
            120,
            "the daemon to restart the VM with the new secret",
        )
        outputs += [str(daemon.get("/api/status")), str(daemon.get("/"))]
        outputs.append(str(daemon.get("/api/events")))
        daemon.stop()
        outputs.append(daemon.log())
        daemon = None
        for needle in (FIRST, SECOND):
            assert _grep(needle, state) == [], needle
            for output in outputs:
                assert needle not in output
    finally:
        if daemon is not None:
            daemon.stop()
        remove_deployment(state, bridge)
