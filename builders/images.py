"""The ``unikernel`` and ``microvm`` targets: bootable images around one executable.

* unikernel (Lupine Linux style): the kernel and ONE initramfs holding only the guest init, the
  workload, the shared libraries it needs and the kernel modules the kernel lacks built in (none
  with a specialised kernel: then the init loads nothing); no disk, no root switch, no
  distribution. Byte-reproducible (see ``cpio.py``).
* microvm: the kernel, a small initramfs (init + modules) that mounts the root disk and switches
  to it, and an ext4 root built in one pass with ``mkfs.ext4 -d`` from a staging directory
  holding busybox, the init, the workload, its libraries and its config.

The workload is a ``program``: one static or self-extracting file, or a Python one-directory
bundle (``executable.Layout.ONEDIR``: ``workload`` and its ``_internal/``), copied under
``/app`` as it is, so nothing is unpacked at boot but the initramfs itself. The initramfs is
written with ``INITRAMFS_COMPRESSION`` (measured in ``bench/results/boot.md``); the file keeps
its historical name ``initramfs.cpio.gz`` whatever the compression, since the kernel (and
``cpio.compression_of``) go by the content.

Per-VM data (address, hostname, env, args, restart policy) is NOT in the image: at every start
the runtime appends it to a per-VM copy of the initramfs as ``/etc/reconciler/vm.conf`` (see
``runtime/guest_config.py``), so one artifact serves every replica and an env change is a
restart, not a rebuild.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

from builders.cpio import (
    Compression,
    Entry,
    char_device,
    directory,
    file_entry,
    symlink,
    write_initramfs,
)
from builders.executable import shared_libraries
from builders.kernels import VM_MODULES, Kernel
from builders.toolchain import require, run
from reconciler.errors import BuildError

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
APP_DIR = "app"
WORKLOAD_PATH = f"{APP_DIR}/workload"
INITRAMFS = "initramfs.cpio.gz"
# Under TCG the guest decompresses its initramfs instruction by instruction: measured on the
# web unikernel (bench/results/boot.md), uncompressed unpacks fastest with both kernels; the
# cost is the artifact's size in the cache. Every kernel reads an uncompressed archive.
INITRAMFS_COMPRESSION = Compression.NONE
CONFIG_PATH = "etc/reconciler/init.conf"
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3"
ROOTFS_HEADROOM = 1.3
ROOTFS_EXTRA_MIB = 16


def guest_init(log: Path) -> Path:
    """The guest init binary, built from ``guest/`` when it is missing or older than its source."""
    binary = GUEST_DIR / "build" / "reconciler-init"
    source = GUEST_DIR / "init.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        if not (shutil.which("musl-gcc") or shutil.which("gcc")):
            require("gcc")
        run([require("make"), "-s", "-C", GUEST_DIR], log=log, what="building the guest init")
        # Built under the CLI's umask 077, it would be 0700: the process sandbox runs it as the
        # VM's own unprivileged uid. It holds nothing secret.
        binary.chmod(0o755)
    return binary


def _base_entries(init: Path, config: str) -> list[Entry]:
    return [
        file_entry("init", init, 0o755),
        Entry(CONFIG_PATH, 0o100644, config.encode()),
        directory("dev"),
        directory("proc"),
        directory("sys"),
        directory("tmp"),
        char_device("dev/console", 5, 1),
        char_device("dev/null", 1, 3, 0o666),
    ]


def _power_button_modules(kernel: Kernel) -> list[Path]:
    """The ACPI button and evdev drivers when the kernel has them as modules (Debian's cloud
    kernel; neither depends on another module). The init stops the workload and powers off when
    the runtime presses the power button (QEMU's ``system_powerdown``); without them a stop
    waits for the runtime's timeout, so they are wanted but never required."""
    if kernel.modules_dir is None:
        return []
    found = []
    for relative in ("kernel/drivers/acpi/button.ko", "kernel/drivers/input/evdev.ko"):
        matches = sorted(kernel.modules_dir.glob(relative + "*"))  # .ko, .ko.xz, ...
        if matches and matches[0].suffix == ".ko":  # the init loads uncompressed modules
            found.append(matches[0])
    return found


def _module_entries(kernel: Kernel) -> tuple[list[Entry], list[str]]:
    entries, paths = [], []
    for module in [*kernel.modules_for(VM_MODULES), *_power_button_modules(kernel)]:
        inside = f"lib/modules/{module.name}"
        entries.append(file_entry(inside, module, 0o644))
        paths.append("/" + inside)
    return entries, paths


def entry_point(program: Path) -> Path:
    """The file that runs: ``program`` itself, or the ``workload`` at the top of a bundle."""
    return program / "workload" if program.is_dir() else program


def _library_entries(program: Path) -> list[Entry]:
    entries = []
    for library in shared_libraries(entry_point(program)):
        entries.append(file_entry(str(library).lstrip("/"), library.resolve(), 0o755))
    return entries


def program_entries(program: Path) -> list[Entry]:
    """``program`` under ``/app``: one file as ``app/workload``, or a bundle's tree as it is
    (its links as links: ``executable.take_tree`` kept only links that stay inside it)."""
    if not program.is_dir():
        return [file_entry(WORKLOAD_PATH, program, 0o755)]
    entries = []
    for current, dirs, files in os.walk(program):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(current) / name
            inside = f"{APP_DIR}/{path.relative_to(program).as_posix()}"
            if path.is_symlink():
                entries.append(symlink(inside, os.readlink(path)))
            elif path.is_dir():
                entries.append(directory(inside))
            else:
                entries.append(file_entry(inside, path))
    return entries


def _write_common(kernel: Kernel, out_dir: Path) -> None:
    shutil.copyfile(kernel.image, out_dir / "kernel")
    (out_dir / "cmdline").write_text(BASE_CMDLINE + "\n")


def build_unikernel(
    program: Path,
    kernel: Kernel,
    init: Path,
    out_dir: Path,
    *,
    compression: Compression = INITRAMFS_COMPRESSION,
) -> None:
    # No module= line when the kernel has them built in: the init then loads nothing; no root=,
    # so it never switches root: the initramfs is the root.
    modules, module_paths = _module_entries(kernel)
    config = "".join(f"module={m}\n" for m in module_paths)
    config += f"exec=/{WORKLOAD_PATH}\nworkdir=/{APP_DIR}\n"
    entries = [
        *_base_entries(init, config),
        *modules,
        *_library_entries(program),
        *program_entries(program),
    ]
    write_initramfs(entries, out_dir / INITRAMFS, compression)
    _write_common(kernel, out_dir)


def build_microvm(
    program: Path,
    kernel: Kernel,
    init: Path,
    out_dir: Path,
    *,
    staging: Path,
    log: Path,
    compression: Compression = INITRAMFS_COMPRESSION,
) -> None:
    modules, module_paths = _module_entries(kernel)
    boot_config = "".join(f"module={m}\n" for m in module_paths)
    boot_config += "root=/dev/vda\nrootfstype=ext4\n"
    write_initramfs([*_base_entries(init, boot_config), *modules], out_dir / INITRAMFS, compression)

    root = staging / "rootfs"
    stage_rootfs(root, program, init)
    image = out_dir / "rootfs.ext4"
    make_ext4(root, image, log)
    _write_common(kernel, out_dir)


def stage_rootfs(root: Path, program: Path, init: Path) -> None:
    busybox = require("busybox")
    for name in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "app",
        "etc/reconciler",
        "newroot",
        "root",
        "var/tmp",
    ):
        (root / name).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=False
    ).stdout.split()
    for applet in applets:
        link = root / applet
        if applet == "bin/busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    shutil.copyfile(init, root / "sbin/reconciler-init")
    os.chmod(root / "sbin/reconciler-init", 0o755)
    if program.is_dir():
        shutil.rmtree(root / APP_DIR)
        shutil.copytree(program, root / APP_DIR, symlinks=True)
    else:
        shutil.copyfile(program, root / WORKLOAD_PATH)
        os.chmod(root / WORKLOAD_PATH, 0o755)
    for library in shared_libraries(entry_point(program)):
        target = root / str(library).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library.resolve(), target)
        os.chmod(target, 0o755)
    (root / CONFIG_PATH).write_text(f"exec=/{WORKLOAD_PATH}\nworkdir=/{APP_DIR}\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")


def tree_bytes(root: Path) -> int:
    total = 0
    for current, _dirs, files in os.walk(root):
        for name in files:
            path = Path(current) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def make_ext4(root: Path, image: Path, log: Path) -> None:
    """An ext4 image of ``root`` in one pass, sized to its content plus headroom."""
    mkfs = require("mkfs.ext4")
    size_mib = math.ceil(tree_bytes(root) * ROOTFS_HEADROOM / (1 << 20)) + ROOTFS_EXTRA_MIB
    run(
        [
            mkfs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "root",
            "-E",
            "root_owner=0:0",
            "-d",
            root,
            image,
            f"{size_mib}M",
        ],
        log=log,
        what="mkfs.ext4 of the root filesystem",
    )
    if not image.exists():
        raise BuildError(f"mkfs.ext4 wrote no image at {image}")
