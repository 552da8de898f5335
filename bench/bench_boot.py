"""Benchmark: QEMU start to "workload started", side by side, for the lean images.

For ``web`` (Python) and ``echo`` (C) of fleet-example, in one run and under the same VMM (TCG
here), the time from starting QEMU to the guest init's ``workload-started`` marker, on the wall
clock and on the guest's (the marker's ``t``, CLOCK_MONOTONIC since the kernel started), for:

* unikernel / specialised kernel (profile ``unikernel``), through the QEMU runtime;
* microVM image / specialised kernel (profile ``microvm``), through the QEMU runtime;
* microVM image / Debian's cloud kernel, through the QEMU runtime (the reference);
* the unikernel on Debian's kernel, and the unikernel as it was packed before (one-file
  PyInstaller executable, gzip initramfs; stripped like the rest), for context;
* bare QEMU with the same artifacts: a hand-written minimal ``qemu-system-x86_64 -M microvm``
  command without the runtime's confinement, QMP, console socket or per-VM configuration work
  (its per-VM initrd is written before the clock starts), to show the runtime's own overhead.

Then, on bare QEMU only: each boot phase (QEMU start, kernel's first message, ``/init`` run,
init ``booted``, ``workload-started``; printk timestamps give the guest clock; the kernel logs to
the console for this, so these boots are slower than the headline ones), the time to the first
answer of the workload's health check (HTTP ``/healthz`` for web, an echoed line for echo:
``workload-started`` is the exec, and a Python workload still starts its interpreter after it),
and the initramfs compression (gzip, LZ4, none) against each kernel for the web unikernel.

A row whose specialised kernel is not built on this machine is reported missing with the
command that builds it, never estimated. Best of N and median of N boots; the machine is shared
and has 2 cores, so single figures are noisy.

Usage: ``python bench/bench_boot.py [--out bench/results/boot.md] [--boots 5]
[--build-kernels]`` as root (the QEMU runtime's confinement needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]  # the project, and the test kit

from support.kernel import register_kernel  # noqa: E402
from support.qemu import artifact_spec  # noqa: E402
from support.waiting import free_port  # noqa: E402

from builders import kernel_build  # noqa: E402
from builders.cpio import Compression  # noqa: E402
from builders.executable import Layout, build_executable  # noqa: E402
from builders.images import (  # noqa: E402
    INITRAMFS,
    INITRAMFS_COMPRESSION,
    build_microvm,
    build_unikernel,
    guest_init,
)
from builders.kernels import Kernel, KernelRegistry  # noqa: E402
from reconciler.guest_config import GuestConfig  # noqa: E402
from reconciler.model import Language  # noqa: E402
from runtime.console import MARKER, read_markers  # noqa: E402
from runtime.guest_config import write_vm_initrd  # noqa: E402
from runtime.qemu.argv import USER_NET_ADDRESS, USER_NET_GATEWAY  # noqa: E402
from runtime.qemu.driver import QemuRuntime  # noqa: E402
from runtime.qemu.machine import tcg_kernel_args  # noqa: E402

MEMORY_MIB = 256
TIMEOUT = 120.0
WORKLOADS = {
    # name: (language, source, entrypoint, port, env)
    "web": (Language.PYTHON, "services/web", "app.py", 8080, {"PORT": "8080"}),
    "echo": (Language.C, "services/echo", "echo.c", 7007, {"ECHO_PORT": "7007"}),
}


# -- artifacts ---------------------------------------------------------------------------------


def built_kernel(profile: str) -> kernel_build.BuiltKernel | None:
    """The specialised kernel of ``profile`` if this machine built it already (what ``reconciler
    kernel build`` would reuse), without building it."""
    return kernel_cache().cached(profile)


def kernel_cache() -> kernel_build.KernelCache:
    return kernel_build.KernelCache(
        Path(os.environ.get("RECONCILER_KERNEL_CACHE", kernel_build.DEFAULT_CACHE))
    )


@dataclass
class Kernels:
    debian: Kernel
    special: dict[str, Kernel]  # profile -> kernel
    missing: dict[str, str]  # profile -> why


def kernels(state: Path, build: bool) -> Kernels:
    registry = KernelRegistry(register_kernel(state) / "kernels")
    debian = registry.list()[0]
    special: dict[str, Kernel] = {}
    missing: dict[str, str] = {}
    for profile in ("unikernel", "microvm"):
        try:
            found = built_kernel(profile)
            if found is None and build:
                found, _ = kernel_cache().build(profile)
        except Exception as exc:
            missing[profile] = f"the kernel builder failed: {exc}"
            continue
        if found is None:
            missing[profile] = (
                f"no specialised `{profile}` kernel is built on this machine "
                f"(`reconciler kernel build --profile {profile}`, or rerun with --build-kernels)"
            )
        else:
            special[profile] = kernel_build.register(registry, found)
    return Kernels(debian, special, missing)


def build_programs(root: Path, log: Path) -> dict[str, Path]:
    """``web`` one-file and one-directory, ``echo``: what the images carry."""
    fleet = PROJECT / "fleet-example"
    root.mkdir(parents=True)
    out: dict[str, Path] = {}
    for name, (language, source, entrypoint, _port, _env) in WORKLOADS.items():
        layouts = [Layout.ONEFILE, Layout.ONEDIR] if language is Language.PYTHON else [None]
        for layout in layouts:
            key = name if layout in (None, Layout.ONEDIR) else f"{name}-onefile"
            output = root / key
            build_executable(
                language,
                fleet / source,
                entrypoint=entrypoint,
                options={},
                output=output,
                log=log,
                layout=layout or Layout.ONEFILE,
            )
            out[key] = output
    return out


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# -- booting -----------------------------------------------------------------------------------


def guest_for(workload: str, *, network: bool = False) -> GuestConfig:
    env = WORKLOADS[workload][4]
    if network:
        return GuestConfig(
            hostname=f"{workload}-0",
            env=env,
            restart="never",
            address=USER_NET_ADDRESS,
            gateway=USER_NET_GATEWAY,
        )
    return GuestConfig(hostname=f"{workload}-0", env=env, restart="never")


def boot_runtime(artifact: Path, work: Path, workload: str) -> tuple[float, float]:
    """(wall, guest) seconds to ``workload-started`` through the QEMU runtime, from the call to
    ``start`` (per-VM initrd, chroot, confinement, QMP and console sockets included)."""
    vm_dir = work / f"{workload}-0"
    shutil.rmtree(vm_dir, ignore_errors=True)
    spec = artifact_spec(
        artifact, vm_dir, f"{workload}-0", guest=guest_for(workload), memory_mib=MEMORY_MIB
    )
    runtime = QemuRuntime(state_dir=work, accel="tcg", snapshots=False)
    started = time.perf_counter()
    runtime.start(spec)
    try:
        deadline = started + TIMEOUT
        while True:
            markers = read_markers(vm_dir / "console.log")
            found = [m for m in markers if m["event"] in ("workload-started", "error")]
            if found:
                if found[0]["event"] == "error":
                    raise RuntimeError(f"{artifact.name}: {found[0]['message']}")
                return time.perf_counter() - started, float(found[0]["t"])
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{artifact.name}: no workload-started within {TIMEOUT:g} s")
            time.sleep(0.005)
    finally:
        runtime.stop(spec, grace_seconds=0)


@dataclass
class BareBoot:
    """One bare QEMU boot: console lines with their wall-clock arrival, and its process."""

    process: subprocess.Popen[bytes]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append((time.perf_counter() - self.started, raw.decode(errors="replace")))
        self.done.set()

    def wait_marker(self, event: str) -> tuple[float, dict[str, object]]:
        deadline = time.perf_counter() + TIMEOUT
        seen = 0
        while time.perf_counter() < deadline:
            for wall, line in self.lines[seen:]:
                seen += 1
                if MARKER in line:
                    marker = json.loads(line[line.index(MARKER) + len(MARKER) :])
                    if marker["event"] == "error":
                        raise RuntimeError(f"guest error: {marker['message']}")
                    if marker["event"] == event:
                        return wall, marker
            if self.done.is_set() and seen == len(self.lines):
                raise RuntimeError(f"QEMU ended without {event}: {self.tail()}")
            time.sleep(0.002)
        raise RuntimeError(f"no {event} within {TIMEOUT:g} s: {self.tail()}")

    def tail(self) -> str:
        return "".join(line for _, line in self.lines[-15:])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def bare_argv(
    artifact: Path, initrd: Path, rootfs: Path | None, forward: tuple[int, int] | None, append: str
) -> list[str]:
    """The minimal hand-written command: the same machine, devices and kernel arguments as the
    runtime's, and nothing else."""
    argv = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        f"{MEMORY_MIB}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(artifact / "kernel"),
        "-initrd",
        str(initrd),
    ]
    if rootfs is not None:
        argv += [
            "-drive",
            f"id=root,file={rootfs},format=raw,if=none,cache=writeback",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    if forward is not None:
        argv += [
            "-netdev",
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{forward[0]}-:{forward[1]}",
            "-device",
            "virtio-net-device,netdev=net0",
        ]
    cmdline = " ".join(
        p for p in ((artifact / "cmdline").read_text().strip(), tcg_kernel_args(), append) if p
    )
    return [*argv, "-append", cmdline]


def boot_bare(
    artifact: Path, work: Path, workload: str, *, forward: int | None = None, append: str = ""
) -> BareBoot:
    work.mkdir(parents=True, exist_ok=True)
    initrd = work / "vm-initrd"
    write_vm_initrd(artifact / INITRAMFS, guest_for(workload, network=forward is not None), initrd)
    rootfs = None
    if (artifact / "rootfs.ext4").exists():
        rootfs = work / "rootfs.ext4"
        shutil.copyfile(artifact / "rootfs.ext4", rootfs)
    port = (forward, WORKLOADS[workload][3]) if forward is not None else None
    argv = bare_argv(artifact, initrd, rootfs, port, append)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    boot = BareBoot(process, started)
    threading.Thread(target=boot.read, daemon=True).start()
    return boot


def bare_started(artifact: Path, work: Path, workload: str) -> tuple[float, float]:
    boot = boot_bare(artifact, work, workload)
    try:
        wall, marker = boot.wait_marker("workload-started")
        return wall, float(str(marker["t"]))
    finally:
        boot.stop()


def answered(workload: str, port: int) -> bool:
    try:
        if workload == "web":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                return bool(reply.status == 200)
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.settimeout(1)
            conn.sendall(b"ping\n")
            return conn.recv(16).startswith(b"ping")
    except OSError:
        return False


def bare_health(artifact: Path, work: Path, workload: str) -> tuple[float, float]:
    """(wall to workload-started, wall to the first answer of the health check)."""
    port = free_port()
    boot = boot_bare(artifact, work, workload, forward=port)
    try:
        started, _ = boot.wait_marker("workload-started")
        deadline = time.perf_counter() + TIMEOUT
        while not answered(workload, port):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{workload} never answered: {boot.tail()}")
            time.sleep(0.01)
        return started, time.perf_counter() - boot.started
    finally:
        boot.stop()


PHASES = ("kernel's first message", "/init started", "init booted", "workload-started")
PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]")


def bare_phases(artifact: Path, work: Path, workload: str) -> dict[str, tuple[float, float]]:
    """{phase: (wall, guest)} with the kernel logging to the console (printk timestamps)."""
    boot = boot_bare(artifact, work, workload, append="loglevel=7 printk.time=1")
    try:
        started, marker = boot.wait_marker("workload-started")
        _, booted = boot.wait_marker("booted")
    finally:
        boot.stop()
    phases: dict[str, tuple[float, float]] = {}
    for wall, line in boot.lines:
        stamp = PRINTK.match(line)
        if stamp:
            phases.setdefault("kernel's first message", (wall, float(stamp.group(1))))
            if "Run /init as init process" in line:
                phases["/init started"] = (wall, float(stamp.group(1)))
        if MARKER in line and '"booted"' in line:
            phases["init booted"] = (wall, float(str(booted["t"])))
    phases["workload-started"] = (started, float(str(marker["t"])))
    return phases


# -- the report --------------------------------------------------------------------------------


def stats(samples: list[float]) -> str:
    return f"{min(samples):.2f} / {statistics.median(samples):.2f}"


def repeat(n: int, run: Callable[[], tuple[float, float]]) -> tuple[list[float], list[float]]:
    walls, guests = [], []
    for _ in range(n):
        wall, guest = run()
        walls.append(wall)
        guests.append(guest)
    return walls, guests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "boot.md")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--build-kernels", action="store_true")
    args = parser.parse_args()
    n = args.boots

    with tempfile.TemporaryDirectory(prefix="reconciler-bench-boot-") as tmp:
        root = Path(tmp)
        log = root / "build.log"
        found = kernels(root / "state", args.build_kernels)
        programs = build_programs(root / "programs", log)
        init = guest_init(log)

        # (workload, image, kernel label) -> artifact directory
        kernel_of = {"debian": found.debian, **found.special}
        artifacts: dict[tuple[str, str, str], Path] = {}

        def image(workload: str, kind: str, kernel: str, program: str, **kw: object) -> None:
            out = root / "art" / f"{workload}-{kind}-{kernel}"
            out.mkdir(parents=True)
            if kind.startswith("unikernel"):
                build_unikernel(programs[program], kernel_of[kernel], init, out, **kw)  # type: ignore[arg-type]
            else:
                scratch = root / "scratch" / out.name
                scratch.mkdir(parents=True)
                build_microvm(
                    programs[program], kernel_of[kernel], init, out, staging=scratch, log=log
                )
            artifacts[(workload, kind, kernel)] = out

        for workload in WORKLOADS:
            image(workload, "microvm", "debian", workload)
            image(workload, "unikernel", "debian", workload)
            if "unikernel" in kernel_of:
                image(workload, "unikernel", "unikernel", workload)
            if "microvm" in kernel_of:
                image(workload, "microvm", "microvm", workload)
        before = "web-onefile"
        image("web", "unikernel-before", "debian", before, compression=Compression.GZIP)

        lines = [
            "# Boot: unikernel, microVM and bare QEMU side by side (fleet-example)",
            "",
            f"Generated by `bench/bench_boot.py` on {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, QEMU TCG (KVM is not usable here), "
            f"{MEMORY_MIB} MiB and 1 vCPU per VM. Best / median of {n} boots each, in seconds; "
            "the machine is shared (other builds ran at the same time), so compare ratios "
            "within this run rather than figures across runs. Rerun: "
            "`sudo .venv/bin/python bench/bench_boot.py [--boots N] [--build-kernels]`.",
            "",
            f"Load average when the boots began: {os.getloadavg()[0]:.1f} (2 cores).",
            "",
        ]
        if found.missing:
            lines += ["**Missing rows** (never estimated):", ""]
            lines += [f"- {profile} kernel: {why}" for profile, why in found.missing.items()]
            lines.append("")

        # Headline: through the runtime, and bare QEMU with the same artifacts.
        headline = [
            ("unikernel", "unikernel", "unikernel / specialised kernel"),
            ("microvm", "microvm", "microVM / specialised kernel"),
            ("microvm", "debian", "microVM / Debian kernel"),
            ("unikernel", "debian", "unikernel / Debian kernel"),
            ("unikernel-before", "debian", "unikernel, one-file + gzip / Debian kernel"),
        ]
        lines += [
            '## QEMU start to "workload started"',
            "",
            "| workload | image / kernel | runtime wall | runtime guest clock | bare QEMU wall | "
            "bare guest clock | runtime / bare (best / median wall) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        medians: dict[tuple[str, str], float] = {}
        overheads: dict[tuple[str, str], float] = {}
        for workload in WORKLOADS:
            for kind, kernel, label in headline:
                artifact = artifacts.get((workload, kind, kernel))
                if artifact is None:
                    if kind == "unikernel-before" and workload != "web":
                        continue
                    lines.append(f"| {workload} | {label} | missing | | | | |")
                    continue
                work = root / "vms" / f"{workload}-{kind}-{kernel}"
                # Alternated, so that a change in the machine's load hits both alike.
                rt_wall, rt_guest, bare_wall, bare_guest = [], [], [], []
                for _ in range(n):
                    wall, guest = boot_runtime(artifact, work, workload)
                    rt_wall.append(wall)
                    rt_guest.append(guest)
                    wall, guest = bare_started(artifact, work / "bare", workload)
                    bare_wall.append(wall)
                    bare_guest.append(guest)
                medians[(workload, label)] = statistics.median(rt_wall)
                ratio = statistics.median(rt_wall) / statistics.median(bare_wall)
                overheads[(workload, label)] = ratio
                lines.append(
                    f"| {workload} | {label} | {stats(rt_wall)} | {stats(rt_guest)} | "
                    f"{stats(bare_wall)} | {stats(bare_guest)} | "
                    f"{min(rt_wall) / min(bare_wall):.2f}x / {ratio:.2f}x |"
                )
                print(lines[-1], flush=True)

        lines += ["", "## Targets (ratios of median runtime wall time)", ""]
        lines += ["| workload | ratio | value | target |", "|---|---|---:|---:|"]
        for workload in WORKLOADS:
            reference = medians.get((workload, "microVM / Debian kernel"))
            for label, target in (
                ("unikernel / specialised kernel", 0.5),
                ("microVM / specialised kernel", 0.7),
                ("unikernel / Debian kernel", None),
            ):
                value = medians.get((workload, label))
                shown = f"{value / reference:.2f}x" if value and reference else "missing"
                want = f"<= {target}x" if target else "(context)"
                lines.append(f"| {workload} | {label} / microVM Debian | {shown} | {want} |")
            if overheads:
                worst = max((v, k[1]) for k, v in overheads.items() if k[0] == workload)
                lines.append(
                    f"| {workload} | runtime / bare QEMU, worst row ({worst[1]}) | "
                    f"{worst[0]:.2f}x | <= 1.2x |"
                )

        # Health check: the first answer, bare QEMU with a user-mode network forward.
        lines += [
            "",
            "## QEMU start to the first health-check answer (bare QEMU, user-mode network)",
            "",
            "`workload-started` is the init's exec of the workload; a Python workload then "
            "starts its interpreter (and a one-file executable first unpacks itself to /tmp).",
            "",
            "| workload | image / kernel | workload-started wall | first answer wall |",
            "|---|---|---:|---:|",
        ]
        # The rows that were built: (workload, label, artifact).
        present = [
            (workload, label, artifacts[(workload, kind, kernel)])
            for workload in WORKLOADS
            for kind, kernel, label in headline
            if (workload, kind, kernel) in artifacts
        ]
        for workload, label, artifact in present:
            work = root / "vms" / f"health-{artifact.name}"
            started, answer = repeat(n, partial(bare_health, artifact, work, workload))
            lines.append(f"| {workload} | {label} | {stats(started)} | {stats(answer)} |")
            print(lines[-1], flush=True)

        # Phases, one boot per configuration with the kernel's log on the console.
        lines += [
            "",
            "## Boot phases (bare QEMU, kernel log on the console: slower than above)",
            "",
            "Wall clock from QEMU start / guest clock (printk timestamps, then the init's "
            "markers). The first kernel message comes after the kernel decompressed itself "
            "and set up its console; `/init started` after the initramfs was unpacked.",
            "",
            "| workload | image / kernel | kernel's first message | /init started | "
            "init booted | workload-started |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for workload, label, artifact in present:
            phases = bare_phases(artifact, root / "vms" / f"phases-{artifact.name}", workload)
            cells = [
                f"{phases[p][0]:.2f} / {phases[p][1]:.2f}" if p in phases else "-" for p in PHASES
            ]
            lines.append(f"| {workload} | {label} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)

        # Compression of the initramfs, per kernel, web unikernel, bare QEMU.
        lines += [
            "",
            "## Initramfs compression (web unikernel, one-directory bundle, bare QEMU)",
            "",
            "| kernel | compression | initramfs MB | wall to workload-started | guest clock |",
            "|---|---|---:|---:|---:|",
        ]
        fastest: list[str] = []
        for kernel in ("unikernel", "debian"):
            if kernel not in kernel_of:
                lines.append(f"| {kernel} | missing | | | |")
                continue
            by_compression: dict[str, float] = {}
            for compression in Compression:
                out = root / "compression" / f"{kernel}-{compression.value}"
                out.mkdir(parents=True)
                build_unikernel(
                    programs["web"], kernel_of[kernel], init, out, compression=compression
                )
                size = (out / INITRAMFS).stat().st_size / 1e6
                walls, guests = repeat(n, partial(bare_started, out, root / "vms" / "cmp", "web"))
                by_compression[compression.value] = min(guests)
                lines.append(
                    f"| {kernel} | {compression.value} | {size:.1f} | {stats(walls)} | "
                    f"{stats(guests)} |"
                )
                print(lines[-1], flush=True)
            best = min(by_compression, key=by_compression.__getitem__)
            fastest.append(f"`{best}` with the {kernel} kernel")
        lines += [
            "",
            f"Fastest in this run (best guest clock: load only adds time, so the best of N is "
            f"the figure a busy machine distorts least): {', '.join(fastest)}. The images use "
            f"`{INITRAMFS_COMPRESSION.value}` (`builders/images.py`): the kernel's unpacking "
            "is guest work, emulated under TCG; the cost is the artifact's size in the cache.",
        ]

        # Sizes.
        lines += [
            "",
            "## Sizes (MB)",
            "",
            "| workload | image / kernel | kernel | initramfs | root disk | workload as packed |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for (workload, kind, kernel), artifact in sorted(artifacts.items()):
            program = "web-onefile" if kind == "unikernel-before" else workload
            disk = artifact / "rootfs.ext4"
            kernel_mb = (artifact / "kernel").stat().st_size / 1e6
            lines.append(
                f"| {workload} | {kind} / {kernel} | {kernel_mb:.1f}"
                f" | {(artifact / INITRAMFS).stat().st_size / 1e6:.2f}"
                f" | {disk.stat().st_size / 1e6 if disk.exists() else 0:.1f}"
                f" | {tree_size(programs[program]) / 1e6:.2f} |"
            )
        for label, registered in kernel_of.items():
            vmlinux = registered.image.with_name("vmlinux")
            extra = f", vmlinux {vmlinux.stat().st_size / 1e6:.1f} MB" if vmlinux.exists() else ""
            lines.append(
                f"\nKernel `{label}`: {registered.name}, bzImage "
                f"{registered.image.stat().st_size / 1e6:.1f} MB{extra}."
            )

    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
