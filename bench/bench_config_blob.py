"""Benchmark: the cost of a VM's own initrd (the artifact's initramfs plus the guest init's
per-VM configuration segment), which the QEMU and Firecracker runtimes write at every start.

The base is a file of the web unikernel's initramfs size (``--size-mib``, default 17: the
PyInstaller web service with its libraries and the kernel modules), written once; each run then
writes the per-VM initrd with a realistic configuration (hostname, address, 20 env entries, an
8 KiB value, args) next to it, as the runtime does in the VM's directory, and the encoding alone
is timed apart. Reported: median and max wall time over ``--runs`` runs after one warm-up.

Usage: ``.venv/bin/python bench/bench_config_blob.py [--dir DIR] [--out FILE]`` (``--dir`` picks
the file system: the state directory's in production; results: bench/results/config-blob.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.guest_config import GuestConfig, encode
from runtime.guest_config import write_vm_initrd


def config() -> GuestConfig:
    env = {f"SETTING_{i}": f"value {i}\twith\nodd bytes" for i in range(20)}
    env["BIG"] = "x" * 8192
    return GuestConfig(
        hostname="web-0",
        address="10.88.0.5/24",
        gateway="10.88.0.1",
        env=env,
        args=("--port", "8080", "two words"),
        restart="always",
    )


def timed(action: object, runs: int) -> list[float]:
    assert callable(action)
    action()  # warm-up: page cache, allocator
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=17)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-config-blob-", dir=options.dir) as tmp:
        base = Path(tmp) / "initramfs.cpio.gz"
        base.write_bytes(os.urandom(options.size_mib << 20))
        guest = config()
        blob = encode(guest)
        output = Path(tmp) / "vm" / "initrd.img"
        initrd = timed(lambda: write_vm_initrd(base, guest, output), options.runs)
        encoding = timed(lambda: encode(guest), options.runs)
        where = "a temporary directory" if options.dir is None else f"`{options.dir}`"
    ms = [t * 1000 for t in initrd]
    us = [t * 1e6 for t in encoding]
    report = f"""# Per-VM initrd cost (`bench/bench_config_blob.py`)

What a QEMU or Firecracker start now does before the VMM runs: copy the artifact's initramfs
and append the guest init's configuration segment (`runtime/guest_config.py`).

| measure | median | max |
|---|---|---|
| write the per-VM initrd, {options.size_mib} MiB base | {statistics.median(ms):.1f} ms \
| {max(ms):.1f} ms |
| encode the configuration ({len(blob)} bytes) | {statistics.median(us):.0f} µs \
| {max(us):.0f} µs |

{options.runs} runs after one warm-up, base in the page cache (as it is right after a build or a
previous start), files in {where}; {os.cpu_count()} CPUs, Python {platform.python_version()}.
For scale: a TCG boot of the same unikernel to its workload takes seconds, so the copy is a
small fraction of a start.
"""
    print(report)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(report)


if __name__ == "__main__":
    main()
