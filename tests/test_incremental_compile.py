"""Reusing compiled workloads (``manifests.compile_cache``) never changes a plan.

Generated fleets in real git repositories take random edits commit after commit (replicas, env,
defaults, source files, exec bits, documents moved between files, symlinks in and in front of
source trees); at every step the plan between two revisions made with the cache (in one loader,
and from the file a previous process saved) is compared with the plan compiled from scratch.
The planner's per-workload path (``ReplicaVMs`` against ``observed_from_desired``: whole
workloads decided at once) is compared, on those fleets and on generated fleets with suspended
workloads, shrinking volumes, scale-downs, renamed fleets and prune off, with the per-VM path
it stands for. Then: the cache file is private, a damaged file or entry is compiled again, an
unwritable state directory only costs the reuse, and ``diff`` imports neither the validators,
the runtimes, GitPython nor the database driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import marshal
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler import model
from reconciler.cli.main import main
from reconciler.errors import ManifestError, PlanError
from reconciler.manifests import DEFAULT_LIMITS, ParseCache, load_fleet
from reconciler.manifests import compile_cache as compile_cache_module
from reconciler.manifests import loader as loader_module
from reconciler.manifests.compile_cache import (
    CACHE_FILE,
    MAGIC,
    CompileCache,
    TreeIndex,
    decode_workload,
    encode_workload,
)
from reconciler.manifests.parallel import Pending, in_child
from reconciler.model import (
    BuildSpec,
    DeploySpec,
    DesiredFleet,
    FleetSettings,
    HealthCheck,
    HealthKind,
    Language,
    PlacementSpec,
    PortSpec,
    RolloutOverrides,
    RuntimeKind,
    SourceSpec,
    Target,
    VolumeSpec,
    Workload,
    assemble_fleet,
    canonical_json,
)
from reconciler.pipeline import RevisionLoader, plan_between
from reconciler.planning import check_deletions, diff, observed_from_desired
from reconciler.render import render_json
from reconciler.source import GitSource
from reconciler.source.export import remove_tree

PROJECT = Path(__file__).resolve().parents[1]

FLEET = """apiVersion: reconciler/v1alpha1
kind: Fleet
metadata:
  name: generated
spec:
  defaults:
    deploy:
      memoryMiB: {memory}
"""

WORKLOAD = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata:
  name: {name}
  labels:
    team: t{team}
spec:
  source:
    path: {path}
    language: python
    entrypoint: app.py
  build:
    targets: [executable, microvm]
  deploy:
    target: microvm
    runtime: qemu
    replicas: {replicas}
    env:
      LEVEL: {level}
"""


@dataclass
class Spec:
    file: str
    path: str  # the source path as the manifest declares it (relative to fleet/)
    replicas: int
    level: str
    team: int


@dataclass
class GeneratedFleet:
    """The fleet as data, written out to the repository before each commit."""

    repo: FleetRepo
    rng: random.Random
    memory: int = 128
    workloads: dict[str, Spec] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # directories under src/
    counter: int = 0

    def new_source(self) -> str:
        self.counter += 1
        name = f"s{self.counter}"
        self.repo.write(f"src/{name}/app.py", f"print({self.counter})\n")
        self.sources.append(name)
        return name

    def add_workload(self) -> None:
        self.counter += 1
        share = self.sources and self.rng.random() < 0.3
        source = self.rng.choice(self.sources) if share else self.new_source()
        self.workloads[f"w{self.counter}"] = Spec(
            file=f"m{self.rng.randrange(4)}.yaml",
            path=f"../src/{source}",
            replicas=self.rng.randint(1, 3),
            level="info",
            team=self.rng.randrange(3),
        )

    def write(self) -> None:
        fleet = self.repo.path / "fleet"
        for old in fleet.glob("m*.yaml"):
            old.unlink()
        self.repo.write("fleet/fleet.yaml", FLEET.format(memory=self.memory))
        files: dict[str, list[str]] = {}
        for name, spec in self.workloads.items():
            files.setdefault(spec.file, []).append(
                WORKLOAD.format(
                    name=name,
                    path=spec.path,
                    replicas=spec.replicas,
                    level=spec.level,
                    team=spec.team,
                )
            )
        for file, documents in files.items():
            self.repo.write(f"fleet/{file}", "".join(documents))

    def edit(self) -> str:
        """One random change; what it was, for the assertion message."""
        rng = self.rng
        name = rng.choice(sorted(self.workloads))
        spec = self.workloads[name]
        kind = rng.choice(
            [
                "replicas",
                "env",
                "add",
                "remove",
                "source",
                "exec",
                "move",
                "reorder",
                "defaults",
                "symlink-inside",
                "symlink-in-front",
                "dir-becomes-link",
                "unlink",
                "ignore",
                "nothing",
            ]
        )
        source_dir = self.repo.path / "fleet" / spec.path
        if kind == "replicas":
            spec.replicas = rng.randint(1, 4)
        elif kind == "env":
            spec.level = rng.choice(["debug", "info", "warn"])
        elif kind == "add":
            self.add_workload()
        elif kind == "remove" and len(self.workloads) > 3:
            del self.workloads[name]
        elif kind == "source" and source_dir.is_dir() and not source_dir.is_symlink():
            (source_dir / "app.py").write_text(f"print({rng.random()})\n")
        elif kind == "exec" and (source_dir / "app.py").is_file():
            mode = (source_dir / "app.py").stat().st_mode
            os.chmod(source_dir / "app.py", mode ^ 0o111)
        elif kind == "move":
            spec.file = f"m{rng.randrange(4)}.yaml"
        elif kind == "reorder":
            items = list(self.workloads.items())
            rng.shuffle(items)
            self.workloads = dict(items)
        elif kind == "defaults":
            self.memory = rng.choice([128, 192, 256])
        elif kind == "symlink-inside" and source_dir.is_dir():
            link = source_dir / f"link{rng.randrange(100)}"
            if not link.is_symlink():
                link.symlink_to("app.py")
        elif kind == "symlink-in-front":
            # fleet/../alt -> src: the workload is reached through a symlink, then "..".
            if not (self.repo.path / "alt").is_symlink():
                (self.repo.path / "alt").symlink_to("src")
            spec.path = f"../alt/../src/{spec.path.rsplit('/', 1)[1]}"
        elif kind == "dir-becomes-link" and len(self.sources) > 1:
            # A source directory replaced by a symlink to another one with the same content.
            target = rng.choice(self.sources)
            victim = spec.path.rsplit("/", 1)[1]
            real = self.repo.path / "src" / victim
            if victim != target and real.is_dir() and not real.is_symlink():
                for child in real.iterdir():
                    child.unlink()
                real.rmdir()
                real.symlink_to(target)
        elif kind == "unlink":
            # Back to a symlink-free tree (a revision the cache may keep whole).
            self._unlink()
        elif kind == "ignore":
            # A foreign YAML file that only the ignore file keeps from being an error.
            notes = self.repo.path / "fleet" / "notes"
            if notes.is_dir():
                shutil.rmtree(notes)
                (self.repo.path / "fleet" / ".reconcilerignore").unlink()
            else:
                self.repo.write("fleet/notes/todo.yaml", "items: [a, b]\n")
                self.repo.write("fleet/.reconcilerignore", "notes/\n")
        return f"{kind} {name}"

    def _unlink(self) -> None:
        for directory, dirnames, filenames in os.walk(self.repo.path):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            for entry in [*dirnames, *filenames]:
                path = Path(directory) / entry
                if path.is_symlink():
                    path.unlink()
        for name, spec in self.workloads.items():
            leaf = spec.path.rsplit("/", 1)[1]
            if not (self.repo.path / "src" / leaf).is_dir():
                self.repo.write(f"src/{leaf}/app.py", f"print({name!r})\n")
            spec.path = f"../src/{leaf}"


def _loaded(fleet: DesiredFleet) -> tuple[object, ...]:
    return (fleet.workloads, fleet.vms, fleet.artifacts, fleet.fleet)


def _per_vm(fleet: DesiredFleet) -> DesiredFleet:
    """``fleet`` with its VMs in a plain dict: the planner then compares VM by VM."""
    return replace(fleet, vms=dict(fleet.vms))


def _plan_per_vm(loader: RevisionLoader, base: str, head: str) -> str:
    """``plan_between`` the long way: every VM built, observed and compared on its own."""
    base_fleet, head_fleet = _per_vm(loader.load(base)), _per_vm(loader.load(head))
    observed = observed_from_desired(base_fleet)
    assert isinstance(observed.vms, dict)
    plan = check_deletions(diff(head_fleet, observed, base=base_fleet), head_fleet, observed)
    return render_json(plan)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cached_plans_equal_plans_from_scratch(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    repo = FleetRepo(tmp_path / "repo")
    generated = GeneratedFleet(repo, rng)
    for _ in range(12):
        generated.add_workload()
    generated.write()
    revisions = [repo.commit("generated")]
    source = GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git")
    cache_file = tmp_path / "state" / CACHE_FILE
    lasting = RevisionLoader(source, "fleet", compile_cache=cache_file)

    for step in range(14):
        what = generated.edit()
        generated.write()
        revisions.append(repo.commit(what))
        base = revisions[-2] if rng.random() < 0.7 else rng.choice(revisions[:-1])
        head = revisions[-1]
        scratch = RevisionLoader(source, "fleet", cache=ParseCache())  # no reuse at all
        expected = render_json(plan_between(scratch, base, head))
        assert _plan_per_vm(scratch, base, head) == expected, (step, what)
        reopened = RevisionLoader(source, "fleet", compile_cache=cache_file)
        for loader in (lasting, reopened):
            assert render_json(plan_between(loader, base, head)) == expected, (step, what)
            assert _loaded(loader.load(head)) == _loaded(scratch.load(head)), (step, what)
    store = lasting.cache.store
    assert store is not None
    assert store.hits > 0
    assert store.revisions  # some revisions were symlink-free and were kept whole


def _example(tmp_path: Path) -> tuple[FleetRepo, GitSource, str, str]:
    repo = FleetRepo.of_fleet_example(tmp_path / "repo")
    base = repo.git("rev-parse", "HEAD")
    repo.edit("workloads/web.yaml", "replicas: 2", "replicas: 3")
    head = repo.commit("scale web")
    return repo, GitSource(str(repo.path), cache_dir=tmp_path / "git"), base, head


def test_a_second_process_compiles_nothing(tmp_path: Path) -> None:
    _, source, base, head = _example(tmp_path)
    cache_file = tmp_path / "state" / CACHE_FILE
    first = RevisionLoader(source, compile_cache=cache_file)
    expected = render_json(plan_between(first, base, head))
    assert cache_file.stat().st_mode & 0o777 == 0o600
    again = RevisionLoader(source, compile_cache=cache_file)
    assert render_json(plan_between(again, base, head)) == expected
    store = again.cache.store
    assert store is not None
    workloads = len(again.load(head).workloads)
    assert store.hits >= 2 * workloads  # base and head, all served from the file


def _planned(source: GitSource, base: str, head: str, cache_file: Path) -> tuple[str, int]:
    """The rendered plan of a loader using ``cache_file``, and how many workloads it reused."""
    loader = RevisionLoader(source, compile_cache=cache_file)
    plan = render_json(plan_between(loader, base, head))
    assert loader.cache.store is not None
    return plan, loader.cache.store.hits


def test_damaged_cache_is_compiled_again(tmp_path: Path) -> None:
    _, source, base, head = _example(tmp_path)
    cache_file = tmp_path / CACHE_FILE
    # A fresh cache reuses in memory only: head's unchanged workloads are base's.
    fresh = _planned(source, base, head, cache_file)
    data = bytearray(cache_file.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit: the checksum no longer matches
    cache_file.write_bytes(bytes(data))
    assert CompileCache.open(cache_file).workloads == {}
    assert _planned(source, base, head, cache_file) == fresh
    cache_file.write_bytes(b"not a cache")
    assert _planned(source, base, head, cache_file) == fresh


def test_a_write_cut_short_leaves_no_file_behind_for_long(tmp_path: Path) -> None:
    """A writer killed before its rename (a detached write when its CI job ended) leaves its
    temporary file; the next write removes it, and leaves a live writer's alone."""
    _, source, base, head = _example(tmp_path)
    cache_file = tmp_path / CACHE_FILE
    abandoned = tmp_path / f".{CACHE_FILE}.999999999.tmp"  # above any pid the kernel gives
    in_flight = tmp_path / f".{CACHE_FILE}.1.tmp"  # init's: alive
    abandoned.write_bytes(b"half a cache")
    in_flight.write_bytes(b"being written")
    _planned(source, base, head, cache_file)
    assert cache_file.exists()
    assert not abandoned.exists()
    assert in_flight.read_bytes() == b"being written"


def test_an_entry_that_does_not_decode_is_dropped(tmp_path: Path) -> None:
    _, source, base, head = _example(tmp_path)
    cache_file = tmp_path / CACHE_FILE
    fresh = _planned(source, base, head, cache_file)
    payload = cache_file.read_bytes()[len(MAGIC) + 32 :]
    version, files, _, workloads, revisions, expansions = marshal.loads(payload)
    # The example renders a template and decrypts secrets: its revisions are never kept whole.
    assert revisions == {}
    workloads = dict.fromkeys(workloads, ("garbage",))  # well signed, wrong shape
    bad = marshal.dumps((version, files, {}, workloads, revisions, expansions))
    cache_file.write_bytes(MAGIC + hashlib.sha256(bad).digest() + bad)
    assert _planned(source, base, head, cache_file) == fresh  # every workload compiled again
    assert decode_workload(("garbage",)) is None


def _generated(tmp_path: Path) -> tuple[GitSource, str, str]:
    repo = FleetRepo(tmp_path / "repo")
    generated = GeneratedFleet(repo, random.Random(7))
    for _ in range(6):
        generated.add_workload()
    generated.write()
    base = repo.commit("generated")
    generated.memory = 256
    generated.write()
    head = repo.commit("defaults")
    return GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git"), base, head


def _plan_of(source: GitSource, base: str, head: str, cache_file: Path) -> tuple[str, int]:
    loader = RevisionLoader(source, "fleet", compile_cache=cache_file)
    plan = render_json(plan_between(loader, base, head))
    assert loader.cache.store is not None
    return plan, loader.cache.store.hits


def test_a_revision_loaded_whole_before_reads_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, base, head = _generated(tmp_path)
    cache_file = tmp_path / "state" / CACHE_FILE
    expected = render_json(
        plan_between(RevisionLoader(source, "fleet", cache=ParseCache()), base, head)
    )
    assert _plan_of(source, base, head, cache_file)[0] == expected
    payload = cache_file.read_bytes()[len(MAGIC) + 32 :]
    version, files, trees, workloads, revisions, expansions = marshal.loads(payload)
    assert len(revisions) == 2  # base and head, symlink-free, no template, no secret
    # Neither checkout is read again: both revisions come from the cache alone.
    for rev in (base, head):
        checkout = tmp_path / "state" / "git" / "trees" / rev
        os.chmod(checkout, 0o755)
        remove_tree(checkout / "fleet")
    derived: list[str] = []
    derive = model.vm_settings
    monkeypatch.setattr(model, "vm_settings", lambda w, *a: derived.append(w.name) or derive(w, *a))
    listed: list[str] = []
    list_trees = source.tree_entries
    source.tree_entries = lambda rev: listed.append(rev) or list_trees(rev)  # type: ignore[method-assign]
    plan, hits = _plan_of(source, base, head, cache_file)
    assert plan == expected
    assert hits == 12
    assert listed == []  # nor their trees listed
    assert derived == []  # nor their VMs' settings derived again
    del source.tree_entries
    # The derived settings of every workload were kept too, and are used.
    assert len(expansions) == len(workloads)
    # An entry of the wrong shape, or one whose workloads are gone, is loaded again; derived
    # settings of the wrong shape are derived again.
    for broken in (
        (files, trees, workloads, dict.fromkeys(revisions, ("garbage", ())), expansions),
        (files, trees, {}, revisions, expansions),
        (files, trees, workloads, revisions, dict.fromkeys(expansions, ("garbage",))),
        (files, trees, workloads, revisions, dict.fromkeys(expansions, (None, "x", {}, ()))),
    ):
        bad = marshal.dumps((version, *broken))
        cache_file.write_bytes(MAGIC + hashlib.sha256(bad).digest() + bad)
        remove_tree(tmp_path / "state" / "git" / "trees")
        assert _plan_of(source, base, head, cache_file)[0] == expected
    assert decode_workload(("garbage",)) is None


def test_a_remembered_revision_is_not_exported_but_still_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A commit the cache holds whole is planned without exporting its tree (a CI runner that
    restored the cache exports only what it has not seen), and a source that verifies
    signatures still refuses it once its key is revoked."""
    key = tmp_path / "signer"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "signer", "-f", str(key)],
        check=True,
    )
    repo = FleetRepo(tmp_path / "repo")
    signed = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q")
    generated = GeneratedFleet(repo, random.Random(3))
    for _ in range(4):
        generated.add_workload()
    generated.write()
    repo.git("add", "-A")
    repo.git(*signed, "-S", "-m", "base")
    base = repo.git("rev-parse", "HEAD")
    generated.memory = 256
    generated.write()
    repo.git("add", "-A")
    repo.git(*signed, "-S", "-m", "head")
    head = repo.git("rev-parse", "HEAD")
    state = tmp_path / "state"
    argv = ["diff", "--repo", str(repo.path), "--path", "fleet", "--base", base, "--head", head]
    argv += ["--state-dir", str(state), "--format", "json", "--trusted-key", f"{key}.pub"]
    assert main(argv) == 2
    first = capsys.readouterr().out
    remove_tree(state / "git" / "trees")
    assert main(argv) == 2
    assert capsys.readouterr().out == first
    assert not (state / "git" / "trees").exists() or not any((state / "git" / "trees").iterdir())
    assert main([*argv, "--revoked-key", f"{key}.pub"]) == 1
    assert "which is revoked (--revoked-key)" in capsys.readouterr().err


def test_an_unwritable_state_directory_only_costs_the_reuse(tmp_path: Path) -> None:
    _, source, base, head = _example(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache_file = blocker / "state" / CACHE_FILE  # its parent can never be made
    expected = render_json(plan_between(RevisionLoader(source, cache=ParseCache()), base, head))
    loader = RevisionLoader(source, compile_cache=cache_file)
    assert render_json(plan_between(loader, base, head)) == expected
    assert not cache_file.exists()


def test_workloads_round_trip_through_plain_data(tmp_path: Path) -> None:
    _, source, base, _ = _example(tmp_path)
    fleet = RevisionLoader(source).load(base)
    plain = [w for w in fleet.workloads.values() if not w.deploy.secret_env]
    assert plain
    for workload in plain:
        encoded = encode_workload(workload)
        assert encoded is not None
        assert decode_workload(marshal.loads(marshal.dumps(encoded))) == workload
    # Secret references depend on the decrypted files: never kept.
    assert all(encode_workload(w) is None for w in fleet.workloads.values() if w not in plain)


def test_tree_index_keys_only_symlink_free_paths() -> None:
    entries = {
        "src": ("040000", "t-src"),
        "src/a": ("040000", "t-a"),
        "src/b": ("040000", "t-b"),
        "src/b/link": ("120000", "l"),
        "alt": ("120000", "l2"),
        "mod": ("160000", "c"),
        "fleet": ("040000", "t-fleet"),
    }
    index = TreeIndex.from_entries(entries)
    assert index.source_tree("fleet", "../src/a") == ("src/a", "t-a")
    assert index.source_tree("fleet", "./../src//a/") == ("src/a", "t-a")
    assert index.source_tree("fleet", "../src/b") is None  # a symlink inside
    assert index.source_tree("fleet", "../alt/a") is None  # through a symlink
    assert index.source_tree("fleet", "../alt/../src/a") is None  # ".." after a symlink
    assert index.source_tree("fleet", "../../x") is None  # leaves the repository
    assert index.source_tree("fleet", "/src/a") is None
    assert index.source_tree("fleet", "../mod") is None  # a submodule
    assert index.source_tree("fleet", "../src") is None  # holds a symlink below


def test_paths_git_lists_are_refused_as_the_file_system_refuses_them(tmp_path: Path) -> None:
    """Source paths resolved from Git's listing (no symlink on the way: no ``realpath``) give
    the same workloads and the same problems as those resolved on disk."""
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "app.py").write_text("print('outside')\n")
    repo = FleetRepo(tmp_path / "repo")
    repo.write("fleet/fleet.yaml", FLEET.format(memory=128))
    cases = {
        "plain": "../src/a",
        "dotted": "./../src//b/../a/",
        "escape": "../out/x",  # out -> a directory outside the repository
        "through": "../alt/../src/a",  # alt -> src: ".." after a symlink
        "linked": "../src/c",  # holds a symlink
        "missing": "../src/none",
        "file": "../src/a/app.py",
    }
    documents = [
        WORKLOAD.format(name=name, path=path, replicas=1, level="info", team=0)
        for name, path in cases.items()
    ]
    # An entrypoint that climbs out of its own (symlink-free) directory into another.
    documents.append(
        WORKLOAD.format(name="climb", path="../src/a", replicas=1, level="info", team=0).replace(
            "entrypoint: app.py", "entrypoint: ../b/app.py"
        )
    )
    documents.append(
        WORKLOAD.format(name="inner", path="../src", replicas=1, level="info", team=0).replace(
            "entrypoint: app.py", "entrypoint: b/./app.py"
        )
    )
    repo.write("fleet/workloads.yaml", "".join(documents))
    for leaf in "abc":
        repo.write(f"src/{leaf}/app.py", f"print({leaf!r})\n")
    (repo.path / "src" / "c" / "link").symlink_to("app.py")
    (repo.path / "out").symlink_to(outside)
    (repo.path / "alt").symlink_to("src")
    head = repo.commit("paths")
    source = GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git")

    resolved: list[str] = []
    realpath = os.path.realpath

    def counted(path: str, *, strict: bool = False) -> str:
        resolved.append(os.fspath(path))
        return realpath(path, strict=strict)

    def outcome(loader: RevisionLoader) -> tuple[tuple[object, ...], list[str]]:
        resolved.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os.path, "realpath", counted)
            try:
                return _loaded(loader.load(head)), list(resolved)
            except ManifestError as exc:
                return tuple(str(p) for p in exc.problems), list(resolved)

    expected, on_disk = outcome(RevisionLoader(source, "fleet", cache=ParseCache()))
    listed = RevisionLoader(source, "fleet", compile_cache=tmp_path / "state" / CACHE_FILE)
    found, lexical = outcome(listed)
    assert found == expected
    # plain, dotted and climb: directory and entrypoint resolved from the listing; inner is
    # not (src/ holds a symlink below it), nor are the paths through symlinks.
    root = str(source.checkout(head).resolve())
    for path in ("fleet/../src/a", "fleet/./../src//b/../a/", "src/a/app.py", "src/a/../b/app.py"):
        assert f"{root}/{path}" in on_disk, path
        assert f"{root}/{path}" not in lexical, path
    for path in ("fleet/../src", "src/b/./app.py", "fleet/../out/x", "fleet/../alt/../src/a"):
        assert f"{root}/{path}" in on_disk, path
        assert f"{root}/{path}" in lexical, path
    found = "\n".join(str(e) for e in expected)
    assert "source path '../out/x' leaves the repository" in found
    assert "source path '../src/none' is not a directory" in found
    assert "source path '../src/a/app.py' is not a directory" in found
    assert "entrypoint '../b/app.py' is not a file in '../src/a'" in found
    assert "inner" not in found
    assert "'./../src//b/../a/'" not in found


def test_diff_imports_neither_validators_nor_runtimes(tmp_path: Path) -> None:
    """A warm ``diff`` loads what it needs: no jsonschema, jsonschema-rs or Jinja2 (every
    document was validated before, no template), no runtime, builder or daemon code, and no
    ``diff`` loads a store or the signature tools it was not asked to use."""
    repo, _, base, head = _example(tmp_path)
    state = tmp_path / "state"
    argv = ["diff", "--repo", str(repo.path), "--base", base, "--head", head]
    argv += ["--state-dir", str(state), "--format", "json"]
    probe = (
        "import sys, json, contextlib, io\n"
        "from reconciler.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main({argv!r})\n"
        "print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'jsonschema', 'jsonschema_rs', 'jinja2', 'runtime', 'builders', 'pyroute2', "
        "'git', 'sqlite3'} "
        "or m.startswith(('reconciler.daemon.', 'reconciler.execution', "
        "'reconciler.state.location', 'reconciler.state.protocol', "
        "'reconciler.source.signatures', 'reconciler.source.gpg')))]))\n"
    )
    # Neither the store's modules (no --store) nor the signature tools (no --trusted-key):
    # cold or warm.
    unasked = ("reconciler.state.", "reconciler.source.")
    for run in ("cold", "warm"):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=PROJECT
        ).stdout
        code, loaded = json.loads(out.splitlines()[-1])
        assert code == 2
        assert not [m for m in loaded if m.startswith(unasked)]
        heavy = [m for m in loaded if not m.startswith("reconciler.daemon.")]
        if run == "warm":
            assert heavy == [], heavy
        else:
            light = {"runtime", "builders", "pyroute2", "git", "sqlite3"}
            assert not [m for m in heavy if m.split(".")[0] in light]


def test_a_smaller_node_limit_parses_again(tmp_path: Path) -> None:
    """A file saved as parsed under the default node limit is not trusted under a smaller one."""
    root = tmp_path / "fleet"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print(1)\n")
    aliased = WORKLOAD.format(name="w", path="src", replicas=1, level="&level info", team=0)
    (root / "w.yaml").write_text(aliased + "      OTHER: *level\n")
    store = CompileCache()
    load_fleet(root, cache=ParseCache(store))
    small = replace(DEFAULT_LIMITS, max_nodes_per_document=5)
    with pytest.raises(ManifestError) as refused:
        load_fleet(root, cache=ParseCache(store), limits=small)
    assert any("more than 5 nodes" in p.message for p in refused.value.problems)


def test_every_field_of_a_workload_survives_the_file() -> None:
    """The encoding follows the model's dataclasses: a field added there is kept here."""
    base = DeploySpec(Target.MICROVM, RuntimeKind.QEMU, replicas=2, vcpus=1, memory_mib=64)
    deploy = dataclasses.replace(
        base,
        env={"A": "1"},
        ports=(PortSpec("http", 80),),
        health=HealthCheck(HealthKind.TCP, port=80),
        volumes=(VolumeSpec("data", 16, "/data"),),
        placement=PlacementSpec({"zone": "a"}, "zone"),
        rollout=RolloutOverrides(canary=1),
    )
    workload = Workload(
        name="w",
        labels={"team": "a"},
        source=SourceSpec("src/w", Language.PYTHON, "app.py"),
        build=BuildSpec((Target.MICROVM,), {"flags": ["-O2"]}),
        deploy=deploy,
        source_digest="sha256:" + "0" * 64,
    )
    encoded = encode_workload(workload)
    assert decode_workload(marshal.loads(marshal.dumps(encoded))) == workload


def test_decoding_builds_what_the_constructors_build() -> None:
    """Decoding fills each frozen dataclass's fields without its ``__init__``: right only as
    long as no model class does more there. A wrong field count is refused, not truncated."""
    checked = [
        cls
        for cls in vars(model).values()
        if isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and cls.__module__ == model.__name__
    ]
    assert checked
    assert not [cls.__name__ for cls in checked if hasattr(cls, "__post_init__")]
    encoded = encode_workload(_generated_workload(random.Random(1), "w2"))
    assert encoded is not None
    short = (encoded[0], encoded[1], encoded[2][:-1])
    assert decode_workload(short) is None
    assert decode_workload((encoded[0], encoded[1], (*encoded[2], "extra"))) is None


def _generated_workload(rng: random.Random, name: str) -> Workload:
    volumes = tuple(
        VolumeSpec(f"v{i}", rng.choice([16, 32]), f"/v{i}", rng.choice(["ext4", "ext4", "xfs"]))
        for i in range(rng.randrange(2))
    )
    return Workload(
        name=name,
        labels={"team": rng.choice("ab")},
        source=SourceSpec(f"src/{name}", Language.PYTHON, "app.py"),
        build=BuildSpec((Target.MICROVM,)),
        deploy=DeploySpec(
            Target.MICROVM,
            RuntimeKind.QEMU,
            replicas=rng.randrange(4),
            vcpus=1,
            memory_mib=rng.choice([64, 64, 128]),
            env={"LEVEL": rng.choice(["info", "info", "debug"])},
            volumes=volumes,
            depends_on=(rng.choice(["w0", "w1"]),) if name > "w1" and rng.random() < 0.3 else (),
        ),
        source_digest="sha256:" + rng.choice("01") * 64,
        suspended=rng.random() < 0.15,
    )


def _outcome(desired: DesiredFleet, base: DesiredFleet) -> str:
    try:
        observed = observed_from_desired(base)
        return render_json(check_deletions(diff(desired, observed, base=base), desired, observed))
    except PlanError as refused:
        return f"refused: {refused}"


@pytest.mark.parametrize("seed", range(6))
def test_per_workload_planning_equals_per_vm_planning(seed: int) -> None:
    """Pure: generated pairs of fleets, planned per workload and per VM, give the same plan
    (or the same refusal)."""
    rng = random.Random(seed)
    for _ in range(40):
        names = [f"w{i}" for i in range(rng.randint(0, 6))]
        base_workloads = {n: _generated_workload(rng, n) for n in names}
        head_workloads = dict(base_workloads)
        for name in names:
            if rng.random() < 0.4:
                head_workloads[name] = _generated_workload(rng, name)
            elif rng.random() < 0.1:
                del head_workloads[name]
        settings = FleetSettings(name="f", prune=rng.random() < 0.8, allow_empty=True)
        head_settings = replace(settings, name=rng.choice(["f", "f", "f", "g"]))
        base = assemble_fleet("a" * 40, settings, base_workloads)
        head = assemble_fleet("b" * 40, head_settings, head_workloads)
        expected = _outcome(_per_vm(head), _per_vm(base))
        assert _outcome(head, base) == expected


def _two_processes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every load, however small, parses and compiles half its files and workloads in a
    child process, and every save writes from one (``manifests.parallel``): the thresholds
    that keep small fleets in one process set to nothing. Returns whether each fork happened."""
    monkeypatch.setattr(loader_module, "PARALLEL_PARSE_CHARS", 1)
    monkeypatch.setattr(loader_module, "PARALLEL_COMPILE_WORKLOADS", 2)
    monkeypatch.setattr(compile_cache_module, "BACKGROUND_SAVE_WORKLOADS", 1)
    forks: list[bool] = []

    def counted(work: Callable[[], object]) -> Pending | None:
        pending = in_child(work)
        forks.append(pending is not None)
        return pending

    monkeypatch.setattr(loader_module, "in_child", counted)
    return forks


def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "in_child", lambda work: None)


@pytest.mark.parametrize("seed", [4, 5])
def test_two_processes_plan_what_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    repo = FleetRepo(tmp_path / "repo")
    generated = GeneratedFleet(repo, rng)
    for _ in range(16):
        generated.add_workload()
    generated.write()
    revisions = [repo.commit("generated")]
    source = GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git")
    hits = 0
    forked: list[bool] = []
    for step in range(8):
        what = generated.edit()
        generated.write()
        revisions.append(repo.commit(what))
        base, head = rng.choice(revisions[:-1]), revisions[-1]
        _one_process(monkeypatch)
        scratch = RevisionLoader(source, "fleet", cache=ParseCache())
        expected = render_json(plan_between(scratch, base, head))
        forks = _two_processes(monkeypatch)
        cache_file = tmp_path / "state" / f"{CACHE_FILE}-{step}"  # a first load each time
        first = RevisionLoader(source, "fleet", compile_cache=cache_file)
        assert render_json(plan_between(first, base, head)) == expected, (step, what)
        assert _loaded(first.load(head)) == _loaded(scratch.load(head)), (step, what)
        assert first.cache.store is not None
        first.cache.store.wait()  # the child that writes the file
        again = RevisionLoader(source, "fleet", compile_cache=cache_file)
        assert render_json(plan_between(again, base, head)) == expected, (step, what)
        assert again.cache.store is not None
        hits += again.cache.store.hits
        forked += forks
    assert any(forked)  # the child processes did run
    assert hits > 0  # and the files they wrote were read


def test_two_processes_report_what_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = FleetRepo(tmp_path / "repo")
    generated = GeneratedFleet(repo, random.Random(9))
    for _ in range(12):
        generated.add_workload()
    generated.write()
    # Problems in both halves: a file that does not parse, a document its schema refuses, a
    # source without its entrypoint, a dependency on nothing.
    repo.write("fleet/m9.yaml", "apiVersion: reconciler/v1alpha1\nkind: [Workload\n")
    names = sorted(generated.workloads)
    for name in (names[1], names[-2]):
        file = f"fleet/{generated.workloads[name].file}"
        repo.edit(file, f"name: {name}\n", f"name: {name}\n  bad: 1\n")
    for name in (names[2], names[-1]):
        (repo.path / "fleet" / generated.workloads[name].path / "app.py").unlink()
    head = repo.commit("broken")
    source = GitSource(str(repo.path), cache_dir=tmp_path / "state" / "git")
    outcomes = []
    for step in ("one", "two"):
        forks = _two_processes(monkeypatch) if step == "two" else []
        if step == "one":
            _one_process(monkeypatch)
        loader = RevisionLoader(source, "fleet", compile_cache=tmp_path / f"cache-{step}")
        with pytest.raises(ManifestError) as raised:
            loader.load(head)
        outcomes.append(raised.value.lines())
        assert any(forks) == (step == "two")
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) > 4


def _json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([0, -1, 7, 2**70, -(2**40)])
    if kind == 1:
        return rng.choice([True, False, None])
    if kind == 2:
        return rng.choice(["", "plain", 'quo"te', "back\\slash", "\n\t\x00\x1f", "é€😀", "\ud800"])
    if kind == 3:
        return rng.choice([0.5, -2.0, 1e300, float("inf")])
    if kind == 4:
        return Target.MICROVM  # a str subclass: encoded by its value
    if kind == 5:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return tuple(_json_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    keys = ["b", "a", "é", "A", "10", "9"]
    return {rng.choice(keys): _json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_canonical_json_spells_values_as_the_json_module_does() -> None:
    """Every digest (artifacts, settings) is taken of ``canonical_json``: its shortcuts for
    scalars, lists and mappings must give exactly what ``json.dumps`` gives."""
    rng = random.Random(11)
    for _ in range(3000):
        value = _json_value(rng)
        expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert canonical_json(value) == expected, value
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        canonical_json(circular)
    with pytest.raises(TypeError):
        canonical_json({"a": object()})
