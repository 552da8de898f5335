"""Building a fleet repository's artifacts for the tests and benchmarks that boot or measure
them: ``reconciler build`` in this process, through the artifact cache it fills."""

from __future__ import annotations

from pathlib import Path

from builders.cache import ArtifactCache, CacheEntry


def build_artifacts(repo: Path, state: Path, cache: Path, *extra: str) -> dict[str, CacheEntry]:
    """Build ``repo`` (``extra``: more ``reconciler build`` arguments: targets, workloads) with
    the kernels of ``state`` into ``cache``; the entries by ``workload/target``."""
    from reconciler.cli import main

    argv = ["build", "--repo", str(repo), "--state-dir", str(state), "--cache-dir", str(cache)]
    code = main([*argv, *extra])
    assert code == 0, f"reconciler build {' '.join(extra)} exited {code}"
    return {
        f"{e.manifest['workload']}/{e.manifest['target']}": e
        for e in ArtifactCache(cache).entries()
    }
