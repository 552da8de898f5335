"""The build sandbox: every build step that reads a commit's content runs in bubblewrap.

    builders/executable.py ──▶ BuildSandbox.run(argv) ──▶ bwrap ... -- gcc | pip | PyInstaller | ldd

Building a commit executes code from it: a Python workload's ``setup.py`` or build backend runs
during ``pip install``, PyInstaller imports hooks, a C source picks its own headers, and the
output executable is inspected with ``ldd``. The reconciler runs as root with its API token, its
lease URL (with a database password) and its webhook secret in its environment and state
directory, so each such step runs here instead:

* a new user namespace, uid and gid 65534 inside, every capability dropped, and no nested user
  namespaces (``--disable-userns``: no way to win capabilities back);
* new PID, IPC, UTS, cgroup and network namespaces; the network is shared only when the operator
  allowed it (``RECONCILER_BUILD_NETWORK=1``) *and* the step needs a package index;
* the host read-only and only in part: ``/usr`` (with the ``/bin``, ``/lib`` ... links of a
  merged-usr system), the few ``/etc`` files the toolchain needs, the Python installation that
  runs PyInstaller; never the state directory or the artifact cache (``hidden``: a mount that
  would expose one is refused);
* one writable directory, ``/build``: a copy of the source tree and the step's outputs, which
  the builder takes back without following any link the step may have planted;
* a private ``/tmp``, a minimal ``/dev`` and ``/proc``;
* an explicit environment (``PATH``, ``HOME``, ``LANG``, ``SOURCE_DATE_EPOCH`` ...), nothing
  inherited from the daemon.

bwrap is run by the reconciler (root): it maps the sandbox's uid 65534 to the caller's uid, so
what confines the step is the mount view, the dropped capabilities and the namespaces, not the
host uid. ``bwrap_argv`` is pure and golden-tested; ``HostView.probe`` is the only part that
looks at the host. No bwrap means ``ToolMissingError``, never an unsandboxed build.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from builders.toolchain import require, tail
from reconciler.errors import BuildError

BUILD_ROOT = "/build"
NETWORK_ENV = "RECONCILER_BUILD_NETWORK"
SANDBOX_UID = 65534
# A fixed timestamp for tools that embed one (1980-01-01, the earliest a zip file can hold).
SOURCE_DATE_EPOCH = "315532800"
# Merged-usr links (or directories on older systems) that programs expect at the top.
TOP_LEVEL_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# What the toolchain reads from /etc: the dynamic loader's cache, user names, alternatives.
ETC_ALWAYS = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
)
# ... and what name resolution and TLS need when a step may use the network.
ETC_NETWORK = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/gai.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pip.conf",
)


@dataclass(frozen=True)
class HostView:
    """The facts about the host that shape the sandbox, gathered once by ``probe``."""

    links: Mapping[str, str]  # top-level path -> its symlink target (merged /usr)
    directories: tuple[str, ...]  # top-level paths that are real directories
    etc: tuple[str, ...]  # the ETC_ALWAYS entries that exist
    etc_network: tuple[str, ...]  # the ETC_NETWORK entries that exist
    python: tuple[str, ...]  # the Python installation(s) PyInstaller runs from

    @classmethod
    def probe(cls) -> HostView:
        links: dict[str, str] = {}
        directories: list[str] = []
        for path in TOP_LEVEL_LINKS:
            if os.path.islink(path):
                links[path] = os.readlink(path)
            elif os.path.isdir(path):
                directories.append(path)
        return cls(
            links=links,
            directories=tuple(directories),
            etc=tuple(p for p in ETC_ALWAYS if os.path.lexists(p)),
            etc_network=tuple(p for p in ETC_NETWORK if os.path.lexists(p)),
            python=python_roots(),
        )


def python_roots() -> tuple[str, ...]:
    """The directories the builder's Python needs: its environment and the installation it was
    made from (a virtualenv's interpreter is a link into the base installation)."""
    roots: list[str] = []
    for path in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        real = os.path.realpath(path)
        if real.endswith("/bin"):
            real = os.path.dirname(real)
        roots.append(path)
        roots.append(real)
    return _outermost([r for r in roots if r and r != "/"])


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: Sequence[str]) -> tuple[str, ...]:
    """``paths`` without duplicates and without those inside another one (or inside /usr,
    which is always mounted)."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(_within(path, k) for k in [*kept, "/usr"]):
            kept.append(path)
    return tuple(sorted(kept))


@dataclass(frozen=True)
class Step:
    """One sandboxed command: what it may see and do."""

    argv: Sequence[str]
    cwd: str = BUILD_ROOT
    network: bool = False
    env: Mapping[str, str] = field(default_factory=dict)  # added to the base environment
    read_only: Sequence[tuple[str, str]] = ()  # (host path, path inside) extra read-only files


def base_environment(network: bool) -> dict[str, str]:
    """The whole environment of a build step; nothing is inherited."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    }
    if not network:
        env["PIP_NO_INDEX"] = "1"
    return env


def bwrap_argv(bwrap: str, host: HostView, work: str, step: Step) -> list[str]:
    """The bwrap command line of one step (pure; see the module docstring)."""
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "build",
    ]
    if step.network:
        argv.append("--share-net")
    # The private /tmp first: the Python (a virtualenv may live under /tmp) and the other
    # read-only paths are bound on top of it, not hidden by it.
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for path, target in sorted(host.links.items()):
        argv += ["--symlink", target, path]
    for path in host.directories:
        argv += ["--ro-bind", path, path]
    for path in (*host.etc, *(host.etc_network if step.network else ())):
        argv += ["--ro-bind", path, path]
    for path in host.python:
        argv += ["--ro-bind", path, path]
    argv += ["--bind", work, BUILD_ROOT]
    for source, inside in step.read_only:
        argv += ["--ro-bind", source, inside]
    argv += ["--chdir", step.cwd, "--clearenv"]
    for key, value in sorted({**base_environment(step.network), **step.env}.items()):
        argv += ["--setenv", key, value]
    return [*argv, "--", *step.argv]


def exposed(argv: Sequence[str], hidden: Sequence[Path]) -> list[str]:
    """Mount sources of ``argv`` that would show a ``hidden`` directory (or contain one)."""
    sources = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--bind", "--ro-bind")]
    found = []
    for source in sources:
        real = os.path.realpath(source)
        for secret in hidden:
            secret_real = os.path.realpath(secret)
            if _within(secret_real, real) or _within(real, secret_real):
                found.append(f"{source} (shows {secret})")
    return found


def network_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """The operator's choice: may build steps that need a package index reach the network?"""
    value = (os.environ if environ is None else environ).get(NETWORK_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


class BuildSandbox:
    """Runs build steps in bubblewrap over one work directory (``/build`` inside).

    ``hidden`` are host directories that must stay invisible (the state directory, the artifact
    cache); ``network`` is whether steps that ask for the network may have it."""

    def __init__(
        self,
        work: Path,
        *,
        hidden: Sequence[Path] = (),
        network: bool = False,
        host: HostView | None = None,
    ) -> None:
        self.bwrap = require("bwrap")
        self.work = work
        self.hidden = tuple(hidden)
        self.network = network
        self.host = host or HostView.probe()

    def argv(self, step: Step) -> list[str]:
        if step.network and not self.network:
            raise BuildError(
                "this build step needs the network, which builds do not have; allow it with "
                f"{NETWORK_ENV}=1 in the reconciler's environment"
            )
        argv = bwrap_argv(self.bwrap, self.host, str(self.work), step)
        # The files a step is given on purpose (an artifact to inspect) may live in the cache;
        # the directories every step sees must not show it, nor the state directory.
        common = bwrap_argv(self.bwrap, self.host, str(self.work), replace(step, read_only=()))
        leaks = exposed(common[: common.index("--")], self.hidden)
        if leaks:
            raise BuildError(
                "the build sandbox would expose the reconciler's own files: "
                + ", ".join(leaks)
                + "; keep the state directory and the cache outside the Python installation"
            )
        return argv

    def run(
        self,
        step: Step,
        *,
        log: Path,
        what: str,
        timeout: float = 900,
        hint: str = "",
    ) -> None:
        """Run ``step``, its output appended to ``log``; failure is a ``BuildError`` ending with
        the log's tail (and ``hint``, what to do about it)."""
        argv = self.argv(step)
        with log.open("a") as out:
            out.write(f"$ [sandbox] {' '.join(step.argv)}\n")
            out.flush()
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                    env={"PATH": "/usr/bin:/bin"},
                )
            except subprocess.TimeoutExpired as exc:
                raise BuildError(f"{what} took longer than {timeout:g} s; see {log}") from exc
        if result.returncode != 0:
            message = f"{what} failed (exit {result.returncode}):\n" + tail(
                log.read_text(errors="replace")
            )
            raise BuildError(message + (f"\n{hint}" if hint else ""))

    def output(self, step: Step, *, what: str, timeout: float = 120) -> str:
        """Run ``step`` and return its standard output (for inspections such as ``ldd``)."""
        argv = self.argv(step)
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={"PATH": "/usr/bin:/bin"},
            )
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"{what} took longer than {timeout:g} s") from exc
        if result.returncode != 0 and not result.stdout:
            raise BuildError(f"{what} failed: {tail(result.stderr, 5)}")
        return result.stdout


def copy_tree_in(source: Path, destination: Path) -> None:
    """Copy a source tree for a build; links are copied as links (they resolve inside the
    sandbox, where the host is not visible)."""
    shutil.copytree(source, destination, symlinks=True)


def take_output(work: Path, relative: str, destination: Path) -> None:
    """Copy ``work/relative``, written by a sandboxed step, to ``destination``.

    The step owned ``work``: any component may have been replaced by a link to a host file
    (the API token, the state database) that a plain copy would follow as root. Each component
    is opened without following links, and only a regular file is taken."""
    parts = Path(relative).parts
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(work, flags | os.O_DIRECTORY)
    except OSError as exc:
        raise BuildError(f"cannot open the build directory {work}: {exc.strerror}") from exc
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(parts[-1], flags, dir_fd=fd)
    except OSError as exc:
        os.close(fd)
        raise BuildError(
            f"the build left no regular file at {relative} ({exc.strerror}); see the build log"
        ) from exc
    os.close(fd)
    with os.fdopen(file_fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise BuildError(f"the build output {relative} is not a regular file")
        with destination.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
