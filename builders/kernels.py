"""The kernel registry: kernels imported once, validated, stored by digest, chosen by name.

    reconciler kernel import PATH  ──▶ <state>/kernels/<hex>/{kernel.json, vmlinuz, modules/}

A kernel comes from a bzImage, an ELF vmlinux or a Debian ``linux-image-*.deb``; from a .deb the
modules are kept (with a ``modules.dep`` made by ``depmod``) because Debian's cloud kernel has
virtio-mmio, virtio-blk and virtio-net as modules that the initramfs must load, in dependency
order, before it can see its disk or network.

A kernel built by ``builders/kernel_build.py`` is registered the same way, with its provenance
(``build``: profile, source version, configuration digest, compiler) and the features its
configuration leaves out on purpose (``omits``). When a manifest names no kernel, ``default_for``
picks the newest one built for the target's profile, else the newest general-purpose kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builders.cache import file_digest
from builders.toolchain import require, run
from reconciler.errors import BuildError

FEATURES = {
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "vsock": "CONFIG_VIRTIO_VSOCKETS",
    "ext4": "CONFIG_EXT4_FS",
    "9p": "CONFIG_9P_FS",
}
# What a reconciler VM needs from its kernel, in no particular order.
VM_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "ext4")


def profile_for(target: str, *, volumes: bool) -> str:
    """The specialised kernel profile an image target boots by default: a unikernel has no disk
    unless the workload declares volumes (each one is a virtio-blk disk with ext4)."""
    return "unikernel" if target == "unikernel" and not volumes else "microvm"


@dataclass(frozen=True)
class Kernel:
    digest: str
    name: str
    version: str
    image: Path
    format: str  # "bzImage" | "elf-vmlinux"
    modules_dir: Path | None
    features: Mapping[str, str] = field(default_factory=dict)
    imported_at: float = 0.0
    build: Mapping[str, str] = field(default_factory=dict)  # provenance of a built kernel

    @property
    def profile(self) -> str | None:
        """The profile a specialised kernel was built for; ``None`` for an imported one."""
        return self.build.get("profile")

    @property
    def omits(self) -> frozenset[str]:
        """Features left out of a specialised kernel by design (a unikernel has no disk)."""
        return frozenset(f for f in self.build.get("omits", "").split(",") if f)

    def modules_for(self, wanted: Sequence[str]) -> list[Path]:
        """Module files for ``wanted`` and their dependencies, dependencies first.

        Built-in features need no file; a feature the kernel lacks is a ``BuildError``, unless
        its profile leaves it out on purpose (the target does not use it)."""
        wanted = [w for w in wanted if w not in self.omits]
        missing = [w for w in wanted if self.features.get(w, "missing") == "missing"]
        if missing:
            raise BuildError(
                f"kernel {self.name} has no {', '.join(missing)} (neither built in nor a "
                "module); import a kernel that has them"
            )
        needed = [w for w in wanted if self.features.get(w) == "module"]
        if not needed:
            return []
        if self.modules_dir is None:
            raise BuildError(f"kernel {self.name} needs modules but none were imported with it")
        deps = _read_modules_dep(self.modules_dir / "modules.dep")
        by_name = {_module_name(path): path for path in deps}
        order: list[str] = []

        def visit(path: str) -> None:
            if path in order:
                return
            for dependency in deps[path]:
                visit(dependency)
            order.append(path)

        for name in needed:
            path = by_name.get(name)
            if path is None:
                raise BuildError(f"module {name} of kernel {self.name} is not in modules.dep")
            visit(path)
        return [self.modules_dir / path for path in order]


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def _read_modules_dep(path: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        module, _, rest = line.partition(":")
        if module:
            deps[module.strip()] = rest.split()
    return deps


def inspect_image(path: Path) -> tuple[str, str]:
    """``(format, version)`` of a kernel image, or ``BuildError`` if it is not an x86-64 one."""
    try:
        with path.open("rb") as f:
            head = f.read(0x1000)
    except OSError as exc:
        raise BuildError(f"cannot read {path}: {exc.strerror}") from exc
    if len(head) > 0x210 and head[0x202:0x206] == b"HdrS":
        version = ""
        offset = struct.unpack_from("<H", head, 0x20E)[0]
        if offset:
            with path.open("rb") as f:
                f.seek(offset + 0x200)
                raw = f.read(256)
            version = raw.split(b"\0", 1)[0].decode(errors="replace").split(" ", 1)[0]
        return "bzImage", version
    if head[:4] == b"\x7fELF":
        elf_class, machine = head[4], struct.unpack_from("<H", head, 18)[0]
        if elf_class == 2 and machine == 62:
            return "elf-vmlinux", ""
    raise BuildError(f"{path} is not an x86-64 Linux kernel (bzImage or ELF vmlinux)")


def features_from_config(config: str) -> dict[str, str]:
    values = {}
    for line in config.splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return {
        feature: {"y": "builtin", "m": "module"}.get(values.get(option, ""), "missing")
        for feature, option in FEATURES.items()
    }


# Compressed payloads inside a bzImage, as the kernel's scripts/extract-vmlinux finds them.
PAYLOADS = (
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b\x08", ["gzip", "-dc"]),
)


def extract_vmlinux(image: Path, output: Path) -> None:
    """Write the uncompressed ELF kernel inside bzImage ``image`` to ``output``."""
    data = image.read_bytes()
    for magic, command in PAYLOADS:
        tool = shutil.which(command[0])
        start = data.find(magic)
        while tool is not None and start >= 0:
            result = subprocess.run(
                [tool, *command[1:]], input=data[start:], capture_output=True, check=False
            )
            # Trailing bytes after the payload make some tools complain; the ELF is still whole.
            if result.stdout[:4] == b"\x7fELF":
                tmp = output.with_name(output.name + ".tmp")
                tmp.write_bytes(result.stdout)
                os.replace(tmp, output)
                return
            start = data.find(magic, start + 1)
    raise BuildError(
        f"cannot find an ELF kernel inside {image}: install lz4, zstd, xz-utils and gzip, or "
        "import an uncompressed vmlinux"
    )


class KernelRegistry:
    """Kernels stored under ``root`` (``<state dir>/kernels``), one directory per digest."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self) -> list[Kernel]:
        if not self.root.is_dir():
            return []
        kernels = []
        for meta in sorted(self.root.glob("*/kernel.json")):
            data = json.loads(meta.read_text())
            entry = meta.parent
            kernels.append(
                Kernel(
                    digest=data["digest"],
                    name=data["name"],
                    version=data["version"],
                    image=entry / data["image"],
                    format=data["format"],
                    modules_dir=entry / data["modules_dir"] if data["modules_dir"] else None,
                    features=data["features"],
                    imported_at=data["imported_at"],
                    build=data.get("build", {}),
                )
            )
        return sorted(kernels, key=lambda k: k.imported_at)

    def get(self, ref: str | None) -> Kernel:
        kernels = self.list()
        if not kernels:
            raise BuildError(
                "no kernel registered: run `make kernel` (or `reconciler kernel import PATH`)"
            )
        if ref is None:
            return kernels[-1]
        by_name = [k for k in kernels if k.name == ref]
        if by_name:
            return by_name[-1]
        wanted = ref.removeprefix("sha256:")
        matches = [k for k in kernels if k.digest.removeprefix("sha256:").startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise BuildError(f"kernel digest prefix {ref!r} is ambiguous; give more digits")
        names = ", ".join(k.name for k in kernels)
        raise BuildError(f"no kernel named {ref!r} is registered (have: {names})")

    def default_for(self, profile: str) -> Kernel:
        """The kernel of a target whose manifest names none: the newest kernel built for
        ``profile``, else one built for ``microvm`` (disk and network: enough for every target),
        else the newest one not built for any profile (Debian's)."""
        kernels = self.list()
        for wanted in (profile, "microvm", None):
            chosen = [k for k in kernels if k.profile == wanted]
            if chosen:
                return chosen[-1]
        return self.get(None)  # only kernels of other profiles: say what to do about it

    def vmlinux_for(self, kernel: Kernel) -> Path:
        """The uncompressed ELF kernel (what Firecracker boots), extracted once and kept."""
        if kernel.format == "elf-vmlinux":
            return kernel.image
        vmlinux = kernel.image.with_name("vmlinux")
        if not vmlinux.exists():
            extract_vmlinux(kernel.image, vmlinux)
        return vmlinux

    def import_path(
        self,
        path: Path,
        *,
        name: str | None = None,
        config: Path | None = None,
        vmlinux: Path | None = None,
        build: Mapping[str, str] | None = None,
    ) -> Kernel:
        """Import a bzImage, an ELF vmlinux or a Debian kernel .deb; idempotent.

        A built kernel also gives its ``config`` (its features), its uncompressed ``vmlinux``
        (kept for Firecracker, no extraction) and its ``build`` provenance."""
        if not path.is_file():
            raise BuildError(f"{path} does not exist or is not a file")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=self.root))
        try:
            if path.name.endswith(".deb"):
                image, modules, config = self._unpack_deb(path, staging)
            else:
                image, modules = staging / "vmlinuz", None
                shutil.copyfile(path, image)
                if config is not None:
                    shutil.copyfile(config, staging / "config")
                    config = staging / "config"
                if vmlinux is not None:
                    shutil.copyfile(vmlinux, staging / "vmlinux")
            kind, version = inspect_image(image)
            digest = file_digest(image)
            destination = self.root / digest.removeprefix("sha256:")
            if destination.is_dir():
                shutil.rmtree(staging)
                return self.get(digest)
            if config is not None:
                features = features_from_config(config.read_text())
            else:
                features = dict.fromkeys(FEATURES, "builtin")  # an unknown monolithic kernel
            label = name or (f"debian-{version}" if modules else f"kernel-{digest[7:19]}")
            if any(k.name == label for k in self.list()):
                raise BuildError(
                    f"a different kernel is already registered as {label!r}; pick another --name"
                )
            meta = {
                "digest": digest,
                "name": label,
                "version": version,
                "image": image.name,
                "format": kind,
                "modules_dir": str(modules.relative_to(staging)) if modules else None,
                "features": features,
                "source": path.name,
                "imported_at": time.time(),
                "build": dict(build or {}),
            }
            (staging / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.rename(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(digest)

    def _unpack_deb(self, deb: Path, staging: Path) -> tuple[Path, Path, Path | None]:
        log = staging / "import.log"
        unpacked = staging / "deb"
        run([require("dpkg-deb"), "-x", deb, unpacked], log=log, what=f"unpacking {deb.name}")
        images = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not images:
            raise BuildError(f"{deb.name} holds no boot/vmlinuz-*: is it a linux-image package?")
        version = images[0].name.removeprefix("vmlinuz-")
        image = staging / "vmlinuz"
        os.rename(images[0], image)
        config = unpacked / "boot" / f"config-{version}"
        kept_config = staging / "config"
        if config.is_file():
            os.rename(config, kept_config)
        tree = unpacked / "lib" / "modules" / version
        if not tree.is_dir():
            raise BuildError(f"{deb.name} holds no lib/modules/{version}")
        # Only what a VM can use: drivers for sound, GPUs and wireless are dead weight.
        for unused in ("sound", "drivers/gpu", "drivers/net/wireless", "drivers/media"):
            shutil.rmtree(tree / "kernel" / unused, ignore_errors=True)
        run([require("depmod"), "-b", unpacked, version], log=log, what="depmod")
        modules = staging / "modules"
        os.rename(tree, modules)
        shutil.rmtree(unpacked)
        return image, modules, kept_config if kept_config.is_file() else None
