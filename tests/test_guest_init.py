"""The guest init in host mode: configuration, the per-VM configuration file, markers, signals,
reaping, static linking."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from reconciler.guest_config import GuestConfig, encode

GUEST = Path(__file__).resolve().parents[1] / "guest"

# Values that used to add kernel parameters, get cut, or fail at launch on the command line.
HOSTILE_ENV = {
    "TAB": "a\tb",
    "NEWLINE": "line one\nline two\n",
    "QUOTES": "say \"hi\" and 'bye' \\ `x` $HOME",
    "CONTROL": "\v\f\r",
    "NBSP": "non\u00a0breaking caf\u00e9 \u2603",
    "INJECT": "x rc.exec=/bin/sh init=/bin/sh rc.env=EVIL=1",
    "EQUALS": "a=b=c",
    "EMPTY": "",
    "BIG": "0123456789abcdef" * 512,  # 8 KiB
}


@pytest.fixture(scope="session")
def init_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True)
    return GUEST / "build" / "reconciler-init"


def markers(output: str) -> list[dict[str, object]]:
    return [
        json.loads(line.split(" ", 1)[1])
        for line in output.splitlines()
        if line.startswith("@@reconciler ")
    ]


def run_init(
    init: Path, tmp_path: Path, config: str, vm_config: bytes | None = None, *flags: str
) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "init.conf"
    conf.write_text(config)
    argv = [str(init), "--config", str(conf), *flags]
    if vm_config is not None:
        (tmp_path / "vm.conf").write_bytes(vm_config)
        argv += ["--vm-config", str(tmp_path / "vm.conf")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


# The workload prints its arguments, then its environment, NUL-separated and hex-encoded: every
# byte is visible, nothing can be hidden by the terminal or by a newline inside a value.
DUMP = (
    "exec=/bin/sh\narg=-c\n"
    "arg=printf '%s\\0' \"$0\" \"$@\" | od -An -v -tx1 | tr -d ' \\n'; echo; "
    "env -0 | od -An -v -tx1 | tr -d ' \\n'; echo\n"
    "arg=dump\n"
)


def dumped(output: str) -> tuple[list[bytes], dict[bytes, bytes]]:
    lines = [line for line in output.splitlines() if not line.startswith("@@")]
    args = bytes.fromhex(lines[0]).split(b"\0")[:-1]
    env = dict(entry.split(b"=", 1) for entry in bytes.fromhex(lines[1]).split(b"\0") if entry)
    return args, env


def test_runs_the_workload_with_env_workdir_and_exit_code(
    init_binary: Path, tmp_path: Path
) -> None:
    result = run_init(
        init_binary,
        tmp_path,
        "# the workload\nexec=/bin/sh\narg=-c\narg=echo $GREETING; pwd; exit 7\n"
        f"env=GREETING=hello\nworkdir={tmp_path}\n",
    )
    assert result.returncode == 7
    # The workload runs from its exec on; the init's "workload-started" line follows the exec, so
    # it may land between the workload's own lines. Markers are whole lines of their own.
    workload_output = [line for line in result.stdout.splitlines() if not line.startswith("@@")]
    assert workload_output == ["hello", str(tmp_path)]
    events = markers(result.stdout)
    assert [e["event"] for e in events] == ["booted", "workload-started", "workload-exited"]
    assert events[2]["code"] == 7
    assert isinstance(events[1]["pid"], int)
    times = [float(e["t"]) for e in events]  # type: ignore[arg-type]
    assert times == sorted(times)


def test_every_byte_of_env_and_args_arrives_and_nothing_else_changes(
    init_binary: Path, tmp_path: Path
) -> None:
    args = ("a b", "tab\there", "--", "rc.exec=/bin/sh", "x" * 8192, "", 'quote"s')
    blob = encode(GuestConfig(hostname="web-0", env=HOSTILE_ENV, args=args, restart="never"))
    result = run_init(init_binary, tmp_path, DUMP, blob)
    assert result.returncode == 0, result.stdout
    got_args, got_env = dumped(result.stdout)
    # The artifact's exec and args come first and are untouched; the VM's follow in order.
    assert got_args == [b"dump", *(a.encode() for a in args)]
    for name, value in HOSTILE_ENV.items():
        assert got_env[name.encode()] == value.encode(), name
    assert b"EVIL" not in got_env
    assert [e["event"] for e in markers(result.stdout)] == [
        "booted",
        "workload-started",
        "workload-exited",
    ]


def test_the_vm_configuration_extends_the_artifacts(init_binary: Path, tmp_path: Path) -> None:
    flag = tmp_path / "ran-once"
    blob = encode(
        GuestConfig(
            hostname="web-0", env={"A": "vm", "B": "two words"}, args=("x",), restart="on-failure"
        )
    )
    result = run_init(
        init_binary,
        tmp_path,
        f'exec=/bin/sh\narg=-c\narg=echo "$A $B $0"; [ -e {flag} ] && exit 0; touch {flag}; '
        "exit 3\nenv=A=artifact\nrestart=never\n",
        blob,
    )
    # The VM's env wins over the artifact's, its args follow the artifact's, and its restart
    # policy (on-failure) replaces the artifact's (never): the workload ran twice.
    assert "vm two words x" in result.stdout
    codes = [e["code"] for e in markers(result.stdout) if e["event"] == "workload-exited"]
    assert codes == [3, 0]


def test_hundreds_of_args_and_env_are_never_dropped(init_binary: Path, tmp_path: Path) -> None:
    env = {f"V{i}": str(i) for i in range(600)}
    args = tuple(str(i) for i in range(600))
    blob = encode(GuestConfig(hostname="web-0", env=env, args=args, restart="never"))
    result = run_init(init_binary, tmp_path, DUMP, blob)
    got_args, got_env = dumped(result.stdout)
    assert got_args[1:] == [a.encode() for a in args]
    assert all(got_env[k.encode()] == v.encode() for k, v in env.items())


GOOD = encode(GuestConfig(hostname="web-0", env={"A": "1"}, args=("x",), restart="never"))


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "not a reconciler-vm-config 1 file"),
        (b"rc.env=A=1\n", "not a reconciler-vm-config 1 file"),
        (GOOD[:-8], "truncated"),  # cut inside the last records: no end
        (GOOD.replace(b"end 0\n\n", b""), "bad record header"),
        (GOOD + b"arg 1\nx\n", "data after the end record"),
        (GOOD.replace(b"env 3\nA=1", b"env 90\nA=1"), "truncated"),
        (GOOD.replace(b"env 3\n", b"env 3x\n"), "bad length"),
        (GOOD.replace(b"env 3\n", b"env 999999999\n"), "bad length"),
        (GOOD.replace(b"env 3\nA=1", b"env 3\n1=A"), "not NAME=value"),
        (GOOD.replace(b"env 3\nA=1", b"env 3\nA\0B"), "NUL"),
        (GOOD.replace(b"arg 1\nx", b"exec 1\nx"), "unknown key exec"),
        (GOOD.replace(b"arg 1\nx", b"module 1\nx"), "unknown key module"),
        (GOOD.replace(b"arg 1\n", b"Arg 1\n"), "bad key"),
        (GOOD[:-1] + b"A" * (1024 * 1024), "larger than"),
    ],
)
def test_a_malformed_vm_configuration_stops_before_the_workload(
    init_binary: Path, tmp_path: Path, blob: bytes, why: str
) -> None:
    flag = tmp_path / "ran"
    result = run_init(init_binary, tmp_path, f"exec=/bin/touch\narg={flag}\n", blob)
    assert result.returncode == 127
    assert not flag.exists()
    events = markers(result.stdout)
    assert [e["event"] for e in events] == ["error"], result.stdout
    assert why in str(events[0]["message"])


def test_a_missing_vm_configuration_named_on_the_command_line_is_an_error(
    init_binary: Path, tmp_path: Path
) -> None:
    nope = str(tmp_path / "nope")
    result = run_init(init_binary, tmp_path, "exec=/bin/true\n", None, "--vm-config", nope)
    assert result.returncode == 127
    assert "cannot read the VM configuration" in result.stdout


def test_the_command_line_is_no_configuration_channel(init_binary: Path, tmp_path: Path) -> None:
    # The old --cmdline flag (and rc.* tokens) are gone: an unknown flag changes nothing.
    (tmp_path / "cmdline").write_text("rc.exec=/bin/false rc.env=A=cmd\n")
    config = 'exec=/bin/sh\narg=-c\narg=echo "A=$A"\n'
    cmdline = str(tmp_path / "cmdline")
    result = run_init(init_binary, tmp_path, config, None, "--cmdline", cmdline)
    assert result.returncode == 0
    assert "A=\n" in result.stdout


def test_exec_failure_is_an_error_marker(init_binary: Path, tmp_path: Path) -> None:
    result = run_init(init_binary, tmp_path, "exec=/no/such/program\n")
    assert result.returncode == 127
    errors = [e for e in markers(result.stdout) if e["event"] == "error"]
    assert "No such file or directory" in str(errors[0]["message"])


def test_sigterm_is_forwarded_then_sigkill_after_the_grace_period(
    init_binary: Path, tmp_path: Path
) -> None:
    conf = tmp_path / "init.conf"
    conf.write_text(
        "exec=/bin/sh\narg=-c\narg=trap 'echo got-term' TERM; while :; do sleep 0.1; done\n"
        "grace=1\n"
    )
    process = subprocess.Popen(
        [str(init_binary), "--config", str(conf)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert "workload-started" in process.stdout.readline() + process.stdout.readline()
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert "got-term" in output
    exited = [e for e in markers(output) if e["event"] == "workload-exited"]
    assert exited[0]["code"] == 128 + signal.SIGKILL
    assert process.returncode == 128 + signal.SIGKILL


def test_restart_on_failure_reruns_the_workload(init_binary: Path, tmp_path: Path) -> None:
    flag = tmp_path / "ran-once"
    result = run_init(
        init_binary,
        tmp_path,
        f"exec=/bin/sh\narg=-c\narg=[ -e {flag} ] && exit 0; touch {flag}; exit 1\n"
        "restart=on-failure\n",
    )
    codes = [e["code"] for e in markers(result.stdout) if e["event"] == "workload-exited"]
    assert codes == [1, 0]


def test_orphans_are_reaped_and_the_workload_code_wins(init_binary: Path, tmp_path: Path) -> None:
    result = run_init(
        init_binary,
        tmp_path,
        "exec=/bin/sh\narg=-c\narg=(sleep 0.2 &) ; sleep 0.5; exit 4\n",
    )
    assert result.returncode == 4


def test_init_is_a_static_binary(init_binary: Path) -> None:
    header = init_binary.read_bytes()
    assert header[:4] == b"\x7fELF"
    assert b"/lib64/ld-linux" not in header  # no PT_INTERP: nothing needed in the guest
    out = subprocess.run(
        ["file", str(init_binary)], capture_output=True, text=True, check=True
    ).stdout
    assert "statically linked" in out


def _ready(process: subprocess.Popen[str]) -> None:
    """Until the workload says it has set its trap."""
    assert process.stdout is not None
    while process.stdout.readline().strip() != "ready":
        pass


@pytest.mark.parametrize(
    ("sig", "by"),
    [(signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint"), (signal.SIGPWR, "power-button")],
)
def test_a_stop_request_stops_the_workload_at_once_and_says_so(
    init_binary: Path, tmp_path: Path, sig: signal.Signals, by: str
) -> None:
    # A workload that ends on SIGTERM, under a grace period far longer than the test: the init
    # must not wait it out, and a restart policy of "always" must not bring the workload back.
    conf = tmp_path / "init.conf"
    conf.write_text(
        "exec=/bin/sh\narg=-c\narg=trap 'echo got-term; exit 0' TERM; echo ready; "
        "while :; do sleep 0.05; done\ngrace=600\nrestart=always\n"
    )
    process = subprocess.Popen(
        [str(init_binary), "--config", str(conf)], stdout=subprocess.PIPE, text=True
    )
    _ready(process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    assert "got-term" in output
    events = markers(output)
    assert [e["event"] for e in events][-2:] == ["workload-exited", "stopped"]
    assert (events[-2]["code"], events[-1]["by"]) == (0, by)
    assert process.returncode == 0


def test_a_stop_request_before_the_workload_starts_runs_nothing(
    init_binary: Path, tmp_path: Path
) -> None:
    # Restarting after a crash: a stop that arrives during the pause ends the loop there.
    flag = tmp_path / "runs"
    conf = tmp_path / "init.conf"
    conf.write_text(f"exec=/bin/sh\narg=-c\narg=echo run >> {flag}; exit 3\nrestart=always\n")
    process = subprocess.Popen(
        [str(init_binary), "--config", str(conf)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    seen = ""
    while "workload-exited" not in seen:
        seen += process.stdout.readline()
    process.send_signal(signal.SIGTERM)  # during the one-second pause before the restart
    output, _ = process.communicate(timeout=60)
    events = [e["event"] for e in markers(seen + output)]
    assert events == ["booted", "workload-started", "workload-exited", "stopped"]
    assert flag.read_text() == "run\n"
