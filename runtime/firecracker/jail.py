"""Preparing the chroot that Firecracker's jailer confines one VM to.

The jailer (``jailer --id <vm> --uid --gid --chroot-base-dir <base> --new-pid-ns -- ...``)
chroots to ``<base>/firecracker/<vm>/root``, creates ``/dev/kvm`` and ``/dev/net/tun`` there,
drops to the unprivileged user and executes Firecracker, which then sees only that directory.
So everything the VM boots must be inside it before the jailer runs: the kernel (hard-linked,
else copied: read-only for the VM), the VM's own initrd with its per-VM configuration (mode 0600,
owned by the VM's user), the VM's root disk (its private copy, hard-linked and handed to the
VM's user) and the config file, whose paths are the chroot's (``firecracker_config(...,
jailed=True)``). The API socket and the pid file the jailer writes appear in the same directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from reconciler.errors import VMRuntimeError
from runtime.firecracker.config import (
    API_SOCKET,
    JAIL_KERNEL,
    JAIL_ROOTFS,
    JailerOptions,
    firecracker_config,
    jail_volume,
)
from runtime.guest_config import VM_INITRD, write_vm_initrd
from runtime.protocol import VMSpec

CONFIG_FILE = "firecracker.json"
JAILER_PID_FILE = "firecracker.pid"  # written by the jailer (--new-pid-ns) in the chroot


def _place(source: Path, dest: Path, *, owner: tuple[int, int] | None, mode: int) -> None:
    """``dest`` as a hard link to ``source`` (same file system), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
        linked = True
    except OSError:
        shutil.copyfile(source, dest)
        linked = False
    if owner is not None:
        os.chown(dest, *owner)
    if not linked or owner is not None:
        os.chmod(dest, mode)
    elif dest.stat().st_mode & 0o004 == 0:
        # A shared inode we may not chmod (the artifact cache's): give the VM its own copy.
        dest.unlink()
        shutil.copyfile(source, dest)
        os.chmod(dest, mode)


def prepare_chroot(spec: VMSpec, options: JailerOptions) -> Path:
    """Fill the VM's chroot; returns its root directory."""
    if spec.kernel is None:
        raise ValueError(f"VM {spec.name} has no kernel to boot")
    root = options.chroot(spec.name)
    root.mkdir(parents=True, exist_ok=True)
    owner = (options.uid, options.gid)
    for stale in (API_SOCKET, JAILER_PID_FILE):
        (root / stale).unlink(missing_ok=True)
    _place(spec.kernel, root / JAIL_KERNEL, owner=None, mode=0o644)
    if spec.initrd is not None:
        write_vm_initrd(spec.initrd, spec.guest, root / VM_INITRD, owner=owner)
    if spec.rootfs is not None:
        _place(spec.rootfs, root / JAIL_ROOTFS, owner=owner, mode=0o600)
    for volume in spec.volumes:
        # A hard link only, never a copy: the VM must write the volume itself, not a copy that
        # the next start would throw away.
        dest = root / jail_volume(volume.name)
        dest.unlink(missing_ok=True)
        try:
            os.link(volume.path, dest)
        except OSError as exc:
            raise VMRuntimeError(
                f"{spec.name}: cannot link volume {volume.name} into the jail ({exc.strerror}); "
                "the state directory must be one file system"
            ) from exc
        os.chown(dest, *owner)
    config = root / CONFIG_FILE
    config.write_text(json.dumps(firecracker_config(spec, jailed=True), indent=2) + "\n")
    os.chmod(config, 0o644)
    return root
