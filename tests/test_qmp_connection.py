"""QMP connections made from short-lived threads (HTTP handlers, a stop in a worker) leave no
event loop and no file descriptor behind: a daemon answering for months must not leak one per
request. A minimal QMP server on a Unix socket stands in for QEMU's (greeting, capabilities,
one command)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from runtime.qemu.qmp import qmp_connection


def serve_qmp(path: Path, stop: threading.Event) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    with server:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
                greeting = {"QMP": {"version": version, "capabilities": []}}
                conn.sendall(json.dumps(greeting).encode() + b"\n")
                answer_requests(conn)


def answer_requests(conn: socket.socket) -> None:
    """Every request answered with its id; the client sends JSON without a line end."""
    decoder = json.JSONDecoder()
    pending = ""
    while chunk := conn.recv(4096):
        pending += chunk.decode()
        while pending.strip():
            try:
                request, end = decoder.raw_decode(pending.lstrip())
            except json.JSONDecodeError:
                break  # the rest of it is still on its way
            pending = pending.lstrip()[end:]
            answer: dict[str, object] = {"return": {"status": "running"}}
            if "id" in request:
                answer["id"] = request["id"]
            conn.sendall(json.dumps(answer).encode() + b"\n")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connections_from_threads_leave_no_loop_and_no_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    stop = threading.Event()
    server = threading.Thread(target=serve_qmp, args=(path, stop), daemon=True)
    server.start()
    answers: list[object] = []

    def one_request() -> None:
        with qmp_connection(path, timeout=5.0, retry_for=5.0) as monitor:
            answers.append(monitor.cmd("query-status"))

    try:
        one_request()  # the first one loads what the client imports lazily
        before = open_fds()
        for _ in range(20):
            worker = threading.Thread(target=one_request)
            worker.start()
            worker.join(30)
        after = open_fds()
    finally:
        stop.set()
        server.join(5)
    assert len(answers) == 21
    assert answers[-1] == {"status": "running"}
    assert after <= before, f"{after - before} descriptors left by 20 QMP connections"
