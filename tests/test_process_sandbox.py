"""The process runtime's sandbox as a boundary: a workload from the (untrusted) fleet repository,
run by a reconciler that is root, cannot write the host, read the state directory or other
VMs, keep any capability, reach the host's loopback services, or reach a workload it does not
depend on. The root test deploys a probe program with ``reconciler apply`` and reads what it
could and could not do from its console."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.process_fleet import (
    ECHO,
    echo_workload,
    fleet_document,
    link_names,
    netns_names,
    network_yaml,
    new_pool,
    remove_deployment,
    sleeper_spec,
)
from support.repo import FleetRepo

from reconciler.cli import main
from reconciler.errors import ToolMissingError
from runtime.network import scope_for
from runtime.process.sandbox import (
    UID_BASE,
    UID_COUNT,
    HostLayout,
    Tools,
    sandbox_argv,
    sandbox_tools,
    sandbox_uid,
)

TOOLS = Tools(nsenter="/usr/bin/nsenter", bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv")
LAYOUT = HostLayout(
    links={"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64"},
    directories=(),
    etc=("/etc/ld.so.cache", "/etc/resolv.conf", "/etc/ssl/certs"),
)


def _argv(netns: Path | None) -> list[str]:
    vm = Path("/var/lib/reconciler/vms/web-0")
    return sandbox_argv(
        name="web-0",
        command=["/opt/init", "--supervisor", "--config", str(vm / "init.conf")],
        read_only=[Path("/opt/init"), Path("/var/cache/art/workload"), vm / "init.conf"],
        workdir=vm / "work",
        uid=sandbox_uid("web-0"),
        netns=netns,
        tools=TOOLS,
        layout=LAYOUT,
    )


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def test_sandbox_command_line() -> None:
    argv = _argv(Path("/run/netns/rcab12-web-0"))
    assert argv[:3] == ["/usr/bin/nsenter", "--net=/run/netns/rcab12-web-0", "--"]
    outer = argv[3 : argv.index("/usr/bin/setpriv")]
    drop = argv[argv.index("/usr/bin/setpriv") : argv.index("/usr/bin/bwrap", 4)]
    inner = argv[argv.index("/usr/bin/bwrap", 4) : -4]
    uid = str(sandbox_uid("web-0"))
    # The view, made by root: the VM's work directory is the only writable host path, the rest
    # of the state directory (database, token, other VMs, its own pid file) is not there.
    assert _options(outer, "--bind") == ["/var/lib/reconciler/vms/web-0/work"]
    assert _options(outer, "--ro-bind") == [
        "/usr",
        "/etc/ld.so.cache",
        "/etc/resolv.conf",
        "/etc/ssl/certs",
        "/opt/init",
        "/var/cache/art/workload",
        "/var/lib/reconciler/vms/web-0/init.conf",
    ]
    assert "/" not in _options(outer, "--ro-bind") + _options(outer, "--bind")
    # Directories on the way are created enterable (bwrap's own would be 0700).
    at = outer.index("/var/lib/reconciler/vms/web-0")
    assert outer[at - 3 : at] == ["--perms", "0755", "--dir"]
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session"):
        assert flag in outer
    assert "--unshare-net" not in outer  # the namespace of nsenter, on the fleet bridge
    assert "--die-with-parent" not in argv  # VMs outlive the reconciler
    # Root is dropped before the workload's own bwrap runs.
    assert drop[1:] == [
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    assert inner[1:7] == ["--unshare-user", "--disable-userns", "--uid", uid, "--gid", uid]
    assert inner[7:9] == ["--cap-drop", "ALL"]
    assert _options(inner, "--ro-bind") == ["/"]
    assert _options(inner, "--bind") == ["/tmp", "/var/lib/reconciler/vms/web-0/work"]
    assert argv[-4:] == ["/opt/init", "--supervisor", "--config", _options(outer, "--ro-bind")[-1]]


def test_without_a_network_the_sandbox_has_none() -> None:
    argv = _argv(None)
    assert argv[0] == "/usr/bin/bwrap"
    assert "--unshare-net" in argv


def test_sandbox_uids_are_unprivileged_stable_and_per_vm() -> None:
    uids = {sandbox_uid(f"web-{n}") for n in range(50)}
    assert len(uids) == 50
    assert all(UID_BASE <= uid < UID_BASE + UID_COUNT for uid in uids)
    assert sandbox_uid("web-0") == sandbox_uid("web-0")


def test_a_missing_sandbox_tool_is_an_error_not_a_bare_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="bwrap is not installed"):
        sandbox_tools()


PROBE_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *reach(const char *target) {
    char ip[64];
    const char *colon = strrchr(target, ':');
    snprintf(ip, sizeof ip, "%.*s", (int)(colon - target), target);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(colon + 1));
    inet_pton(AF_INET, ip, &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int ok = connect(s, (struct sockaddr *)&a, sizeof a) == 0;
    if (!ok && errno == EINPROGRESS) {
        struct pollfd p = {s, POLLOUT, 0};
        int err = 1;
        socklen_t len = sizeof err;
        if (poll(&p, 1, 1000) == 1) getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
        ok = err == 0;
    }
    close(s);
    return ok ? "open" : "closed";
}

int main(int argc, char **argv) {
    char line[256], host[64] = "";
    setvbuf(stdout, NULL, _IOLBF, 0); /* whole lines: the init writes markers to the same log */
    FILE *status = fopen("/proc/self/status", "r");
    while (fgets(line, sizeof line, status))
        if (!strncmp(line, "Cap", 3)) printf("%s", line);
    fclose(status);
    gethostname(host, sizeof host);
    printf("uid %d gid %d hostname %s\n", (int)getuid(), (int)getgid(), host);
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strncmp(arg, "write:", 6)) {
            int fd = open(arg + 6, O_WRONLY | O_CREAT, 0644);
            printf("write %s %s\n", arg + 6, fd >= 0 ? "ok" : strerror(errno));
        } else if (!strncmp(arg, "read:", 5)) {
            int fd = open(arg + 5, O_RDONLY);
            printf("read %s %s\n", arg + 5, fd >= 0 ? "ok" : strerror(errno));
        } else if (!strcmp(arg, "remount")) {
            int r = mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL);
            printf("remount %s\n", r == 0 ? "ok" : strerror(errno));
        } else if (!strcmp(arg, "userns")) {
            int r = unshare(CLONE_NEWUSER);
            printf("userns %s\n", r == 0 ? "ok" : strerror(errno));
        }
    }
    for (int round = 0;; round++) {
        for (int i = 1; i < argc; i++)
            if (!strncmp(argv[i], "connect:", 8))
                printf("connect %s %s\n", argv[i] + 8, reach(argv[i] + 8));
        printf("round %d\n", round);
        fflush(stdout);
        sleep(1);
    }
}
"""


PROBE = """---
apiVersion: reconciler/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  source: {{path: probe, language: c, entrypoint: probe.c}}
  build: {{targets: [executable]}}
  deploy:
    runtime: process
    dependsOn: {depends_on}
    args: {args}
    health: {{type: console}}
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def host_service() -> Iterator[int]:
    """A service on the host's loopback, as the daemon's API or PostgreSQL would be."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


def _rounds(log: Path) -> list[list[str]]:
    """The probe's connection rounds, each its ``connect ...`` lines."""
    rounds: list[list[str]] = [[]]
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("connect "):
            rounds[-1].append(line)
        elif line.startswith("round "):
            rounds.append([])
    return rounds[:-1]


def _latest_round(log: Path, after: int) -> list[str]:
    """A round completed after the first ``after`` (+1: the one in progress at the time)."""
    after += 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rounds = _rounds(log)
        if len(rounds) > after:
            return rounds[-1]
        time.sleep(0.5)
    raise AssertionError(f"the probe stopped reporting:\n{log.read_text()}")


@pytest.mark.root
def test_a_workload_is_confined_to_its_sandbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host_service: int
) -> None:
    bridge, cidr = new_pool()
    state = tmp_path / "state"
    state.mkdir()
    (state / "api-token").write_text("the-api-token\n")
    (state / "api-token").chmod(0o600)
    vms = state / "vms"
    gateway = cidr.rsplit(".", 1)[0] + ".1"
    neighbours = [cidr.rsplit(".", 1)[0] + f".{n}:7007" for n in range(2, 6)]
    args = [
        "write:/probe",
        "write:/etc/probe",
        "write:/usr/probe",
        f"write:{state}/probe",
        f"write:{vms}/probe-0/probe",
        f"write:{vms}/probe-0/work/probe",
        "write:/tmp/probe",
        f"read:{state}/api-token",
        f"read:{state}/state.db",
        f"read:{vms}/echo-0/console.log",
        "remount",
        "userns",
        f"connect:127.0.0.1:{host_service}",
        f"connect:{gateway}:{host_service}",
        *(f"connect:{target}" for target in neighbours),
    ]
    (tmp_path / "fleet").mkdir()
    repo = FleetRepo(tmp_path / "fleet")
    head = fleet_document("sandboxed", network_yaml(bridge, cidr)) + echo_workload("echo", 7007)
    probe = PROBE.format(name="probe", depends_on="[]", args=json.dumps(args))
    friend = PROBE.format(name="friend", depends_on="[echo]", args=json.dumps(args))
    repo.write("fleet.yaml", head + probe + friend)
    repo.write("echo/echo.c", ECHO.read_text())
    repo.write("probe/probe.c", PROBE_C)
    repo.commit("a probe in the sandbox")
    common = ["--repo", str(repo.path), "--state-dir", str(state)]
    try:
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        code, out = cli(capsys, "status", "--state-dir", str(state), "--format", "json")
        status = {vm["name"]: vm for vm in json.loads(out)["vms"]}
        assert all(vm["healthy"] for vm in status.values()), status
        log = vms / "probe-0" / "console.log"
        text = log.read_text()

        # No privilege: an unprivileged uid, no capability, even in its bounding set.
        found = re.search(r"uid (\d+) gid (\d+) hostname (\S+)", text)
        assert found is not None, text
        assert int(found[1]) != 0
        assert int(found[2]) != 0
        assert found[3] == "probe-0"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert f"{cap}:\t0000000000000000" in text, text
        assert re.search(r"^remount (Operation not permitted|Permission denied)$", text, re.M)
        assert "userns No space left on device" in text  # no nested user namespace

        # The host is read-only; the state directory is not there, but for its work directory.
        for path in ("/probe", "/etc/probe", "/usr/probe"):
            assert re.search(
                rf"^write {path} (Read-only file system|Permission denied)$", text, re.M
            )
        assert f"write {state}/probe Permission denied" in text
        assert f"write {vms}/probe-0/probe Permission denied" in text
        assert f"write {vms}/probe-0/work/probe ok" in text
        assert "write /tmp/probe ok" in text
        for secret in (f"{state}/api-token", f"{state}/state.db", f"{vms}/echo-0/console.log"):
            assert f"read {secret} No such file or directory" in text
        assert not Path("/probe").exists()
        assert not (state / "probe").exists()
        assert (vms / "probe-0" / "work" / "probe").exists()  # written there, nowhere else

        # Its own network: the host's loopback services are out of reach, also through the
        # bridge; echo is reachable only from the workload that declares it in dependsOn.
        echo = f"{status['echo-0']['address']}:7007"
        assert status["probe-0"]["address"] != "127.0.0.1"
        seen = len(_rounds(log))
        latest = _latest_round(log, seen)
        assert f"connect 127.0.0.1:{host_service} closed" in latest
        assert f"connect {gateway}:{host_service} closed" in latest
        assert f"connect {echo} closed" in latest, latest
        friend_log = vms / "friend-0" / "console.log"
        seen_by_friend = _latest_round(friend_log, len(_rounds(friend_log)))
        assert f"connect {echo} open" in seen_by_friend, seen_by_friend

        # Removing the VM removes its namespace and its veth.
        scope = scope_for(str(state.resolve()))
        assert f"rc{scope}-probe-0" in netns_names()
        repo.write("fleet.yaml", head + friend)
        repo.commit("no probe")
        code, out = cli(capsys, "apply", *common)
        assert code == 0, out
        assert f"rc{scope}-probe-0" not in netns_names()
        assert f"rc{scope}-probe-0" not in link_names()
        assert f"rc{scope}-friend-0" in netns_names()
        assert f"rc{scope}-friend-0" in link_names()
    finally:
        remove_deployment(state, bridge)


@pytest.mark.root
def test_stop_reaches_the_workload_and_a_new_runtime_adopts_the_sandbox(tmp_path: Path) -> None:
    """SIGTERM goes to the supervisor inside the sandbox (the namespace's first process, bwrap,
    ignores it), so the workload ends gracefully; a runtime that did not start the sandbox (a
    restarted reconciler) finds it from the pid file."""
    from builders.images import guest_init
    from reconciler.model import VMState
    from runtime.process.driver import ProcessRuntime

    spec = sleeper_spec(tmp_path, restart="never")
    init = guest_init(tmp_path / "guest-init.log")
    started = ProcessRuntime(init_binary=lambda: init).start(spec)
    try:
        assert started.state is VMState.RUNNING
        log = spec.vm_dir / "console.log"
        deadline = time.monotonic() + 20
        while "waiting" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "waiting" in log.read_text(), log.read_text()

        adopter = ProcessRuntime(init_binary=lambda: init)
        adopted = adopter.status(spec)
        assert (adopted.state, adopted.pid) == (VMState.RUNNING, started.pid)
        assert adopter.start(spec).pid == started.pid  # adopted, not started twice

        stopped = adopter.stop(spec, grace_seconds=30)
        assert stopped.state is VMState.STOPPED, stopped
        assert stopped.detail == "workload exited with code 0"
        assert "terminated" in log.read_text()
    finally:
        remove_deployment(tmp_path)
