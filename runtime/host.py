"""Host prerequisites, as ``reconciler check`` reports them: what exists, what is usable, and
what to do about what is missing. Only reads the host; changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # needed by the embedded default (QEMU, one host)


def _version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return ""
    # Tools disagree on how to say their version: mkfs.ext4 wants -V, busybox no argument.
    for flags in (["--version"], ["-V"], []):
        try:
            out = subprocess.run(
                [path, *flags], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (out.stdout or out.stderr).strip()
        if out.returncode == 0 and text:
            return text.splitlines()[0]
    return path


def tool_check(name: str, tool: str, package: str, *, required: bool = True) -> Check:
    version = _version(tool)
    if version:
        return Check(name, True, version, required=required)
    return Check(name, False, f"{tool} not found", f"apt-get install {package}", required)


def host_checks() -> list[Check]:
    checks = [
        tool_check("QEMU", "qemu-system-x86_64", "qemu-system-x86"),
        tool_check("mkfs.ext4", "mkfs.ext4", "e2fsprogs"),
        tool_check("busybox (static)", "busybox", "busybox-static"),
        tool_check("C compiler", "gcc", "gcc libc6-dev"),
        tool_check("nftables", "nft", "nftables", required=False),
        # Every build runs in bubblewrap, and a process VM in bubblewrap entered with nsenter
        # into its network namespace and dropped to its own uid with setpriv: no fallback.
        tool_check("bubblewrap", "bwrap", "bubblewrap"),
        tool_check("setpriv", "setpriv", "util-linux"),
        tool_check("nsenter", "nsenter", "util-linux"),
        # QEMU drops to a system user of its own, created with useradd on first start.
        tool_check("useradd", "useradd", "passwd"),
    ]
    firecracker = shutil.which("firecracker")
    checks.append(
        Check(
            "Firecracker",
            firecracker is not None,
            firecracker or "firecracker not found",
            ""
            if firecracker
            else "install the firecracker release binary on PATH (not packaged "
            "in Debian); the qemu and process runtimes work without it",
            required=False,
        )
    )
    kvm = os.path.exists("/dev/kvm")
    checks.append(
        Check(
            "/dev/kvm",
            kvm,
            "present" if kvm else "absent",
            "" if kvm else "VMs run under TCG (slower)",
            required=False,
        )
    )
    tun = os.path.exists("/dev/net/tun")
    checks.append(
        Check(
            "TAP devices (/dev/net/tun)",
            tun,
            "present" if tun else "absent",
            "" if tun else "modprobe tun",
            required=True,
        )
    )
    root = os.geteuid() == 0
    checks.append(
        Check(
            "bridge and TAP management",
            root,
            "running as root" if root else "not root",
            "" if root else "run the reconciler as root (CAP_NET_ADMIN)",
            True,
        )
    )
    return checks
