"""Compile schema-valid documents into the model: ``FleetSettings`` and ``Workload`` objects.

Input: documents that passed their JSON Schema (``schema.py``). Output: the arguments of
``model.assemble_fleet``, plus the problems that a schema cannot express: a deploy target that is
not built, a runtime that cannot run that target, a source path leaving the repository,
``dependsOn`` naming an unknown workload or forming a cycle.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.build_flags import build_input_problems
from reconciler.guest_values import deploy_problems, value_problems
from reconciler.manifests.paths import SourceTrees
from reconciler.manifests.secrets import FleetSecrets
from reconciler.model import (
    BuildSpec,
    DeploySpec,
    FleetSettings,
    HealthCheck,
    HealthKind,
    Language,
    NetworkPool,
    PlacementSpec,
    PortSpec,
    RestartPolicy,
    RolloutOverrides,
    RolloutPolicy,
    RuntimeKind,
    SecretFileSpec,
    SecretRef,
    SourceSpec,
    Target,
    VolumeSpec,
    Workload,
)

BUILT_IN_DEPLOY: Mapping[str, Any] = {"replicas": 1, "vcpus": 1, "memoryMiB": 256}
PRIVATE_POOLS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
VM_TARGETS = {Target.UNIKERNEL, Target.MICROVM}


@dataclass(frozen=True)
class Document:
    """One schema-valid document and where it came from."""

    file: str  # relative to the revision root
    index: int  # position in its file
    kind: str
    name: str
    content: Mapping[str, Any]


# (document, JSON path inside it, message)
Report = Callable[[Document, Sequence[Hashable], str], None]


def compile_fleet(document: Document | None) -> FleetSettings:
    if document is None:
        return FleetSettings(name="default", declared=False)
    spec = document.content.get("spec") or {}
    network = spec.get("network") or {}
    rollout = spec.get("rollout") or {}
    return FleetSettings(
        name=document.name,
        rollout=RolloutPolicy(
            max_unavailable=rollout.get("maxUnavailable", 1),
            max_surge=rollout.get("maxSurge", 0),
            progress_deadline_seconds=rollout.get("progressDeadlineSeconds"),
        ),
        prune=spec.get("prune", True),
        allow_empty=spec.get("allowEmpty", False),
        network=NetworkPool(
            cidr=network.get("cidr", NetworkPool.cidr),
            bridge=network.get("bridge", NetworkPool.bridge),
            nat=network.get("nat", False),
            host_prefix_length=network.get("hostPrefixLength"),
        ),
        kernel=spec.get("kernel"),
        variables=spec.get("variables") or {},
        max_deletions=spec.get("maxDeletions"),
        secrets={name: s["path"] for name, s in (spec.get("secrets") or {}).items()},
    )


def check_fleet(document: Document, report: Report) -> None:
    rollout = (document.content.get("spec") or {}).get("rollout") or {}
    if rollout.get("maxUnavailable") == 0 and rollout.get("maxSurge", 0) == 0:
        report(document, ("spec", "rollout"), "maxUnavailable 0 needs maxSurge of 1 or more")
    cidr = ((document.content.get("spec") or {}).get("network") or {}).get("cidr")
    if cidr is None:
        return
    try:
        network = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        report(document, ("spec", "network", "cidr"), f"invalid network: {exc}")
        return
    # The schema bounds the prefix (/16 to /29); a pool must also be private: its gateway
    # address goes on a host bridge, and the host routes the whole pool onto it.
    if not any(network.subnet_of(private) for private in PRIVATE_POOLS):
        report(
            document,
            ("spec", "network", "cidr"),
            f"the pool {network} is not private: use a network inside "
            + ", ".join(str(p) for p in PRIVATE_POOLS)
            + " (the host would route it onto the bridge)",
        )
    host_prefix = ((document.content.get("spec") or {}).get("network") or {}).get(
        "hostPrefixLength"
    )
    if host_prefix is not None and host_prefix < network.prefixlen:
        report(
            document,
            ("spec", "network", "hostPrefixLength"),
            f"a host's subnet (/{host_prefix}) cannot be larger than the pool {network}",
        )


def fleet_defaults(document: Document | None) -> Mapping[str, Any]:
    if document is None:
        return {}
    spec = document.content.get("spec") or {}
    return (spec.get("defaults") or {}).get("deploy") or {}


def merge_deploy(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**BUILT_IN_DEPLOY, **defaults, **own}
    if "env" in defaults or "env" in own:
        merged["env"] = {**(defaults.get("env") or {}), **(own.get("env") or {})}
    return merged


def compile_workload(
    document: Document,
    *,
    defaults: Mapping[str, Any],
    root: Path,
    fleet_dir: Path,
    trees: SourceTrees,
    report: Report,
    secrets: FleetSecrets | None = None,
) -> Workload | None:
    spec = document.content["spec"]
    source = spec["source"]
    targets = tuple(Target(t) for t in spec["build"]["targets"])
    deploy = merge_deploy(defaults, spec["deploy"])
    ok = True

    if "target" not in deploy:
        if len(targets) == 1:
            deploy["target"] = targets[0].value
        else:
            report(
                document,
                ("spec", "deploy"),
                "spec.deploy.target is required when several targets are built",
            )
            ok = False
    target = Target(deploy.get("target", targets[0].value))
    if target not in targets:
        report(
            document,
            ("spec", "deploy", "target"),
            f"deploy target {target.value!r} is not in spec.build.targets "
            f"{[t.value for t in targets]}",
        )
        ok = False
    runtime = RuntimeKind(
        deploy.get("runtime", "process" if target is Target.EXECUTABLE else "qemu")
    )
    if runtime is RuntimeKind.PROCESS and target is not Target.EXECUTABLE:
        report(
            document,
            ("spec", "deploy", "runtime"),
            f"runtime 'process' runs the executable target, not {target.value!r}",
        )
        ok = False
    if runtime is not RuntimeKind.PROCESS and target not in VM_TARGETS:
        report(
            document,
            ("spec", "deploy", "runtime"),
            f"runtime {runtime.value!r} boots a unikernel or microvm target, not "
            f"{target.value!r}; use runtime 'process' for executables",
        )
        ok = False
    if document.name in deploy.get("dependsOn", []):
        report(document, ("spec", "deploy", "dependsOn"), "a workload cannot depend on itself")
        ok = False
    for at, why in deploy_problems(deploy):  # what cannot reach the guest as written
        report(document, ("spec", "deploy", *at), why)
        ok = False

    resolved = trees.resolve(fleet_dir, source["path"])
    if isinstance(resolved, str):
        report(document, ("spec", "source", "path"), resolved)
        return None
    digest, escapes = trees.digest(resolved)
    for message in escapes:
        report(document, ("spec", "source", "path"), message)
    entry = trees.inside(resolved, source["entrypoint"])
    if not entry.startswith(str(resolved) + os.sep) or not os.path.isfile(entry):
        report(
            document,
            ("spec", "source", "entrypoint"),
            f"entrypoint {source['entrypoint']!r} is not a file in {source['path']!r}",
        )
        ok = False
    build = spec["build"].get("options") or {}
    for where, message in build_input_problems(source["language"], source["entrypoint"], build):
        report(document, ("spec", *where), message)
        ok = False
    secret_env, secret_files = _secret_refs(document, deploy, secrets, report)
    if escapes or not ok or secret_env is None or secret_files is None:
        return None

    health = deploy.get("health")
    return Workload(
        name=document.name,
        labels=dict(document.content["metadata"].get("labels") or {}),
        source=SourceSpec(
            path=trees.relative(resolved),
            language=Language(source["language"]),
            entrypoint=source["entrypoint"],
        ),
        build=BuildSpec(targets=targets, options=dict(spec["build"].get("options") or {})),
        deploy=DeploySpec(
            target=target,
            runtime=runtime,
            replicas=deploy["replicas"],
            vcpus=deploy["vcpus"],
            memory_mib=deploy["memoryMiB"],
            env=dict(deploy.get("env") or {}),
            ports=tuple(
                PortSpec(p["name"], p["port"], p.get("protocol", "tcp"))
                for p in deploy.get("ports", [])
            ),
            health=None
            if health is None
            else HealthCheck(
                kind=HealthKind(health["type"]),
                port=health.get("port"),
                path=health.get("path"),
                timeout_seconds=float(health.get("timeoutSeconds", HealthCheck.timeout_seconds)),
                interval_seconds=float(health.get("intervalSeconds", HealthCheck.interval_seconds)),
                start_period_seconds=float(
                    health.get("startPeriodSeconds", HealthCheck.start_period_seconds)
                ),
            ),
            depends_on=tuple(deploy.get("dependsOn", [])),
            kernel=deploy.get("kernel"),
            args=tuple(deploy.get("args", [])),
            kernel_args=deploy.get("kernelArgs", ""),
            restart_policy=RestartPolicy(deploy.get("restartPolicy", RestartPolicy.ALWAYS)),
            prevent_destroy=bool(deploy.get("preventDestroy", False)),
            volumes=tuple(
                VolumeSpec(
                    name=v["name"],
                    size_mib=v["sizeMiB"],
                    mount_path=v["mountPath"],
                    filesystem=v.get("filesystem", "ext4"),
                    reclaim_policy=v.get("reclaimPolicy", "retain"),
                )
                for v in deploy.get("volumes", [])
            ),
            secret_env=secret_env,
            secret_files=secret_files,
            placement=PlacementSpec(
                host_selector=dict((deploy.get("placement") or {}).get("hostSelector") or {}),
                spread_by=(deploy.get("placement") or {}).get("spreadBy"),
            ),
            rollout=_rollout_overrides(document, deploy, report),
        ),
        source_digest=digest,
        declared_in=document.file,
        suspended=bool(spec.get("suspend", False)),
    )


def _rollout_overrides(
    document: Document, deploy: Mapping[str, Any], report: Report
) -> RolloutOverrides | None:
    """``deploy.rollout``, checked against the replicas it moves."""
    rollout = deploy.get("rollout")
    if rollout is None:
        return None
    path = ("spec", "deploy", "rollout")
    if rollout.get("maxUnavailable") == 0 and rollout.get("maxSurge", 0) == 0:
        report(document, path, "maxUnavailable 0 needs maxSurge of 1 or more")
    canary = rollout.get("canary")
    if canary and canary >= deploy.get("replicas", 1):
        report(
            document,
            (*path, "canary"),
            f"canary {canary} must be fewer than the {deploy.get('replicas', 1)} replicas",
        )
    deadline = rollout.get("progressDeadlineSeconds")
    soak = rollout.get("soakSeconds")
    return RolloutOverrides(
        max_unavailable=rollout.get("maxUnavailable"),
        max_surge=rollout.get("maxSurge"),
        canary=canary,
        soak_seconds=float(soak) if soak is not None else None,
        auto_promote=rollout.get("autoPromote"),
        progress_deadline_seconds=float(deadline) if deadline is not None else None,
    )


def _secret_refs(
    document: Document,
    deploy: Mapping[str, Any],
    secrets: FleetSecrets | None,
    report: Report,
) -> tuple[dict[str, SecretRef] | None, tuple[SecretFileSpec, ...] | None]:
    """``deploy.secretEnv`` and ``deploy.secretFiles`` as references with keyed digests, or
    ``(None, None)`` after reporting what is wrong (``manifests.secrets``)."""
    wanted_env = deploy.get("secretEnv") or {}
    wanted_files = deploy.get("secretFiles") or []
    if not wanted_env and not wanted_files:
        return {}, ()
    ok = True
    env: dict[str, SecretRef] = {}
    files: list[SecretFileSpec] = []

    def resolve(at: tuple[Hashable, ...], secret: str, key: str) -> SecretRef | None:
        nonlocal ok
        if secrets is None:
            ref: SecretRef | str = "the fleet declares no secrets (Fleet spec.secrets)"
        else:
            ref = secrets.ref(secret, key)
        if isinstance(ref, str):
            report(document, ("spec", "deploy", *at), ref)
            ok = False
            return None
        return ref

    plain_env = deploy.get("env") or {}
    for name, wanted in wanted_env.items():
        if name in plain_env:
            report(
                document,
                ("spec", "deploy", "secretEnv", name),
                f"{name} is also in deploy.env; a variable is either plain or secret",
            )
            ok = False
        ref = resolve(("secretEnv", name), wanted["secret"], wanted.get("key", ""))
        if ref is not None:
            env[name] = ref
    seen: set[str] = set()
    for index, wanted in enumerate(wanted_files):
        if wanted["path"] in seen:
            report(document, ("spec", "deploy", "secretFiles", index, "path"), "path used twice")
            ok = False
        seen.add(wanted["path"])
        ref = resolve(("secretFiles", index), wanted["secret"], wanted.get("key", ""))
        if ref is not None:
            files.append(SecretFileSpec(wanted["path"], ref))
    if secrets is not None and ok:
        # The limits every env value has (no NUL, a size cap), checked on the values without
        # ever naming them.
        values = {n: secrets.sensitive.get(r.digest, "") for n, r in env.items()}
        for at, why in value_problems(values, ()):
            report(document, ("spec", "deploy", "secretEnv", *at[1:]), why)
            ok = False
        for index, secret_file in enumerate(files):
            if "\0" in secrets.sensitive.get(secret_file.ref.digest, ""):
                report(
                    document,
                    ("spec", "deploy", "secretFiles", index),
                    "the secret holds a NUL byte, which the guest cannot be given",
                )
                ok = False
    return (env, tuple(files)) if ok else (None, None)


def check_dependencies(workloads: Mapping[str, Document], known: set[str], report: Report) -> None:
    """Unknown names and cycles in ``dependsOn``, each reported once. ``known`` holds every
    declared workload name, including those whose documents have problems of their own."""
    graph: dict[str, list[str]] = {}
    for name, document in workloads.items():
        deps = list(document.content["spec"]["deploy"].get("dependsOn", []))
        for position, dependency in enumerate(deps):
            if dependency not in known:
                report(
                    document,
                    ("spec", "deploy", "dependsOn", position),
                    f"dependsOn names unknown workload {dependency!r}",
                )
        graph[name] = [d for d in deps if d in workloads and d != name]

    state: dict[str, int] = {}
    stack: list[str] = []
    reported: set[frozenset[str]] = set()

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dependency in graph[name]:
            if state.get(dependency) == 1:
                cycle = [*stack[stack.index(dependency) :], dependency]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    report(
                        workloads[name],
                        ("spec", "deploy", "dependsOn"),
                        "dependsOn forms a cycle: " + " -> ".join(cycle),
                    )
            elif not state.get(dependency):
                visit(dependency)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name)
