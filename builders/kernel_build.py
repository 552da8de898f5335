"""The kernel builder: a specialised guest kernel per profile, built once per machine and cached.

    linux-source-6.1 (Debian) ──tar──▶ make tinyconfig
        + kernel_config/{common,<profile>}.config ──merge──▶ .config
        ──▶ make olddefconfig ──verify──▶ make bzImage vmlinux
        ──▶ <kernel cache>/<key>/{bzImage, vmlinux, config, build.json} ──▶ KernelRegistry

``reconciler kernel build [--profile P]`` and ``make kernel`` come here; the result is
registered in the kernel registry (``builders/kernels.py``) like an imported kernel, with its
provenance (profile, source version, configuration digest, compiler) in ``kernel.json``, and the
image builders pick it by profile when a manifest names no kernel.

The key of a build is the digest of what decides its output: the recipe, the source package's
version (which decides what ``tinyconfig`` gives), the fragments and the toolchain's versions.
The cache lives outside the state directory (``$RECONCILER_KERNEL_CACHE``, default
``/var/cache/reconciler/kernels``) so that every state directory, test run and CI job on a
machine shares one build.

The configuration starts from the kernel's own ``tinyconfig`` (everything that can be off is
off), then ``common.config`` and one profile fragment are applied in that order; every option the
two fragments name is checked after ``olddefconfig``, because Kconfig silently drops a value whose
dependencies are not met. The fragments are derived from Firecracker's CI guest configuration
(vendored unchanged as ``kernel_config/base-firecracker-6.1.config``, see ``NOTICE``): each option
is set the way Firecracker sets it or is a deliberate deviation in ``DEVIATIONS``, with its reason
(a unit test checks it). Starting from Firecracker's whole configuration instead built about 1,040
options and took most of an hour per profile on two cores; tinyconfig plus the fragments builds
in minutes (``bench/results/kernel.md``).

The build runs in the build sandbox (``builders/sandbox.py``) although its inputs are trusted
(Debian's source package, our configuration): it costs nothing, keeps a compiler that runs for
minutes as root away from the state directory, and it fixes the build path to
``/build/linux-source-6.1`` on every machine, which with the fixed ``KBUILD_BUILD_*`` values
makes the image reproducible (``bench/results/kernel.md``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builders.kernels import FEATURES, Kernel, KernelRegistry
from builders.sandbox import BUILD_ROOT, BuildSandbox, Step, take_output
from builders.toolchain import version_of
from reconciler.errors import BuildError, ToolMissingError

CONFIG_DIR = Path(__file__).parent / "kernel_config"
# The reference the fragments are derived from; not part of the build.
REFERENCE_CONFIG = "base-firecracker-6.1.config"
COMMON_FRAGMENT = "common.config"
PROFILES = ("microvm", "unikernel", "batch")
# What the image builders use when a manifest names no kernel: one kernel per target.
DEFAULT_PROFILES = ("microvm", "unikernel")

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_DIR = "linux-source-6.1"  # the tarball's top directory
DEFAULT_CACHE = Path("/var/cache/reconciler/kernels")
# Bumped when the way a kernel is built changes (flags, steps), so that old builds are not reused.
# 2: tinyconfig as the base instead of Firecracker's configuration.
RECIPE = "2"
# Fixed values the kernel would otherwise take from the build machine and the clock.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1980-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "reconciler",
    "KBUILD_BUILD_HOST": "reconciler",
    "KBUILD_BUILD_VERSION": "1",
}
# Where our fragments set an option differently from Firecracker's configuration, and why.
DEVIATIONS: Mapping[str, str] = {
    "CONFIG_KERNEL_LZ4": "LZ4 decompresses the bzImage several times faster than gzip under TCG",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "Firecracker passes devices as virtio_mmio.device=",
    "CONFIG_ACPI_BUTTON": "the runtime's stop request is the ACPI power button (init: KEY_POWER)",
    "CONFIG_VT": "no virtual terminal: the console is the serial port",
    "CONFIG_IPV6": "the init configures IPv4 only; IPv6 is boot time and code nobody uses",
    "CONFIG_RD_BZIP2": "initramfs is uncompressed, LZ4 or gzip; others cost boot time",
    "CONFIG_RD_LZMA": "initramfs is uncompressed, LZ4 or gzip; others cost boot time",
    "CONFIG_RD_XZ": "initramfs is uncompressed, LZ4 or gzip; others cost boot time",
    "CONFIG_RD_LZO": "initramfs is uncompressed, LZ4 or gzip; others cost boot time",
    "CONFIG_RD_ZSTD": "initramfs is uncompressed, LZ4 or gzip; others cost boot time",
}
TOOLS = ("gcc", "ld", "make", "bison", "flex", "bc", "perl")
BUILD_TIMEOUT = 3 * 3600.0


# -- configuration: pure ------------------------------------------------------------------------


def parse_config(text: str) -> dict[str, str]:
    """``{option: value}`` of a Kconfig file or fragment; ``# CONFIG_X is not set`` is ``n``."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:].removesuffix(" is not set").strip()] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            option, _, value = line.partition("=")
            values[option.strip()] = value.strip()
        elif line and not line.startswith("#"):
            raise BuildError(f"kernel configuration line {number} is not an option: {raw!r}")
    return values


def render_config(values: Mapping[str, str]) -> str:
    return "".join(
        f"# {option} is not set\n" if value == "n" else f"{option}={value}\n"
        for option, value in values.items()
    )


def fragment_paths(profile: str, config_dir: Path = CONFIG_DIR) -> list[Path]:
    """The fragments of ``profile``, in the order they are applied onto ``tinyconfig``."""
    if profile not in PROFILES:
        raise BuildError(f"no kernel profile {profile!r} (have: {', '.join(PROFILES)})")
    return [config_dir / COMMON_FRAGMENT, config_dir / f"{profile}.config"]


def wanted_options(fragments: Sequence[str]) -> dict[str, str]:
    """Every option the fragments name, with its last value."""
    wanted: dict[str, str] = {}
    for fragment in fragments:
        wanted.update(parse_config(fragment))
    return wanted


def merge(base: str, fragments: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``(merged configuration, wanted options)``: ``fragments`` applied in order onto ``base``;
    the wanted options are every one a fragment names, with its last value."""
    values = parse_config(base)
    wanted: dict[str, str] = {}
    for fragment in fragments:
        for option, value in parse_config(fragment).items():
            values[option] = value
            wanted[option] = value
    return render_config(values), wanted


def verify(final: str, wanted: Mapping[str, str], *, profile: str) -> None:
    """``BuildError`` naming every wanted option ``olddefconfig`` did not keep as asked."""
    actual = parse_config(final)
    wrong = [
        f"{option} (wanted {value}, got {actual.get(option, 'n')})"
        for option, value in wanted.items()
        if actual.get(option, "n") != value
    ]
    if wrong:
        raise BuildError(
            f"kernel profile {profile}: Kconfig did not take "
            + ", ".join(wrong)
            + " (a dependency is missing or another option selects it); fix the fragment"
        )


def build_key(source_version: str, fragments: str, toolchain: Mapping[str, str]) -> str:
    """The hex digest a build is cached under: what decides its output, and nothing else (the
    base, ``tinyconfig``, is decided by the source version)."""
    document = {
        "recipe": RECIPE,
        "source": source_version,
        "config": fragments,
        "tools": toolchain,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def omitted_features(final: str) -> list[str]:
    """The registry features a profile leaves out on purpose (``kernels.FEATURES`` names)."""
    actual = parse_config(final)
    return sorted(f for f, option in FEATURES.items() if actual.get(option, "n") == "n")


# -- the machine: source, toolchain, cache ------------------------------------------------------


def source_version() -> str:
    """The installed ``linux-source-6.1`` package's version, or a ``ToolMissingError``."""
    dpkg = shutil.which("dpkg-query")
    result = (
        subprocess.run(
            [dpkg, "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        if dpkg
        else None
    )
    if result is None or result.returncode != 0 or not SOURCE_TARBALL.is_file():
        raise ToolMissingError(
            SOURCE_PACKAGE, f"install it with `apt-get install {SOURCE_PACKAGE}`"
        )
    return result.stdout.strip()


def toolchain() -> dict[str, str]:
    versions = {tool: version_of(tool) for tool in TOOLS}
    missing = [tool for tool, version in versions.items() if version == "missing"]
    if missing:
        raise ToolMissingError(
            ", ".join(missing), "install the kernel build tools listed in deploy/apt-packages.txt"
        )
    return versions


@dataclass(frozen=True)
class BuiltKernel:
    """One cached build: its directory and what it was built from."""

    profile: str
    key: str
    path: Path  # <cache>/<key>
    provenance: Mapping[str, str]

    @property
    def bzimage(self) -> Path:
        return self.path / "bzImage"

    @property
    def vmlinux(self) -> Path:
        return self.path / "vmlinux"

    @property
    def config(self) -> Path:
        return self.path / "config"

    @property
    def name(self) -> str:
        """The name it is registered under (what ``deploy.kernel`` may give)."""
        return f"linux-{self.provenance['release']}-{self.profile}-{self.key[:8]}"


class KernelCache:
    """Built kernels under ``root``, one directory per build key, written once by rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> BuiltKernel | None:
        entry = self.root / key
        meta = entry / "build.json"
        if not meta.is_file():
            return None
        data = json.loads(meta.read_text())
        return BuiltKernel(data["profile"], key, entry, data)

    def key_of(self, profile: str) -> tuple[str, str, dict[str, str]]:
        """``(key, fragments, wanted options)`` of ``profile`` on this machine."""
        wanted = wanted_options([p.read_text() for p in fragment_paths(profile)])
        fragments = render_config(wanted)
        return build_key(source_version(), fragments, toolchain()), fragments, wanted

    def cached(self, profile: str) -> BuiltKernel | None:
        """The build of ``profile`` this machine has already made, without building it."""
        return self.get(self.key_of(profile)[0])

    def build(
        self,
        profile: str,
        *,
        log: Path | None = None,
        jobs: int | None = None,
        hidden: Sequence[Path] = (),
    ) -> tuple[BuiltKernel, bool]:
        """``(kernel, built)``: the cached build of ``profile`` for this machine, made first when
        there is none (``built`` is then true). ``hidden`` stays invisible to the build."""
        key, merged, wanted = self.key_of(profile)
        version = source_version()
        tools = toolchain()
        cached = self.get(key)
        if cached is not None:
            return cached, False
        self.root.mkdir(parents=True, exist_ok=True)
        # Two callers wanting the same kernel (a test session and `make kernel`) wait for one
        # build instead of running two on the same cores.
        with (self.root / f".lock-{key}").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cached = self.get(key)
            if cached is not None:
                return cached, False
            return self._build_locked(
                profile=profile,
                fragments=merged,
                wanted=wanted,
                version=version,
                tools=tools,
                key=key,
                log=log,
                jobs=jobs,
                hidden=hidden,
            )

    def _build_locked(
        self,
        *,
        profile: str,
        fragments: str,
        wanted: Mapping[str, str],
        version: str,
        tools: Mapping[str, str],
        key: str,
        log: Path | None,
        jobs: int | None,
        hidden: Sequence[Path],
    ) -> tuple[BuiltKernel, bool]:
        work = Path(tempfile.mkdtemp(prefix=f".build-{profile}-", dir=self.root))
        os.chmod(work, 0o755)
        build_log = log or (self.root / f"build-{profile}-{key[:12]}.log")
        build_log.write_text(f"# kernel {profile} from {SOURCE_PACKAGE} {version}, key {key}\n")
        try:
            provenance = _build(
                profile,
                wanted,
                work=work,
                log=build_log,
                jobs=jobs or os.cpu_count() or 1,
                hidden=hidden,
            )
            provenance.update(
                {
                    "profile": profile,
                    "source": f"{SOURCE_PACKAGE} {version}",
                    "fragments_digest": "sha256:" + hashlib.sha256(fragments.encode()).hexdigest(),
                    "gcc": tools["gcc"],
                    "ld": tools["ld"],
                    "key": key,
                }
            )
            out = work / "out"
            (out / "build.json").write_text(json.dumps(provenance, indent=2) + "\n")
            destination = self.root / key
            try:
                os.rename(out, destination)
            except OSError:  # another build of the same key won the race: theirs is as good
                if not (destination / "build.json").is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        built = self.get(key)
        assert built is not None
        return built, True


def _build(
    profile: str,
    wanted: Mapping[str, str],
    *,
    work: Path,
    log: Path,
    jobs: int,
    hidden: Sequence[Path],
) -> dict[str, str]:
    sandbox = BuildSandbox(work, hidden=hidden)
    tree = f"{BUILD_ROOT}/{SOURCE_DIR}"
    sandbox.run(
        Step(["tar", "-xf", "/source.tar.xz"], read_only=[(str(SOURCE_TARBALL), "/source.tar.xz")]),
        log=log,
        what=f"unpacking {SOURCE_TARBALL.name}",
        timeout=1800,
    )
    make = ["make", "ARCH=x86_64", f"-j{jobs}"]
    sandbox.run(
        Step([*make, "tinyconfig"], cwd=tree, env=BUILD_ENV), log=log, what="make tinyconfig"
    )
    out = work / "out"
    out.mkdir()
    take_output(work, f"{SOURCE_DIR}/.config", out / "tinyconfig")
    merged, _ = merge((out / "tinyconfig").read_text(), [render_config(wanted)])
    (out / "tinyconfig").unlink()
    # take_output copied the file out and the sandbox's tree is ours; write through a fresh file
    # so that a link the build may have left at .config is replaced, never followed.
    config_path = work / SOURCE_DIR / ".config"
    config_path.unlink()
    config_path.write_text(merged)
    sandbox.run(
        Step([*make, "olddefconfig"], cwd=tree, env=BUILD_ENV), log=log, what="make olddefconfig"
    )
    take_output(work, f"{SOURCE_DIR}/.config", out / "config")
    final = (out / "config").read_text()
    verify(final, wanted, profile=profile)
    started = time.monotonic()
    sandbox.run(
        Step([*make, "bzImage", "vmlinux"], cwd=tree, env=BUILD_ENV),
        log=log,
        what=f"building the {profile} kernel",
        timeout=BUILD_TIMEOUT,
    )
    seconds = time.monotonic() - started
    take_output(work, f"{SOURCE_DIR}/arch/x86/boot/bzImage", out / "bzImage")
    take_output(work, f"{SOURCE_DIR}/vmlinux", out / "vmlinux")
    take_output(work, f"{SOURCE_DIR}/include/config/kernel.release", out / "release")
    release = (out / "release").read_text().strip()
    (out / "release").unlink()
    return {
        "release": release,
        "omits": ",".join(omitted_features(final)),
        "build_seconds": f"{seconds:.0f}",
        "jobs": str(jobs),
    }


def register(registry: KernelRegistry, built: BuiltKernel) -> Kernel:
    """``built`` in ``registry`` (idempotent), with its provenance and built-in features."""
    return registry.import_path(
        built.bzimage,
        name=built.name,
        config=built.config,
        vmlinux=built.vmlinux,
        build={k: v for k, v in built.provenance.items() if k != "build_seconds"},
    )
