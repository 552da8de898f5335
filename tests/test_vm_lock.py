"""The per-VM host lock: a second reconciler waits for the first's start or stop, and gives up
with one line after the timeout instead of starting a duplicate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from reconciler.errors import VMRuntimeError
from reconciler.execution.vm_lock import vm_lock


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with vm_lock(tmp_path, "web-0"):
            first_in.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with vm_lock(tmp_path, "web-0"):  # a separate open file: flock excludes it like a process
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_frozen_holder_makes_the_other_give_up_with_a_clear_error(tmp_path: Path) -> None:
    now = [0.0]

    def advance(seconds: float) -> None:
        now[0] += seconds

    with vm_lock(tmp_path, "web-0"):
        frozen_out = vm_lock(tmp_path, "web-0", timeout=2, monotonic=lambda: now[0], sleep=advance)
        with pytest.raises(VMRuntimeError, match=r"web-0: another reconciler .* more than 2 s"):
            frozen_out.__enter__()
        with vm_lock(tmp_path, "web-1", timeout=0):  # other VMs are not held up
            pass
    with vm_lock(tmp_path, "web-0", timeout=0):  # released with its holder
        pass
