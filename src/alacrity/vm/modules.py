"""Pick kernel modules and their dependencies from a kernel tree, in load order."""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Drivers the guest needs for vhost-user and built-in virtio devices (virtio_rng: /dev/hwrng,
# for the rng class); af_packet is for the networking tools, and is usually built in; button
# and evdev let acpid turn QMP's system_powerdown into a clean poweroff; vsock's virtio
# transport is where the guest agent listens.
WANTED = ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "af_packet", "button",
          "evdev", "vmw_vsock_virtio_transport")
REQUIRED = ("virtio_pci", "virtio_blk", "virtio_net")

_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path  # as found in the kernel tree, maybe compressed


def module_name(path: str) -> str:
    return _SUFFIX.sub("", Path(path).name).replace("-", "_")


def ensure_modules_dep(root: Path, version: str) -> Path:
    """Debian's package leaves modules.dep to its postinst, so generate it with depmod."""
    moddir = root / "lib" / "modules" / version
    dep = moddir / "modules.dep"
    if not dep.exists():
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        if not Path(depmod).exists():
            raise RuntimeError("depmod not found: install kmod (apt-get install kmod)")
        subprocess.run([depmod, "-b", str(root), version], check=True)
    return dep


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (relative path, dependency paths)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def resolve(table: dict[str, tuple[str, list[str]]], wanted: tuple[str, ...]) -> list[str]:
    """Module names in an order where each follows everything it depends on."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in table[name][1]:
            visit(module_name(dep))
        order.append(name)

    for name in wanted:
        if name in table:
            visit(name)
    return order


def builtin_names(moddir: Path) -> set[str]:
    path = moddir / "modules.builtin"
    return {module_name(p) for p in path.read_text().split()} if path.exists() else set()


def select(root: Path, version: str, wanted: tuple[str, ...] = WANTED) -> list[Module]:
    moddir = root / "lib" / "modules" / version
    table = parse_modules_dep(ensure_modules_dep(root, version).read_text())
    builtin = builtin_names(moddir)
    missing = [m for m in REQUIRED if m not in table and m not in builtin]
    if missing:
        raise RuntimeError(f"kernel {version} lacks modules {', '.join(missing)}")
    return [Module(n, moddir / table[n][0]) for n in resolve(table, wanted)]


def read_uncompressed(path: Path) -> bytes:
    """Module bytes, decompressed, since busybox insmod may not read .xz or .zst."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        if not shutil.which("zstd"):
            raise RuntimeError("kernel modules are .zst: install zstd (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()
