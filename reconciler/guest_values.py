"""What per-VM values the guest can be given, and what may reach the kernel command line (pure).

Where it sits: manifests are checked with these functions when a revision is compiled
(``manifests/compile.py``), so a value that cannot be carried is refused before anything is
planned, built or stopped; the runtime's encoder (``runtime/guest_config.py``) checks the same
rules again when it writes a VM's configuration, so nothing reaches a guest unchecked.

Threat model: every commit of the fleet repository is untrusted and its values end up in a
process that runs as root (the guest init, the VMM). Env and args travel in a length-prefixed
per-VM configuration, never on the kernel command line, so any byte string except NUL arrives
unchanged; what cannot be carried is refused here with the reason, never dropped or truncated.
``deploy.kernelArgs`` does reach the kernel command line, so it is held to an allow-list: plain
tokens, single spaces, and none of the parameters that choose what runs as PID 1 or that would
speak to the guest init.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# The kernel refuses a single argv or environment string longer than MAX_ARG_STRLEN (32 pages,
# including the terminating NUL) with E2BIG at execve: the workload would never start.
MAX_VALUE_BYTES = 32 * 4096 - 1
# The whole per-VM configuration (env, args, address, hostname, ...). execve's own limit on
# argv + environment together is a quarter of the stack limit (2 MiB by default); 1 MiB stays
# well inside it and is still far beyond what any real workload passes.
MAX_CONFIG_BYTES = 1024 * 1024
# Room kept in the cap for what the runtime adds (hostname, address, gateway, restart policy).
RUNTIME_HEADROOM_BYTES = 1024
# x86's COMMAND_LINE_SIZE is 2048; the artifact's own arguments and the runtime's need the rest.
MAX_KERNEL_ARGS_BYTES = 512

# What one record of the per-VM configuration costs beyond its value: key, length, separators.
RECORD_OVERHEAD_BYTES = 24

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KERNEL_TOKEN = re.compile(r"[A-Za-z0-9_.,:=/+-]+")
# Kernel parameter names are lower case; the kernel hands a name=value it does not know to the
# init as environment, and a bare word it does not know to the init as an argument, so only
# lower-case names and a few well-known flags pass.
KERNEL_PARAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
KERNEL_FLAGS = frozenset(
    {
        "quiet",
        "debug",
        "ignore_loglevel",
        "nokaslr",
        "norandmaps",
        "nosmp",
        "nosmt",
        "noapic",
        "nolapic",
        "nopti",
        "nowatchdog",
        "nosoftlockup",
    }
)
# Parameters that choose what runs as PID 1 or from where, or that once spoke to the guest
# init (``rc.*``): none may come from a manifest.
FORBIDDEN_KERNEL_PARAMS = frozenset(
    {"init", "rdinit", "root", "nfsroot", "rootfstype", "rootflags", "initrd", "retain_initrd"}
)
FORBIDDEN_KERNEL_PREFIXES = ("rc.",)


def kernel_args_problem(text: str) -> str | None:
    """Why ``text`` may not be appended to a kernel command line, or None when it may."""
    if not text:
        return None
    if len(text.encode()) > MAX_KERNEL_ARGS_BYTES:
        return f"kernelArgs is longer than {MAX_KERNEL_ARGS_BYTES} bytes"
    tokens = text.split(" ")
    if any(not token for token in tokens):
        return "kernelArgs must be tokens separated by single spaces"
    for token in tokens:
        if not KERNEL_TOKEN.fullmatch(token):
            return (
                f"kernelArgs token {token!r} has a character outside [A-Za-z0-9_.,:=/+-] "
                "(no quotes, control characters or other whitespace)"
            )
        name = token.split("=", 1)[0]
        if name in FORBIDDEN_KERNEL_PARAMS or name.startswith(FORBIDDEN_KERNEL_PREFIXES):
            return f"kernelArgs may not set {name}= (it chooses what the guest runs)"
        if "=" not in token:
            if token not in KERNEL_FLAGS:
                return (
                    f"kernelArgs word {token!r} is not a known kernel flag (the kernel would "
                    f"pass it to the guest init); known: {', '.join(sorted(KERNEL_FLAGS))}"
                )
        elif not KERNEL_PARAM_NAME.fullmatch(name):
            return (
                f"kernelArgs parameter {name!r} is not a lower-case kernel parameter name "
                "(the kernel would pass it to the guest init as environment)"
            )
    return None


def _utf8(value: str) -> bytes | None:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return None


def value_problems(
    env: Mapping[str, str], args: Iterable[str]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems with a workload's env and args, each with its JSON path below ``deploy``."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    total = 0
    for name, value in env.items():
        path: tuple[str | int, ...] = ("env", name)
        if not ENV_NAME.fullmatch(name):
            problems.append((path, f"env name {name!r} is not a valid identifier"))
            continue
        raw = _utf8(value)
        if raw is None:
            problems.append((path, "env value is not valid Unicode text (a lone surrogate)"))
        elif b"\0" in raw:
            problems.append((path, "env value contains a NUL byte, which no process can receive"))
        elif len(name) + 1 + len(raw) > MAX_VALUE_BYTES:
            problems.append((path, f"env {name}=... is longer than {MAX_VALUE_BYTES} bytes"))
        else:
            total += len(name) + 1 + len(raw) + RECORD_OVERHEAD_BYTES
    for index, arg in enumerate(args):
        raw = _utf8(arg)
        if raw is None:
            problems.append((("args", index), "arg is not valid Unicode text (a lone surrogate)"))
        elif b"\0" in raw:
            problems.append((("args", index), "arg contains a NUL byte"))
        elif len(raw) > MAX_VALUE_BYTES:
            problems.append((("args", index), f"arg is longer than {MAX_VALUE_BYTES} bytes"))
        else:
            total += len(raw) + RECORD_OVERHEAD_BYTES
    if total > MAX_CONFIG_BYTES - RUNTIME_HEADROOM_BYTES:
        problems.append(
            (
                (),
                f"env and args together take {total} bytes, more than the per-VM "
                f"configuration carries ({MAX_CONFIG_BYTES - RUNTIME_HEADROOM_BYTES})",
            )
        )
    return problems


def deploy_problems(deploy: Mapping[str, object]) -> list[tuple[tuple[str | int, ...], str]]:
    """Every problem with the per-VM values of a merged ``deploy`` block (manifest-shaped)."""
    env = deploy.get("env") or {}
    args = deploy.get("args") or []
    problems = value_problems(
        {str(k): str(v) for k, v in env.items()} if isinstance(env, Mapping) else {},
        [str(a) for a in args] if isinstance(args, list) else [],
    )
    kernel_args = deploy.get("kernelArgs")
    if isinstance(kernel_args, str):
        problem = kernel_args_problem(kernel_args)
        if problem:
            problems.append((("kernelArgs",), problem))
    volumes = deploy.get("volumes")
    if isinstance(volumes, list):
        problems += volume_problems(volumes)
    return problems


# ------------------------------------------------------------------------------- volumes --

# A volume's name is the disk's virtio serial (at most 20 bytes) and its ext4 label (at most
# 16), which is how the init finds it whatever order the disks appear in.
VOLUME_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?")
MAX_VOLUMES = 8
MIN_VOLUME_MIB = 16  # below this mkfs.ext4 leaves no room for a journal and data
MAX_VOLUME_MIB = 1024 * 1024  # 1 TiB: sparse, but a typo should not promise a petabyte
MOUNT_PATH = re.compile(r"(/[A-Za-z0-9._-]+)+")
MAX_MOUNT_PATH_BYTES = 255
# Where a volume may not be mounted: over what the init mounts itself (/dev, /proc, /sys, /tmp),
# over what makes the guest run (the programs and libraries, /etc and the init's
# /etc/reconciler, the workload in /app, the initramfs's /init and /newroot) or, in the process
# runtime's sandbox, over the host's /usr, /etc and library links. Below them too.
RESERVED_MOUNT_PATHS = (
    "/app",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/init",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/newroot",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def mount_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be where a volume is mounted in the guest, or None."""
    if not path.startswith("/") or path == "/":
        return "mountPath must be an absolute path below /, such as /data"
    if len(path.encode()) > MAX_MOUNT_PATH_BYTES:
        return f"mountPath is longer than {MAX_MOUNT_PATH_BYTES} bytes"
    if not MOUNT_PATH.fullmatch(path):
        return (
            "mountPath must be /-separated names of [A-Za-z0-9._-] (no empty, trailing or "
            "whitespace parts)"
        )
    if any(part in (".", "..") for part in path.split("/")):
        return "mountPath may not contain . or .. parts"
    for reserved in RESERVED_MOUNT_PATHS:
        if _under(path, reserved):
            return f"mountPath {path} would hide {reserved}, which the guest needs"
    return None


def volume_problems(volumes: list[object]) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems with ``deploy.volumes`` (manifest-shaped), with their JSON paths."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if len(volumes) > MAX_VOLUMES:
        problems.append((("volumes",), f"at most {MAX_VOLUMES} volumes per VM"))
    names: set[str] = set()
    paths: list[tuple[str, int]] = []
    for index, volume in enumerate(volumes):
        at: tuple[str | int, ...] = ("volumes", index)
        if not isinstance(volume, Mapping):
            continue  # the schema reports the shape
        name = volume.get("name")
        if isinstance(name, str):
            if not VOLUME_NAME.fullmatch(name):
                problems.append(
                    (
                        (*at, "name"),
                        f"volume name {name!r} must be 1-16 of [a-z0-9-], "
                        "starting and ending with a letter or digit",
                    )
                )
            elif name in names:
                problems.append(((*at, "name"), f"volume {name!r} is declared twice"))
            names.add(name)
        size = volume.get("sizeMiB")
        if isinstance(size, int) and not MIN_VOLUME_MIB <= size <= MAX_VOLUME_MIB:
            problems.append(
                ((*at, "sizeMiB"), f"sizeMiB must be {MIN_VOLUME_MIB} to {MAX_VOLUME_MIB}")
            )
        if volume.get("filesystem", "ext4") != "ext4":
            problems.append(((*at, "filesystem"), "the only filesystem is ext4"))
        if volume.get("reclaimPolicy", "retain") not in ("retain", "delete"):
            problems.append(((*at, "reclaimPolicy"), "reclaimPolicy is retain or delete"))
        path = volume.get("mountPath")
        if isinstance(path, str):
            problem = mount_path_problem(path)
            if problem:
                problems.append(((*at, "mountPath"), problem))
            else:
                for other, other_index in paths:
                    if _under(path, other) or _under(other, path):
                        problems.append(
                            (
                                (*at, "mountPath"),
                                f"mountPath {path} overlaps volumes[{other_index}] at {other}",
                            )
                        )
                paths.append((path, index))
    return problems
