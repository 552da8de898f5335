"""The ``executable`` target: a workload's source turned into one self-contained file, and the
one-directory bundle the images carry instead.

* python: PyInstaller; a workload with a ``requirements.txt`` or a ``pyproject.toml`` first gets
  them installed into an isolated build environment that sees the builder's PyInstaller but
  keeps the workload's packages to itself. Needs only glibc on the target. Two layouts
  (``Layout``): the ``executable`` target is ``--onefile``, one self-extracting file, because
  the process runtime runs one read-only file and its sandbox mounts just that file; the
  unikernel and microvm images carry ``--onedir`` instead (the bootloader, libpython and the
  modules as plain files), because in a VM a one-file executable is unpacked twice at every
  boot: by the kernel out of the initramfs, then by itself into ``/tmp``. Both are stripped
  (``--strip``: the interpreter's debug information was most of its size, 17 MB of the web
  service's one-file executable, now 7.6 MB). PyInstaller runs from a spec written here
  that also cuts the standard library's optional parts the workload's code cannot reach
  (``bundle_trim``: TLS and libcrypto, OpenSSL's hashes, codecs nobody names): the web
  service's bundle went from 18.4 MB to 11.3 MB. Both layouts get the same cuts, so a workload
  behaves the same on every target.
* c: every ``*.c`` of the source directory compiled and linked statically (musl-gcc when
  installed, else ``gcc -static``); ``build.options.cflags`` adds compiler flags and
  ``build.options.ldflags`` libraries, both checked against ``reconciler.build_flags``.
* binary: a prebuilt static x86-64 ELF inside the repository, taken as is after checking it.

Building runs the commit's code (a ``setup.py``, a build backend, headers of its choosing), so
every step that reads the source runs in the build sandbox (``builders/sandbox.py``) on a copy
of the source tree, and the output is taken back without following links. The same file runs on
the host (the ``process`` runtime) and inside the unikernel and microVM images, which add the
libraries it needs.
"""

from __future__ import annotations

import enum
import os
import posixpath
import shutil
import site
import stat
import struct
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from builders import bundle_trim
from builders.sandbox import (
    BUILD_ROOT,
    NETWORK_ENV,
    BuildSandbox,
    Step,
    copy_tree_in,
    network_allowed,
    take_output,
)
from builders.toolchain import require, require_pyinstaller
from reconciler.build_flags import build_input_problems, checked_flags
from reconciler.errors import BuildError
from reconciler.model import Language

SOURCE = f"{BUILD_ROOT}/src"  # the copy of the source tree, inside the sandbox
OUTPUT = f"{BUILD_ROOT}/out/workload"
TRIM_MODULE = "_reconciler_bundle_trim"  # bundle_trim's name in the sandbox, unlike a workload's
TRIM_REPORT = f"{BUILD_ROOT}/pyinstaller/trimmed.txt"
OFFLINE_HINT = (
    f"Builds have no network. If the workload's requirements need a package index, allow it "
    f"with {NETWORK_ENV}=1 in the reconciler's environment (the build then shares the host's "
    "network), or vendor them in the source tree."
)


# Run by the builder's own Python inside the sandbox: an empty environment over the system
# site-packages whose .pth file adds the builder's packages (PyInstaller, pip) after its own.
class Layout(enum.Enum):
    ONEFILE = "onefile"  # one self-extracting file: the executable target (process runtime)
    ONEDIR = "onedir"  # a directory with ``workload`` at its top: what the images carry


_MAKE_VENV = """\
import os, sys, venv
target, *paths = sys.argv[1:]
venv.create(target, system_site_packages=True, with_pip=False, symlinks=True)
version = "python%d.%d" % sys.version_info[:2]
with open(os.path.join(target, "lib", version, "site-packages", "_builder.pth"), "w") as pth:
    pth.write("".join(p + "\\n" for p in paths))
"""


def build_executable(
    language: Language,
    source_dir: Path,
    *,
    entrypoint: str,
    options: Mapping[str, str],
    output: Path,
    log: Path,
    hidden: Sequence[Path] = (),
    network: bool | None = None,
    layout: Layout = Layout.ONEFILE,
) -> None:
    """Write the executable of ``source_dir`` to ``output``; failures raise ``BuildError``.

    ``hidden``: host directories the build must not see (the state directory, the cache);
    ``network``: whether installing requirements may reach a package index (default: the
    operator's ``RECONCILER_BUILD_NETWORK``); ``layout``: for Python, ``ONEDIR`` makes
    ``output`` a directory holding ``workload`` and what it loads (C and binary workloads are
    one static file either way)."""
    # Validation refused these already; checked again because the builder is the last line.
    problems = build_input_problems(language.value, entrypoint, options)
    if problems:
        where, message = problems[0]
        raise BuildError(f"spec.{'.'.join(where)}: {message}")
    if network is None:
        network = network_allowed()
    if language is Language.BINARY:
        _take_binary(source_dir, entrypoint, output)
    else:
        with tempfile.TemporaryDirectory(prefix="reconciler-build-") as tmp:
            work = Path(tmp)
            sandbox = BuildSandbox(work, hidden=hidden, network=network)
            copy_tree_in(source_dir, work / "src")
            if language is Language.C:
                _build_c(sandbox, entrypoint, options, log)
                take_output(work, "out/workload", output)
            elif layout is Layout.ONEDIR:
                name = _build_python(sandbox, entrypoint, log, layout)
                take_tree(work / "dist" / name, output)
                return
            else:
                name = _build_python(sandbox, entrypoint, log, layout)
                take_output(work, f"dist/{name}", output)
    os.chmod(output, 0o755)


def _build_c(sandbox: BuildSandbox, entrypoint: str, options: Mapping[str, str], log: Path) -> None:
    compiler = shutil.which("musl-gcc") or require("gcc")
    cflags = checked_flags("cflags", options.get("cflags", ""))
    ldflags = checked_flags("ldflags", options.get("ldflags", ""))
    tree = sandbox.work / "src"
    # "./" keeps a file named like a flag ("-fplugin=x.c") a file name on gcc's command line.
    sources = sorted(f"./{p.relative_to(tree).as_posix()}" for p in tree.rglob("*.c"))
    main = f"./{posixpath.normpath(entrypoint)}"
    if main not in sources:
        sources.insert(0, main)
    (sandbox.work / "out").mkdir()
    sandbox.run(
        Step(
            [compiler, "-static", "-O2", *cflags, "-o", OUTPUT, *sources, *ldflags],
            cwd=SOURCE,
        ),
        log=log,
        what=f"compiling {entrypoint}",
    )


def _needs_install(tree: Path) -> list[str] | None:
    """pip's arguments for the workload's own dependencies, or None when it has none (its own
    modules are found in the source tree, so a project without dependencies needs no install)."""
    requirements = tree / "requirements.txt"
    if requirements.is_file() and not requirements.is_symlink():
        lines = requirements.read_text(errors="replace").splitlines()
        if any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            return ["-r", f"{SOURCE}/requirements.txt"]
        return None
    pyproject = tree / "pyproject.toml"
    if pyproject.is_file() and not pyproject.is_symlink():
        try:
            project = tomllib.loads(pyproject.read_text(errors="replace")).get("project", {})
        except tomllib.TOMLDecodeError as exc:
            raise BuildError(f"pyproject.toml of the workload is not valid TOML: {exc}") from exc
        if isinstance(project, dict) and project.get("dependencies"):
            return [SOURCE]
    return None


def _build_python(sandbox: BuildSandbox, entrypoint: str, log: Path, layout: Layout) -> str:
    """Run PyInstaller in the sandbox; returns the name of what it wrote under dist/."""
    require_pyinstaller()
    python = sys.executable
    install = _needs_install(sandbox.work / "src")
    if install is not None:
        venv = f"{BUILD_ROOT}/venv"
        sandbox.run(
            Step([sys.executable, "-I", "-c", _MAKE_VENV, venv, *site.getsitepackages()]),
            log=log,
            what="creating the build environment",
        )
        python = f"{venv}/bin/python"
        offline = [] if sandbox.network else ["--no-index", "--no-build-isolation"]
        sandbox.run(
            Step(
                [python, "-I", "-m", "pip", "install", "--quiet", *offline, *install],
                # Relative paths in requirements.txt name files of the source tree; -I keeps
                # the source directory off sys.path.
                cwd=SOURCE,
                network=sandbox.network,
            ),
            log=log,
            what="installing the workload's requirements",
            hint="" if sandbox.network else OFFLINE_HINT,
        )
    name = "workload"
    spec = _write_spec(sandbox.work, entrypoint, name, layout)
    sandbox.run(
        Step(
            [
                python,
                "-I",
                "-m",
                "PyInstaller",
                "--noconfirm",
                "--clean",
                "--log-level",
                "WARN",
                "--distpath",
                f"{BUILD_ROOT}/dist",
                "--workpath",
                f"{BUILD_ROOT}/pyinstaller",
                spec,
            ]
        ),
        log=log,
        what=f"PyInstaller on {entrypoint}",
    )
    _append_trim_report(sandbox.work, log)
    return name


def _write_spec(work: Path, entrypoint: str, name: str, layout: Layout) -> str:
    """Write the PyInstaller spec into the build tree; returns its path inside the sandbox.

    The spec is PyInstaller's own for ``--{onefile,onedir} --strip`` plus ``bundle_trim``, which
    is copied beside it (it imports nothing of the project) and cuts what the workload's code
    cannot reach before PyInstaller collects anything. Paths go in as ``repr`` literals."""
    (work / "trim").mkdir()
    shutil.copyfile(Path(bundle_trim.__file__), work / "trim" / f"{TRIM_MODULE}.py")
    script = f"{SOURCE}/{posixpath.normpath(entrypoint)}"
    if layout is Layout.ONEDIR:
        package = f"""exe = EXE(pyz, a.scripts, [], exclude_binaries=True, name={name!r},
          strip=True, upx=False, console=True)
COLLECT(exe, a.binaries, a.datas, strip=True, upx=False, name={name!r})
"""
    else:
        package = f"""EXE(pyz, a.scripts, a.binaries, a.datas, [], name={name!r}, strip=True,
    upx=False, console=True, runtime_tmpdir=None)
"""
    text = f"""import sys
sys.path.insert(0, {f"{BUILD_ROOT}/trim"!r})
import {TRIM_MODULE}
{TRIM_MODULE}.install({TRIM_REPORT!r})
a = Analysis([{script!r}], pathex=[{SOURCE!r}], noarchive=False, optimize=0)
pyz = PYZ(a.pure)
{package}"""
    (work / "pyinstaller").mkdir()
    (work / "pyinstaller" / f"{name}.spec").write_text(text)
    return f"{BUILD_ROOT}/pyinstaller/{name}.spec"


def _append_trim_report(work: Path, log: Path) -> None:
    """Copy what the trim left out into the build log (read without following a link: the
    sandboxed build wrote it)."""
    try:
        fd = os.open(work / "pyinstaller" / "trimmed.txt", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BuildError("PyInstaller ran without the bundle trim; see the build log") from exc
    with os.fdopen(fd, "rb") as report, log.open("a") as out:
        out.write(report.read(1 << 20).decode(errors="replace"))


def take_tree(top: Path, destination: Path) -> None:
    """Copy the directory ``top``, written by a sandboxed step, to ``destination`` (new).

    As ``sandbox.take_output`` does for a file: nothing is followed. Regular files keep only
    their executable bit, a symbolic link is kept only when it is relative and stays inside the
    tree (the images copy it as a link, and the host never follows it), and anything else (a
    device, a FIFO, a socket, a link out of the tree) fails the build."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(top, flags | os.O_DIRECTORY)
    except OSError as exc:
        raise BuildError(
            f"the build left no directory at {top.name} ({exc.strerror}); see the build log"
        ) from exc
    try:
        _copy_dir(fd, "", destination)
    finally:
        os.close(fd)


def _copy_dir(fd: int, relative: str, destination: Path) -> None:
    destination.mkdir(mode=0o755)
    for name in sorted(os.listdir(fd)):
        inside = posixpath.join(relative, name)
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            child = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            try:
                _copy_dir(child, inside, destination / name)
            finally:
                os.close(child)
        elif stat.S_ISREG(info.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(src, "rb") as data, (destination / name).open("xb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
            (destination / name).chmod(0o755 if info.st_mode & 0o111 else 0o644)
        elif stat.S_ISLNK(info.st_mode):
            target = os.readlink(name, dir_fd=fd)
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(inside), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise BuildError(f"the build output {inside} links out of its directory")
            os.symlink(target, destination / name)
        else:
            raise BuildError(f"the build output {inside} is not a file, directory or link")


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


def _take_binary(source_dir: Path, entrypoint: str, output: Path) -> None:
    path = source_dir / entrypoint
    # Validation checked the same; a link swapped in since must not make us copy a host file.
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(source_dir) + os.sep):
        raise BuildError(f"the binary {entrypoint} leaves the source directory")
    try:
        data = Path(real).read_bytes()
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
    output.write_bytes(data)


def shared_libraries(executable: Path) -> list[Path]:
    """The shared libraries a dynamic executable needs on the target, including what ``ldd``
    does not show: PyInstaller's bootloader loads libpython after unpacking, and libpython
    needs the rest of glibc (libm, libdl, libpthread, librt, libutil) without ``ldd`` seeing it.

    The executable came out of a build of untrusted source, so ``ldd`` looks at it inside the
    sandbox, and only libraries of the host's toolchain (regular files) are taken.
    """
    if is_static_elf(executable.read_bytes()[:65536]):
        return []
    ldd = require("ldd")
    with tempfile.TemporaryDirectory(prefix="reconciler-ldd-") as tmp:
        sandbox = BuildSandbox(Path(tmp))
        inside = "/inspect/workload"
        listing = sandbox.output(
            Step([ldd, inside], read_only=[(str(executable), inside)]),
            what=f"listing the libraries of {executable.name}",
        )
    found: set[Path] = set()
    for line in listing.splitlines():
        for part in line.split():
            if not part.startswith("/") or part.startswith(("/inspect/", "/build/", "/tmp/")):
                continue
            candidate = Path(part)
            if candidate.is_file() and not part.startswith(("/proc/", "/dev/")):
                found.add(candidate)
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
