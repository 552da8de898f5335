"""The git source on real repositories: refs to SHAs, exported trees, mirrors of remotes."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import FleetRepo

from reconciler.errors import SourceError
from reconciler.source import GitSource, open_source
from reconciler.source.export import extract_tree


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
    with pytest.raises(SourceError, match=re.escape(f"cannot fetch {missing}")):
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


def test_a_remote_that_never_answers_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    # A real TCP listener that accepts connections (the kernel backlog does) but never speaks:
    # git waits for the git:// protocol greeting forever unless it is killed.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"git://127.0.0.1:{silent.getsockname()[1]}/fleet.git"
        source = GitSource(url, cache_dir=tmp_path / "cache", fetch_timeout=0.5)
        with pytest.raises(
            SourceError, match=re.escape(f"cannot fetch {url}: no answer within 0.5 s")
        ):
            source.fetch()
    # Nothing half-cloned is left to be mistaken for a mirror later.
    assert not any((tmp_path / "cache" / "mirrors").iterdir())
    with pytest.raises(SourceError, match="has never been fetched"):
        source.resolve()


def test_local_clone_resolves_remote_tracking_refs(repo: FleetRepo, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(clone)], check=True)
    newer = repo.commit("not fetched by the clone yet")
    source = open_source(str(clone), ref="origin/main", cache_dir=tmp_path / "cache")
    # A local path is read as it is: no fetch happens behind the operator's back.
    assert source.resolve() == repo.git("rev-parse", "HEAD~1")
    assert source.resolve() != newer
    assert source.describe() == f"the repository at {clone}"


def test_mirror_follows_the_default_branch_and_prunes_deleted_branches(
    repo: FleetRepo, tmp_path: Path
) -> None:
    repo.git("branch", "feature", "v1")
    url = f"file://{repo.path}"
    cache = tmp_path / "cache"
    source = open_source(url, ref=None, cache_dir=cache)
    assert source.describe() == f"the remote {url}"
    assert source.resolve() == repo.git("rev-parse", "main")
    assert source.resolve("feature") == repo.git("rev-parse", "v1")
    repo.git("branch", "-D", "feature")
    source.fetch()
    with pytest.raises(SourceError, match="unknown revision 'feature'"):
        source.resolve("feature")


def test_checkout_is_read_only_and_rejects_unknown_commits(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    tree = source.checkout(source.resolve())
    for path in [tree, tree / "fleet", tree / "fleet/a.yaml", tree / "bin/run.sh"]:
        assert stat.S_IMODE(path.lstat().st_mode) & 0o222 == 0, path
    with pytest.raises(SourceError, match=r"unknown revision '0{40}'"):
        source.checkout("0" * 40)


def test_changed_paths_lists_files_that_differ(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    assert source.changed_paths("v1", "main") == ["fleet/a.yaml"]


def _tar(entries: list[tarfile.TarInfo], payload: bytes = b"owned\n") -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for entry in entries:
            if entry.isreg():
                entry.size = len(payload)
                archive.addfile(entry, io.BytesIO(payload))
            else:
                archive.addfile(entry)
    buffer.seek(0)
    return buffer


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "entries",
    [
        # A file written through a symlinked directory that points outside.
        [_link("conf", "OUTSIDE"), tarfile.TarInfo("conf/owned")],
        # A file written over a symlink that points outside.
        [_link("owned", "OUTSIDE/owned"), tarfile.TarInfo("owned")],
        [tarfile.TarInfo("../owned")],
        [tarfile.TarInfo("/owned")],
    ],
    ids=["through-symlinked-dir", "over-symlink", "dot-dot", "absolute"],
)
def test_hostile_archives_never_write_outside_the_checkout(
    entries: list[tarfile.TarInfo], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for entry in entries:
        if entry.issym():
            entry.linkname = entry.linkname.replace("OUTSIDE", str(outside))
    destination = tmp_path / "cache" / "trees" / "x"
    with pytest.raises(SourceError, match="refusing tree entry"):
        extract_tree(_tar(entries), destination)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "owned").exists()
    # Neither the tree nor its staging directory is left behind.
    assert list((tmp_path / "cache" / "trees").iterdir()) == []
