"""The unprivileged account that VMMs run as once they have set up (QEMU drops to it with
``-runas``, Firecracker's jailer with ``--uid``/``--gid``).

A dedicated system account, created on demand and shared by the VMs of this host: it owns no
file outside the VMs' own, and it is not ``nobody``, which other daemons may use.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess

from reconciler.errors import VMRuntimeError

VM_USER = "reconciler-vm"


def ensure_user(name: str = VM_USER) -> pwd.struct_passwd:
    """The account, created with ``useradd --system`` when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    created = subprocess.run(
        [
            useradd,
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        reason = created.stderr.strip() or "useradd failed"
        raise VMRuntimeError(
            f"cannot create the user {name!r} that VMMs run as ({reason}); create it with "
            f"`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"
        ) from exc
