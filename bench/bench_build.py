"""Benchmark: the build matrix on fleet-example, and how fast its images boot.

Measures, in one run: build time per target (from a cold cache), artifact sizes per target, the
microVM root filesystem step (``images.make_ext4``: sizing + ``mkfs.ext4 -d``) against a raw
``mkfs.ext4 -d`` of the same staging tree (target overhead <= 1.3x), and the time from starting
QEMU to the init's "workload started" marker for the unikernel and the microVM image of the same
workload (web) under the same VMM (TCG here; the unikernel should be faster).

Usage: ``python bench/bench_build.py [--out bench/results/build.md] [--boots 3]``.
Needs a registered kernel: it fetches Debian's cloud kernel itself.
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(PROJECT))

from builders.cache import ArtifactCache  # noqa: E402
from builders.images import guest_init, make_ext4, stage_rootfs  # noqa: E402
from builders.kernels import KernelRegistry  # noqa: E402
from reconciler.cli import main as reconciler  # noqa: E402
from runtime.qemu.machine import tcg_kernel_args  # noqa: E402


def boot_seconds(artifact: Path, work: Path) -> tuple[float, float]:
    """(wall seconds from QEMU start to the workload-started marker, guest-reported seconds)."""
    console = work / "console.log"
    console.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(artifact / "kernel"),
        "-initrd",
        str(artifact / "initramfs.cpio.gz"),
    ]
    if (artifact / "rootfs.ext4").exists():
        shutil.copyfile(artifact / "rootfs.ext4", work / "root.ext4")
        argv += [
            "-drive",
            f"id=root,file={work / 'root.ext4'},format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    argv += ["-append", f"{(artifact / 'cmdline').read_text().strip()} {tcg_kernel_args()}"]
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while time.perf_counter() - start < 120:
            text = console.read_text(errors="replace") if console.exists() else ""
            for line in text.splitlines():
                if '"workload-started"' in line:
                    wall = time.perf_counter() - start
                    return wall, float(json.loads(line.split(" ", 1)[1])["t"])
            time.sleep(0.01)
        raise RuntimeError(f"no workload-started marker from {artifact}")
    finally:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "build.md")
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reconciler-bench-") as tmp:
        root = Path(tmp)
        state = root / "state"
        deb = (
            subprocess.run(
                ["bash", str(PROJECT / "deploy" / "fetch-debian-kernel.sh"), str(root / "deb")],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        KernelRegistry(state / "kernels").import_path(Path(deb))
        repo = root / "fleet"
        shutil.copytree(PROJECT / "fleet-example", repo)
        for git in (
            ["init", "-q", "-b", "main"],
            ["add", "-A"],
            ["-c", "user.email=b@example.invalid", "-c", "user.name=b", "commit", "-qm", "fleet"],
        ):
            subprocess.run(["git", "-C", str(repo), *git], check=True)
        cache = root / "cache"
        started = time.perf_counter()
        code = reconciler(
            [
                "build",
                "--repo",
                str(repo),
                "--state-dir",
                str(state),
                "--cache-dir",
                str(cache),
                "--format",
                "json",
            ]
        )
        cold = time.perf_counter() - started
        started = time.perf_counter()
        reconciler(
            [
                "build",
                "--repo",
                str(repo),
                "--state-dir",
                str(state),
                "--cache-dir",
                str(cache),
                "--format",
                "json",
            ]
        )
        warm = time.perf_counter() - started
        entries = {
            (e.manifest["workload"], e.manifest["target"]): e
            for e in ArtifactCache(cache).entries()
        }

        # The rootfs step against raw mkfs.ext4 -d on the same staging tree.
        web_exe = entries[("web", "executable")].file("workload")
        staging = root / "staging"
        stage_rootfs(staging, web_exe, guest_init(root / "init.log"))
        ours, raw = [], []
        for i in range(5):
            image = root / f"ours{i}.ext4"
            t = time.perf_counter()
            make_ext4(staging, image, root / "mkfs.log")
            ours.append(time.perf_counter() - t)
            size = image.stat().st_size
            t = time.perf_counter()
            subprocess.run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-d",
                    str(staging),
                    str(root / "raw.ext4"),
                    f"{size // (1 << 20)}M",
                ],
                check=True,
            )
            raw.append(time.perf_counter() - t)

        work = root / "boot"
        work.mkdir()
        boots = {}
        for target in ("unikernel", "microvm"):
            runs = [boot_seconds(entries[("web", target)].path, work) for _ in range(args.boots)]
            boots[target] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )

    lines = [
        "# Build matrix and boot benchmark (fleet-example)",
        "",
        f"Generated by `bench/bench_build.py` on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"QEMU TCG (KVM is not usable on these machines). Build exit code {code}.",
        "",
        "## Build time and size per artifact (cold cache)",
        "",
        "| workload | target | build s | size MB |",
        "|---|---|---:|---:|",
    ]
    for (workload, target), entry in sorted(entries.items()):
        size = sum(f["size"] for f in entry.manifest["files"].values()) / 1e6
        lines.append(f"| {workload} | {target} | {entry.manifest['seconds']:.1f} | {size:.1f} |")
    lines += [
        "",
        f"Whole matrix: {cold:.1f} s cold, {warm:.2f} s when everything is cached.",
        "",
        "## Root filesystem step (web microVM)",
        "",
        "| step | median s |",
        "|---|---:|",
        f"| `make_ext4` (sizing + mkfs.ext4 -d) | {statistics.median(ours):.3f} |",
        f"| raw `mkfs.ext4 -d`, same tree and size | {statistics.median(raw):.3f} |",
        f"| overhead | {statistics.median(ours) / statistics.median(raw):.2f}x (target <= 1.3x) |",
        "",
        f'## QEMU start to "workload started" (web, median of {args.boots})',
        "",
        "| image | wall s | guest clock s |",
        "|---|---:|---:|",
        f"| unikernel | {boots['unikernel'][0]:.2f} | {boots['unikernel'][1]:.2f} |",
        f"| microvm | {boots['microvm'][0]:.2f} | {boots['microvm'][1]:.2f} |",
        f"| ratio microvm / unikernel | {boots['microvm'][0] / boots['unikernel'][0]:.2f}x | "
        f"{boots['microvm'][1] / boots['unikernel'][1]:.2f}x |",
        "",
        "web is the one workload of fleet-example built as both images. Its unikernel's "
        "initramfs carries the whole 17 MB PyInstaller executable, which the kernel decompresses "
        "into memory before init runs; the microVM image reads the executable from its disk on "
        "demand. The unikernel saves the disk driver and the root switch, and pays for the "
        "unpacking.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
