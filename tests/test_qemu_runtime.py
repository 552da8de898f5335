"""The QEMU runtime: the command line from a VM spec (golden), and a real VM's lifecycle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.model import RuntimeKind, VMState
from runtime.protocol import NetworkAttachment, VMSpec
from runtime.qemu.argv import qemu_argv
from runtime.qemu.driver import QemuRuntime

GOLDEN = Path(__file__).parent / "golden" / "qemu"


def spec_for(vm_dir: Path, **extra: object) -> VMSpec:
    return VMSpec(
        name="web-0",
        workload="web",
        fleet="example",
        runtime=RuntimeKind.QEMU,
        vcpus=2,
        memory_mib=256,
        vm_dir=vm_dir,
        kernel=Path("/artifacts/web/kernel"),
        initrd=Path("/artifacts/web/initramfs.cpio.gz"),
        kernel_cmdline="console=ttyS0 panic=-1 quiet rc.hostname=web-0",
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("unikernel", {}),
        (
            "microvm-tap",
            {
                "rootfs": Path("/vms/web-0/rootfs.ext4"),
                "network": NetworkAttachment(
                    "rc-web-0", "52:54:00:12:34:56", "10.88.0.2/24", "10.88.0.1"
                ),
            },
        ),
    ],
)
def test_argv_matches_golden(case: str, extra: dict[str, object]) -> None:
    argv = qemu_argv(
        spec_for(Path("/vms/web-0"), **extra),
        accel="tcg",
        extra_kernel_args="tsc_early_khz=2600000",
    )
    rendered = "\n".join(argv) + "\n"
    golden = GOLDEN / f"{case}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


@pytest.mark.qemu
def test_vm_is_detached_adopted_and_stopped(echo_unikernel: Path, tmp_path: Path) -> None:
    spec = VMSpec(
        name="echo-0",
        workload="echo",
        fleet="example",
        runtime=RuntimeKind.QEMU,
        vcpus=1,
        memory_mib=128,
        vm_dir=tmp_path / "echo-0",
        kernel=echo_unikernel / "kernel",
        initrd=echo_unikernel / "initramfs.cpio.gz",
        kernel_cmdline=(echo_unikernel / "cmdline").read_text().strip(),
    )
    runtime = QemuRuntime(state_dir=tmp_path, accel="tcg")
    started = runtime.start(spec)
    try:
        assert started.state is VMState.RUNNING
        assert started.pid is not None
        # Detached: QEMU is not a child of this process, so it outlives the reconciler.
        assert os.getppid() != started.pid
        ppid = int(Path(f"/proc/{started.pid}/stat").read_text().split(")")[1].split()[1])
        assert ppid != os.getpid()
        # A second runtime (a restarted daemon) adopts the VM instead of starting another.
        again = QemuRuntime(state_dir=tmp_path, accel="tcg").start(spec)
        assert again.pid == started.pid
        import time

        from runtime.console import read_markers

        deadline = time.monotonic() + 120
        while not any(
            m["event"] == "workload-started" for m in read_markers(spec.vm_dir / "console.log")
        ):
            assert time.monotonic() < deadline, (spec.vm_dir / "console.log").read_text()
            time.sleep(0.5)
    finally:
        stopped = runtime.stop(spec, grace_seconds=1)
    assert stopped.state is VMState.MISSING
    assert stopped.pid is None
    stat = Path(f"/proc/{started.pid}/stat")
    # Gone, or a zombie waiting for the host's init to reap it: either way no VM runs.
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


def test_check_reports_every_prerequisite_and_probes_kvm(
    session_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", "--state-dir", str(session_state)])
    out = capsys.readouterr().out
    assert code == 0, out  # CI installs everything the embedded default needs
    for name in (
        "QEMU",
        "mkfs.ext4",
        "kernel registered",
        "KVM usable",
        "Firecracker",
        "TAP devices",
        "nftables",
    ):
        assert name in out
    kvm_line = next(line for line in out.splitlines() if "KVM usable" in line)
    # Usable or not, the verdict comes from a canary boot, never from /dev/kvm alone.
    assert "canary" in kvm_line or "QEMU failed under KVM" in kvm_line or "/dev/kvm" in kvm_line
