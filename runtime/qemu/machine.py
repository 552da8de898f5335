"""Facts about the host that every QEMU boot of a reconciler image needs.

Under TCG the guest's TSC runs at the host's TSC rate, but the guest kernel cannot always measure
it: on a loaded host, calibration against the PIT fails, and ``-M microvm`` has no HPET or ACPI
PM timer to fall back on, so the kernel stops right after "tsc: No reference (HPET/PMTIMER)
available" and never reaches init. Telling it the frequency (``tsc_early_khz=``) skips the
calibration. The value is the host's, so the runtime adds it at boot, never the image.
"""

from __future__ import annotations

import re
from pathlib import Path

_DETECTED = re.compile(r"tsc: (?:Detected|Refined TSC clocksource calibration:) ([0-9.]+) MHz")


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC frequency in kHz, or None when it cannot be read."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    try:
        if sysfs.exists():
            return int(sysfs.read_text().strip())
        text = cpuinfo.read_text()
    except (OSError, ValueError):
        return None
    # With constant_tsc the reported clock is the TSC clock; without it there is no safe value.
    if "constant_tsc" not in text:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def tcg_kernel_args() -> str:
    """Kernel command-line arguments a guest needs to boot reliably under TCG on this host."""
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""
