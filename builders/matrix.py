"""The build matrix: every listed target of every workload of a desired fleet, through the cache.

    DesiredFleet + checkout ──▶ for each (workload, target): cache hit, or build ──▶ BuildResult

The executable of a workload is built first and reused by its unikernel and microvm images.
One artifact failing does not stop the others; each result says built, cached or failed.

A Python workload's images carry its one-directory bundle instead of the one-file executable
(``executable.Layout``): built once per executable from the same source, and kept in the cache
as an entry of its own (``BUNDLE_NAME``) whose input digest is derived from the executable's,
so that looking an artifact up by a plan's digest never finds a bundle. The packing
(``PACKING``) is in every cache key: changing it rebuilds what it changes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from builders.bundle_trim import RULES_DIGEST
from builders.cache import ArtifactCache, CacheEntry, file_digest
from builders.executable import Layout, build_executable
from builders.images import INITRAMFS_COMPRESSION, build_microvm, build_unikernel, guest_init
from builders.kernels import Kernel, KernelRegistry, profile_for
from builders.sandbox import network_allowed
from builders.toolchain import pyinstaller_version, python_version, version_of
from reconciler.errors import BuildError, ReconcilerError
from reconciler.model import (
    ArtifactRef,
    BuildStatus,
    DesiredFleet,
    Language,
    Target,
    Workload,
    artifact_ref_for,
    digest_of,
)

EXECUTABLE_NAME = "workload"
BUNDLE_NAME = "bundle"
# How workloads are packed (stripped Python, the images' bundle and initramfs compression); in
# every cache key, so changing it rebuilds once (bump the number when the packing changes).
PACKING = (
    f"3:python-strip,trim-{RULES_DIGEST},images-onedir:initramfs-{INITRAMFS_COMPRESSION.value}"
)


@dataclass(frozen=True)
class BuildEvent:
    workload: str
    target: Target
    phase: str  # "start" | "built" | "cached" | "failed"
    message: str = ""


@dataclass(frozen=True)
class _Job:
    """One artifact being built: where, with which kernel and init."""

    workload: Workload
    ref: ArtifactRef
    key: str
    staging: Path
    log: Path
    kernel: Kernel | None
    init: Path | None


@dataclass(frozen=True)
class BuildResult:
    workload: str
    target: Target
    digest: str  # the plan's input digest
    status: BuildStatus
    seconds: float
    cache_key: str | None = None
    path: Path | None = None
    error: str = ""


def _toolchain(language: Language) -> dict[str, str]:
    # The sandbox is part of the toolchain: it decides what a build can see.
    if language is Language.C:
        cc = version_of("musl-gcc") if shutil.which("musl-gcc") else version_of("gcc")
        return {"cc": cc, "sandbox": version_of("bwrap")}
    if language is Language.PYTHON:
        return {
            "pyinstaller": pyinstaller_version(),
            "python": python_version(),
            "sandbox": version_of("bwrap"),
        }
    return {}


class MatrixBuilder:
    """Builds artifacts of one checkout into one cache (see the module docstring)."""

    def __init__(
        self,
        checkout_root: Path,
        cache: ArtifactCache,
        kernels: KernelRegistry,
        progress: Callable[[BuildEvent], None] | None = None,
        *,
        build_network: bool | None = None,
    ) -> None:
        """``build_network``: may builds that need a package index reach the network (default:
        ``RECONCILER_BUILD_NETWORK`` in the environment, off unless set)."""
        self.checkout_root = checkout_root
        self.cache = cache
        self.kernels = kernels
        self.progress = progress or (lambda event: None)
        self.build_network = network_allowed() if build_network is None else build_network
        # What a build must never see: the cache and the state directory that holds the
        # kernel registry (and the API token, the state database, the lease files).
        self.hidden = (cache.root, kernels.root, kernels.root.parent)

    def machine_inputs(
        self, workload: Workload, target: Target, kernel: Kernel | None, init: Path | None
    ) -> dict[str, str]:
        machine = {**_toolchain(workload.source.language), "packing": PACKING}
        if target is not Target.EXECUTABLE:
            assert kernel is not None
            assert init is not None
            machine["kernel"] = kernel.digest
            machine["init"] = file_digest(init)
        if target is Target.MICROVM:
            machine["mkfs.ext4"] = version_of("mkfs.ext4")
            machine["busybox"] = version_of("busybox")
        return machine

    def _program(self, workload: Workload, executable: CacheEntry, log: Path) -> Path:
        """What an image of ``workload`` carries: the executable, or for Python its bundle."""
        if workload.source.language is not Language.PYTHON:
            return executable.file(EXECUTABLE_NAME)
        machine = {**_toolchain(workload.source.language), "layout": Layout.ONEDIR.value}
        key = digest_of({"bundle-of": executable.key, "machine": machine})
        entry = self.cache.get(key)
        if entry is not None:
            return entry.file(BUNDLE_NAME)
        staging = self.cache.new_staging()
        own_log = staging / "build.log"
        own_log.write_text(f"# {workload.name}/{Layout.ONEDIR.value} bundle for the images\n")
        started = time.monotonic()
        try:
            build_executable(
                workload.source.language,
                self.checkout_root / workload.source.path,
                entrypoint=workload.source.entrypoint,
                options=workload.build.options,
                output=staging / BUNDLE_NAME,
                log=own_log,
                hidden=self.hidden,
                network=self.build_network,
                layout=Layout.ONEDIR,
            )
        except BaseException:
            # The image's log is the one a failed build keeps: it gets the bundle's.
            with log.open("a") as out:
                out.write(own_log.read_text(errors="replace"))
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {
            "workload": workload.name,
            "target": f"{Target.EXECUTABLE.value}-{Layout.ONEDIR.value}",
            "input_digest": digest_of({"bundle-of": executable.input_digest}),
            "toolchain": machine,
            "seconds": round(time.monotonic() - started, 3),
            "built_at": time.time(),
            "log": "build.log",
        }
        return self.cache.commit(staging, key, manifest).file(BUNDLE_NAME)

    def build(
        self,
        desired: DesiredFleet,
        *,
        targets: set[Target] | None = None,
        workloads: set[str] | None = None,
    ) -> list[BuildResult]:
        unknown = (workloads or set()) - set(desired.workloads)
        if unknown:
            raise BuildError(f"no such workload in this revision: {', '.join(sorted(unknown))}")
        results = []
        for name, workload in sorted(desired.workloads.items()):
            if workloads and name not in workloads:
                continue
            wanted = [t for t in workload.build.targets if not targets or t in targets]
            executable: CacheEntry | None = None
            executable_failed = ""
            order = sorted(wanted, key=lambda t: t is not Target.EXECUTABLE)
            for target in order:
                ref = desired.artifacts[(name, target)]
                if executable_failed:
                    # The images wrap the executable: without it there is nothing to build.
                    message = f"not built: the executable of {name} failed"
                    self.progress(BuildEvent(name, target, "failed", message))
                    results.append(
                        BuildResult(
                            name, target, ref.input_digest, BuildStatus.FAILED, 0.0, error=message
                        )
                    )
                    continue
                result, entry = self._one(desired, workload, ref, executable)
                if target is Target.EXECUTABLE:
                    executable = entry
                    executable_failed = result.error
                results.append(result)
        return results

    def _one(
        self,
        desired: DesiredFleet,
        workload: Workload,
        ref: ArtifactRef,
        executable: CacheEntry | None,
    ) -> tuple[BuildResult, CacheEntry | None]:
        started = time.monotonic()
        target = ref.target
        self.progress(BuildEvent(workload.name, target, "start"))
        staging: Path | None = None
        try:
            kernel = init = None
            staging = self.cache.new_staging()
            log = staging / "build.log"
            log.write_text(f"# {workload.name}/{target.value} from inputs {ref.input_digest}\n")
            if target is not Target.EXECUTABLE:
                named = workload.deploy.kernel or desired.fleet.kernel
                profile = profile_for(target.value, volumes=bool(workload.deploy.volumes))
                kernel = self.kernels.get(named) if named else self.kernels.default_for(profile)
                init = guest_init(log)
            key = self.cache.key_for(ref, self.machine_inputs(workload, target, kernel, init))
            entry = self.cache.get(key)
            if entry is not None:
                shutil.rmtree(staging, ignore_errors=True)
                seconds = time.monotonic() - started
                self.progress(BuildEvent(workload.name, target, "cached"))
                return BuildResult(
                    workload.name,
                    target,
                    ref.input_digest,
                    BuildStatus.CACHED,
                    seconds,
                    key,
                    entry.path,
                ), entry
            job = _Job(workload, ref, key, staging, log, kernel, init)
            entry = self._build(desired, job, executable)
            seconds = time.monotonic() - started
            self.progress(BuildEvent(workload.name, target, "built", f"{seconds:.1f} s"))
            return BuildResult(
                workload.name,
                target,
                ref.input_digest,
                BuildStatus.BUILT,
                seconds,
                key,
                entry.path,
            ), entry
        except ReconcilerError as err:
            message = str(err)
            if staging is not None and staging.exists():
                kept = self.cache.discard(
                    staging, staging / "build.log", f"{workload.name}-{target.value}"
                )
                message += f"\n(full log: {kept})"
            self.progress(BuildEvent(workload.name, target, "failed", message))
            return BuildResult(
                workload.name,
                target,
                ref.input_digest,
                BuildStatus.FAILED,
                time.monotonic() - started,
                error=message,
            ), None

    def _build(self, desired: DesiredFleet, job: _Job, executable: CacheEntry | None) -> CacheEntry:
        workload, ref, staging, log = job.workload, job.ref, job.staging, job.log
        kernel, init = job.kernel, job.init
        started = time.monotonic()
        source_dir = self.checkout_root / workload.source.path
        if ref.target is Target.EXECUTABLE:
            build_executable(
                workload.source.language,
                source_dir,
                entrypoint=workload.source.entrypoint,
                options=workload.build.options,
                output=staging / EXECUTABLE_NAME,
                log=log,
                hidden=self.hidden,
                network=self.build_network,
            )
        else:
            assert kernel is not None
            assert init is not None
            if executable is None:
                # The image needs the executable even when only the image was asked for.
                exe_ref = desired.artifacts.get((workload.name, Target.EXECUTABLE))
                if exe_ref is None:
                    exe_ref = artifact_ref_for(workload, Target.EXECUTABLE, None)
                result, executable = self._one(desired, workload, exe_ref, None)
                if executable is None:
                    raise BuildError(f"the executable of {workload.name} failed: {result.error}")
            program = self._program(workload, executable, log)
            if ref.target is Target.UNIKERNEL:
                build_unikernel(program, kernel, init, staging)
            else:
                scratch = self.cache.new_staging()
                try:
                    build_microvm(program, kernel, init, staging, staging=scratch, log=log)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        machine = self.machine_inputs(workload, ref.target, kernel, init)
        manifest: Mapping[str, object] = {
            "workload": workload.name,
            "target": ref.target.value,
            "input_digest": ref.input_digest,
            "inputs": dict(ref.inputs),
            "toolchain": machine,
            "kernel": {"name": kernel.name, "version": kernel.version} if kernel else None,
            "seconds": round(time.monotonic() - started, 3),
            "built_at": time.time(),
            "log": "build.log",
        }
        return self.cache.commit(staging, job.key, manifest)
