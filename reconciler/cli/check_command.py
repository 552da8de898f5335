"""``reconciler check``: which host prerequisites exist, whether KVM is usable (a canary boot,
not the presence of /dev/kvm), and what to do about each missing one. Exit 1 when something the
embedded default needs is missing."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from builders.cpio import Entry, char_device, directory, file_entry, write_initramfs
from builders.images import guest_init
from builders.kernels import KernelRegistry
from reconciler.cli.options import add_state_option, state_dir
from reconciler.errors import EXIT_ERROR, EXIT_OK, ReconcilerError
from runtime.host import Check, host_checks
from runtime.qemu.accel import kvm_probe
from runtime.qemu.machine import host_tsc_khz


def register(commands: Any) -> None:
    check = commands.add_parser("check", help="report which host prerequisites exist")
    add_state_option(check)
    check.set_defaults(handler=run_check)


def _kernel_and_kvm(state: Path) -> list[Check]:
    try:
        kernel = KernelRegistry(state / "kernels").get(None)
    except ReconcilerError as err:
        return [
            Check("kernel registered", False, str(err), "make kernel"),
            Check(
                "KVM usable",
                False,
                "unknown until a kernel is registered",
                "make kernel, then run check again",
                required=False,
            ),
        ]
    checks = [Check("kernel registered", True, f"{kernel.name} ({kernel.version})")]
    if not Path("/dev/kvm").exists():
        return [*checks, Check("KVM usable", False, "no /dev/kvm: TCG", required=False)]
    with tempfile.TemporaryDirectory(prefix="reconciler-check-") as tmp:
        initrd = Path(tmp) / "canary.cpio.gz"
        init = guest_init(Path(tmp) / "init.log")
        entries: list[Entry] = [
            file_entry("init", init, 0o755),
            directory("dev"),
            directory("proc"),
            directory("sys"),
            char_device("dev/console", 5, 1),
        ]
        write_initramfs(entries, initrd)
        usable, why = kvm_probe(
            kernel.image, initrd, cache=state / "kvm-probe.json", qemu_version="check"
        )
    fix = "" if usable else "VMs run under TCG (slower, but they run)"
    return [*checks, Check("KVM usable", usable, why, fix, required=False)]


def run_check(args: argparse.Namespace) -> int:
    checks = [*host_checks(), *_kernel_and_kvm(state_dir(args))]
    khz = host_tsc_khz()
    checks.append(
        Check(
            "host TSC frequency (for TCG guests)",
            khz is not None,
            f"{khz} kHz" if khz else "unknown",
            "" if khz else "TCG guests may hang at TSC calibration on a busy host",
            required=False,
        )
    )
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("MISSING" if c.required else "no  ")
        line = f"{mark:<8} {c.name:<{width}}  {c.detail}"
        if c.fix and not c.ok:
            line += f"  -> {c.fix}"
        print(line)
    return EXIT_ERROR if any(c.required and not c.ok for c in checks) else EXIT_OK
