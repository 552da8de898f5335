"""Loading manifests from a directory: the contract, templates, and hostile input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.errors import ManifestError
from reconciler.manifests import Limits, ParseCache, load_fleet
from reconciler.model import RuntimeKind, Target

EXAMPLE = Path(__file__).resolve().parents[1] / "fleet-example"

WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata:
  name: {name}
spec:
  source: {{path: src, language: c, entrypoint: main.c}}
  build: {{targets: [executable, unikernel]}}
  deploy: {{target: unikernel{extra}}}
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(EXAMPLE, root)
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    return root


def problems(root: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_fleet(root, **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


def test_fleet_example_compiles_to_its_vms(fleet: Path) -> None:
    desired = load_fleet(fleet, revision="r1")
    assert desired.fleet.name == "example"
    assert sorted(desired.vms) == ["echo-0", "report-0", "web-0", "web-1"]
    web = desired.workloads["web"]
    assert web.deploy.runtime is RuntimeKind.QEMU  # from the fleet defaults
    assert web.source.path == "services/web"
    assert desired.vms["web-1"].artifact == desired.artifacts[("web", Target.MICROVM)]
    assert len(desired.artifacts) == 7
    # The template was rendered from the fleet's variables.
    assert desired.workloads["report"].deploy.env["REPORT_LIMIT"] == "50000"


def test_moving_a_document_changes_nothing_but_where_it_was_declared(fleet: Path) -> None:
    before = load_fleet(fleet)
    (fleet / "elsewhere").mkdir()
    (fleet / "workloads" / "echo.yaml").rename(fleet / "elsewhere" / "renamed.yml")
    after = load_fleet(fleet)
    assert after.vms == before.vms
    assert after.artifacts == before.artifacts
    assert after.workloads["echo"].declared_in == "elsewhere/renamed.yml"


def test_source_change_moves_only_that_workloads_digest(fleet: Path) -> None:
    before = load_fleet(fleet)
    with (fleet / "services" / "echo" / "echo.c").open("a") as source:
        source.write("/* changed */\n")
    after = load_fleet(fleet)
    changed = {k for k in after.artifacts if after.artifacts[k] != before.artifacts[k]}
    assert changed == {("echo", Target.EXECUTABLE), ("echo", Target.UNIKERNEL)}


def test_defaults_merge_under_the_workload_and_env_maps_merge(tiny: Path) -> None:
    (tiny / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        "spec:\n  defaults:\n    deploy: {memoryMiB: 512, env: {A: a, B: b}}\n"
    )
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=", env: {B: own}"))
    deploy = load_fleet(tiny).workloads["w"].deploy
    assert deploy.memory_mib == 512
    assert dict(deploy.env) == {"A": "a", "B": "own"}


def test_undefined_template_variable_is_reported_with_its_file(tiny: Path) -> None:
    (tiny / "w.yaml.j2").write_text(WORKLOAD.format(name="{{ nme }}", extra=""))
    found = problems(tiny)
    assert len(found) == 1
    assert found[0].startswith("w.yaml.j2")
    assert "'nme' is undefined" in found[0]


def test_fleet_document_may_not_be_templated(tiny: Path) -> None:
    (tiny / "f.yaml.j2").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
    )
    assert "plain .yaml" in problems(tiny)[0]


def test_duplicate_keys_report_their_line(tiny: Path) -> None:
    text = WORKLOAD.format(name="w", extra="").replace("metadata:\n", "metadata:\n  name: x\n")
    (tiny / "w.yaml").write_text(text)
    assert problems(tiny) == ["w.yaml:5: duplicate key 'name'"]


def test_files_over_the_size_cap_are_refused_unread(tiny: Path) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra="") + "#" * 2000 + "\n")
    found = problems(tiny, limits=Limits(max_file_bytes=1000))
    assert found[0].startswith("w.yaml: file is")


def test_yaml_that_is_not_a_manifest_is_ignored(tiny: Path) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=""))
    (tiny / "src" / "config.yaml").write_text("some: [tool, config]\n")
    (tiny / "src" / "broken.yml").write_text("a: [unclosed\n")
    assert list(load_fleet(tiny).workloads) == ["w"]


def test_contract_violations_the_schema_cannot_see(tiny: Path) -> None:
    (tiny / "a.yaml").write_text(WORKLOAD.format(name="a", extra=", runtime: process"))
    (tiny / "b.yaml").write_text(
        WORKLOAD.format(name="b", extra="").replace("target: unikernel", "target: microvm")
    )
    (tiny / "c.yaml").write_text(WORKLOAD.format(name="c", extra=", dependsOn: [ghost]"))
    found = problems(tiny)
    assert any("a.yaml" in p and "runtime 'process' runs the executable" in p for p in found)
    assert any("b.yaml" in p and "not in spec.build.targets" in p for p in found)
    assert any("c.yaml" in p and "unknown workload 'ghost'" in p for p in found)


def test_unknown_kind_and_api_version(tiny: Path) -> None:
    (tiny / "x.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n---\n"
        "apiVersion: reconciler/v2\nkind: Workload\nmetadata: {name: g}\n"
    )
    found = problems(tiny)
    assert "x.yaml:1: $.kind: unknown kind 'Gadget'" in found[0]
    assert "x.yaml:5: $.apiVersion: apiVersion must be" in found[1]


def test_cycle_is_named(tiny: Path) -> None:
    (tiny / "a.yaml").write_text(WORKLOAD.format(name="a", extra=", dependsOn: [b]"))
    (tiny / "b.yaml").write_text(WORKLOAD.format(name="b", extra=", dependsOn: [a]"))
    found = problems(tiny)
    assert len(found) == 1
    assert "dependsOn forms a cycle: a -> b -> a" in found[0]


def test_symlinked_source_tree_leaving_the_repo_is_refused(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tiny / "src" / "vendor")
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=""))
    assert any("src/vendor" in p and "leaves the repository" in p for p in problems(tiny))


def test_fleet_path_must_exist(tiny: Path) -> None:
    assert "no such directory" in problems(tiny, subpath="nope")[0]
    assert "leaves the repository" in problems(tiny, subpath="../..")[0]


def test_empty_directory_is_an_empty_fleet(tiny: Path) -> None:
    desired = load_fleet(tiny)
    assert desired.vms == {}
    assert desired.fleet.declared is False


def test_parse_cache_reuses_identical_contents(fleet: Path) -> None:
    cache = ParseCache()
    load_fleet(fleet, cache=cache)
    entries = len(cache._entries)
    load_fleet(fleet, cache=cache)
    assert len(cache._entries) == entries


# -- Nothing under the manifest path is silently skipped -----------------------------------


def test_a_misspelt_api_version_is_an_error_not_a_skipped_file(tiny: Path) -> None:
    (tiny / "a.yaml").write_text(WORKLOAD.format(name="a", extra=""))
    (tiny / "b.yaml").write_text(
        WORKLOAD.format(name="b", extra="").replace("apiVersion:", "apiVerison:")
    )
    assert problems(tiny) == [
        "b.yaml:1: $.apiVerison: no apiVersion; did you mean apiVersion (found 'apiVerison')?"
    ]


def test_yaml_that_is_not_a_manifest_outside_source_directories_is_an_error(tiny: Path) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=""))
    (tiny / "notes.yaml").write_text("owner: team-a\n")
    (tiny / "k8s.yml").write_text("apiVersion: v1\nkind: Service\n---\n- a list\n")
    found = problems(tiny)
    assert found[0] == (
        "k8s.yml:1: $.apiVersion: apiVersion must be 'reconciler/v1alpha1', not 'v1'; if the "
        "file is not a manifest, exclude it in .reconcilerignore or the Fleet's spec.ignore"
    )
    assert found[1].startswith("k8s.yml:4: not a manifest: a list")
    assert found[2].startswith("notes.yaml:1: not a manifest: no apiVersion")
    assert len(found) == 3


def test_a_misspelt_kind_and_field_say_what_was_meant(tiny: Path) -> None:
    (tiny / "a.yaml").write_text(WORKLOAD.format(name="a", extra="").replace("kind:", "kidn:"))
    (tiny / "b.yaml").write_text(WORKLOAD.format(name="b", extra=", preventDestory: true"))
    found = problems(tiny)
    assert found[0] == "a.yaml:1: $.kind: no kind; did you mean kind (found 'kidn')?"
    assert "did you mean 'preventDestroy' (found 'preventDestory')?" in found[1]


def test_ignore_file_and_fleet_ignore_exclude_files_on_purpose(tiny: Path) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=""))
    (tiny / "docs").mkdir()
    (tiny / "docs" / "a.yaml").write_text("owner: team-a\n")
    (tiny / "docs" / "keep.yaml").write_text(WORKLOAD.format(name="k", extra=""))
    (tiny / "ci.yml").write_text("jobs: {}\n")
    (tiny / "deep" / "x").mkdir(parents=True)
    (tiny / "deep" / "x" / "values.yaml").write_text("a: 1\n")
    assert len(problems(tiny)) == 3
    (tiny / ".reconcilerignore").write_text(
        "# not manifests\ndocs/\n!docs/keep.yaml\nvalues.yaml\n"
    )
    # A directory that is ignored stays ignored, as in git: keep.yaml does not come back.
    assert problems(tiny) == [
        "ci.yml:1: not a manifest: no apiVersion (a manifest has apiVersion: "
        "reconciler/v1alpha1); if the file is not a manifest, exclude it in .reconcilerignore "
        "or the Fleet's spec.ignore"
    ]
    (tiny / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        "spec: {ignore: ['/ci.yml', '*.yaml']}\n"
    )
    # spec.ignore adds to the file; the file holding the Fleet is never ignored by it.
    desired = load_fleet(tiny)
    assert desired.fleet.name == "f"
    assert list(desired.workloads) == []  # w.yaml matches '*.yaml' too


def test_source_directories_are_excluded_but_not_documents_that_claim_to_be_manifests(
    tiny: Path,
) -> None:
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=""))
    (tiny / "src" / "tool.yaml").write_text("- any: [tool, config]\n")
    (tiny / "src" / "conf.yaml.j2").write_text("port: {{ not_a_fleet_variable }}\n")
    assert list(load_fleet(tiny).workloads) == ["w"]
    (tiny / "src" / "moved.yaml").write_text(
        WORKLOAD.format(name="m", extra="").replace("apiVersion:", "apiversion:")
    )
    assert problems(tiny) == [
        "src/moved.yaml:1: $.apiversion: no apiVersion; did you mean apiVersion "
        "(found 'apiversion')?"
    ]


def test_a_source_path_of_the_manifest_root_excludes_nothing(tiny: Path) -> None:
    (tiny / "main.c").write_text("int main(void) { return 0; }\n")
    (tiny / "w.yaml").write_text(
        WORKLOAD.format(name="w", extra="").replace("path: src", "path: .")
    )
    (tiny / "stray.yaml").write_text("replicas: 3\n")
    assert problems(tiny)[0].startswith("stray.yaml:1: not a manifest")


# -- Templates are rendered in a child process under limits ---------------------------------

BOMBS = {
    "recursion.yaml.j2": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}\n",
    "memory.yaml.j2": "{{ 'a' * 3000000000 }}\n",
    "loops.yaml.j2": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}\n",
    "output.yaml.j2": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ 'x' * 100000 }}{% endfor %}{% endfor %}\n",
}


@pytest.mark.slow
def test_template_bombs_are_one_line_each_and_the_rest_still_renders(tiny: Path) -> None:
    for name, text in BOMBS.items():
        (tiny / name).write_text(text)
    (tiny / "w.yaml.j2").write_text(WORKLOAD.format(name="{{ 'w' }}", extra=""))
    limits = Limits(template_cpu_seconds=1, template_memory_bytes=64 << 20)
    found = problems(tiny, limits=limits)
    assert found == [
        "loops.yaml.j2: template exceeded its CPU limit (1 s)",
        "memory.yaml.j2: template exceeded its memory limit (64 MiB)",
        "output.yaml.j2: template output exceeds the limit of 1048576 bytes",
        "recursion.yaml.j2: template nests or recurses too deeply (a macro calling itself?)",
    ]
    for bomb in BOMBS:
        (tiny / bomb).unlink()
    assert list(load_fleet(tiny, limits=limits).workloads) == ["w"]


def test_a_template_that_takes_too_long_is_killed_and_the_next_one_renders(tiny: Path) -> None:
    (tiny / "a.yaml.j2").write_text(BOMBS["loops.yaml.j2"])
    (tiny / "b.yaml.j2").write_text(WORKLOAD.format(name="{{ 'b' }}", extra=""))
    # A wall-clock limit under the CPU limit: the parent kills the child, then starts another.
    limits = Limits(template_cpu_seconds=30, template_seconds=0.5)
    assert problems(tiny, limits=limits) == ["a.yaml.j2: template exceeded its time limit (0.5 s)"]


# -- The network pool and bridge are the fleet's own -------------------------------------------


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("{cidr: 0.0.0.0/0}", "'0.0.0.0/0': the pool must be an IPv4 network from /16 to /29"),
        ("{cidr: 10.0.0.0/8}", "'10.0.0.0/8': the pool must be an IPv4 network from /16 to /29"),
        ("{cidr: 10.0.0.0/30}", "the pool must be an IPv4 network from /16 to /29"),
        ("{cidr: 8.8.8.0/24}", "the pool 8.8.8.0/24 is not private"),
        ("{bridge: eth0}", "'eth0': the bridge must be a fleet-owned name"),
        ("{bridge: rcbr-a-very-long1}", "the bridge must be a fleet-owned name"),
    ],
)
def test_network_pools_and_bridges_that_would_take_the_host_are_refused(
    tiny: Path, network: str, message: str
) -> None:
    (tiny / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        f"spec: {{network: {network}}}\n"
    )
    found = problems(tiny)
    assert len(found) == 1
    assert message in found[0]
    assert found[0].startswith("fleet.yaml:4: $.spec.network.")


def test_largest_pool_and_guard_settings_compile(tiny: Path) -> None:
    (tiny / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: f}\n"
        "spec: {network: {cidr: 10.64.0.0/16, bridge: rcbr-prod}, maxDeletions: '10%'}\n"
    )
    (tiny / "w.yaml").write_text(WORKLOAD.format(name="w", extra=", preventDestroy: true"))
    desired = load_fleet(tiny)
    assert desired.fleet.network.cidr == "10.64.0.0/16"
    assert desired.fleet.max_deletions == "10%"
    assert desired.workloads["w"].deploy.prevent_destroy
    assert desired.vms["w-0"].settings["deploy.preventDestroy"] == "true"
