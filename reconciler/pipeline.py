"""The one pipeline from a fleet repository to a plan, shared by diff, plan, apply and daemon.

    Source.resolve/checkout ──▶ manifests.load_fleet ──▶ DesiredFleet
    StateStore.observed (or the base revision) ──▶ ObservedFleet ──▶ planning.diff ──▶ Plan
                                                        ──▶ planning.check_deletions (guards)
    the live hosts (multi-host store: LiveHosts) ──▶ planning.placed.place_plan (where VMs go)

Commands choose what happens to the plan (render it, save it, execute it); none of them has a
second way of making one.

An operator's pin (``reconciler rollback --workload``) composes two revisions: the desired fleet
is the target revision's, except that the pinned workload is the pinned revision's
(``pin_workloads``).

A loader keeps what it learnt (``manifests.compile_cache``): a file parsed, a source tree
digested or a workload compiled at one revision is reused at the next when its content (its
text, its Git tree id) is the same, and a whole revision loaded before (by commit, when nothing
outside the commit decided its load) is decoded without reading its files. With
``compile_cache`` set, that lasts across processes. Comparing two revisions writes that cache
from a child process while the plan is made and rendered, and makes the cycle collector run
rarely (``rarer_collections``): both matter only for fleets of thousands of workloads.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from reconciler.errors import PlanError
from reconciler.formatting import short_sha
from reconciler.manifests import ParseCache, load_fleet, load_remembered
from reconciler.manifests.compile_cache import CompileCache, TreeIndex
from reconciler.model import DesiredFleet, ObservedFleet, Plan, Workload, assemble_fleet
from reconciler.planning import check_deletions, diff, observed_from_desired
from reconciler.secrets import SecretResolver
from reconciler.source import Source

if TYPE_CHECKING:
    from reconciler.planning.placed import LiveHosts


@runtime_checkable
class ListsTrees(Protocol):
    """A ``Source`` that names the trees of a revision (``GitSource.tree_entries``)."""

    def tree_entries(self, rev: str) -> dict[str, tuple[str, str]]: ...


@runtime_checkable
class VerifiesCommits(Protocol):
    """A ``Source`` that serves only commits it verifies (``VerifiedSource``): ``verify``
    raises for one it does not trust, as its ``checkout`` would."""

    def verify(self, sha: str) -> str: ...


@dataclass
class RevisionLoader:
    """Loads the desired fleet at any revision of one source, parsing each file content once
    and compiling each unchanged workload once."""

    source: Source
    subpath: str = ""
    cache: ParseCache = field(default_factory=lambda: ParseCache(CompileCache()))
    secrets: SecretResolver | None = None
    """Decrypts the fleet's secrets; None only where nothing is started or compared
    (``validate``)."""
    compile_cache: Path | None = None
    """File of the persistent compile cache (in the state directory); read at the first load,
    written after each. None: reuse lasts as long as the loader."""
    _opened: bool = field(default=False, init=False, repr=False)

    def resolve(self, rev: str | None) -> str:
        return self.source.resolve(rev)

    def load(self, rev: str | None, *, save: bool = True) -> DesiredFleet:
        """The desired fleet at ``rev``; ``save=False`` leaves writing the persistent cache to
        a later load (``plan_between`` writes once for both revisions)."""
        revision = self.source.resolve(rev)
        if not self._opened:
            self._opened = True
            if self.compile_cache is not None:
                self.cache.store = CompileCache.open(self.compile_cache)
        fleet = None
        index = None
        if self.cache.store is not None and isinstance(self.source, ListsTrees):
            # A commit loaded whole before needs neither its checkout (exporting a large
            # revision takes seconds: a CI runner that restored the cache exports only the
            # head) nor its tree listing. Only what the source trusts is served: a source that
            # verifies signatures verifies this commit as its checkout would.
            fleet = load_remembered(self.cache, revision, subpath=self.subpath)
            if fleet is not None and isinstance(self.source, VerifiesCommits):
                self.source.verify(revision)
            if fleet is None:
                index = TreeIndex.from_entries(self.source.tree_entries(revision))
        if fleet is None:
            fleet = load_fleet(
                self.source.checkout(revision),
                subpath=self.subpath,
                revision=revision,
                cache=self.cache,
                secrets=self.secrets,
                tree_index=index,
            )
        if save:
            self.save()
        return fleet

    def save(self, *, background: bool = False) -> None:
        """Write the persistent compile cache (``CompileCache.save``) if there is one."""
        if self.cache.store is not None:
            self.cache.store.save(background=background)


def plan_against_observed(
    loader: RevisionLoader,
    rev: str | None,
    observed: ObservedFleet,
    *,
    force_deletions: bool = False,
    hosts: LiveHosts | None = None,
) -> tuple[DesiredFleet, Plan]:
    """Desired at ``rev`` against what runs now (the state store refreshed from the runtimes).

    A plan that deletes more than the deletion guards allow raises ``DeletionGuardError``.
    With ``hosts`` (a multi-host store), the plan carries where its VMs go; one that does not
    fit them raises ``CapacityError``."""
    desired = loader.load(rev)
    plan = diff(desired, observed)
    plan = check_deletions(plan, desired, observed, force_deletions=force_deletions)
    if hosts is None:
        return desired, plan
    from reconciler.planning.placed import place_plan  # noqa: PLC0415 (a multi-host store's)

    return desired, place_plan(plan, desired, hosts)


def plan_between(
    loader: RevisionLoader,
    base: str,
    head: str | None,
    *,
    force_deletions: bool = False,
    hosts: LiveHosts | None = None,
) -> Plan:
    """Desired at ``head`` against the fleet as ``base`` would run it: the pull-request review.

    Needs no runtime and no state store. Guarded like ``plan_against_observed``, and placed
    like it on ``hosts`` when given (the live hosts of a multi-host store)."""
    rarer_collections()
    base_fleet = loader.load(base, save=False)
    head_fleet = loader.load(head, save=False)
    # For a large first load, written by a detached process while the plan is made and
    # rendered, which this process does not wait for.
    loader.save(background=True)
    observed = observed_from_desired(base_fleet)
    plan = diff(head_fleet, observed, base=base_fleet)
    plan = check_deletions(plan, head_fleet, observed, force_deletions=force_deletions)
    if hosts is None:
        return plan
    from reconciler.planning.placed import place_plan  # noqa: PLC0415 (a multi-host store's)

    return place_plan(plan, head_fleet, hosts)


COLLECTION_THRESHOLD = 100_000


def rarer_collections() -> None:
    """Let Python's cycle collector run after every 100,000 allocations instead of 700, for
    the rest of this process.

    Comparing two revisions of a large fleet allocates millions of objects that all live until
    the plan is rendered (documents, workloads, 100,000 no-op actions and their JSON rows), and
    the collector, run every 700 of them, walks the young ones again and again and the whole
    heap whenever it grew by a quarter: half the CPU time of a 10,000-workload diff. Nothing
    here depends on it to free memory (the few cycles, a YAML parser's state, wait a little
    longer), and the command ends once the plan is shown."""
    first, *rest = gc.get_threshold()
    if 0 < first < COLLECTION_THRESHOLD:
        gc.set_threshold(COLLECTION_THRESHOLD, *rest)


@dataclass(frozen=True)
class PinnedWorkload:
    """One workload held at an earlier revision: that revision's desired fleet and checkout."""

    workload: str
    fleet: DesiredFleet
    checkout: Path


def pin_workloads(desired: DesiredFleet, pinned: Mapping[str, PinnedWorkload]) -> DesiredFleet:
    """``desired`` with each pinned workload as its pinned revision declares it.

    What is pinned is the workload's own document (its deploy, build and source settings) and
    its source tree: its artifact is built from the pinned checkout (the workload's source path
    becomes that checkout's, an absolute path the builder joins to nothing). The fleet's own
    settings (network pool, kernel, rollout policy, secrets files) stay the target revision's,
    so a pin never holds back the rest of the fleet; the artifact digest follows, which is the
    pinned one unless the fleet's kernel changed since. A workload the pinned revision does not
    declare cannot be pinned there (``PlanError``); one the target revision deleted comes back.
    """
    if not pinned:
        return desired
    workloads: dict[str, Workload] = dict(desired.workloads)
    sensitive = desired.sensitive
    for name, pin in sorted(pinned.items()):
        own = pin.fleet.workloads.get(name)
        if own is None:
            raise PlanError(
                f"workload {name} is pinned at {short_sha(pin.fleet.revision)}, which does not "
                f"declare it; unpin it (reconciler unpin --workload {name})"
            )
        source = replace(own.source, path=str(pin.checkout / own.source.path))
        workloads[name] = replace(own, source=source)
        sensitive = sensitive.union(pin.fleet.sensitive)
    composed = assemble_fleet(desired.revision, desired.fleet, workloads)
    return replace(composed, sensitive=sensitive)
