"""A workload's source digest (``SourceTrees.digest``) is the one it always was.

The digest names the artifact a workload builds: if it changed for the same tree, every VM of
every fleet would be replaced at the next upgrade. It is computed with one ``scandir`` per
directory now; on generated trees (nested directories, empty ones, exec bits, symlinks inside
and leaving the repository, a FIFO) it must equal the ``os.walk`` definition kept below.
Symlink loops, which pathlib cannot resolve, are problems of the revision.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.errors import ManifestError
from reconciler.manifests import ParseCache
from reconciler.manifests.compile_cache import CACHE_FILE
from reconciler.manifests.paths import SourceTrees, is_inside, resolved
from reconciler.pipeline import RevisionLoader
from reconciler.source import GitSource


def walk_digest(directory: Path, root: Path) -> tuple[str, list[str]]:
    """The digest as first defined, with ``os.walk``."""
    hasher = hashlib.sha256()
    escapes: list[str] = []
    base = str(directory)
    for current, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(current, name)
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                link = os.readlink(path)
                target = resolved(Path(path))
                if target is None:  # a loop: pathlib raised, a crash, before it was reported
                    escapes.append(f"symlink {rel} -> {link} is a loop")
                elif not is_inside(target, root):
                    escapes.append(f"symlink {rel} -> {link} leaves the repository")
                hasher.update(f"L {rel}\0{link}\0".encode())
            elif stat.S_ISREG(info.st_mode):
                executable = "x" if info.st_mode & 0o111 else "-"
                hasher.update(f"F {rel} {executable}\0".encode())
                with open(path, "rb") as content:
                    hasher.update(hashlib.sha256(content.read()).digest())
            elif stat.S_ISDIR(info.st_mode):
                hasher.update(f"D {rel}\0".encode())
    return "sha256:" + hasher.hexdigest(), escapes


NAMES = ["a", "B", "a.b", "a-b", "a_b", "z", "é", "a b", "0", "aa", ".hidden"]


def generate(rng: random.Random, directory: Path, depth: int, outside: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in rng.sample(NAMES, rng.randint(0, 6)):
        path = directory / name
        roll = rng.random()
        if depth < 4 and roll < 0.3:
            generate(rng, path, depth + 1, outside)
        elif roll < 0.4:
            path.symlink_to(rng.choice(["a", "../a", str(outside), "missing", ".", name]))
        elif roll < 0.45:
            os.mkfifo(path)
        else:
            path.write_bytes(rng.randbytes(rng.randint(0, 64)))
            if rng.random() < 0.3:
                path.chmod(0o755)


@pytest.mark.parametrize("seed", range(25))
def test_the_digest_equals_its_os_walk_definition(tmp_path: Path, seed: int) -> None:
    root = tmp_path / "repo"
    outside = tmp_path / "outside"
    outside.mkdir()
    source = root / "src"
    generate(random.Random(seed), source, 0, outside)
    assert SourceTrees(root).digest(source) == walk_digest(source, root)


def test_a_known_tree_keeps_its_digest(tmp_path: Path) -> None:
    # Written down once: a change of definition shows here, not in a fleet's next rollout.
    root = tmp_path / "repo"
    (root / "src" / "lib").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "src" / "lib" / "run.sh").write_text("#!/bin/sh\n")
    (root / "src" / "lib" / "run.sh").chmod(0o755)
    (root / "src" / "link").symlink_to("app.py")
    digest, escapes = SourceTrees(root).digest(root / "src")
    assert (digest, escapes) == walk_digest(root / "src", root)
    assert not escapes


WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata:
  name: loops
spec:
  source:
    path: ../src
    language: python
    entrypoint: app.py
  build:
    targets: [executable]
  deploy:
    replicas: 1
    vcpus: 1
    memoryMiB: 128
"""


def test_symlink_loops_in_a_commit_are_problems_not_crashes(tmp_path: Path) -> None:
    """A commit is untrusted: ``a -> a`` in the fleet directory, as its ignore file or in a
    source tree makes pathlib raise; each is a problem of the revision, in one line."""
    repo = FleetRepo(tmp_path / "repo")
    repo.write("fleet/w.yaml", WORKLOAD)
    repo.write("src/app.py", "print('hi')\n")
    (repo.path / "fleet" / "loop.yaml").symlink_to("loop.yaml")
    (repo.path / "fleet" / ".reconcilerignore").symlink_to(".reconcilerignore")
    (repo.path / "src" / "spin").symlink_to("spin")
    (repo.path / "cycle").symlink_to("cycle")
    head = repo.commit("loops")
    source = GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git")
    for loader in (
        RevisionLoader(source, "fleet", cache=ParseCache()),
        RevisionLoader(source, "fleet", compile_cache=tmp_path / "state" / CACHE_FILE),
    ):
        with pytest.raises(ManifestError) as caught:
            loader.load(head)
        found = [str(p) for p in caught.value.problems]
        assert "fleet/loop.yaml: symlink loop; refusing it" in found
        assert "fleet/.reconcilerignore: must be a file inside the repository" in found
        assert any("symlink spin -> spin is a loop" in p for p in found), found
    with pytest.raises(ManifestError) as caught:
        RevisionLoader(source, "cycle", cache=ParseCache()).load(head)
    assert [str(p) for p in caught.value.problems] == ["cycle: the fleet path is a symlink loop"]
