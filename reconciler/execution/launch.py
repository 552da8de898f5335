"""From a VM's flat settings to what its runtime needs at boot (pure).

Settings are the same canonical mapping the planner compares (``model.vm_settings``), so a VM is
started from exactly what the plan said, whether the settings come from the desired fleet or,
for a restart of what runs, from the state store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.errors import VMRuntimeError


@dataclass(frozen=True)
class LaunchConfig:
    vcpus: int
    memory_mib: int
    env: dict[str, str]
    args: list[str]
    restart_policy: str
    kernel_args: str
    health: dict[str, object] | None


def launch_config(settings: Mapping[str, str]) -> LaunchConfig:
    def value(key: str, default: object = None) -> object:
        return json.loads(settings[key]) if key in settings else default

    env = {
        key.removeprefix("deploy.env."): str(json.loads(raw))
        for key, raw in settings.items()
        if key.startswith("deploy.env.")
    }
    health = value("deploy.health")
    return LaunchConfig(
        vcpus=int(str(value("deploy.vcpus", 1))),
        memory_mib=int(str(value("deploy.memoryMiB", 256))),
        env=env,
        args=[str(a) for a in value("deploy.args", []) or []],  # type: ignore[attr-defined]
        restart_policy=str(value("deploy.restartPolicy", "always")),
        kernel_args=str(value("deploy.kernelArgs", "")),
        health=health if isinstance(health, dict) else None,
    )


def _token(key: str, value: str) -> str:
    if '"' in value or "\n" in value:
        raise VMRuntimeError(
            f"{key} value {value!r} cannot be passed on the kernel command line "
            "(no double quotes or newlines)"
        )
    return f'rc.{key}="{value}"' if " " in value else f"rc.{key}={value}"


def guest_cmdline(
    base: str,
    config: LaunchConfig,
    *,
    hostname: str,
    address: str | None,
    gateway: str | None,
) -> str:
    """The kernel command line: the artifact's, then per-VM data for the guest init."""
    parts = [base, config.kernel_args, _token("hostname", hostname)]
    if address and gateway:
        parts += [_token("ip", address), _token("gateway", gateway)]
    parts += [_token("env", f"{k}={v}") for k, v in sorted(config.env.items())]
    parts += [_token("arg", a) for a in config.args]
    parts.append(_token("restart", config.restart_policy))
    return " ".join(p for p in parts if p)
