"""Host facts for QEMU boots under TCG."""

from __future__ import annotations

from pathlib import Path

from runtime.qemu.machine import host_tsc_khz, tcg_kernel_args


def test_tsc_frequency_is_read_from_cpuinfo_only_with_a_constant_tsc(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2596.152\nflags\t\t: fpu constant_tsc\n")
    if not Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").exists():
        assert host_tsc_khz(cpuinfo) == 2596152
        cpuinfo.write_text("cpu MHz\t\t: 2596.152\nflags\t\t: fpu\n")
        assert host_tsc_khz(cpuinfo) is None


def test_kernel_args_name_the_frequency_when_known() -> None:
    args = tcg_kernel_args()
    assert args == "" or args.startswith("tsc_early_khz=")
