"""``build``, ``kernel`` and ``artifacts``: the build matrix and what it keeps.

``build`` loads the fleet at a revision (the same pipeline as ``diff``), then builds every listed
target of every workload through the content-addressed cache. Exit 1 when anything failed.
With ``--trusted-key`` nothing is built from a commit that is not signed by a trusted key: a
build runs the repository's build steps, as root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from builders.cache import ArtifactCache
from builders.kernel_build import DEFAULT_CACHE, DEFAULT_PROFILES, PROFILES, KernelCache
from builders.kernel_build import register as register_built
from builders.kernels import KernelRegistry
from builders.matrix import BuildEvent, MatrixBuilder
from reconciler.cli.environment import read_environment
from reconciler.cli.options import (
    add_repo_options,
    add_state_option,
    revision_loader,
    state_dir,
    store_location,
)
from reconciler.errors import EXIT_ERROR, EXIT_OK
from reconciler.formatting import short_sha
from reconciler.model import BuildStatus, Target, short_digest
from reconciler.state import open_state_store


def register(commands: Any) -> None:
    build = commands.add_parser("build", help="build the artifacts of a revision's workloads")
    add_repo_options(build)
    add_state_option(build)
    add_cache_option(build)
    build.add_argument("--rev", default=None, help="revision to build (default: the ref)")
    build.add_argument(
        "--target",
        action="append",
        choices=[t.value for t in Target],
        default=None,
        help="only this target (repeatable)",
    )
    build.add_argument("--format", choices=["text", "json"], default="text")
    build.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="only these workloads")
    build.set_defaults(handler=run_build)

    kernel = commands.add_parser("kernel", help="manage the kernel registry")
    kernel_commands = kernel.add_subparsers(dest="kernel_command", metavar="ACTION")
    kernel_commands.required = True
    imp = kernel_commands.add_parser("import", help="import a bzImage, ELF vmlinux or kernel .deb")
    add_state_option(imp)
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", default=None, help="name to register it under")
    imp.set_defaults(handler=run_kernel_import)
    build_kernel = kernel_commands.add_parser(
        "build", help="build (or reuse) a specialised kernel from linux-source-6.1 and register it"
    )
    add_state_option(build_kernel)
    build_kernel.add_argument(
        "--profile",
        action="append",
        choices=PROFILES,
        default=None,
        help=f"kernel profile, repeatable (default: {' and '.join(DEFAULT_PROFILES)})",
    )
    build_kernel.add_argument(
        "--kernel-cache",
        type=Path,
        default=None,
        help=f"where built kernels are kept (default: $RECONCILER_KERNEL_CACHE or {DEFAULT_CACHE})",
    )
    build_kernel.set_defaults(handler=run_kernel_build)
    ls = kernel_commands.add_parser("ls", help="list registered kernels")
    add_state_option(ls)
    ls.set_defaults(handler=run_kernel_ls)

    artifacts = commands.add_parser("artifacts", help="inspect and clean the artifact cache")
    artifact_commands = artifacts.add_subparsers(dest="artifacts_command", metavar="ACTION")
    artifact_commands.required = True
    for name, handler, help_text in (
        ("ls", run_artifacts_ls, "list cached artifacts"),
        ("gc", run_artifacts_gc, "remove artifacts no VM in the state store runs"),
    ):
        sub = artifact_commands.add_parser(name, help=help_text)
        add_state_option(sub)
        add_cache_option(sub)
        sub.set_defaults(handler=handler)


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="artifact cache (default: $RECONCILER_CACHE_DIR or <state dir>/artifacts)",
    )


def cache_dir(args: argparse.Namespace) -> Path:
    chosen: Path | None = getattr(args, "cache_dir", None)
    if chosen is not None:
        return chosen
    return read_environment().cache_dir or state_dir(args) / "artifacts"


def kernel_registry(args: argparse.Namespace) -> KernelRegistry:
    return KernelRegistry(state_dir(args) / "kernels")


def run_build(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    loader = revision_loader(args, decrypt=False)
    revision = loader.resolve(args.rev)
    desired = loader.load(revision)
    checkout = loader.source.checkout(revision)

    def progress(event: BuildEvent) -> None:
        label = f"{event.workload}/{event.target.value}"
        if event.phase == "start":
            console.print(f"[bold]building[/] {label} ...")
        elif event.phase == "failed":
            console.print(f"[red]failed[/]   {label}: {event.message}")
        else:
            console.print(f"[green]{event.phase:<8}[/] {label} {event.message}")

    builder = MatrixBuilder(
        checkout,
        ArtifactCache(cache_dir(args)),
        kernel_registry(args),
        progress if args.format == "text" else None,
    )
    targets = {Target(t) for t in args.target} if args.target else None
    results = builder.build(desired, targets=targets, workloads=set(args.workloads) or None)
    if args.format == "json":
        for r in results:
            print(
                json.dumps(
                    {
                        "workload": r.workload,
                        "target": r.target.value,
                        "digest": r.digest,
                        "status": r.status,
                        "seconds": round(r.seconds, 3),
                        "error": r.error or None,
                    }
                )
            )
    else:
        counts = {s: sum(r.status == s for r in results) for s in BuildStatus}
        total = sum(r.seconds for r in results)
        print(
            ", ".join(f"{counts[s]} {s}" for s in BuildStatus)
            + f" ({total:.1f} s) for revision {short_sha(revision)}"
        )
    return EXIT_ERROR if any(r.status == BuildStatus.FAILED for r in results) else EXIT_OK


def run_kernel_import(args: argparse.Namespace) -> int:
    kernel = kernel_registry(args).import_path(args.path, name=args.name)
    modules = ", ".join(f"{k}={v}" for k, v in sorted(kernel.features.items()))
    print(f"imported {kernel.name} ({kernel.version}, {kernel.format}) as {kernel.digest}")
    print(f"features: {modules}")
    return EXIT_OK


def run_kernel_build(args: argparse.Namespace) -> int:
    chosen: Path | None = args.kernel_cache
    cache = KernelCache(chosen or read_environment().kernel_cache or DEFAULT_CACHE)
    registry = kernel_registry(args)
    for profile in args.profile or DEFAULT_PROFILES:
        print(f"kernel {profile}: building or reusing in {cache.root} ...", file=sys.stderr)
        built, fresh = cache.build(profile, hidden=[state_dir(args)])
        kernel = register_built(registry, built)
        how = f"built in {built.provenance['build_seconds']} s" if fresh else "cached"
        print(f"{kernel.name} ({kernel.version}, {kernel.format}, {how}) as {kernel.digest}")
    return EXIT_OK


def run_kernel_ls(args: argparse.Namespace) -> int:
    kernels = kernel_registry(args).list()
    if not kernels:
        print(
            "no kernel registered: run `make kernel` or `reconciler kernel import PATH`",
            file=sys.stderr,
        )
        return EXIT_OK
    print(f"{'NAME':<36} {'VERSION':<26} {'FORMAT':<12} {'PROFILE':<10} DIGEST")
    for k in kernels:
        print(
            f"{k.name:<36} {k.version:<26} {k.format:<12} {k.profile or '-':<10} "
            f"{short_digest(k.digest)}"
        )
    return EXIT_OK


def run_artifacts_ls(args: argparse.Namespace) -> int:
    entries = ArtifactCache(cache_dir(args)).entries()
    rows = sorted(
        ((str(e.manifest["workload"]), str(e.manifest["target"]), e) for e in entries),
        key=lambda row: row[:2],
    )
    # Columns as wide as their longest value: workload names and targets such as a Python
    # workload's ``executable-onedir`` bundle outgrow any fixed width.
    name = max([len("WORKLOAD"), *(len(r[0]) for r in rows)])
    target = max([len("TARGET"), *(len(r[1]) for r in rows)])
    print(f"{'WORKLOAD':<{name}} {'TARGET':<{target}} {'INPUT':<13} {'SIZE':>10}  BUILT")
    for workload, kind, e in rows:
        size = sum(f["size"] for f in e.manifest.get("files", {}).values())
        print(
            f"{workload:<{name}} {kind:<{target}} {short_digest(e.input_digest):<13} "
            f"{size / 1e6:>8.1f}MB  {e.manifest.get('seconds', 0):.1f} s"
        )
    return EXIT_OK


def run_artifacts_gc(args: argparse.Namespace) -> int:
    """Keep the artifacts the state store's VMs run; remove every other entry. That includes
    the executables and Python bundles the kept images were built from: an image carries its
    own copy of the program (``builders.images``), so it boots without them, and they are only
    needed to build an image again, which rebuilds them (a kept image is a cache hit)."""
    store = open_state_store(store_location(args))
    try:
        keep = {vm.artifact_digest for vm in store.observed().vms.values()}
    finally:
        store.close()
    removed = ArtifactCache(cache_dir(args)).gc(keep)
    freed = sum(sum(f["size"] for f in e.manifest.get("files", {}).values()) for e in removed)
    print(
        f"removed {len(removed)} artifacts ({freed / 1e6:.1f} MB); kept what "
        f"{len(keep)} running artifact digests need"
    )
    return EXIT_OK
