"""Pre-booted QEMU snapshots (``runtime/qemu/snapshot.py``): two VMs restored from one template
answer their health check with their own env and address, carry their own MAC, have the host's
time and random numbers of their own, and neither the snapshot file nor the console log holds a
per-VM value or a secret.

The real thing: a small C service built as a unikernel (it answers a TCP connection on
``$PORT`` with its env, the time and bytes from ``getrandom``), confined QEMUs under TCG, a TAP
device per VM with a point-to-point host address (no bridge), all removed at the end.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.qemu import artifact_spec
from support.repo import FleetRepo
from support.waiting import eventually
from test_guest_init import GUEST, run_init

from reconciler.errors import ConfigError
from reconciler.guest_config import GuestConfig, GuestConfigError, encode
from reconciler.model import VMState
from runtime.protocol import NetworkAttachment, VolumeAttachment
from runtime.qemu.driver import QemuRuntime
from runtime.qemu.snapshot import (
    META,
    SNAPSHOTS,
    VMSTATE,
    SnapshotCache,
    eligible,
    snapshot_key,
    snapshots_wanted,
)

REPORTER_C = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    int server = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(getenv("PORT")))};
    if (bind(server, (struct sockaddr *)&address, sizeof address) || listen(server, 4)) return 1;
    printf("reporter: listening\n");
    fflush(stdout);
    for (;;) {
        int client = accept(server, NULL, NULL);
        unsigned char random[16];
        char line[256];
        if (getrandom(random, sizeof random, 0) != sizeof random) return 2;
        int n = snprintf(line, sizeof line, "%s %lld ", getenv("GREETING"), (long long)time(NULL));
        for (int i = 0; i < 16; i++) n += snprintf(line + n, sizeof line - n, "%02x", random[i]);
        line[n++] = '\n';
        (void)!write(client, line, (size_t)n);
        close(client);
    }
}
"""

REPORTER_FLEET = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {name: reporter}
spec:
  source: {path: reporter, language: c, entrypoint: reporter.c}
  build: {targets: [unikernel]}
  deploy: {memoryMiB: 128}
"""

SECRET = "s3cret-only-in-the-guest-7f3a9c"
SECRET_FILE = "file-secret-never-saved-51d2"


def test_the_flag_is_on_off_or_refused() -> None:
    assert snapshots_wanted({}) is False
    assert snapshots_wanted({"RECONCILER_QEMU_SNAPSHOTS": "0"}) is False
    assert snapshots_wanted({"RECONCILER_QEMU_SNAPSHOTS": "1"}) is True
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        snapshots_wanted({"RECONCILER_QEMU_SNAPSHOTS": "yes"})


def test_only_disk_less_vms_are_eligible_and_the_key_follows_the_machine(tmp_path: Path) -> None:
    (tmp_path / "kernel").write_bytes(b"kernel")
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"initramfs")
    (tmp_path / "cmdline").write_text("console=ttyS0\n")
    spec = artifact_spec(tmp_path, tmp_path / "vm", "web-0")
    assert eligible(spec) == ""
    assert "root disk" in eligible(spec.__class__(**{**spec.__dict__, "rootfs": tmp_path}))
    volume = VolumeAttachment("data", tmp_path / "data.ext4", "/data")
    assert "volumes" in eligible(spec.__class__(**{**spec.__dict__, "volumes": (volume,)}))

    def key(**changes: object) -> str:
        changed = spec.__class__(**{**spec.__dict__, **changes})
        return snapshot_key(changed, accel="tcg", binary="true", extra_kernel_args="")

    # Per-VM values are not part of the key: every replica shares one snapshot...
    assert key() == key(name="web-1", guest=GuestConfig(env={"A": "b"}, secret_env={"S": "x"}))
    # ... but the machine's shape is.
    assert key() != key(memory_mib=256)
    assert key() != key(vcpus=2)
    tap = NetworkAttachment("rc-x", "52:54:00:00:00:09", "10.0.0.2/30", "10.0.0.1")
    assert key() != key(network=tap)
    before = key()
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"another initramfs (a new init, say)")
    assert key() != before


@pytest.fixture(scope="module")
def reporter_unikernel(tmp_path_factory: pytest.TempPathFactory, session_state: Path) -> Path:
    from builders.cache import ArtifactCache
    from reconciler.cli import main

    root = tmp_path_factory.mktemp("reporter")
    repo = FleetRepo.create(
        root / "fleet", {"reporter.yaml": REPORTER_FLEET, "reporter/reporter.c": REPORTER_C}
    )
    common = ["--state-dir", str(session_state), "--cache-dir", str(root / "cache")]
    assert main(["build", "--repo", str(repo.path), *common, "reporter"]) == 0
    # The unikernel: the build may also make other targets' artifacts.
    return next(
        e.path for e in ArtifactCache(root / "cache").entries() if e.file("cmdline").exists()
    )


def test_pruning_keeps_the_most_recently_used_and_any_in_use(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path)
    now = time.time()
    for index in range(5):
        directory = cache.root / f"key{index}"
        directory.mkdir(parents=True)
        (directory / META).write_text("{}")
        # key0 used an hour ago ... key4 just now; key3 twenty minutes ago.
        ago = {0: 3600, 1: 3000, 2: 2400, 3: 1200, 4: 0}[index]
        os.utime(directory / META, (now - ago, now - ago))
    assert sorted(cache.prune(keep=2)) == ["key0", "key1", "key2"]
    assert sorted(p.name for p in cache.root.iterdir()) == ["key3", "key4"]
    # One used within the last ten minutes is never removed, whatever the count.
    assert cache.prune(keep=0) == ["key3"]
    assert [p.name for p in cache.root.iterdir()] == ["key4"]


def test_a_restored_vm_is_sent_its_mac_clock_and_fresh_entropy_never_a_template_flag() -> None:
    blob = encode(
        GuestConfig(
            mac="52:54:00:5a:00:03", clock_ns=1_700_000_000_000_000_123, entropy=bytes(range(64))
        )
    )
    assert b"mac 17\n52:54:00:5a:00:03\n" in blob
    assert b"realtime 20\n1700000000.000000123\n" in blob
    assert b"entropy 128\n" + bytes(range(64)).hex().encode() + b"\n" in blob
    assert b"snapshot-template" not in blob
    with pytest.raises(GuestConfigError, match="MAC"):
        encode(GuestConfig(mac="53:54:00:5a:00:03"))  # multicast
    with pytest.raises(GuestConfigError, match="entropy"):
        encode(GuestConfig(entropy=bytes(513)))


@pytest.fixture(scope="module")
def guest_init() -> Path:
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True)
    return GUEST / "build" / "reconciler-init"


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (b"mac 17\n53:54:00:5a:00:03\n", "MAC address"),  # multicast
        (b"mac 17\n52:54:00:5A:00:03\n", "MAC address"),
        (b"mac 5\n52:54\n", "MAC address"),
        (b"realtime 4\n1e10\n", "<seconds>.<nanoseconds>"),
        (b"entropy 3\nabc\n", "hex"),
        (b"entropy 2\nXY\n", "hex"),
    ],
)
def test_the_init_refuses_a_malformed_restore_record(
    guest_init: Path, tmp_path: Path, record: bytes, why: str
) -> None:
    flag = tmp_path / "ran"
    blob = b"reconciler-vm-config 1\n" + record + b"end 0\n\n"
    result = run_init(guest_init, tmp_path, f"exec=/bin/touch\narg={flag}\n", blob)
    assert result.returncode == 127
    assert not flag.exists()
    assert why in result.stdout


def test_the_init_takes_well_formed_restore_records(guest_init: Path, tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    blob = encode(
        GuestConfig(
            mac="52:54:00:5a:00:03",
            clock_ns=time.time_ns(),
            entropy=b"\x01" * 64,
            restart="never",
        )
    )
    # Outside a VM (host mode) they are only checked: no clock, RNG or interface is touched.
    result = run_init(guest_init, tmp_path, f"exec=/bin/touch\narg={flag}\n", blob)
    assert result.returncode == 0, result.stdout
    assert flag.exists()


def _tap(name: str, host: str) -> None:
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    subprocess.run(["ip", "addr", "add", host, "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


@pytest.fixture
def taps() -> Iterator[list[str]]:
    names = [f"rcsnap{os.getpid() % 10000}{side}" for side in "ab"]
    for name in names:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    yield names
    for name in names:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def _report(address: str, port: int) -> list[str] | None:
    """``[greeting, time, random hex]`` from the reporter at ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=2) as conn:
            return conn.makefile().readline().split()
    except OSError:
        return None


def _neighbour_mac(tap: str, address: str) -> str | None:
    out = subprocess.run(
        ["ip", "neigh", "show", "dev", tap, address], capture_output=True, text=True, check=False
    ).stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else None


@pytest.mark.qemu
@pytest.mark.root
def test_vms_restored_from_one_snapshot_have_their_own_env_address_and_no_saved_secret(
    reporter_unikernel: Path, tmp_path: Path, taps: list[str]
) -> None:
    octet = 16 + os.getpid() % 200
    runtime = QemuRuntime(state_dir=tmp_path / "state", accel="tcg", snapshots=True)
    specs = []
    for index, tap in enumerate(taps):
        host, guest = f"10.251.{octet}.{4 * index + 1}", f"10.251.{octet}.{4 * index + 2}"
        _tap(tap, f"{host}/30")
        name = f"reporter-{index}"
        config = GuestConfig(
            hostname=name,
            address=f"{guest}/30",
            gateway=host,
            env={"PORT": str(7100 + index), "GREETING": f"hello-from-{index}"},
            secret_env={"API_SECRET": f"{SECRET}-{index}"},
            secret_files={"/run/secrets/token": f"{SECRET_FILE}-{index}"},
        )
        network = NetworkAttachment(tap, f"52:54:00:5a:00:0{index + 3}", f"{guest}/30", host)
        specs.append(
            artifact_spec(
                reporter_unikernel, tmp_path / "vms" / name, name, guest=config, network=network
            )
        )
    try:
        for spec in specs:
            started = runtime.start(spec)
            assert started.state is VMState.RUNNING, started.detail
            # The second VM starts well after the template was saved: a clock that kept the
            # template's time would be behind by this much.
            time.sleep(4)
        # One template served both.
        snapshots = [p for p in (tmp_path / "state" / SNAPSHOTS).iterdir() if p.is_dir()]
        assert len(snapshots) == 1
        vmstate = (snapshots[0] / VMSTATE).read_bytes()
        assert vmstate.startswith(b"QEVM")  # a QEMU migration stream
        randoms = set()
        for index, spec in enumerate(specs):
            assert spec.network is not None
            guest = spec.network.address.split("/")[0]
            # Its own env (the port) on its own address: the health check the fleet declares.
            greeting, clock, random = eventually(
                functools.partial(_report, guest, 7100 + index), 120, f"{spec.name} to answer"
            )
            assert greeting == f"hello-from-{index}"
            assert _report(guest, 7100 + 1 - index) is None  # not the other VM's env
            # The host's time, not the template's stopped clock; random bytes of its own.
            assert abs(int(clock) - time.time()) < 2.5
            randoms.add(random)
            # Its own MAC, not the template's.
            assert _neighbour_mac(spec.network.tap, guest) == spec.network.mac
            console = (spec.vm_dir / "console.log").read_text(errors="replace")
            assert "snapshot-ready" not in console  # restored, not booted
            assert '"event":"error"' not in console, console
            assert '"event":"booted"' in console
            # The per-VM initrd, here the template's, left once QEMU had loaded it.
            assert not (spec.vm_dir / "initrd.img").exists()
            qemu_cmdline = Path(f"/proc/{runtime.status(spec).pid}/cmdline").read_bytes()
            assert b"-incoming" in qemu_cmdline
            assert SECRET.encode() not in qemu_cmdline
            assert SECRET.encode() not in console.encode()
            assert SECRET_FILE.encode() not in console.encode()
        # The snapshot was taken before any VM's configuration existed: no secret, no env, no
        # address in it, and none written since.
        vmstate = (snapshots[0] / VMSTATE).read_bytes()
        for spec in specs:
            assert spec.network is not None
            for value in (SECRET, SECRET_FILE, "API_SECRET", spec.network.address, spec.name):
                assert value.encode() not in vmstate, value
        assert len(randoms) == len(specs)
        assert (snapshots[0] / VMSTATE).stat().st_mode & 0o777 == 0o600
    finally:
        for spec in specs:
            runtime.stop(spec, grace_seconds=1)
    for spec in specs:
        assert runtime.status(spec).pid is None
