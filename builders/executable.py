"""The ``executable`` target: a workload's source turned into one self-contained file.

* python: PyInstaller ``--onefile`` in an isolated virtual environment (with the workload's
  ``requirements.txt`` or ``pyproject.toml`` installed into it); needs only glibc on the target.
* c: every ``*.c`` of the source directory compiled and linked statically (musl-gcc when
  installed, else ``gcc -static``); ``build.options.cflags`` adds flags.
* binary: a prebuilt static x86-64 ELF inside the repository, taken as is after checking it.

The same file runs on the host (the ``process`` runtime) and inside the unikernel and microVM
images, which add the libraries it needs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from builders.toolchain import require, require_pyinstaller, run
from reconciler.errors import BuildError
from reconciler.model import Language


def build_executable(
    language: Language,
    source_dir: Path,
    *,
    entrypoint: str,
    options: Mapping[str, str],
    output: Path,
    log: Path,
) -> None:
    """Write the executable of ``source_dir`` to ``output``; failures raise ``BuildError``."""
    if language is Language.C:
        _build_c(source_dir, entrypoint, options, output, log)
    elif language is Language.PYTHON:
        _build_python(source_dir, entrypoint, output, log)
    else:
        _take_binary(source_dir / entrypoint, output)
    os.chmod(output, 0o755)


def _build_c(
    source_dir: Path, entrypoint: str, options: Mapping[str, str], output: Path, log: Path
) -> None:
    compiler = shutil.which("musl-gcc") or require("gcc")
    sources = sorted(str(p.relative_to(source_dir)) for p in source_dir.rglob("*.c"))
    if entrypoint not in sources:
        sources.insert(0, entrypoint)
    flags = shlex.split(options.get("cflags", ""))
    run(
        [compiler, "-static", "-O2", *flags, "-o", output, *sources],
        cwd=source_dir,
        log=log,
        what=f"compiling {entrypoint}",
    )


def _build_python(source_dir: Path, entrypoint: str, output: Path, log: Path) -> None:
    require_pyinstaller()
    with tempfile.TemporaryDirectory(prefix="reconciler-pyi-") as tmp:
        work = Path(tmp)
        python = sys.executable
        requirements = source_dir / "requirements.txt"
        if requirements.is_file() or (source_dir / "pyproject.toml").is_file():
            # The workload's own dependencies go into a fresh environment that can see the
            # builder's PyInstaller but keeps the workload's packages to itself.
            venv = work / "venv"
            run(
                [sys.executable, "-m", "venv", "--system-site-packages", venv],
                log=log,
                what="creating the build environment",
            )
            python = str(venv / "bin" / "python")
            target = ["-r", str(requirements)] if requirements.is_file() else [str(source_dir)]
            run(
                [python, "-m", "pip", "install", "--quiet", *target],
                log=log,
                what="installing the workload's requirements",
            )
        name = output.name
        run(
            [
                python,
                "-m",
                "PyInstaller",
                "--onefile",
                "--noconfirm",
                "--clean",
                "--log-level",
                "WARN",
                "--name",
                name,
                "--distpath",
                work / "dist",
                "--workpath",
                work / "build",
                "--specpath",
                work,
                "--paths",
                source_dir,
                source_dir / entrypoint,
            ],
            cwd=work,
            log=log,
            what=f"PyInstaller on {entrypoint}",
        )
        shutil.move(work / "dist" / name, output)


def is_static_elf(data: bytes) -> bool | None:
    """True for a static x86-64 ELF, False for a dynamic one, None if not x86-64 ELF at all."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or struct.unpack_from("<H", data, 18)[0] != 62:
        return None
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(data):
            break
        if struct.unpack_from("<I", data, offset)[0] == 3:  # PT_INTERP
            return False
    return True


def _take_binary(path: Path, output: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read the binary {path}: {exc.strerror}") from exc
    static = is_static_elf(data)
    if static is None:
        raise BuildError(f"{path.name} is not an x86-64 ELF executable")
    if not static:
        raise BuildError(
            f"{path.name} is dynamically linked; the binary language needs a "
            "static executable (link with -static)"
        )
    shutil.copyfile(path, output)


def shared_libraries(executable: Path) -> list[Path]:
    """The shared libraries a dynamic executable needs on the target, including what ``ldd``
    does not show: PyInstaller's bootloader loads libpython after unpacking, and libpython
    needs the rest of glibc (libm, libdl, libpthread, librt, libutil) without ``ldd`` seeing it.
    """
    if is_static_elf(executable.read_bytes()[:65536]):
        return []
    ldd = require("ldd")
    result = subprocess.run([ldd, str(executable)], capture_output=True, text=True, check=False)
    found: set[Path] = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                found.add(Path(part))
    libc = next((p for p in found if p.name.startswith("libc.so")), None)
    if libc is not None:
        for name in (
            "libm.so.6",
            "libdl.so.2",
            "libpthread.so.0",
            "librt.so.1",
            "libutil.so.1",
            "libz.so.1",
        ):
            candidate = libc.parent / name
            if candidate.exists():
                found.add(candidate)
    return sorted(found)
