"""Per-VM configuration for the guest init: the encoding, the initramfs segment read back by the
real ``cpio``, hostile values through the real init in host mode, and refusals at validate time
(before any VM could be stopped)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.repo import FleetRepo

from reconciler.cli import main
from reconciler.guest_config import GuestConfig, GuestConfigError, encode
from runtime.guest_config import initramfs_segment, write_config_file, write_vm_initrd

GUEST = Path(__file__).resolve().parents[1] / "guest"

# Each of these once split or cut the kernel command line the values travelled on.
HOSTILE = {
    "T_TAB": "a\tb",
    "T_NEWLINE": "line1\nline2",
    "T_QUOTES": "say \"hi\" 'there'",
    "T_CONTROL": "v\vf\fr\r",
    "T_NBSP": "no\u00a0break",
    "T_INJECT": "x rc.exec=/bin/sh init=/bin/sh",
    "T_EQUALS": "a=b=c",
    "T_LONG": "x" * 8192,
}
HOSTILE_ARGS = ("--flag", "two words", "tab\there", "rc.arg=evil")


def test_encoding_is_length_prefixed() -> None:
    blob = encode(
        GuestConfig(
            hostname="web-0",
            address="10.88.0.2/24",
            gateway="10.88.0.1",
            env={"A": "x\ny", "B": ""},
            args=("a b",),
            restart="on-failure",
        )
    )
    assert blob == (
        b"reconciler-vm-config 1\n"
        b"hostname 5\nweb-0\n"
        b"ip 12\n10.88.0.2/24\n"
        b"gateway 9\n10.88.0.1\n"
        b"env 5\nA=x\ny\n"
        b"env 2\nB=\n"
        b"arg 3\na b\n"
        b"restart 10\non-failure\n"
        b"end 0\n\n"
    )


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (GuestConfig(hostname="w", env={"A": "a\0b"}), "NUL"),
        (GuestConfig(hostname="w", args=("a\0",)), "NUL"),
        (GuestConfig(hostname="w", env={"1A": "x"}), "identifier"),
        (GuestConfig(hostname="w", env={"A": "x" * 200_000}), "longer than"),
        (GuestConfig(hostname="w", env={f"V{i}": "x" * 100_000 for i in range(12)}), "bytes"),
        (GuestConfig(hostname="w b"), "DNS label"),
        (GuestConfig(hostname="w", restart="sometimes"), "restart"),
    ],
)
def test_what_cannot_be_carried_is_refused(config: GuestConfig, why: str) -> None:
    with pytest.raises(GuestConfigError, match=why):
        encode(config)


def test_segment_is_a_cpio_archive_the_real_cpio_reads(tmp_path: Path) -> None:
    config = GuestConfig(hostname="web-0", env=HOSTILE)
    (tmp_path / "segment.cpio").write_bytes(initramfs_segment(config))
    out = tmp_path / "out"
    out.mkdir()
    with (tmp_path / "segment.cpio").open("rb") as archive:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            stdin=archive,
            cwd=out,
            check=True,
        )
    extracted = out / "etc" / "reconciler" / "vm.conf"
    assert extracted.read_bytes() == encode(config)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"],
        input=initramfs_segment(config),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "-rw-------" in next(line for line in listing.splitlines() if "vm.conf" in line)


def test_per_vm_initrd_is_the_artifact_then_the_segment(tmp_path: Path) -> None:
    base = tmp_path / "initramfs.cpio.gz"
    base.write_bytes(b"\x1f\x8b" + b"z" * 4093)  # an odd length: the segment is re-aligned
    config = GuestConfig(hostname="web-0", env={"A": "1"})
    initrd = write_vm_initrd(base, config, tmp_path / "vm" / "initrd.img")
    data = initrd.read_bytes()
    assert data.startswith(base.read_bytes())
    assert data[4095:4096] == b"\0"
    assert data[4096:] == initramfs_segment(config)
    assert initrd.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in initrd.parent.iterdir()] == ["initrd.img"]  # no temporary left


@pytest.fixture(scope="session")
def init_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True)
    return GUEST / "build" / "reconciler-init"


# Prints the workload's T_* environment and its arguments as hex, one per line.
DUMP = (
    'for v in $(env | grep -o "^T_[A-Z]*" | sort -u); do '
    'printf "ENV %s " "$v"; printenv "$v" | head -c -1 | od -An -v -tx1 | tr -d " \\n"; echo; '
    "done; "
    'for a in "$@"; do printf "ARG "; printf %s "$a" | od -An -v -tx1 | tr -d " \\n"; echo; done'
)


def _dumped(output: str) -> tuple[dict[str, bytes], list[bytes]]:
    env, args = {}, []
    for line in output.splitlines():
        if line.startswith("ENV "):
            _, name, *value = line.split(" ")
            env[name] = bytes.fromhex(value[0] if value else "")
        elif line.startswith("ARG "):
            args.append(bytes.fromhex(line[4:]))
    return env, args


def test_hostile_values_reach_the_workload_byte_for_byte(init_binary: Path, tmp_path: Path) -> None:
    conf = tmp_path / "init.conf"
    conf.write_text(f"exec=/bin/sh\narg=-c\narg={DUMP}\narg=dump\nrestart=never\n")
    vm_conf = write_config_file(
        GuestConfig(hostname="web-0", env=HOSTILE, args=HOSTILE_ARGS, restart="never"),
        tmp_path / "vm.conf",
    )
    result = subprocess.run(
        [str(init_binary), "--config", str(conf), "--vm-config", str(vm_conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env, args = _dumped(result.stdout)
    assert env == {name: value.encode() for name, value in HOSTILE.items()}
    assert args == [a.encode() for a in HOSTILE_ARGS]


def test_a_malformed_config_runs_nothing(init_binary: Path, tmp_path: Path) -> None:
    conf = tmp_path / "init.conf"
    conf.write_text(f"exec=/bin/sh\narg=-c\narg=touch {tmp_path / 'ran'}\n")
    good = encode(GuestConfig(hostname="web-0", env={"A": "1"}, restart="never"))
    for name, blob in {
        "cut": good[:-9],
        "length": good.replace(b"env 3\n", b"env 99\n"),
        "exec": good.replace(b"end 0", b"exec 7\n/bin/sh\nend 0"),
    }.items():
        (tmp_path / name).write_bytes(blob)
        result = subprocess.run(
            [str(init_binary), "--config", str(conf), "--vm-config", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0, name
        assert '"event":"error"' in result.stdout, name
        assert not (tmp_path / "ran").exists(), name


WORKLOAD = """apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: echo}}
spec:
  source: {{path: echo, language: c, entrypoint: echo.c}}
  build: {{targets: [unikernel]}}
  deploy:
{deploy}
"""


@pytest.mark.parametrize(
    ("deploy", "message"),
    [
        ('    kernelArgs: "quiet init=/bin/sh"', "kernelArgs may not set init"),
        ('    kernelArgs: "rc.exec=/bin/sh"', "kernelArgs may not set rc.exec"),
        ('    kernelArgs: "quiet\\tinit=/bin/sh"', "kernelArgs"),
        ('    kernelArgs: "console=ttyS0  quiet"', "single spaces"),
        ('    kernelArgs: "-- --config"', "kernelArgs"),
        ('    env: {A: "x\\0y"}', "NUL"),
        ('    args: ["ok", "a\\0b"]', "NUL"),
    ],
)
def test_values_that_cannot_reach_the_guest_are_refused_at_validate_time(
    deploy: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fleet").mkdir()
    repo = FleetRepo(tmp_path / "fleet")
    repo.write("workloads.yaml", WORKLOAD.format(deploy=deploy))
    repo.write("echo/echo.c", "int main(void) { return 0; }\n")
    repo.commit("a workload")
    code = main(["validate", "--repo", str(repo.path), "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert "workloads.yaml" in err
    assert "spec.deploy" in err
    assert "Traceback" not in err


def test_good_kernel_args_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "fleet").mkdir()
    repo = FleetRepo(tmp_path / "fleet")
    repo.write(
        "workloads.yaml",
        WORKLOAD.format(deploy='    kernelArgs: "quiet loglevel=7 console=ttyS0,115200"'),
    )
    repo.write("echo/echo.c", "int main(void) { return 0; }\n")
    repo.commit("a workload")
    code = main(["validate", "--repo", str(repo.path), "--state-dir", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err
