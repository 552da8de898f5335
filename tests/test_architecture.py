"""The layer rules of the README's architecture section, checked on the import graph.

The layers are an ordered list, top first, in the style of import-linter's "layers" contract: a
module may import the layers below its own, never one above. The names on one line are
independent siblings, which do not import each other either (the planner knows nothing of the
state store, a runtime nothing of the builders). Every module of the project belongs to exactly
one layer, so a new package has to be placed before it can be imported from anywhere.

A few rules are not about order and are stated apart: which module may use which third-party
edge (git, pyroute2, I/O in the pure core), what the HTTP layer sees, and what leader election
knows. The check reads the source with ``ast`` (no import side effects) and reports every
violation at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reconciler", "builders", "runtime")

# Top first. A name stands for the module and everything below it; "reconciler" alone is the
# package's own __init__ (its version), not the whole control plane.
LAYERS: list[tuple[str, ...]] = [
    ("reconciler.__main__",),
    ("reconciler.cli",),  # argument parsing; the one place errors become exit codes
    ("reconciler.daemon",),  # the continuous loop, its triggers and its HTTP view
    (
        "reconciler.pipeline",  # revision -> plan
        "reconciler.execution",  # plan -> effects
        "reconciler.notify",  # notifications and commit statuses from the outbox
        "reconciler.fleet_hosts",  # registry records -> placement's HostFacts (lost or not)
    ),
    (
        "reconciler.source",  # the only git
        "reconciler.manifests",
        "reconciler.planning",  # pure
        "reconciler.render",  # pure
        "reconciler.state",
        "builders",  # the only build tools
        "runtime",  # the only VMMs and netlink
    ),
    (
        "reconciler.leadership",  # leases, terms and the fence every write checks
        "reconciler.secrets",  # decrypting the fleet's sops/age secrets; keyed digests
        "reconciler.forge",  # GitHub/GitLab REST: PR comments, commit statuses
    ),
    ("reconciler.guest_config",),  # what the guest init reads, shared by runtimes and execution
    ("reconciler.noop_rows",),  # a plan's no-op rows, kept as runs: planning makes, render reads
    (
        "reconciler.model",  # the pure types every layer shares
        "reconciler.guest_values",
        "reconciler.build_flags",
        "reconciler.redact",
        "reconciler.formatting",  # how revisions and durations read
        "reconciler.log_context",  # the fields of a cycle's log lines
        "reconciler.lifetimes",  # with-blocks for what holds a resource
        "reconciler.http_client",  # outgoing requests follow no redirect
        "reconciler.defaults",  # the state directory and age key a host reads by default
        "reconciler",
    ),
    ("reconciler.errors",),  # the one error tree
]
ROOT_ONLY = {"reconciler"}  # entries that stand for the package's __init__ alone

# (modules the rule applies to, forbidden import prefixes, why): what the order does not say.
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("reconciler.model", "reconciler.planning", "reconciler.render"),
        ("git", "subprocess", "pyroute2", "sqlite3", "socket", "os", "shutil"),
        "planning is pure: no I/O",
    ),
    (
        ("reconciler.manifests",),
        ("git", "subprocess", "pyroute2"),
        "manifests read a checked-out directory; their one child process is multiprocessing's",
    ),
    (
        ("reconciler", "builders", "runtime"),
        ("git",),
        "only reconciler.source touches git",
    ),
    (
        ("reconciler", "builders"),
        ("pyroute2",),
        "only runtime/ touches netlink",
    ),
    (
        (
            "reconciler.daemon.http_api",
            "reconciler.daemon.status_page",
            "reconciler.daemon.metrics",
            "reconciler.daemon.webhooks",
        ),
        (
            "reconciler.source",
            "reconciler.state",
            "reconciler.execution",
            "reconciler.pipeline",
            "reconciler.leadership",
            "builders",
            "runtime",
            "sqlite3",
            "subprocess",
        ),
        "the HTTP layer shows the DaemonView; it never reads the store, git or runtimes itself",
    ),
    (
        ("reconciler.leadership",),
        (
            "reconciler.execution",
            "reconciler.daemon",
            "reconciler.pipeline",
            "reconciler.state",
            "reconciler.cli",
            "builders",
            "runtime",
        ),
        "leader election knows leases and terms, nothing of what the leader does",
    ),
]

EXEMPT = {"git": ("reconciler.source",)}


def _modules() -> dict[str, set[str]]:
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
            imports[module] = found
    return imports


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _place(module: str) -> tuple[int, str] | None:
    """``(layer index, the entry of that layer)`` holding ``module``; the longest entry wins."""
    matches = [
        (len(entry), index, entry)
        for index, layer in enumerate(LAYERS)
        for entry in layer
        if module == entry or (entry not in ROOT_ONLY and module.startswith(entry + "."))
    ]
    if not matches:
        return None
    _, index, entry = max(matches)
    return index, entry


def test_layers_are_an_order() -> None:
    modules = _modules()
    violations = []
    for module, imported in sorted(modules.items()):
        home = _place(module)
        assert home is not None, f"{module} belongs to no layer: place it in LAYERS"
        for name in sorted(imported):
            if not _within(name, PACKAGES):
                continue
            there = _place(name)
            if there is None or there[1] == home[1]:
                continue  # an unknown name fails above when it is a module; inside one entry
            if there[0] < home[0]:
                violations.append(f"{module} imports {name}, a layer above it ({there[1]})")
            elif there[0] == home[0]:
                violations.append(f"{module} imports {name}: independent siblings ({there[1]})")
    assert violations == [], "\n".join(violations)


def test_every_layer_names_a_module() -> None:
    modules = _modules()
    for layer in LAYERS:
        for entry in layer:
            assert any(m == entry or m.startswith(entry + ".") for m in modules), entry


def test_rules_beyond_the_order_hold() -> None:
    violations = []
    for module, imported in sorted(_modules().items()):
        for scope, forbidden, why in RULES:
            if not _within(module, scope):
                continue
            for name in sorted(imported):
                if not _within(name, forbidden):
                    continue
                exempt = [e for f, e in EXEMPT.items() if _within(name, (f,))]
                if exempt and _within(module, exempt[0]):
                    continue
                if _within(name, (module,)):
                    continue
                violations.append(f"{module} imports {name}: {why}")
    assert violations == [], "\n".join(violations)


def test_rules_see_the_packages() -> None:
    modules = _modules()
    assert "reconciler.planning.diff" in modules
    assert "reconciler.model" in modules
    assert _place("reconciler.planning.diff") == (4, "reconciler.planning")
    assert _place("reconciler") == (8, "reconciler")
    assert _place("reconciler.daemon.loop") == (2, "reconciler.daemon")
