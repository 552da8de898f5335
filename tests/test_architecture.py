"""The layer rules of the README's architecture section, checked on the import graph.

Each rule names a set of modules and the imports they must not make. The check reads the source
with ``ast`` (no import side effects) and reports every violation at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reconciler", "builders", "runtime")

# (modules the rule applies to, forbidden import prefixes, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("reconciler.model", "reconciler.planning", "reconciler.render"),
        (
            "git",
            "subprocess",
            "pyroute2",
            "sqlite3",
            "socket",
            "os",
            "shutil",
            "reconciler.source",
            "reconciler.state",
            "reconciler.manifests",
            "reconciler.execution",
            "reconciler.cli",
            "builders",
            "runtime",
        ),
        "planning is pure: no I/O, and it knows only the model",
    ),
    (
        ("reconciler.manifests",),
        (
            "git",
            "subprocess",
            "pyroute2",
            "reconciler.source",
            "reconciler.execution",
            "reconciler.cli",
            "builders",
            "runtime",
        ),
        "manifests read a checked-out directory; only the source layer touches git",
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
        ("builders", "runtime"),
        ("reconciler.cli", "reconciler.execution", "reconciler.daemon"),
        "backends do not call back into the control plane",
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
        ("reconciler.execution", "reconciler.daemon", "reconciler.cli", "builders", "runtime"),
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


def test_layer_rules_hold() -> None:
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
    assert violations == []


def test_rules_see_the_packages() -> None:
    modules = _modules()
    assert "reconciler.planning.diff" in modules
    assert "reconciler.model" in modules
