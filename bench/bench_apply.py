"""Benchmark: ``reconciler apply`` on the embedded defaults, and the VM lifecycle it drives.

Measures, in one run (root, QEMU TCG here):

* time from ``reconciler apply`` to every VM of fleet-example healthy, artifacts already cached,
  and the peak RSS of the reconciler process during that apply;
* per VM, start to the init's "workload started" through the QEMU runtime against a bare
  ``qemu-system-x86_64`` command line booting the same artifacts (target overhead <= 1.2x);
* start (to "workload started") and stop latency of one VM, side by side with libvirt
  (``virsh create`` / ``virsh destroy`` of a transient domain with the same kernel and initrd,
  TCG) when libvirt is installed and ``libvirtd`` can be started.

Usage: ``sudo .venv/bin/python bench/bench_apply.py [--out bench/results/apply.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]  # the project, and the test kit

from support.kernel import register_kernel  # noqa: E402
from support.process_fleet import new_pool, remove_deployment  # noqa: E402
from support.qemu import artifact_spec, boot, wait_for_event  # noqa: E402
from support.repo import FleetRepo  # noqa: E402

from builders.cache import ArtifactCache  # noqa: E402
from runtime.qemu.driver import QemuRuntime  # noqa: E402
from runtime.qemu.machine import tcg_kernel_args  # noqa: E402


def wait_marker(log: Path, event: str, timeout: float = 180) -> float:
    """When (``time.perf_counter()``) the console log ``log`` showed ``event``."""
    wait_for_event(log, event, timeout)
    return time.perf_counter()


def reconciler(*argv: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one reconciler command."""
    wrapper = (
        "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-m", "reconciler", *argv],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if out[-2] != "0":
        raise RuntimeError(f"reconciler {' '.join(argv)} exited {out[-2]}")
    return time.perf_counter() - start, int(out[-1]) / 1024


def teardown(state: Path, bridge: str) -> None:
    """Stop the VMs of ``state``, remove their network, and forget them."""
    remove_deployment(state, bridge)
    shutil.rmtree(state / "vms", ignore_errors=True)
    for db in state.glob("state.db*"):
        db.unlink()


def bare_qemu(artifact: Path, work: Path) -> float:
    """Seconds from starting QEMU on the runtime's command line, by hand, to workload started."""
    vm = boot(artifact, work / "bare", memory_mib=256, kernel_log=False)
    try:
        return wait_marker(vm.console, "workload-started") - vm.started
    finally:
        vm.stop()


def runtime_vm(artifact: Path, work: Path, runtime: QemuRuntime) -> tuple[float, float]:
    """(start to workload-started, stop) seconds through the QEMU runtime."""
    vm_dir = work / "vm"
    shutil.rmtree(vm_dir, ignore_errors=True)
    spec = artifact_spec(artifact, vm_dir, "bench-0", fleet="bench", memory_mib=256)
    start = time.perf_counter()
    runtime.start(spec)
    started = wait_marker(vm_dir / "console.log", "workload-started") - start
    t = time.perf_counter()
    runtime.stop(spec, grace_seconds=0)
    return started, time.perf_counter() - t


def libvirt_vm(artifact: Path, work: Path) -> tuple[float, float] | None:
    """(``virsh create`` to workload started, ``virsh destroy``) for a disk-less image."""
    if shutil.which("virsh") is None or shutil.which("libvirtd") is None:
        return None
    if (
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        subprocess.run(["virtlogd", "-d"], check=False)
        subprocess.run(["libvirtd", "-d"], check=False)
        time.sleep(2)
    # libvirt runs QEMU as its own user: give it a readable copy of the artifact.
    shared = Path("/var/tmp/reconciler-bench-libvirt")
    shared.mkdir(mode=0o755, exist_ok=True)
    for name in ("kernel", "initramfs.cpio.gz"):
        shutil.copyfile(artifact / name, shared / name)
        (shared / name).chmod(0o644)
    log = shared / "console.log"
    log.unlink(missing_ok=True)
    cmdline = f"{(artifact / 'cmdline').read_text().strip()} {tcg_kernel_args()}"
    xml = f"""<domain type='qemu'>
  <name>reconciler-bench</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type machine='microvm'>hvm</type><kernel>{shared / "kernel"}</kernel>
    <initrd>{shared / "initramfs.cpio.gz"}</initrd><cmdline>{cmdline}</cmdline></os>
  <devices>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>"""
    (work / "domain.xml").write_text(xml)
    start = time.perf_counter()
    created = subprocess.run(
        ["virsh", "-c", "qemu:///system", "create", str(work / "domain.xml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        print(f"libvirt unavailable: {created.stderr.strip()}", file=sys.stderr)
        return None
    try:
        started = wait_marker(log, "workload-started") - start
    finally:
        t = time.perf_counter()
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "destroy", "reconciler-bench"],
            capture_output=True,
            check=False,
        )
    return started, time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "apply.md")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reconciler-bench-apply-"))
    state = register_kernel(root / "state")
    fleet = FleetRepo.of_fleet_example(root / "fleet")
    bridge, cidr = new_pool()  # a bridge and pool of its own: a demo may run on this host
    fleet.edit("fleet.yaml", "bridge: rcbr0", f"bridge: {bridge}")
    fleet.edit("fleet.yaml", "cidr: 10.88.0.0/24", f"cidr: {cidr}")
    fleet.commit("on the benchmark's own pool")
    common = ["--repo", str(fleet.path), "--state-dir", str(state)]
    try:
        subprocess.run(
            [sys.executable, "-m", "reconciler", "build", *common], check=True, capture_output=True
        )
        applies = []
        for _ in range(args.runs):
            teardown(state, bridge)
            applies.append(reconciler("apply", *common))
        teardown(state, bridge)
        artifact = next(
            e.path
            for e in ArtifactCache(state / "artifacts").entries()
            if (e.manifest["workload"], e.manifest["target"]) == ("web", "microvm")
        )
        work = root / "work"
        work.mkdir()
        runtime = QemuRuntime(state_dir=work, accel="tcg")
        bare = [bare_qemu(artifact, work) for _ in range(args.runs)]
        ours = [runtime_vm(artifact, work, runtime) for _ in range(args.runs)]
        # Side by side with libvirt on a disk-less image (libvirt's microvm disk wiring differs).
        unikernel = next(
            e.path
            for e in ArtifactCache(state / "artifacts").entries()
            if (e.manifest["workload"], e.manifest["target"]) == ("echo", "unikernel")
        )
        ours_uk = [runtime_vm(unikernel, work, runtime) for _ in range(args.runs)]
        virt = [libvirt_vm(unikernel, work) for _ in range(args.runs)]
    finally:
        teardown(state, bridge)
    median = statistics.median
    apply_s = median(a[0] for a in applies)
    peak = max(a[1] for a in applies)
    ours_start, ours_stop = median(o[0] for o in ours), median(o[1] for o in ours)
    lines = [
        "# `reconciler apply` benchmark (fleet-example, embedded defaults)",
        "",
        f"Generated by `bench/bench_apply.py` on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"QEMU TCG (KVM is not usable on these machines), medians of {args.runs} runs.",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| apply to all 4 VMs healthy, artifacts cached | {apply_s:.1f} s | |",
        f"| peak RSS of the reconciler during apply | {peak:.0f} MB | |",
        f"| web microVM: bare qemu start to workload started | {median(bare):.2f} s | |",
        f"| web microVM: QEMU runtime start to workload started | {ours_start:.2f} s | |",
        f"| runtime overhead | {ours_start / median(bare):.2f}x | <= 1.2x |",
        f"| QEMU runtime stop (QMP quit, grace 0) | {ours_stop:.2f} s | |",
    ]
    valid = [v for v in virt if v is not None]
    if valid:
        lines += [
            f"| echo unikernel: QEMU runtime start to workload started | "
            f"{median(o[0] for o in ours_uk):.2f} s | |",
            f"| echo unikernel: `virsh create` to workload started | "
            f"{median(v[0] for v in valid):.2f} s | |",
            f"| echo unikernel: QEMU runtime stop | {median(o[1] for o in ours_uk):.2f} s | |",
            f"| echo unikernel: `virsh destroy` | {median(v[1] for v in valid):.2f} s | |",
        ]
    else:
        lines.append(
            "| libvirt | not measured: libvirt is not installed or libvirtd does not start here | |"
        )
    lines += [
        "",
        "libvirt here runs without systemd (libvirtd and virtlogd started by hand), and most of "
        "its start time is spent inside `virsh create` before QEMU runs the guest.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
