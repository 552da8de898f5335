"""The content-addressed artifact cache.

    <cache>/<key hex>/manifest.json + the artifact's files     (complete entries only)
    <cache>/.tmp-*/                                           (builds in progress)
    <cache>/logs/<workload>-<target>-<time>.log               (logs of failed builds)

The key is the digest of the artifact's input digest (what the plan names) plus everything of
the building machine that changes the output: toolchain versions, the resolved kernel's digest,
the guest init's digest. An entry is built under a temporary name and renamed into place only
when complete, so a crash never leaves a half artifact that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import BuildError
from reconciler.model import ArtifactRef, digest_of

STALE_STAGING_SECONDS = 24 * 3600


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    manifest: Mapping[str, Any]

    @property
    def input_digest(self) -> str:
        return str(self.manifest["input_digest"])

    def file(self, name: str) -> Path:
        return self.path / name


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key_for(ref: ArtifactRef, machine: Mapping[str, str]) -> str:
        return digest_of({"input": ref.input_digest, "machine": dict(machine)})

    def _dir(self, key: str) -> Path:
        return self.root / key.removeprefix("sha256:")

    def get(self, key: str) -> CacheEntry | None:
        manifest = self._dir(key) / "manifest.json"
        if not manifest.is_file():
            return None
        return CacheEntry(key, manifest.parent, json.loads(manifest.read_text()))

    def new_staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))

    def commit(self, staging: Path, key: str, manifest: Mapping[str, Any]) -> CacheEntry:
        """Describe every file of ``staging`` in its manifest and move it into place."""
        files = {
            p.name: {"sha256": file_digest(p), "size": p.stat().st_size}
            for p in sorted(staging.iterdir())
            if p.is_file() and p.name != "manifest.json"
        }
        full = {**manifest, "cache_key": key, "files": files}
        (staging / "manifest.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        destination = self._dir(key)
        try:
            os.rename(staging, destination)
        except OSError:
            if not (destination / "manifest.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # an identical build finished first
        entry = self.get(key)
        if entry is None:
            raise BuildError(f"the cache entry {destination} vanished while being written")
        return entry

    def discard(self, staging: Path, log: Path, label: str) -> Path:
        """Drop a failed build, keeping its log under ``logs/``; returns the kept log."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        kept = logs / f"{label}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        if log.exists():
            shutil.copyfile(log, kept)
        shutil.rmtree(staging, ignore_errors=True)
        return kept

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        found = []
        for manifest in sorted(self.root.glob("*/manifest.json")):
            if manifest.parent.name.startswith("."):
                continue
            key = "sha256:" + manifest.parent.name
            found.append(CacheEntry(key, manifest.parent, json.loads(manifest.read_text())))
        return found

    def find(self, input_digest: str) -> CacheEntry | None:
        """The newest complete entry built for a plan's input digest."""
        matches = [e for e in self.entries() if e.input_digest == input_digest]
        return max(matches, key=lambda e: float(e.manifest.get("built_at", 0)), default=None)

    def gc(self, keep_inputs: set[str]) -> list[CacheEntry]:
        """Remove entries whose input digest is not in ``keep_inputs`` and stale staging
        directories; returns the removed entries."""
        removed = []
        for entry in self.entries():
            if entry.input_digest not in keep_inputs:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry)
        cutoff = time.time() - STALE_STAGING_SECONDS
        for staging in self.root.glob(".tmp-*"):
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
        return removed
