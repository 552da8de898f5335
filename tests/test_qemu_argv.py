"""The one QEMU command line (``runtime.qemu.argv``) in the shapes other than a fleet VM's:
the KVM canary's, and a test or benchmark boot reaching its guest through user-mode networking.
Golden files, as for the runtime's own cases (``test_qemu_runtime.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_qemu_runtime import spec_for

from runtime.protocol import NetworkAttachment, VMSpec
from runtime.qemu.accel import canary_argv
from runtime.qemu.argv import PortForward, SnapshotRole, qemu_argv

GOLDEN = Path(__file__).parent / "golden" / "qemu"


def matches_golden(case: str, argv: list[str]) -> None:
    rendered = "\n".join(argv) + "\n"
    golden = GOLDEN / f"{case}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def spec(**extra: object) -> VMSpec:
    return spec_for(Path("/tmp/boot"), **extra)


def test_a_forwarded_port_is_user_networking_on_loopback_only() -> None:
    argv = qemu_argv(
        spec(rootfs=Path("/tmp/boot/rootfs.ext4")),
        accel="tcg",
        extra_kernel_args="loglevel=6",
        forward=PortForward(40123, 8080),
    )
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:40123-:8080" in argv
    matches_golden("user-forward", argv)


def test_a_vm_on_a_tap_device_cannot_forward_a_port_too() -> None:
    tap = NetworkAttachment("rc-test-0", "52:54:00:12:34:56", "10.88.0.2/24", "10.88.0.1")
    with pytest.raises(ValueError, match="cannot forward"):
        qemu_argv(spec(network=tap), accel="tcg", forward=PortForward(40123, 8080))


def test_the_kvm_canary_boots_its_own_initrd_under_kvm() -> None:
    argv = canary_argv(Path("/kernels/vmlinuz"), Path("/tmp/canary"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-initrd") + 1] == "/tmp/canary/initrd.img"
    matches_golden("kvm-canary", argv)


def test_a_snapshot_template_and_its_restore_differ_only_in_nic_backend_and_incoming() -> None:
    tap = NetworkAttachment("rc-web-0", "52:54:00:12:34:56", "10.88.0.2/24", "10.88.0.1")
    template = qemu_argv(spec(network=tap), accel="tcg", snapshot=SnapshotRole.TEMPLATE)
    restored = qemu_argv(spec(network=tap), accel="tcg", snapshot=SnapshotRole.RESTORE)
    booted = qemu_argv(spec(network=tap), accel="tcg")
    # The template has no TAP: a hub port leading nowhere behind the same device.
    assert "hubport,id=net0,hubid=0" in template
    assert not any("tap" in part for part in template)
    # Same devices, same order: QEMU accepts the saved device state only then.
    assert restored == [*booted, "-incoming", "defer"]
    netdev = booted.index("-netdev") + 1
    assert template[:netdev] == booted[:netdev]
    assert template[netdev + 1 :] == booted[netdev + 1 :]
    matches_golden("snapshot-template", template)
    matches_golden("snapshot-restore", restored)
