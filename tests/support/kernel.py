"""Debian's cloud kernel for the tests and benchmarks that build or boot images: downloaded once
into a cache shared across runs (``deploy/fetch-debian-kernel.sh``) and registered in a state
directory's kernel registry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.repo import PROJECT

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
