"""What a Python workload's PyInstaller build leaves out, decided on PyInstaller's own module
graph: the standard library's optional parts that the workload's code cannot reach.

    executable.py ──spec──▶ PyInstaller (in the build sandbox) ──module graph──▶ trim ──▶ bundle

PyInstaller collects every module an ``import`` statement reaches, including the ones the
standard library imports only in case (``http.client`` tries ``ssl``; ``hmac`` and ``hashlib``
try ``_hashlib``) and every text codec (``encodings`` finds codecs by name at run time, so all
of them are collected). Those drag in libcrypto and libssl (5.4 MB), the CJK codec extensions
and a hundred code-page tables. Three rules, each a function of the graph:

* **codecs**: only ``KEPT_CODECS`` (the Unicode transformation formats, ASCII, Latin-1 and the
  escape codecs, which the interpreter, ``json``, ``pickle`` and ``http`` use, and the few the
  standard library names itself: ``zipfile``'s CP437, IDNA) stay, plus every
  codec whose name (or an alias of it) is a string constant in the workload's own code, so that
  ``data.decode("shift_jis")`` keeps Shift-JIS. A codec named only at run time (from the
  environment, a file) is missing: ``LookupError: unknown encoding``.
* **TLS** (``ssl``, ``_ssl``, hence libssl and libcrypto): kept when the workload's own code
  imports ``ssl`` or a standard-library module that makes or serves TLS connections: one that
  imports ``ssl`` itself, or one of ``TLS_CLIENTS``, which reach it through another module.
* **OpenSSL hashes** (``_hashlib``): kept with TLS, or when the workload's own code imports
  ``_hashlib``, uses ``pbkdf2_hmac`` or ``scrypt`` (OpenSSL only), or names an algorithm only
  OpenSSL provides. Otherwise ``hashlib`` and ``hmac`` use the interpreter's built-in
  MD5/SHA-1/SHA-2/SHA-3/BLAKE2, as they are written to.

"The workload's own code" is every module of the graph outside the standard library: the
entry script, its modules and its third-party packages (``requests`` importing ``ssl`` keeps
TLS). Whatever becomes unreachable once these edges are cut (the CJK extensions,
``_multibytecodec``) is not collected, and PyInstaller's binary analysis then
collects only the shared libraries the kept extension modules link against.

``Module``, ``decide`` and ``Decision`` are pure and tested directly. ``install`` runs inside
the sandboxed PyInstaller, from the spec file ``executable.py`` writes: this file is copied into
the sandbox and imports nothing of the project.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import sysconfig
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# In the build cache's keys (``matrix.PACKING``): a change of these rules rebuilds the bundles.
RULES_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

KEPT_CODECS = frozenset(
    {
        "aliases",
        "ascii",
        "charmap",
        "cp437",  # zipfile's file names (PyInstaller's own runtime hooks read a zip)
        "idna",  # socket and http.client, for a host name that is not ASCII
        "punycode",  # idna's
        "latin_1",
        "raw_unicode_escape",
        "unicode_escape",
        "utf_8",
        "utf_8_sig",
        "utf_16",
        "utf_16_be",
        "utf_16_le",
        "utf_32",
        "utf_32_be",
        "utf_32_le",
    }
)
# Standard-library modules whose API makes TLS connections through a module that imports ssl
# (xmlrpc.client through http.client, logging.handlers through smtplib); those importing ssl
# themselves are found in the graph.
TLS_CLIENTS = frozenset({"logging.handlers", "xmlrpc.client", "urllib.request"})
TLS_MODULES = ("ssl", "_ssl")
OPENSSL_ONLY_CALLS = frozenset({"pbkdf2_hmac", "scrypt"})


@dataclass(frozen=True)
class Module:
    """One module of the graph as the rules see it."""

    own: bool  # outside the standard library: the workload's code or its packages
    imports: frozenset[str] = frozenset()
    strings: frozenset[str] = frozenset()  # string constants of its code (own modules only)
    names: frozenset[str] = frozenset()  # names and attributes its code uses (own modules only)


@dataclass
class Decision:
    """The modules to cut off, each with the rule that cut it."""

    cut: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        return "".join(f"left out {name}: {why}\n" for name, why in sorted(self.cut.items()))


def codec_module(name: str, aliases: Mapping[str, str]) -> str:
    """The ``encodings`` submodule ``codecs.lookup(name)`` would import (the normalisation of
    ``encodings.search_function``)."""
    normal = "".join(c if c.isalnum() or c == "." else "_" for c in name.lower())
    normal = "_".join(part for part in normal.split("_") if part)
    return aliases.get(normal) or aliases.get(normal.replace(".", "_")) or normal


def decide(
    modules: Mapping[str, Module],
    *,
    aliases: Mapping[str, str],
    openssl_only: frozenset[str],
) -> Decision:
    """What to cut from ``modules`` (the reachable graph) under the three rules."""
    decision = Decision()
    own = [module for module in modules.values() if module.own]
    strings = frozenset().union(*(module.strings for module in own))
    names = frozenset().union(*(module.names for module in own))
    own_imports = frozenset().union(*(module.imports for module in own))

    named_codecs = {codec_module(s, aliases) for s in strings if len(s) < 40}
    for name in modules:
        codec = name.removeprefix("encodings.")
        kept = codec in KEPT_CODECS or codec in named_codecs or name in own_imports
        if codec != name and not kept:
            decision.cut[name] = "a codec the workload's code does not name"

    tls_users = {
        name
        for name, module in modules.items()
        if not module.own and any(m in module.imports for m in TLS_MODULES)
    }
    tls = any(
        imported in TLS_MODULES
        or imported in tls_users
        or imported in TLS_CLIENTS
        or imported.split(".")[0] == "asyncio"
        for imported in own_imports
    )
    if not tls:
        for name in TLS_MODULES:
            if name in modules:
                decision.cut[name] = "TLS, which the workload's code does not use"
    hashes = (
        tls
        or "_hashlib" in own_imports
        or bool(names & OPENSSL_ONLY_CALLS)
        or bool({s.lower() for s in strings if len(s) < 40} & openssl_only)
    )
    if not hashes and "_hashlib" in modules:
        decision.cut["_hashlib"] = "OpenSSL's hashes: the built-in ones cover the workload's"
    return decision


# Everything below runs inside the sandboxed PyInstaller (``install`` is called by the spec).


def _code_constants(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_constants(const)


def _stdlib_roots() -> tuple[str, ...]:
    roots = {os.path.dirname(os.__file__), sysconfig.get_paths()["stdlib"]}
    return tuple(os.path.realpath(root) + os.sep for root in roots)


def _is_own(node: Any, roots: tuple[str, ...], pyinstaller: str) -> bool:
    kind = type(node).__name__
    if kind == "Script":
        return True
    filename = getattr(node, "filename", None)
    if kind in {"MissingModule", "BuiltinModule", "ExcludedModule", "AliasNode"} or not filename:
        return False
    path = os.path.realpath(str(filename))
    if path.startswith(pyinstaller):
        return False
    parts = set(path.split(os.sep))
    in_stdlib = path.startswith(roots) and not parts & {"site-packages", "dist-packages"}
    return not in_stdlib


def _view(graph: Any, top: Any) -> tuple[dict[str, Module], dict[str, Any]]:
    roots = _stdlib_roots()
    pyinstaller = os.path.realpath(
        os.path.dirname(str(importlib.import_module("PyInstaller").__file__))
    )
    modules: dict[str, Module] = {}
    nodes: dict[str, Any] = {}
    for node in graph.iter_graph(start=top):
        name = str(node.identifier)
        own = _is_own(node, roots, pyinstaller)
        imports = frozenset(
            str(n.identifier)
            for n in graph.outgoing(node)
            if n is not None and (node is not top or _is_import(graph, node, n))
        )
        strings: set[str] = set()
        names: set[str] = set()
        code = getattr(node, "code", None)
        if own and isinstance(code, types.CodeType):
            for each in _code_constants(code):
                strings.update(c for c in each.co_consts if isinstance(c, str))
                names.update(each.co_names)
        modules[name] = Module(own, imports, frozenset(strings), frozenset(names))
        nodes[name] = node
    return modules, nodes


def _is_import(graph: Any, importer: Any, imported: Any) -> bool:
    """Whether an edge is an import statement (PyInstaller links the script to every module of
    its ``base_library.zip``, every codec among them, with edges that are not)."""
    return type(graph.edgeData(importer, imported)).__name__ == "DependencyInfo"


def _openssl_only() -> frozenset[str]:
    return frozenset(a.lower() for a in hashlib.algorithms_available) - frozenset(
        a.lower() for a in hashlib.algorithms_guaranteed
    )


def install(report: str) -> None:
    """Make PyInstaller cut, right after its post-graph hooks, what ``decide`` says, and write
    the decisions to ``report``. Cutting is removing the edges into a module but the workload's own
    imports of it: what is no longer reachable from the script is not collected."""
    aliases = importlib.import_module("encodings.aliases").aliases
    analysis = importlib.import_module("PyInstaller.depend.analysis")
    graph_class = analysis.PyiModuleGraph
    original = getattr(graph_class, "process_post_graph_hooks", None)
    if original is None:
        sys.exit("this PyInstaller has no post-graph hooks; the bundle cannot be trimmed")

    def process_post_graph_hooks(graph: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(graph, *args, **kwargs)
        top = graph._top_script_node
        modules, nodes = _view(graph, top)
        decision = decide(modules, aliases=aliases, openssl_only=_openssl_only())
        for name in decision.cut:
            target = nodes[name]
            for importer in list(graph.incoming(target)):
                if importer is None:
                    continue
                seen = modules.get(str(importer.identifier), Module(own=False))
                if not (seen.own and name in seen.imports):
                    graph.removeReference(importer, target)
        with open(report, "w") as out:
            out.write(decision.report())
        return result

    graph_class.process_post_graph_hooks = process_post_graph_hooks
