"""One daemon cycle against revisions that fail in ways nobody planned for: whatever a revision
makes go wrong (a RecursionError, a MemoryError, a bug) refuses that revision with one line,
logs the traceback, and keeps the last good revision. A real repository and state store; the
failure is injected at the project's own seam, the ``RevisionLoader``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.daemon.cycle import ReconcileCycle
from reconciler.execution.host import open_host_at
from reconciler.leadership.fence import Fence
from reconciler.model import DesiredFleet
from reconciler.pipeline import RevisionLoader
from reconciler.source import open_source

FLEET = "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: empty}\n"


@dataclass
class _Exploding(RevisionLoader):
    """Loads every revision but ``bad``, which raises ``error``."""

    bad: str = ""
    error: BaseException | None = None

    def load(self, rev: str | None) -> DesiredFleet:
        if rev == self.bad and self.error is not None:
            raise self.error
        return super().load(rev)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (MemoryError(), "ran out of memory"),
        (KeyError("spec"), "internal error (KeyError: 'spec')"),
    ],
)
def test_an_unexpected_failure_refuses_the_revision_and_keeps_the_last_good_one(
    tmp_path: Path, error: BaseException, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "fleet").mkdir()
    repo = FleetRepo(tmp_path / "fleet")
    repo.write("fleet.yaml", FLEET)
    good = repo.commit("good")
    host = open_host_at(tmp_path / "state")
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "state" / "git")
    loader = _Exploding(source=source)
    cycle = ReconcileCycle(loader, host, tmp_path / "cache")
    fence = Fence(1, renew_deadline=60)
    host.store.claim_term(fence)
    try:
        assert cycle.run(fence).outcome == "no_changes"
        applied = host.store.applied_revision()
        assert applied is not None
        assert applied.revision == good

        repo.write("fleet.yaml", FLEET + "spec: {prune: true}\n")
        loader.bad, loader.error = repo.commit("bad"), error
        with caplog.at_level(logging.ERROR, logger="reconciler.daemon"):
            result = cycle.run(fence)
        assert result.outcome == "failed"
        assert result.converged_to == good  # the last good revision still runs
        assert result.error is not None
        assert said in result.error
        assert "\n" not in result.error
        attempted = host.store.attempted_revision()
        assert attempted is not None
        assert (attempted.revision, attempted.outcome) == (loader.bad, "failed")
        assert host.store.applied_revision() == applied
        # The operator's one line is in the state; the traceback is in the log.
        assert any(r.exc_info for r in caplog.records), caplog.records
    finally:
        host.close()
