"""The git source on real repositories: refs to SHAs, exported trees, mirrors of remotes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import FleetRepo

from reconciler.errors import SourceError
from reconciler.source import open_source


@pytest.fixture
def repo(tmp_path: Path) -> FleetRepo:
    (tmp_path / "origin").mkdir()
    r = FleetRepo(tmp_path / "origin")
    r.write("fleet/a.yaml", "one\n")
    r.write("bin/run.sh", "#!/bin/sh\necho hi\n")
    os.chmod(r.path / "bin/run.sh", 0o755)
    os.symlink("../../etc", r.path / "fleet/escape")
    r.commit("first")
    r.git("tag", "v1")
    r.write("fleet/a.yaml", "two\n")
    r.commit("second")
    return r


def test_refs_resolve_to_full_shas(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    head = repo.git("rev-parse", "HEAD")
    first = repo.git("rev-parse", "v1")
    assert source.resolve() == head
    assert source.resolve("main") == head
    assert source.resolve("v1") == first
    assert source.resolve(first[:8]) == first
    assert source.resolve("HEAD~1") == first


def test_unknown_ref_and_missing_repo_are_source_errors(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match="unknown revision 'nope'"):
        source.resolve("nope")
    with pytest.raises(SourceError, match="not a git repository"):
        open_source(str(tmp_path), ref=None, cache_dir=tmp_path / "c").resolve()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing"), ref=None, cache_dir=tmp_path / "c").resolve()


def test_checkout_holds_the_tree_and_keeps_symlinks_unfollowed(
    repo: FleetRepo, tmp_path: Path
) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    first = source.checkout(source.resolve("v1"))
    assert (first / "fleet/a.yaml").read_text() == "one\n"
    assert os.access(first / "bin/run.sh", os.X_OK)
    link = first / "fleet/escape"
    assert link.is_symlink()
    assert os.readlink(link) == "../../etc"
    head = source.checkout(source.resolve())
    assert (head / "fleet/a.yaml").read_text() == "two\n"
    # Cached: the same directory comes back, and no staging directory is left behind.
    assert source.checkout(source.resolve("v1")) == first
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [source.resolve("v1"), source.resolve()]
    )


def test_remote_is_mirrored_and_fetched_incrementally(repo: FleetRepo, tmp_path: Path) -> None:
    url = f"file://{repo.path}"
    cache = tmp_path / "cache"
    source = open_source(url, ref="main", cache_dir=cache)
    assert source.resolve() == repo.git("rev-parse", "HEAD")
    assert source.resolve("origin/main") == repo.git("rev-parse", "HEAD")
    repo.write("fleet/b.yaml", "three\n")
    newest = repo.commit("third")
    assert open_source(url, ref="main", cache_dir=cache).resolve() == newest
    tree = open_source(url, ref="main", cache_dir=cache).checkout(newest)
    assert (tree / "fleet/b.yaml").read_text() == "three\n"


def test_unreachable_remote_names_it_and_keeps_the_last_fetch(
    repo: FleetRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    missing = f"file://{tmp_path}/gone.git"
    with pytest.raises(SourceError, match=f"cannot fetch {missing}"):
        open_source(missing, ref=None, cache_dir=cache)

    moved = tmp_path / "moved"
    url = f"file://{moved}"
    repo.path.rename(moved)
    source = open_source(url, ref="main", cache_dir=cache)
    last = source.resolve()
    moved.rename(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="reconciler.source"):
        again = open_source(url, ref="main", cache_dir=cache)
    assert again.resolve() == last
    assert f"cannot fetch {url}" in caplog.text
