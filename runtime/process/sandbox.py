"""The process runtime's sandbox: how a workload's executable runs on the host without being
able to touch it.

    ProcessRuntime.start ──▶ sandbox_argv(...) ──▶ launch_detached:

    nsenter --net=/run/netns/<vm>          the VM's network namespace on the fleet bridge
      bwrap  (root, host user namespace)   new mount, PID, IPC, UTS and cgroup namespaces; the
                                           view below, mounted while the host is still visible
        setpriv --reuid U --regid U        the VM's own unprivileged host uid; the bounding set
                --clear-groups ...         emptied and no_new_privs set before root is dropped
          bwrap --unshare-user             a user namespace of its own (U inside is U outside),
                --disable-userns           no nested ones (no way to win capabilities back),
                --cap-drop ALL             no capability at all, every mount locked read-only
                                           except its work directory, /tmp and /dev
            reconciler-init --supervisor   the guest init in host mode: markers, restarts
              <workload>

The view: ``/usr`` and the ``/bin``, ``/lib*`` links of a merged-usr host (or those
directories) read-only; from ``/etc`` only what the dynamic loader, name resolution and TLS read;
a private ``/dev``, ``/proc`` (its own PID namespace) and ``/tmp``; the init, the executable and
the init's configuration files read-only at their host paths; and ``<vm dir>/work``, the one
writable host path. Nothing else of the state directory (the state database, the API token,
other VMs, its own pid file and console log) exists inside.

Why two bwraps: the view must be mounted by a process that can still read the host as root (a
state directory under ``/root`` or ``/tmp/...`` with mode 0700 is invisible to an unprivileged
uid), while the workload must run as a host uid that owns nothing (bwrap run by root maps its
sandbox uid to root, whose owner permissions on root's files then apply). So root builds the
view, and inside it an unprivileged bwrap takes the user namespace and drops everything.

Not wanted: ``--die-with-parent``. VMs outlive the reconciler; the PID namespace's first process
(the outer bwrap) is what the pid file names and what a restarted reconciler adopts.

``sandbox_argv`` is pure and golden-tested; ``HostLayout.probe`` and ``sandbox_tools`` are the
only parts that look at the host.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ToolMissingError, VMRuntimeError

# Merged-usr links (or directories on older systems) that programs expect at the top.
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What a workload reads from /etc: the loader's cache, name resolution, time zone, CA bundle.
# No passwd, shadow or host configuration beyond these.
ETC = (
    "/etc/ld.so.cache",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/ssl/certs",
)
# The uids of sandboxed VMs: 65,536 ids in systemd's range for container uids, which no host
# account uses. One per VM (by name), so two VMs never share one; a collision between two
# deployments' VMs would still leave them in separate namespaces.
UID_BASE = 0x6F000000
UID_COUNT = 0x10000
WORKDIR = "work"  # <vm dir>/work: the workload's working directory, its only writable host path


@dataclass(frozen=True)
class HostLayout:
    """The facts about the host that shape the view, gathered once by ``probe``."""

    links: Mapping[str, str]  # top-level path -> its symlink target (merged /usr)
    directories: tuple[str, ...]  # top-level paths that are real directories
    etc: tuple[str, ...]  # the ETC entries that exist

    @classmethod
    def probe(cls) -> HostLayout:
        links: dict[str, str] = {}
        directories: list[str] = []
        for path in TOP_LEVEL:
            if os.path.islink(path):
                links[path] = os.readlink(path)
            elif os.path.isdir(path):
                directories.append(path)
        return cls(links, tuple(directories), tuple(p for p in ETC if os.path.exists(p)))


@dataclass(frozen=True)
class Tools:
    nsenter: str
    bwrap: str
    setpriv: str


def sandbox_tools() -> Tools:
    """The host tools the sandbox is made of; one missing is an error, never a bare process."""
    found = {tool: shutil.which(tool) for tool in ("nsenter", "bwrap", "setpriv")}
    for tool, package in (
        ("bwrap", "bubblewrap"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
    ):
        if found[tool] is None:
            raise ToolMissingError(
                tool, f"the process runtime needs it; install it with `apt-get install {package}`"
            )
    return Tools(str(found["nsenter"]), str(found["bwrap"]), str(found["setpriv"]))


def sandbox_uid(vm: str) -> int:
    """The host uid (and gid) that VM ``vm``'s workload runs as."""
    return UID_BASE + int(hashlib.sha256(vm.encode()).hexdigest()[:8], 16) % UID_COUNT


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _parents(paths: Sequence[str], *, exists: Sequence[str], trees: Sequence[str]) -> list[str]:
    """The directories to create so that ``paths`` can be mounted: every ancestor up to one that
    ``exists`` already or lies inside one of the host ``trees`` mounted whole, outermost first.
    bwrap would create them itself, but with mode 0700, which the workload's uid cannot enter."""
    wanted: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", *exists) and not any(_within(parent, t) for t in trees):
            wanted.add(parent)
            parent = os.path.dirname(parent)
    return sorted(wanted, key=lambda p: (p.count("/"), p))


def sandbox_argv(
    *,
    name: str,
    command: Sequence[str],
    read_only: Sequence[Path],
    workdir: Path,
    uid: int,
    netns: Path | None,
    tools: Tools,
    layout: HostLayout,
    volumes: Sequence[tuple[Path, str]] = (),
    secret_files: bool = False,
) -> list[str]:
    """The command line that runs ``command`` (the init) as VM ``name`` (see the module
    docstring). ``read_only``: host files shown at their own paths (the init, the executable,
    its configuration); ``workdir``: the only writable host directory; ``netns``: the VM's
    network namespace, or None for no network at all (only a loopback of its own);
    ``volumes``: ``(host directory, mount path)`` pairs, writable, mounted last;
    ``secret_files``: a private tmpfs at ``/run/secrets`` (mode 0700, the VM's uid) where the
    init writes them, in memory, never under the state directory."""
    files = [os.path.abspath(p) for p in read_only]
    work = os.path.abspath(workdir)
    mounts = [(os.path.abspath(source), target) for source, target in volumes]
    for _source, target in mounts:
        # bwrap, as root, would make the mount point inside what is below it; never inside a
        # directory the workload writes (its work directory, another volume), where a symlink
        # could send it elsewhere on the host, nor over the files the sandbox is made of.
        for other in [*files, work, *(t for _s, t in mounts if t != target)]:
            if _within(other, target) or _within(target, other):
                raise VMRuntimeError(
                    f"VM {name}: volume mountPath {target} overlaps {other} in the sandbox"
                )
    outer = [tools.bwrap, "--ro-bind", "/usr", "/usr"]
    for path, target in sorted(layout.links.items()):
        outer += ["--symlink", target, path]
    for path in layout.directories:
        outer += ["--ro-bind", path, path]
    outer += ["--perms", "0755", "--dir", "/etc"]
    for path in _parents(layout.etc, exists=["/etc"], trees=[]):
        outer += ["--perms", "0755", "--dir", path]
    for path in layout.etc:
        outer += ["--ro-bind", path, path]
    outer += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp"]
    if secret_files:
        outer += ["--perms", "0755", "--dir", "/run/secrets"]  # the inner bwrap's mount point
    trees = ["/usr", "/dev", "/proc", *layout.links, *layout.directories]
    for path in _parents([*files, work], exists=["/etc", "/tmp"], trees=trees):
        outer += ["--perms", "0755", "--dir", path]
    for path in files:
        outer += ["--ro-bind", path, path]
    outer += ["--bind", work, work]
    volume_trees = [*trees, work, *files]
    for path in _parents([t for _s, t in mounts], exists=["/etc", "/tmp"], trees=volume_trees):
        outer += ["--perms", "0755", "--dir", path]
    for source, target in mounts:
        outer += ["--bind", source, target]
    outer += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if netns is None:
        outer.append("--unshare-net")
    outer += ["--hostname", name, "--new-session", "--chdir", "/", "--"]
    drop = [
        tools.setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    inner = [
        tools.bwrap,
        "--unshare-user",
        "--disable-userns",
        "--uid",
        str(uid),
        "--gid",
        str(uid),
        "--cap-drop",
        "ALL",
        # Everything the outer bwrap mounted, read-only and locked (mounts made by a more
        # privileged user namespace cannot be remounted from this one), then the writable
        # places again.
        "--ro-bind",
        "/",
        "/",
        "--dev-bind",
        "/dev",
        "/dev",
        "--bind",
        "/tmp",
        "/tmp",
        "--bind",
        work,
        work,
        *[arg for _s, target in mounts for arg in ("--bind", target, target)],
        # Made by the unprivileged bwrap, so owned by the VM's uid inside its user namespace.
        *(["--perms", "0700", "--tmpfs", "/run/secrets"] if secret_files else []),
        "--chdir",
        work,
        "--",
    ]
    argv = [*outer, *drop, *inner, *command]
    if netns is not None:
        argv = [tools.nsenter, f"--net={netns}", "--", *argv]
    return argv
