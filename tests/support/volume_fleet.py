"""A fleet whose one service keeps a counter on a volume, for the volume tests and benchmark.

At every start the service reads ``<dir>/counter`` (0 when missing), writes it back plus one
(to a temporary file, fsync'ed and renamed), appends a line to ``<dir>/boots.log``, prints
``counter=N`` on its console and then serves nothing until it is stopped. So the console of
each boot says how many starts the volume has seen: the counter continues exactly when the data
survived."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from support.repo import FleetRepo

COUNTER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/data";
    char path[512], tmp[520], log[520];
    snprintf(path, sizeof path, "%s/counter", dir);
    snprintf(tmp, sizeof tmp, "%s/counter.tmp", dir);
    snprintf(log, sizeof log, "%s/boots.log", dir);
    long n = 0;
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%ld", &n) != 1) n = 0;
        fclose(f);
    }
    n++;
    f = fopen(tmp, "w");
    if (!f) {
        perror(tmp);
        return 2;
    }
    fprintf(f, "%ld\n", n);
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    if (rename(tmp, path) != 0) {
        perror("rename");
        return 2;
    }
    f = fopen(log, "a");
    if (f) {
        fprintf(f, "boot %ld\n", n);
        fflush(f);
        fsync(fileno(f));
        fclose(f);
    }
    int d = open(dir, O_RDONLY);
    if (d >= 0) {
        fsync(d);
        close(d);
    }
    printf("counter=%ld\n", n);
    fflush(stdout);
    for (;;) pause();
}
"""

WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: counter, language: c, entrypoint: counter.c}}
  build: {{targets: [{target}]}}
  deploy:
    target: {target}
    runtime: {runtime}
    replicas: 1
    memoryMiB: 128
    env: {{ROUND: "1"}}
    health: {{type: console}}
    volumes:
      - {{name: data, sizeMiB: {size}, mountPath: /data}}
      - {{name: scratch, sizeMiB: 16, mountPath: /scratch, reclaimPolicy: delete}}
"""


def counter_workload(name: str, *, target: str, runtime: str, size: int = 32) -> str:
    return WORKLOAD.format(name=name, target=target, runtime=runtime, size=size)


def counter_repo(path: Path, fleet_yaml: str) -> FleetRepo:
    return FleetRepo.create(path, {"fleet.yaml": fleet_yaml, "counter/counter.c": COUNTER_C})


def last_counter(console: Path) -> int | None:
    """The counter the current boot printed on its console, or None before it did."""
    if not console.exists():
        return None
    found = re.findall(r"counter=(\d+)", console.read_text(errors="replace"))
    return int(found[-1]) if found else None


def survives_restart_replace_and_kill(
    apply: Callable[[], tuple[int, str]],
    repo: FleetRepo,
    pid_file: Path,
    counter: Callable[[], int],
) -> None:
    """From a first start (counter 1): a restart (an env change), a replace (a source change,
    so a new artifact) and ``kill -9`` of the VM's process (``pid_file``: its VMM or sandbox)
    healed by a new ``apply``; the counter goes on 2, 3, 4."""
    repo.edit("fleet.yaml", 'ROUND: "1"', 'ROUND: "2"')
    repo.commit("restart")
    code, out = apply()
    assert code == 0, out
    assert "restart  count-0" in out, out
    assert counter() == 2

    repo.edit("counter/counter.c", "int main(", "/* v2 */\nint main(")
    repo.commit("a new artifact")
    code, out = apply()
    assert code == 0, out
    assert "replace  count-0" in out, out
    assert counter() == 3

    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    time.sleep(0.5)
    code, out = apply()  # a new reconciler run heals it
    assert code == 0, out
    assert counter() == 4
