"""Confining QEMU: a seccomp filter, an empty chroot and an unprivileged user, chosen once per
QEMU binary.

Why: the guest runs code from an untrusted fleet commit, and a guest that escapes into its VMM
should find an unprivileged process in an empty directory that cannot start programs, not root.
QEMU starts as root (it opens the TAP device, the disks, the initrd, the pid file, the QMP and
console sockets and the console log while it sets up, so they stay root's and the reconciler
stops, inspects and adopts the VM exactly as before), then chroots to an empty directory and
drops to ``VM_USER`` just before the guest runs, with its ``-sandbox`` filter installed and
no-new-privileges set.

What this QEMU accepts is probed once, by starting it with ``-M none``: ``-run-with user=``
replaced ``-runas`` in newer releases, and QEMU 7.2 installs the filter before it drops
privileges, so ``elevateprivileges=deny`` (which forbids ``setuid``) kills a QEMU that drops to
a user at start; where that is so, the filter keeps the other four: ``obsolete``,
``spawn`` (no ``fork``/``exec``), ``resourcecontrol`` denied. After the drop the process has no
capabilities and no-new-privileges, so neither ``setuid`` nor a setuid program can raise it.
``spawn=deny`` is also why QEMU is not ``-daemonize``d: the driver detaches it itself.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import VMRuntimeError
from runtime.vm_user import VM_USER, ensure_user

PROBE_SECONDS = 0.5
FULL_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DROP_SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Confinement:
    """How one QEMU binary is confined: ``sandbox`` for ``-sandbox``, and the options that drop
    to ``user`` (empty when the reconciler is not root and QEMU has nothing to drop)."""

    sandbox: str
    drop: tuple[str, ...]
    user: str | None

    def argv(self, chroot: Path) -> list[str]:
        """The options for one QEMU; ``chroot`` is an empty directory owned by root."""
        jail = ["-chroot", str(chroot)] if self.drop else []
        return ["-sandbox", self.sandbox, *self.drop, *jail]


def _drop_options(binary: str, user: str) -> tuple[str, ...]:
    help_text = subprocess.run(
        [binary, "-help"], capture_output=True, text=True, check=False
    ).stdout
    if "-run-with" in help_text and "user=" in help_text:
        return ("-run-with", f"user={user}")
    if "-runas" in help_text:
        return ("-runas", user)
    raise VMRuntimeError(f"{binary} can neither -runas nor -run-with user=: cannot drop root")


def _starts(binary: str, options: list[str]) -> bool:
    """True when QEMU starts with ``options`` and stays up (a filter that forbids what QEMU
    itself does at start kills it with SIGSYS)."""
    with tempfile.TemporaryDirectory(prefix="reconciler-qemu-probe-") as tmp:
        argv = [binary, "-M", "none", "-display", "none", "-nodefaults", "-no-user-config"]
        chroot = ["-chroot", tmp] if "-runas" in options or "-run-with" in options else []
        process = subprocess.Popen(
            [*argv, *options, *chroot],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(PROBE_SECONDS)
            return process.poll() is None
        finally:
            process.kill()
            process.wait()


@functools.cache
def confinement(binary: str, user: str = VM_USER) -> Confinement:
    """The strongest confinement ``binary`` starts with; probed once per binary and user."""
    drop: tuple[str, ...] = ()
    if os.geteuid() == 0:
        ensure_user(user)
        drop = _drop_options(binary, user)
    # Not root: QEMU already runs unprivileged, and only the filter applies.
    for sandbox in (FULL_SANDBOX, DROP_SANDBOX):
        if _starts(binary, ["-sandbox", sandbox, *drop]):
            return Confinement(sandbox, drop, user if drop else None)
    raise VMRuntimeError(
        f"{binary} does not start with -sandbox {DROP_SANDBOX} {' '.join(drop)}: it needs "
        "seccomp support (Debian's qemu-system-x86 has it)"
    )
