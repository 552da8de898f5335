"""Finding build tools, and the versions that go into every artifact's cache key.

A missing tool is a ``ToolMissingError`` naming the Debian package that provides it, raised
before any work starts. Running a tool goes through ``run`` so that its output lands in the
build log and a failure carries the log's tail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from reconciler.errors import BuildError, ToolMissingError

APT_PACKAGE = {
    "gcc": "gcc libc6-dev",
    "musl-gcc": "musl-tools",
    "mkfs.ext4": "e2fsprogs",
    "busybox": "busybox-static",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "make": "make",
    "ldd": "libc-bin",
    "qemu-system-x86_64": "qemu-system-x86",
    "bwrap": "bubblewrap",
}


def require(tool: str) -> str:
    """The path of ``tool``, or ``ToolMissingError`` saying how to install it."""
    found = shutil.which(tool)
    if found is None:
        package = APT_PACKAGE.get(tool, tool)
        raise ToolMissingError(tool, f"install it with `apt-get install {package}`")
    return found


def require_pyinstaller() -> None:
    try:
        import PyInstaller  # noqa: F401, PLC0415 (only the python builder needs it)
    except ImportError as exc:
        raise ToolMissingError(
            "PyInstaller", "install it with `pip install 'reconciler[build]'`"
        ) from exc


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | Path],
    *,
    log: Path,
    cwd: Path | None = None,
    what: str,
    timeout: float = 900,
) -> None:
    """Run one build step, appending its output to ``log``; a failure is a ``BuildError``
    whose message ends with the tail of the output."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(str(a) for a in argv)}\n")
        out.flush()
        try:
            result = subprocess.run(
                [str(a) for a in argv],
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"{what} took longer than {timeout:g} s; see {log}") from exc
        except OSError as exc:
            raise BuildError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {result.returncode}):\n" + tail(log.read_text(errors="replace"))
        )


@cache
def version_of(tool: str) -> str:
    """First line of ``tool --version`` (or ``-V``), for cache keys; ``missing`` if absent."""
    path = shutil.which(tool)
    if path is None:
        return "missing"
    for flag in ("--version", "-V"):
        try:
            result = subprocess.run(
                [path, flag], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (result.stdout or result.stderr).strip()
        if text:
            return text.splitlines()[0]
    return "unknown"


@cache
def pyinstaller_version() -> str:
    try:
        import PyInstaller  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return "missing"
    return str(PyInstaller.__version__)


def python_version() -> str:
    return sys.version.split()[0]
