"""The QEMU runtime: the command line from a VM spec (golden), and a real VM's lifecycle."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support.qemu import artifact_spec
from test_guest_config import HOSTILE, HOSTILE_ARGS

from reconciler.cli import main
from reconciler.guest_config import GuestConfig
from reconciler.model import RuntimeKind, VMState
from runtime.protocol import NetworkAttachment, VMSpec
from runtime.qemu.argv import qemu_argv
from runtime.qemu.confine import DROP_SANDBOX, VM_USER, Confinement
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
        kernel_cmdline="console=ttyS0 panic=-1 quiet",
        guest=GuestConfig(hostname="web-0", env={"SECRET": "not on the command line"}),
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
    confine = Confinement(DROP_SANDBOX, ("-runas", VM_USER), VM_USER)
    argv = qemu_argv(
        spec_for(Path("/vms/web-0"), **extra),
        accel="tcg",
        extra_kernel_args="tsc_early_khz=2600000",
        confine=confine.argv(Path("/state/qemu-chroot")),
    )
    rendered = "\n".join(argv) + "\n"
    assert "not on the command line" not in rendered
    golden = GOLDEN / f"{case}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


@pytest.mark.qemu
def test_vm_is_detached_adopted_and_stopped(echo_unikernel: Path, tmp_path: Path) -> None:
    spec = artifact_spec(echo_unikernel, tmp_path / "echo-0", "echo-0")
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
    # The init took the power button: it stopped the echo server (SIGTERM, code 143) and
    # powered off, so the VM ended by itself instead of being killed.
    assert (stopped.state, stopped.detail) == (VMState.FAILED, "workload exited with code 143")
    assert stopped.pid is None
    stat = Path(f"/proc/{started.pid}/stat")
    # Gone, or a zombie waiting for the host's init to reap it: either way no VM runs.
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


@pytest.mark.slow
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
        "bubblewrap",
        "setpriv",
        "nsenter",
        "useradd",
    ):
        assert name in out
    kvm_line = next(line for line in out.splitlines() if "KVM usable" in line)
    # Usable or not, the verdict comes from a canary boot, never from /dev/kvm alone.
    assert "canary" in kvm_line or "QEMU failed under KVM" in kvm_line or "/dev/kvm" in kvm_line


ENVDUMP_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
extern char **environ;
static void hex(const char *s) { for (; *s; s++) printf("%02x", (unsigned char)*s); }
int main(int argc, char **argv) {
    for (char **e = environ; *e; e++)
        if (!strncmp(*e, "T_", 2)) { printf("ENV "); hex(*e); printf("\n"); }
    for (int i = 1; i < argc; i++) { printf("ARG "); hex(argv[i]); printf("\n"); }
    printf("EXE "); hex(argv[0]); printf("\n");
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) { cmdline[fread(cmdline, 1, sizeof cmdline - 1, f)] = 0; fclose(f); }
    printf("CMDLINE "); hex(cmdline); printf("\n");
    printf("VMCONF %s\n", access("/etc/reconciler/vm.conf", F_OK) ? "gone" : "present");
    printf("DUMPED\n");
    fflush(stdout);
    for (;;) pause();
}
"""

ENVDUMP_FLEET = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {name: envdump}
spec:
  source: {path: envdump, language: c, entrypoint: envdump.c}
  build: {targets: [unikernel]}
  deploy: {memoryMiB: 128}
"""


@pytest.fixture(scope="module")
def envdump_unikernel(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> Path:
    """A unikernel whose workload prints its T_* environment, args and /proc/cmdline as hex."""
    from support.repo import FleetRepo

    from builders.cache import ArtifactCache

    root = tmp_path_factory.mktemp("envdump")
    (root / "fleet").mkdir()
    repo = FleetRepo(root / "fleet")
    repo.write("envdump.yaml", ENVDUMP_FLEET)
    repo.write("envdump/envdump.c", ENVDUMP_C)
    repo.commit("envdump")
    common = ["--state-dir", str(session_state), "--cache-dir", str(root / "cache")]
    assert main(["build", "--repo", str(repo.path), *common, "envdump"]) == 0
    # The unikernel: the build also makes the executable (and the bundle) it embeds.
    return next(
        e.path
        for e in ArtifactCache(root / "cache").entries()
        if e.manifest["target"] == "unikernel"
    )


@pytest.mark.qemu
@pytest.mark.root
def test_hostile_values_reach_a_confined_vm_byte_for_byte(
    envdump_unikernel: Path, tmp_path: Path
) -> None:
    import time

    artifact = envdump_unikernel
    guest = GuestConfig(hostname="envdump-0", env=HOSTILE, args=HOSTILE_ARGS)
    spec = artifact_spec(artifact, tmp_path / "envdump-0", "envdump-0", guest=guest)
    runtime = QemuRuntime(state_dir=tmp_path, accel="tcg")
    started = runtime.start(spec)
    log = spec.vm_dir / "console.log"
    try:
        assert started.state is VMState.RUNNING
        assert started.pid is not None
        deadline = time.monotonic() + 120
        while "DUMPED" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        # The init's markers may land inside a line of the workload's (one console, two
        # writers): take them out before reading the workload's output.
        text = re.sub(r"@@reconciler \{[^}]*\}\r?\n?", "", log.read_text(errors="replace"))
        lines = text.replace("\r\n", "\n").splitlines()
        found = {line.split(" ", 1)[0]: [] for line in lines if " " in line}
        for line in lines:
            if " " in line:
                found[line.split(" ", 1)[0]].append(line.split(" ", 1)[1].strip())
        env = dict(bytes.fromhex(v).decode().split("=", 1) for v in found["ENV"])
        assert env == HOSTILE
        assert [bytes.fromhex(a).decode() for a in found["ARG"]] == list(HOSTILE_ARGS)
        assert bytes.fromhex(found["EXE"][0]) == b"/app/workload"  # exec unchanged
        cmdline = bytes.fromhex(found["CMDLINE"][0]).decode()
        assert "rc." not in cmdline
        assert "init=" not in cmdline
        assert "T_" not in cmdline
        assert found["VMCONF"] == ["gone"]  # the init removed it after reading
        # ... and the host's copy, the per-VM initrd, left once QEMU had loaded it.
        assert not (spec.vm_dir / "initrd.img").exists()

        # Nothing per-VM on QEMU's command line (what `ps` shows).
        qemu_cmdline = Path(f"/proc/{started.pid}/cmdline").read_bytes()
        for value in [*HOSTILE.values(), *HOSTILE_ARGS]:
            assert value.encode() not in qemu_cmdline
        assert b"envdump-0" in qemu_cmdline  # (its directory is, so it can be adopted)

        # Confined: an unprivileged user, a seccomp filter, no capabilities.
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{started.pid}/status").read_text().splitlines()
        )
        assert all(int(uid) != 0 for uid in status["Uid"].split())
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["CapEff"], 16) == 0
        assert os.readlink(f"/proc/{started.pid}/root") == str(tmp_path / "qemu-chroot")

        # Status and adoption still work on the confined VM.
        assert runtime.status(spec).state is VMState.RUNNING
        assert QemuRuntime(state_dir=tmp_path, accel="tcg").start(spec).pid == started.pid
    finally:
        stopped = runtime.stop(spec, grace_seconds=1)
    # The init took the power button: it stopped the echo server (SIGTERM, code 143) and
    # powered off, so the VM ended by itself instead of being killed.
    assert (stopped.state, stopped.detail) == (VMState.FAILED, "workload exited with code 143")
    assert (
        not Path(f"/proc/{started.pid}/cmdline").exists()
        or not Path(f"/proc/{started.pid}/cmdline").read_bytes()
    )
