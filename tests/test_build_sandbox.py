"""Builds of untrusted commits: the flag allow-list, the bwrap command line (golden), and real
sandboxed builds that try to read the reconciler's secrets, see its environment or reach the
network, and fail."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
from support.repo import FLEET_EXAMPLE, FleetRepo

from builders.executable import build_executable, is_static_elf
from builders.matrix import _toolchain
from builders.sandbox import (
    BuildSandbox,
    HostView,
    Step,
    bwrap_argv,
    network_allowed,
    take_output,
)
from reconciler.build_flags import build_input_problems, checked_flags, entrypoint_problem
from reconciler.errors import BuildError
from reconciler.model import Language

HOST = HostView(
    links={"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/sbin": "usr/sbin"},
    directories=(),
    etc=("/etc/ld.so.cache", "/etc/passwd"),
    etc_network=("/etc/resolv.conf", "/etc/ssl"),
    python=("/opt/python",),
)


# --- the allow-list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        "-O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -Werror=format-security",
        "-DNDEBUG -DVERSION=1.2 -D PORT=7007 -UDEBUG -std=gnu11 -std=c99",
        "-fPIE -fno-strict-aliasing -fstack-protector-strong -fvisibility=hidden",
        "-march=x86-64-v2 -mtune=generic -Iinclude -I include/sub -iquote inc -pthread -Os",
    ],
)
def test_ordinary_compiler_flags_pass(flags: str) -> None:
    assert checked_flags("cflags", flags)


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        ("-wrapper /bin/sh,-c,id", "runs a program"),
        ("-B/tmp/evil", "passes its passes|run its passes"),
        ("-specs=/tmp/evil.specs", "replaces the programs"),
        ("-fplugin=./evil.so", "loads a shared object"),
        ("@flags.txt", "reads more flags from a file"),
        ("-o /etc/passwd", "chooses where the output goes"),
        ("-I/var/lib/reconciler", "outside the source tree"),
        ("-I ../../state", "outside the source tree"),
        ("-include /var/lib/reconciler/api-token", "includes a file by path"),
        ("-Wl,--wrap=main", "raw options to the linker"),
        ("-Xlinker -T", "raw options to the linker"),
        ("--sysroot=/", "changes where the toolchain looks"),
        ("-DX=/etc/shadow", "names a path"),
        ("-save-temps=obj", "writes files by path"),
        ("-fdump-tree-all", "writes files by path"),
        ("'-O2", "cannot split"),
    ],
)
def test_dangerous_compiler_flags_are_refused_with_a_reason(flags: str, why: str) -> None:
    with pytest.raises(BuildError, match=why.rsplit("|", maxsplit=1)[-1]) as caught:
        checked_flags("cflags", flags)
    assert "\n" not in str(caught.value)


def test_linker_flags_take_libraries_only() -> None:
    assert checked_flags("ldflags", "-lm -l pthread -Llib -static") == [
        "-lm",
        "-lpthread",
        "-Llib",
        "-static",
    ]
    with pytest.raises(BuildError, match="raw options to the linker"):
        checked_flags("ldflags", "-Wl,-rpath,/tmp")
    with pytest.raises(BuildError, match="outside the source tree"):
        checked_flags("ldflags", "-L/usr/lib")


def test_build_inputs_are_checked_per_language_and_key() -> None:
    assert build_input_problems("c", "main.c", {"cflags": "-O2", "ldflags": "-lm"}) == []
    problems = {
        ".".join(where): message
        for where, message in build_input_problems(
            "python", "-fplugin=x.py", {"cflags": "-O2", "pyinstaller": "--add-data x"}
        )
    }
    assert problems.keys() == {
        "source.entrypoint",
        "build.options.cflags",
        "build.options.pyinstaller",
    }
    assert "c workloads only" in problems["build.options.cflags"]
    assert "unknown build option" in problems["build.options.pyinstaller"]
    assert "starts with '-'" in problems["source.entrypoint"]
    assert entrypoint_problem("/etc/passwd") is not None
    assert entrypoint_problem("src/../../x") is not None
    assert entrypoint_problem("src/main.c") is None


def test_validate_refuses_the_wrapper_flag_in_one_line(
    fleet_repo: FleetRepo, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.cli import main

    fleet_repo.edit(
        "workloads/echo.yaml",
        "    targets: [executable, unikernel]\n",
        "    targets: [executable, unikernel]\n"
        '    options:\n      cflags: "-O2 -wrapper /bin/sh,-c,touch${IFS}/tmp/pwned"\n',
    )
    fleet_repo.commit("a hostile flag")
    code = main(["validate", "--repo", str(fleet_repo.path), "--state-dir", str(state_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "workloads/echo.yaml:16: $.spec.build.options.cflags: '-wrapper' is refused: it runs a "
        "program of the manifest's choosing around every compiler pass"
    ) in err
    assert "Traceback" not in err


# --- the sandbox's command line (golden) ----------------------------------------------------


def test_bwrap_argv_is_golden() -> None:
    step = Step(["/usr/bin/gcc", "-O2", "x.c"], cwd="/build/src")
    assert bwrap_argv("/usr/bin/bwrap", HOST, "/tmp/work", step) == [
        "/usr/bin/bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "build",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--ro-bind",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--ro-bind",
        "/etc/passwd",
        "/etc/passwd",
        "--ro-bind",
        "/opt/python",
        "/opt/python",
        "--bind",
        "/tmp/work",
        "/build",
        "--chdir",
        "/build/src",
        "--clearenv",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "LC_ALL",
        "C.UTF-8",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "1",
        "--setenv",
        "PIP_NO_INDEX",
        "1",
        "--setenv",
        "PIP_NO_INPUT",
        "1",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        "--setenv",
        "PYTHONHASHSEED",
        "0",
        "--setenv",
        "SOURCE_DATE_EPOCH",
        "315532800",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "TZ",
        "UTC",
        "--",
        "/usr/bin/gcc",
        "-O2",
        "x.c",
    ]


def test_network_and_its_etc_files_only_when_the_step_may_use_it() -> None:
    offline = bwrap_argv("bwrap", HOST, "/w", Step(["pip"]))
    online = bwrap_argv("bwrap", HOST, "/w", Step(["pip"], network=True))
    assert "--share-net" not in offline
    assert "/etc/resolv.conf" not in offline
    assert "--share-net" in online
    assert "/etc/resolv.conf" in online
    assert "PIP_NO_INDEX" not in online


def test_a_step_asking_for_the_network_is_refused_unless_the_operator_allowed_it(
    tmp_path: Path,
) -> None:
    with pytest.raises(BuildError, match="RECONCILER_BUILD_NETWORK=1"):
        BuildSandbox(tmp_path, host=HOST).argv(Step(["pip"], network=True))
    assert BuildSandbox(tmp_path, host=HOST, network=True).argv(Step(["pip"], network=True))
    assert network_allowed({"RECONCILER_BUILD_NETWORK": "1"})
    assert not network_allowed({})


def test_a_mount_that_would_show_the_state_directory_is_refused(tmp_path: Path) -> None:
    python = tmp_path / "opt"
    state = python / "state"
    state.mkdir(parents=True)
    host = HostView({}, (), (), (), (str(python),))
    with pytest.raises(BuildError, match="would expose the reconciler's own files"):
        BuildSandbox(tmp_path / "work", hidden=[state], host=host).argv(Step(["true"]))


def test_outputs_are_taken_back_without_following_links(tmp_path: Path) -> None:
    secret = tmp_path / "api-token"
    secret.write_text("s3cret")
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "workload").symlink_to(secret)
    (work / "linked").symlink_to(tmp_path)
    with pytest.raises(BuildError, match="no regular file"):
        take_output(work, "out/workload", tmp_path / "taken")
    with pytest.raises(BuildError, match="no regular file"):
        take_output(work, "linked/api-token", tmp_path / "taken")
    assert not (tmp_path / "taken").exists() or (tmp_path / "taken").read_text() != "s3cret"
    (work / "out" / "real").write_bytes(b"ELF")
    take_output(work, "out/real", tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"ELF"


def test_the_sandbox_is_part_of_the_cache_key() -> None:
    assert _toolchain(Language.C)["sandbox"].startswith("bubblewrap")
    assert _toolchain(Language.PYTHON)["sandbox"].startswith("bubblewrap")
    assert "sandbox" not in _toolchain(Language.BINARY)


# --- real sandboxed builds ------------------------------------------------------------------


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory holding an API token, and the daemon's secrets in the environment."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "api-token").write_text("TOKEN-0123456789\n")
    monkeypatch.setenv("RECONCILER_API_TOKEN", "TOKEN-0123456789")
    monkeypatch.setenv("RECONCILER_LEASE", "postgresql://reconciler:dbpassword@localhost/x")
    monkeypatch.delenv("RECONCILER_BUILD_NETWORK", raising=False)
    return state


def test_the_builder_refuses_the_wrapper_flag_before_running_anything(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.c").write_text("int main(void) { return 0; }\n")
    marker = tmp_path / "pwned"
    with pytest.raises(BuildError, match="'-wrapper' is refused") as caught:
        build_executable(
            Language.C,
            source,
            entrypoint="main.c",
            options={"cflags": f"-wrapper /bin/sh,-c,touch{chr(36)}{{IFS}}{marker}"},
            output=tmp_path / "out",
            log=tmp_path / "log",
        )
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_c_source_cannot_include_the_api_token(
    tmp_path: Path, secrets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.cli import main

    repo_dir = tmp_path / "fleet"
    shutil.copytree(FLEET_EXAMPLE, repo_dir)
    (repo_dir / "services" / "echo" / "echo.c").write_text(
        "static const char leaked[] =\n"
        f'#include "{secrets_dir / "api-token"}"\n'
        ";\nint main(void) { return 0; }\n"
    )
    FleetRepo(repo_dir).commit("steal the token")
    cache = tmp_path / "cache"
    argv = ["build", "--repo", str(repo_dir), "--state-dir", str(secrets_dir)]
    code = main([*argv, "--cache-dir", str(cache), "--target", "executable", "echo"])
    err = capsys.readouterr().err
    assert code == 1
    assert "api-token: No such file or directory" in err  # the sandbox does not show it
    assert "TOKEN-0123456789" not in err
    logs = list((cache / "logs").glob("echo-executable-*.log"))
    assert logs
    assert "TOKEN-0123456789" not in logs[0].read_text()


def test_a_symlink_to_the_api_token_dangles_inside_the_sandbox(
    tmp_path: Path, secrets_dir: Path
) -> None:
    """Validation refuses links leaving the repository; the builder does not rely on it."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "token.h").symlink_to(secrets_dir / "api-token")
    (source / "main.c").write_text(
        'static const char leaked[] =\n#include "token.h"\n;\nint main(void) { return 0; }\n'
    )
    log = tmp_path / "log"
    with pytest.raises(BuildError, match=r"token\.h: No such file or directory") as caught:
        build_executable(
            Language.C,
            source,
            entrypoint="main.c",
            options={},
            output=tmp_path / "out",
            log=log,
            hidden=[secrets_dir],
        )
    assert "TOKEN-0123456789" not in str(caught.value) + log.read_text()


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    return server


PROBE = """\
import os, socket, sys
try:
    token = open({token!r}).read().strip()
except OSError as exc:
    token = "unreadable " + type(exc).__name__
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
    net = "connected"
except OSError as exc:
    net = "unreachable " + type(exc).__name__
print("PROBE uid=%d token=%s net=%s env=%s" % (os.getuid(), token, net, sorted(os.environ)))
sys.exit("the probe ends the build here")
"""


@pytest.mark.slow
def test_python_build_hooks_see_no_secrets_no_environment_and_no_network(
    tmp_path: Path, secrets_dir: Path
) -> None:
    """A setup.py runs during the build (pip builds the project): it is the workload's code."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text("print('hello')\n")
    (source / "pyproject.toml").write_text(
        '[project]\nname = "probe"\nversion = "1"\ndependencies = ["six"]\n'
    )
    server = _listener()
    port = server.getsockname()[1]
    (source / "setup.py").write_text(PROBE.format(token=str(secrets_dir / "api-token"), port=port))
    log = tmp_path / "build.log"
    try:
        with pytest.raises(BuildError) as caught:
            build_executable(
                Language.PYTHON,
                source,
                entrypoint="app.py",
                options={},
                output=tmp_path / "out",
                log=log,
                hidden=[secrets_dir],
            )
        with pytest.raises(TimeoutError):
            server.accept()  # nothing from the sandbox reached the host's loopback
    finally:
        server.close()
    text = log.read_text()
    assert "PROBE uid=65534 token=unreadable FileNotFoundError net=unreachable" in text
    assert "TOKEN-0123456789" not in text
    assert "RECONCILER_" not in text.split("PROBE", 1)[1]
    assert "dbpassword" not in text
    assert "RECONCILER_BUILD_NETWORK=1" in str(caught.value)  # the way to allow the network


@pytest.mark.slow
def test_requirements_that_need_an_index_fail_offline_saying_how_to_allow_it(
    tmp_path: Path, secrets_dir: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text("import requests\n")
    (source / "requirements.txt").write_text("# pinned\nrequests==2.32.3\n")
    with pytest.raises(BuildError) as caught:
        build_executable(
            Language.PYTHON,
            source,
            entrypoint="app.py",
            options={},
            output=tmp_path / "out",
            log=tmp_path / "log",
        )
    message = str(caught.value)
    assert "installing the workload's requirements failed" in message
    assert "Builds have no network" in message
    assert "RECONCILER_BUILD_NETWORK=1" in message


def _wheel(path: Path, name: str, module: str) -> None:
    """A minimal pure-Python wheel, as a vendored dependency would be committed."""
    dist = f"{name}-1.dist-info"
    files = {
        f"{name}/__init__.py": module,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for inside, text in {**files, f"{dist}/RECORD": record}.items():
            wheel.writestr(inside, text)


@pytest.mark.slow
def test_vendored_requirements_install_offline_in_the_isolated_environment(
    tmp_path: Path,
) -> None:
    """requirements.txt naming a wheel committed with the source: installed without an index
    into the build environment, where PyInstaller (the builder's) finds it."""
    source = tmp_path / "src"
    (source / "wheels").mkdir(parents=True)
    _wheel(source / "wheels" / "greet-1-py3-none-any.whl", "greet", "WORD = 'hi from greet'\n")
    (source / "requirements.txt").write_text("./wheels/greet-1-py3-none-any.whl\n")
    (source / "app.py").write_text("import greet\nprint(greet.WORD)\n")
    (source / "pyproject.toml").write_text('[project]\nname = "app"\nversion = "1"\n')
    out = tmp_path / "workload"
    log = tmp_path / "log"
    build_executable(Language.PYTHON, source, entrypoint="app.py", options={}, output=out, log=log)
    assert "pip install" in log.read_text()
    result = subprocess.run([str(out)], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "hi from greet"


def test_c_build_with_checked_flags_and_libraries(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "include").mkdir(parents=True)
    (source / "include" / "answer.h").write_text("#define ANSWER 42\n")
    (source / "-fplugin=evil.c").write_text("int helper(void) { return 1; }\n")
    (source / "main.c").write_text(
        '#include <math.h>\n#include "answer.h"\nint helper(void);\n'
        "int main(void) { return (int)sqrt(ANSWER * ANSWER) - 42 + helper() - 1 + GREETING; }\n"
    )
    out = tmp_path / "workload"
    build_executable(
        Language.C,
        source,
        entrypoint="main.c",
        options={"cflags": "-Iinclude -DGREETING=0 -Wall", "ldflags": "-lm"},
        output=out,
        log=tmp_path / "log",
    )
    assert is_static_elf(out.read_bytes())
    assert subprocess.run([str(out)], check=False).returncode == 0
    assert os.access(out, os.X_OK)
