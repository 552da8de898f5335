"""``parallel.detached``: the compile cache of a large diff is written after the command is
gone, and whoever reads the command's output to its end does not wait for it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from reconciler.manifests.parallel import detached

# The detached work waits for a file the test creates, then writes its own: until the test lets
# it go, it cannot have finished, whatever the machine's speed.
PROGRAM = """
import os, sys, time
from pathlib import Path
from reconciler.manifests.parallel import detached
go, written = Path(sys.argv[1]), Path(sys.argv[2])
def write():
    while not go.exists():
        time.sleep(0.05)
    written.write_text(str(os.getppid()))
assert detached(write) is not None
print("answered", flush=True)
"""


def test_the_command_returns_before_the_detached_write(tmp_path: Path) -> None:
    go, written = tmp_path / "go", tmp_path / "written"
    # A caller that reads stdout to its end: it would hang if the writer kept the pipe open.
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(go), str(written)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == "answered\n"
    assert not written.exists()
    go.touch()
    deadline = time.monotonic() + 60
    while not written.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written.exists(), "the detached write never happened"


def test_waiting_for_a_detached_write_waits_for_it(tmp_path: Path) -> None:
    go, written = tmp_path / "go", tmp_path / "written"

    def write() -> None:
        while not go.exists():
            time.sleep(0.05)
        written.write_text("done")

    pending = detached(write)
    assert pending is not None
    threading.Timer(0.5, go.touch).start()
    assert pending.result() is None
    assert written.read_text() == "done"
