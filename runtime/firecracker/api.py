"""A small client of Firecracker's HTTP API over its UNIX socket (standard library only).

Errors become ``VMRuntimeError`` carrying Firecracker's own ``fault_message``.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from reconciler.errors import VMRuntimeError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


class FirecrackerAPI:
    def __init__(self, socket_path: Path, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError as exc:
            raise VMRuntimeError(
                f"Firecracker API at {self.socket_path} not answering: {exc}"
            ) from exc
        finally:
            connection.close()
        data = json.loads(raw) if raw else None
        if response.status >= 300:
            fault = data.get("fault_message") if isinstance(data, dict) else raw.decode()
            raise VMRuntimeError(f"Firecracker refused {method} {path}: {fault}")
        return data

    def put_machine_config(self, config: dict[str, Any]) -> None:
        self.request("PUT", "/machine-config", config)

    def put_boot_source(self, boot: dict[str, Any]) -> None:
        self.request("PUT", "/boot-source", boot)

    def put_drive(self, drive: dict[str, Any]) -> None:
        self.request("PUT", f"/drives/{drive['drive_id']}", drive)

    def put_network_interface(self, iface: dict[str, Any]) -> None:
        self.request("PUT", f"/network-interfaces/{iface['iface_id']}", iface)

    def instance_start(self) -> None:
        self.request("PUT", "/actions", {"action_type": "InstanceStart"})

    def send_ctrl_alt_del(self) -> None:
        self.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    def pause(self) -> None:
        self.request("PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.request("PATCH", "/vm", {"state": "Resumed"})

    def get_vm_config(self) -> dict[str, Any]:
        result = self.request("GET", "/vm/config")
        return result if isinstance(result, dict) else {}

    def describe_instance(self) -> dict[str, Any]:
        result = self.request("GET", "/")
        return result if isinstance(result, dict) else {}

    def configure(self, config: dict[str, Any]) -> None:
        """The API sequence equivalent to ``--config-file``, then ``InstanceStart``."""
        self.put_machine_config(config["machine-config"])
        self.put_boot_source(config["boot-source"])
        for drive in config.get("drives", []):
            self.put_drive(drive)
        for iface in config.get("network-interfaces", []):
            self.put_network_interface(iface)
        self.instance_start()
