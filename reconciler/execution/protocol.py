"""The ``Host`` Protocol: the seam between the control plane's policy and a machine that runs VMs.

    ReconcileCycle (daemon), apply (cli) ──Host──▶ observe / refresh ──▶ ObservedFleet
                                                  converge(plan) ────▶ ApplyReport
                                                  settle_health ─────▶ unhealthy VMs

``execution.host.LocalHost`` is this machine (its state store, runtimes and network); a test
passes a fake (``tests/support/fakes.py``) so the daemon's policy runs without root, QEMU or
git. A host is a context manager: leaving it closes its state store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from reconciler.execution.events import Reporter, print_event
from reconciler.execution.executor import ApplyReport
from reconciler.leadership.fence import Fence
from reconciler.model import DesiredFleet, ObservedFleet, Plan
from reconciler.state import StateStore


class Host(Protocol):
    @property
    def store(self) -> StateStore:
        """The state store of this host's fleet."""
        ...

    def observe(self) -> ObservedFleet:
        """What runs now, read from the store and the runtimes; writes nothing."""
        ...

    def refresh(self) -> ObservedFleet:
        """Observe and record the observation: the acting reconciler's step, never a reader's."""
        ...

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
        """Build what ``plan`` starts (from the tree at ``checkout``) and execute it, wave by
        wave. Build and runtime failures raise; VMs that do not get healthy are in the report."""
        ...

    def settle_health(
        self,
        observed: ObservedFleet,
        fence: Fence | None = None,
        on_event: Reporter = print_event,
        superseded: Callable[[], bool] = lambda: False,
    ) -> dict[str, str]:
        """Judge the running VMs whose health nobody knows; returns the unhealthy ones with
        why."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
