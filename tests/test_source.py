"""The git source on real repositories: refs to SHAs, exported trees, mirrors of remotes, which
refs are followed, rollback protection, and credentials kept out of argv, files and messages.

HTTP remotes are served by a static file server with basic auth (git's "dumb" HTTP protocol),
so the credential path runs end to end without a git server."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from support.repo import FleetRepo

from reconciler.errors import ConfigError, SourceError
from reconciler.source import GitSource, open_source
from reconciler.source.credentials import CREDENTIAL_ENV, GitCredential, remote_access
from reconciler.source.export import extract_tree
from reconciler.source.history import require_descendant


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


# -- following only what should be followed -----------------------------------------------------


def test_a_tag_named_like_the_branch_never_stands_in_for_it(
    repo: FleetRepo, tmp_path: Path
) -> None:
    """git rev-parse main would pick refs/tags/main over refs/heads/main: whoever can push a
    tag would choose what runs."""
    branch = repo.git("rev-parse", "refs/heads/main")
    repo.git("tag", "main", "v1")  # the tag points at the older commit
    for location in (str(repo.path), f"file://{repo.path}"):
        cache = tmp_path / "cache" / str(len(location))
        source = open_source(location, ref="refs/heads/main", cache_dir=cache)
        assert source.resolve() == branch
        assert source.resolve("refs/tags/main") == repo.git("rev-parse", "v1")
        bare = open_source(location, ref="main", cache_dir=cache)
        with pytest.raises(SourceError) as caught:
            bare.resolve()
        assert str(caught.value) == (
            f"the --ref 'main' is ambiguous in {bare.describe()}: refs/heads/main and "
            "refs/tags/main both exist; name the one you mean in full (--ref refs/heads/main)"
        )
        with pytest.raises(SourceError, match="'main~1' is ambiguous"):
            bare.resolve("main~1")
    # A name that is only a tag, or only a branch, still works as a bare name.
    source = open_source(str(repo.path), ref="v1", cache_dir=tmp_path / "c")
    assert source.resolve() == repo.git("rev-parse", "v1")


def test_the_mirror_holds_only_branches_and_tags(repo: FleetRepo, tmp_path: Path) -> None:
    head = repo.git("rev-parse", "HEAD")
    repo.git("update-ref", "refs/pull/1/head", "v1")
    repo.git("update-ref", "refs/notes/commits", "v1")
    repo.git("update-ref", "refs/heads/feature", "v1")
    url = f"file://{repo.path}"
    source = open_source(url, ref=None, cache_dir=tmp_path / "cache")
    refs = subprocess.run(
        ["git", "--git-dir", str(source.repo_path), "for-each-ref", "--format=%(refname)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(refs) == ["refs/heads/feature", "refs/heads/main", "refs/tags/v1"]
    with pytest.raises(SourceError, match="there is no ref refs/pull/1/head"):
        source.resolve("refs/pull/1/head")
    assert source.resolve() == head
    config = (source.repo_path / "config").read_text()
    assert "+refs/heads/*:refs/heads/*" in config
    assert "mirror = true" not in config
    assert "refs/*:refs/*" not in config


def test_a_mirror_made_by_clone_mirror_is_brought_into_line(
    repo: FleetRepo, tmp_path: Path
) -> None:
    """Mirrors made before held every ref of the remote; the next fetch drops the rest."""
    repo.git("update-ref", "refs/pull/7/head", "v1")
    url = f"file://{repo.path}"
    source = GitSource(url, cache_dir=tmp_path / "cache")
    source.repo_path.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--mirror", url, str(source.repo_path)], check=True)
    assert (source.repo_path / "refs/pull/7/head").exists() or "refs/pull/7/head" in (
        source.repo_path / "packed-refs"
    ).read_text()
    source.fetch()
    with pytest.raises(SourceError, match="there is no ref refs/pull/7/head"):
        source.resolve("refs/pull/7/head")
    assert source.resolve("main") == repo.git("rev-parse", "main")
    assert "mirror = true" not in (source.repo_path / "config").read_text()


@pytest.mark.parametrize(
    "name",
    [
        "-x",
        "--upload-pack=touch /tmp/owned",
        "--output=/tmp/owned",
        "main..v1",
        "main@{1}",
        ":/second",
        "a b",
        "refs/heads/.hidden",
        "x.lock",
    ],
)
def test_revision_names_that_are_options_or_not_refs_are_refused(
    repo: FleetRepo, tmp_path: Path, name: str
) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match=re.escape(f"refusing the revision {name!r}: ")):
        source.resolve(name)
    with pytest.raises(SourceError, match=re.escape(f"refusing the --ref {name!r}: ")):
        GitSource(str(repo.path), ref=name, cache_dir=tmp_path / "cache")


def test_changed_paths_never_hands_git_an_option(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    owned = tmp_path / "owned"
    with pytest.raises(SourceError, match="refusing the revision"):
        source.changed_paths(f"--output={owned}", "main")
    assert not owned.exists()


def test_abbreviated_shas_name_commits_only(repo: FleetRepo, tmp_path: Path) -> None:
    first = repo.git("rev-parse", "v1")
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    assert source.resolve(first[:7]) == first
    assert source.resolve(f"{first[:7]}~0") == first
    # A branch named like a hex prefix is a branch: looked up as a ref, not as an object.
    repo.git("branch", "cafe", "v1")
    assert source.resolve("cafe") == first
    tree = repo.git("rev-parse", "HEAD^{tree}")
    with pytest.raises(SourceError, match=f"unknown revision '{tree[:10]}'"):
        source.resolve(tree[:10])


def test_is_ancestor_follows_history(repo: FleetRepo, tmp_path: Path) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    first, second = repo.git("rev-parse", "v1"), repo.git("rev-parse", "main")
    repo.git("checkout", "-q", "-b", "side", "v1")
    side = repo.commit("side")
    assert source.is_ancestor(first, second)
    assert source.is_ancestor(second, second)
    assert not source.is_ancestor(second, first)
    assert not source.is_ancestor(second, side)
    with pytest.raises(SourceError, match="cannot tell whether"):
        source.is_ancestor("0" * 40, second)
    with pytest.raises(SourceError, match="not a full commit SHA"):
        source.is_ancestor("--help", second)


def test_require_descendant_refuses_rollbacks_unless_allowed(
    repo: FleetRepo, tmp_path: Path
) -> None:
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "cache")
    first, second = repo.git("rev-parse", "v1"), repo.git("rev-parse", "main")
    require_descendant(source, None, first, allow=False)  # nothing applied yet
    require_descendant(source, first, second, allow=False)
    require_descendant(source, second, second, allow=False)
    with pytest.raises(SourceError) as caught:
        require_descendant(source, second, first, allow=False)
    assert str(caught.value) == (
        f"refusing {first[:12]}: it does not descend from the applied revision {second[:12]} "
        "(a rollback or a rewritten history); pass --allow-non-descendant to apply it anyway"
    )
    require_descendant(source, second, first, allow=True)
    with pytest.raises(SourceError, match="cannot be found in"):
        require_descendant(source, "1" * 40, first, allow=False)


# -- credentials ----------------------------------------------------------------------------------


SECRET = "s3cret"


def test_a_credential_in_the_url_reaches_no_message_and_no_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"https://user:{SECRET}@127.0.0.1:1/x.git"
    with (
        caplog.at_level(logging.INFO, logger="reconciler.source"),
        pytest.raises(SourceError) as caught,
    ):
        open_source(url, ref=None, cache_dir=tmp_path / "cache", fetch_timeout=10)
    message = str(caught.value)
    assert message.startswith("cannot fetch https://127.0.0.1:1/x.git: ")
    assert SECRET not in message
    assert "user" not in message
    assert SECRET not in caplog.text
    assert "visible" in caplog.text or "can read" in caplog.text  # warned about ps
    source = GitSource(url, cache_dir=tmp_path / "cache")
    assert source.describe() == "the remote https://127.0.0.1:1/x.git"
    assert source.location == "https://127.0.0.1:1/x.git"


class _BasicAuthFiles(http.server.SimpleHTTPRequestHandler):
    """A static file server behind HTTP basic auth: git's "dumb" HTTP protocol, no git on the
    server side. Records the Authorization headers it saw."""

    expected = ""
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization") or ""
        type(self).seen.append(auth)
        if auth != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_like_remote(
    repo: FleetRepo, tmp_path: Path
) -> Iterator[tuple[str, type[_BasicAuthFiles]]]:
    served = tmp_path / "served"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(repo.path), str(served / "fleet.git")], check=True
    )
    subprocess.run(["git", "-C", str(served / "fleet.git"), "update-server-info"], check=True)
    expected = "Basic " + base64.b64encode(f"deploy:{SECRET}".encode()).decode()
    handler = type("Handler", (_BasicAuthFiles,), {"seen": [], "expected": expected})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fleet.git", handler
    finally:
        server.shutdown()
        server.server_close()


def _logging_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a ``git`` first on PATH that records every argv, then runs the real git."""
    real = shutil.which("git")
    assert real is not None
    log_file = tmp_path / "git-argv.log"
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log_file}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    return log_file


@pytest.mark.parametrize("given", ["url", "file", "env"])
def test_a_credential_reaches_the_server_but_no_argv_and_no_config(
    https_like_remote: tuple[str, type[_BasicAuthFiles]],
    repo: FleetRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: str,
) -> None:
    url, handler = https_like_remote
    log_file = _logging_git(tmp_path, monkeypatch)
    credential: GitCredential | None = GitCredential("deploy", SECRET)
    location = url
    if given == "url":
        location = url.replace("http://", f"http://deploy:{SECRET}@")
        credential = None
    elif given == "env":
        # As the CLI reads $RECONCILER_GIT_CREDENTIAL: a bare token, the user from the URL.
        credential = GitCredential.parse(f" {SECRET}\n", origin=CREDENTIAL_ENV)
        location = url.replace("http://", "http://deploy@")
    cache = tmp_path / "cache"
    source = open_source(location, ref=None, cache_dir=cache, credential=credential)
    assert source.resolve() == repo.git("rev-parse", "HEAD")
    source.fetch()  # the second fetch authenticates the same way
    assert handler.expected in handler.seen  # the server got the credential
    argv = log_file.read_text()
    assert "fetch" in argv
    assert "clone" in argv
    assert SECRET not in argv
    assert SECRET not in (source.repo_path / "config").read_text()
    assert "deploy" not in (source.repo_path / "config").read_text()
    for path in cache.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert source.describe() == f"the remote {url}"


def test_without_the_credential_the_server_refuses_and_says_so_plainly(
    https_like_remote: tuple[str, type[_BasicAuthFiles]], tmp_path: Path
) -> None:
    url, _ = https_like_remote
    with pytest.raises(SourceError, match=re.escape(f"cannot fetch {url}: ")):
        open_source(url, ref=None, cache_dir=tmp_path / "cache")


def test_the_credential_helper_answers_only_for_the_remote_host(tmp_path: Path) -> None:
    access = remote_access("https://git.example.invalid:8443/fleet.git", GitCredential(None, "tok"))
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **access.git_env()}

    def fill(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *access.git_config_args(), "credential", "fill"],
            input=f"protocol=https\nhost={host}\n\n",
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    answered = fill("git.example.invalid:8443")
    assert answered.returncode == 0
    assert "username=x-access-token\npassword=tok\n" in answered.stdout
    elsewhere = fill("attacker.example.invalid")
    assert elsewhere.returncode != 0
    assert "tok" not in elsewhere.stdout
    assert "tok" not in " ".join(access.git_config_args())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("deploy:tok\n", GitCredential("deploy", "tok")),
        ("  tok  \n", GitCredential(None, "tok")),
        ("deploy:to:k", GitCredential("deploy", "to:k")),
    ],
)
def test_credentials_parse(text: str, expected: GitCredential) -> None:
    assert GitCredential.parse(text, origin="f") == expected
    assert "tok" not in repr(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "is empty"), ("a\nb", "must hold one line"), (":tok", "both parts"), ("u:", "both")],
)
def test_unusable_credentials_are_config_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        GitCredential.parse(text, origin="the file")


def test_a_credential_given_twice_is_refused_and_ssh_users_stay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keep only the latter"):
        remote_access("https://u:p@h/x.git", GitCredential(None, "t"))
    # https://user@host plus a bare token: the URL names the user.
    access = remote_access("https://oauth2@h/x.git", GitCredential(None, "t"))
    assert access.location == "https://h/x.git"
    assert access.git_env()["RECONCILER_GIT_HELPER_USERNAME"] == "oauth2"
    assert remote_access("ssh://git@h/x.git", None).location == "ssh://git@h/x.git"
