"""Kernels for the tests and benchmarks that build or boot images: Debian's cloud kernel,
downloaded once into a cache shared across runs (``deploy/fetch-debian-kernel.sh``), and the
specialised kernels built from ``linux-source-6.1`` once per machine into the kernel cache that
``make kernel`` and ``.ci/run`` fill; both registered in a state directory's kernel registry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from support.repo import PROJECT

if TYPE_CHECKING:
    from builders.kernels import Kernel

TEST_CACHE = Path(
    os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")
)


def fetch_kernel_deb(dest: Path = TEST_CACHE / "kernels") -> Path:
    """The ``linux-image-*-cloud-amd64`` package in ``dest`` (fetched when it is not there)."""
    script = PROJECT / "deploy" / "fetch-debian-kernel.sh"
    result = subprocess.run(
        ["bash", str(script), str(dest)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"cannot fetch the Debian kernel: {result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def register_kernel(state: Path, deb: Path | None = None) -> Path:
    """``state`` with Debian's kernel in its registry, as ``reconciler kernel import`` does."""
    from builders.kernels import KernelRegistry

    KernelRegistry(state / "kernels").import_path(deb or fetch_kernel_deb())
    return state


def debian_kernel(state: Path) -> Kernel:
    """The general-purpose (Debian) kernel registered in ``state``, beside the specialised ones
    that images pick by default: for the tests that compare with it or need its modules."""
    from builders.kernels import KernelRegistry

    general = [k for k in KernelRegistry(state / "kernels").list() if k.profile is None]
    if not general:
        raise AssertionError(f"no general-purpose kernel registered in {state}")
    return general[-1]


def kernel_cache_dir() -> Path:
    """The machine's kernel cache, the one ``reconciler kernel build`` uses by default."""
    from builders.kernel_build import DEFAULT_CACHE

    return Path(os.environ.get("RECONCILER_KERNEL_CACHE") or DEFAULT_CACHE)


def register_specialised(state: Path, profiles: tuple[str, ...] = ("microvm", "unikernel")) -> Path:
    """``state`` with the specialised kernels of ``profiles`` registered, built first if this
    machine has not built them yet (that takes long: CI builds them before the tests)."""
    from builders.kernel_build import KernelCache, register
    from builders.kernels import KernelRegistry

    cache = KernelCache(kernel_cache_dir())
    registry = KernelRegistry(state / "kernels")
    for profile in profiles:
        built, _ = cache.build(profile, hidden=[state])
        register(registry, built)
    return state
