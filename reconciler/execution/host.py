"""The embedded-default host: state store, runtimes and network of this machine, and the one
way to execute a plan on it (shared by ``reconciler apply`` and the daemon). ``LocalHost``
implements the ``Host`` Protocol (``execution.protocol``).

    Plan + DesiredFleet ──converge──▶ MatrixBuilder (builds) ──▶ Executor (waves, health)
                                       Network (bridge, TAPs, firewall) ──┘

One host uses the fleet's whole pool. In a fleet of hosts the daemon's agent sets
``subnet_for``: the host's bridge and VMs then take its own subnet of the pool
(``runtime.network.carving``), and it reloads the firewall when another host's VMs change
(``sync_firewall``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builders.cache import ArtifactCache
from builders.images import guest_init
from builders.kernels import KernelRegistry
from builders.matrix import MatrixBuilder
from reconciler.execution.events import Reporter, print_event
from reconciler.execution.executor import ApplyReport, Executor
from reconciler.execution.health import judge_health
from reconciler.execution.observer import observe, record_observation
from reconciler.leadership.fence import Fence
from reconciler.lifetimes import ClosedOnExit
from reconciler.model import (
    DesiredFleet,
    NetworkPool,
    ObservedFleet,
    Plan,
    RuntimeKind,
    VMState,
)
from reconciler.state import StateStore, StoreLocation, open_state_store
from runtime.firecracker.driver import FirecrackerRuntime
from runtime.network import Network, scope_for
from runtime.process.driver import ProcessRuntime
from runtime.protocol import Runtime
from runtime.qemu.driver import QemuRuntime


@dataclass
class LocalHost(ClosedOnExit):
    """This machine: its state directory, state store and runtimes. A context manager."""

    state_dir: Path
    store: StateStore
    runtimes: dict[RuntimeKind, Runtime]
    subnet_for: Callable[[NetworkPool], str | None] = field(default=lambda pool: None)
    """This host's subnet of a fleet's pool; None: the whole pool (one host)."""

    def network(self, pool: NetworkPool) -> Network:
        """The fleet network of this host (a context manager): its bridge, ports, firewall."""
        return Network(
            pool,
            self.state_dir / "state.db",
            scope=scope_for(str(self.state_dir.resolve())),
            subnet=self.subnet_for(pool),
        )

    def observe(self) -> ObservedFleet:
        """What runs now, read from the store and the runtimes; writes nothing."""
        return observe(self.store, self.runtimes, self.state_dir)

    def refresh(self) -> ObservedFleet:
        """Observe and record the observation: the acting reconciler's step, never a reader's."""
        return record_observation(self.store, self.observe())

    def converge(
        self,
        plan: Plan,
        desired: DesiredFleet,
        checkout: Path,
        cache_dir: Path,
        *,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        record_revision: bool = True,
        superseded: Callable[[], bool] = lambda: False,
    ) -> ApplyReport:
        """Build what ``plan`` starts and execute it, wave by wave, on this host."""
        with self.network(desired.fleet.network) as network:
            builder = MatrixBuilder(
                checkout, ArtifactCache(cache_dir), KernelRegistry(self.state_dir / "kernels")
            )
            executor = Executor(
                self.store,
                self.state_dir,
                builder,
                self.runtimes,
                network,
                on_event=on_event,
                fence=fence,
                record_revision=record_revision,
                superseded=superseded,
            )
            return executor.apply(plan, desired)

    def sync_firewall(
        self,
        pool: NetworkPool,
        addresses: Mapping[str, Sequence[str]],
        depends_on: Mapping[str, Sequence[str]],
    ) -> None:
        """Reload the fleet's rules outside a converge (another host's VMs changed)."""
        with self.network(pool) as network:
            network.sync_firewall(addresses, depends_on)

    def settle_health(
        self,
        observed: ObservedFleet,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        superseded: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        """Judge the running VMs whose health nobody knows: adopted from a reconciler that died
        (or lost its lease) between starting them and seeing them healthy. Returns the
        unhealthy ones with why."""
        unhealthy = {}
        for vm in observed.vms.values():
            if vm.state is VMState.RUNNING and vm.healthy is None:
                if fence is not None:
                    fence.check(f"judging the health of {vm.name}")
                healthy, why = judge_health(
                    self.store,
                    self.runtimes,
                    self.state_dir,
                    vm.name,
                    on_event=on_event,
                    superseded=superseded,
                )
                if not healthy:
                    unhealthy[vm.name] = why
        return unhealthy

    def close(self) -> None:
        self.store.close()


def open_host_at(directory: Path, store: StoreLocation | None = None) -> LocalHost:
    runtimes: dict[RuntimeKind, Runtime] = {
        RuntimeKind.QEMU: QemuRuntime(state_dir=directory),
        RuntimeKind.FIRECRACKER: FirecrackerRuntime(),
        RuntimeKind.PROCESS: ProcessRuntime(
            init_binary=lambda: guest_init(directory / "guest-init.log")
        ),
    }
    # The store is the state directory's (SQLite) unless ``store`` names another.
    return LocalHost(directory, open_state_store(store or directory), runtimes)
