"""From a VM's flat settings to what its runtime needs at boot (pure).

Settings are the same canonical mapping the planner compares (``model.vm_settings``), so a VM is
started from exactly what the plan said, whether the settings come from the desired fleet or,
for a restart of what runs, from the state store. Per-VM data for the guest init becomes a
``GuestConfig`` (``reconciler.guest_config``), never kernel command-line text: the command line
carries only the artifact's parameters and the manifest's checked ``kernelArgs``.

Secrets: settings hold only keyed digests (``deploy.secretEnv.*``, ``deploy.secretFiles.*``);
the values come from the desired fleet's ``SensitiveValues`` (decrypted from the revision, in
memory) at the moment the ``GuestConfig`` is built, and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.errors import VMRuntimeError
from reconciler.guest_config import GuestConfig, GuestVolume, encode
from reconciler.guest_values import kernel_args_problem
from reconciler.model import (
    HealthCheck,
    RestartPolicy,
    SensitiveValues,
    VolumeSpec,
    health_check_of,
    secret_digests_of,
    volumes_of,
)


@dataclass(frozen=True)
class LaunchConfig:
    vcpus: int
    memory_mib: int
    env: dict[str, str]
    args: list[str]
    restart_policy: RestartPolicy
    kernel_args: str
    health: HealthCheck | None
    volumes: tuple[VolumeSpec, ...] = ()
    secret_env: Mapping[str, str] = field(default_factory=dict)  # name -> keyed digest
    secret_files: Mapping[str, str] = field(default_factory=dict)  # guest path -> keyed digest


def launch_config(settings: Mapping[str, str]) -> LaunchConfig:
    def value(key: str, default: object = None) -> object:
        return json.loads(settings[key]) if key in settings else default

    env = {
        key.removeprefix("deploy.env."): str(json.loads(raw))
        for key, raw in settings.items()
        if key.startswith("deploy.env.")
    }
    return LaunchConfig(
        vcpus=int(str(value("deploy.vcpus", 1))),
        memory_mib=int(str(value("deploy.memoryMiB", 256))),
        env=env,
        args=[str(a) for a in value("deploy.args", []) or []],  # type: ignore[attr-defined]
        restart_policy=RestartPolicy(str(value("deploy.restartPolicy", RestartPolicy.ALWAYS))),
        kernel_args=str(value("deploy.kernelArgs", "")),
        health=health_check_of(settings),
        volumes=volumes_of(settings),
        secret_env=secret_digests_of(settings)[0],
        secret_files=secret_digests_of(settings)[1],
    )


def _secret_values(
    digests: Mapping[str, str], sensitive: SensitiveValues | None, *, vm: str, what: str
) -> dict[str, str]:
    values = {}
    for name, digest in digests.items():
        value = sensitive.get(digest) if sensitive is not None else None
        if value is None:
            # A restart from stored settings whose revision is not loaded (or a value that
            # changed since): only the revision's files can give it, never the state store.
            raise VMRuntimeError(
                f"VM {vm}: the value of {what} {name} is not available on this host "
                "(its revision's secrets are not loaded); apply the revision again"
            )
        values[name] = value
    return values


def guest_config(
    config: LaunchConfig,
    *,
    hostname: str,
    address: str | None,
    gateway: str | None,
    sensitive: SensitiveValues | None = None,
) -> GuestConfig:
    """The init's per-VM configuration; checked here (settings may come from an older state
    store) so that a value the guest cannot be given fails before the VM is started."""
    guest = GuestConfig(
        hostname=hostname,
        address=address,
        gateway=gateway,
        env=dict(config.env),
        args=tuple(config.args),
        restart=config.restart_policy,
        volumes=tuple(GuestVolume(v.name, v.mount_path, v.filesystem) for v in config.volumes),
        secret_env=_secret_values(config.secret_env, sensitive, vm=hostname, what="secret env"),
        secret_files=_secret_values(
            config.secret_files, sensitive, vm=hostname, what="secret file"
        ),
    )
    encode(guest)
    return guest


def kernel_cmdline(base: str, config: LaunchConfig) -> str:
    """The kernel command line: the artifact's parameters, then the manifest's ``kernelArgs``."""
    problem = kernel_args_problem(config.kernel_args)
    if problem:
        raise VMRuntimeError(problem)
    return " ".join(p for p in (base, config.kernel_args) if p)
