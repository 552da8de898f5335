"""The embedded-default host: state store, runtimes and network of this machine, opened once per
command that looks at or changes what runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from builders.images import guest_init
from reconciler.cli.options import state_dir
from reconciler.execution.observer import observe
from reconciler.model import ObservedFleet, RuntimeKind
from reconciler.state import SQLiteStateStore, open_state_store
from runtime.firecracker.driver import FirecrackerRuntime
from runtime.process.driver import ProcessRuntime
from runtime.protocol import Runtime
from runtime.qemu.driver import QemuRuntime


@dataclass
class Host:
    state_dir: Path
    store: SQLiteStateStore
    runtimes: dict[RuntimeKind, Runtime]

    def observe(self) -> ObservedFleet:
        return observe(self.store, self.runtimes, self.state_dir)

    def close(self) -> None:
        self.store.close()


def open_host(args: argparse.Namespace) -> Host:
    directory = state_dir(args)
    runtimes: dict[RuntimeKind, Runtime] = {
        RuntimeKind.QEMU: QemuRuntime(state_dir=directory),
        RuntimeKind.FIRECRACKER: FirecrackerRuntime(),
        RuntimeKind.PROCESS: ProcessRuntime(
            init_binary=lambda: guest_init(directory / "guest-init.log")
        ),
    }
    return Host(directory, open_state_store(directory), runtimes)
