"""The one pipeline from a fleet repository to a plan, shared by diff, plan, apply and daemon.

    Source.resolve/checkout ──▶ manifests.load_fleet ──▶ DesiredFleet
    StateStore.observed (or the base revision) ──▶ ObservedFleet ──▶ planning.diff ──▶ Plan
                                                        ──▶ planning.check_deletions (guards)

Commands choose what happens to the plan (render it, save it, execute it); none of them has a
second way of making one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.manifests import ParseCache, load_fleet
from reconciler.model import DesiredFleet, ObservedFleet, Plan
from reconciler.planning import check_deletions, diff, observed_from_desired
from reconciler.secrets import SecretResolver
from reconciler.source import Source


@dataclass
class RevisionLoader:
    """Loads the desired fleet at any revision of one source, parsing each file content once."""

    source: Source
    subpath: str = ""
    cache: ParseCache = field(default_factory=ParseCache)
    secrets: SecretResolver | None = None
    """Decrypts the fleet's secrets; None only where nothing is started or compared
    (``validate``)."""

    def resolve(self, rev: str | None) -> str:
        return self.source.resolve(rev)

    def load(self, rev: str | None) -> DesiredFleet:
        revision = self.source.resolve(rev)
        root = self.source.checkout(revision)
        return load_fleet(
            root, subpath=self.subpath, revision=revision, cache=self.cache, secrets=self.secrets
        )


def plan_against_observed(
    loader: RevisionLoader,
    rev: str | None,
    observed: ObservedFleet,
    *,
    force_deletions: bool = False,
) -> tuple[DesiredFleet, Plan]:
    """Desired at ``rev`` against what runs now (the state store refreshed from the runtimes).

    A plan that deletes more than the deletion guards allow raises ``DeletionGuardError``."""
    desired = loader.load(rev)
    plan = diff(desired, observed)
    return desired, check_deletions(plan, desired, observed, force_deletions=force_deletions)


def plan_between(
    loader: RevisionLoader, base: str, head: str | None, *, force_deletions: bool = False
) -> Plan:
    """Desired at ``head`` against the fleet as ``base`` would run it: the pull-request review.

    Needs no runtime and no state store. Guarded like ``plan_against_observed``."""
    base_fleet = loader.load(base)
    head_fleet = loader.load(head)
    observed = observed_from_desired(base_fleet)
    plan = diff(head_fleet, observed, base=base_fleet)
    return check_deletions(plan, head_fleet, observed, force_deletions=force_deletions)
