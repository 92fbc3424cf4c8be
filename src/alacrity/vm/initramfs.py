"""Assemble the guest initramfs: busybox, kernel modules, extra tools, and /init."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .cpio import CpioWriter, open_gzip
from .modules import Module, read_uncompressed

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# Host tools copied in with their shared libraries when present; the networking work
# measures with iperf3.
EXTRA_BINARIES = ("/usr/bin/iperf3",)

POWER_BUTTON = b"#!/bin/sh\necho alacrity: power button\nsync\npoweroff -f\n"
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def init_script() -> bytes:
    return resources.files("alacrity.vm").joinpath("init.sh").read_bytes()


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        path = Path(cand)
        if path.exists() and _is_static(path):
            return path
    raise RuntimeError("no static busybox found: install it (apt-get install busybox-static)")


def _is_static(path: Path) -> bool:
    res = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    return res.returncode != 0 or "not a dynamic executable" in res.stdout + res.stderr


def present_extras(extras: Sequence[str] = EXTRA_BINARIES) -> list[Path]:
    return [Path(e) for e in extras if Path(e).exists()]


def shared_libraries(binary: Path) -> list[Path]:
    """Libraries (and the loader) as ldd names them; the guest gets them at those paths."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return [Path(m.group(1)) for line in out.splitlines() if (m := _LDD_PATH.search(line))]


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def write_initramfs(
    path: Path, modules: Sequence[Module], extras: Sequence[Path] = (), busybox: Path | None = None,
    agent: Path | None = None,
) -> None:
    busybox = busybox or find_busybox()
    with open_gzip(str(path)) as out:
        cpio = CpioWriter(out)
        for d in (
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "root",
            "etc",
            "lib/modules",
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
        ):
            cpio.directory(d)
        # The kernel opens /dev/console before devtmpfs is mounted.
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, mode=0o666)
        cpio.file("init", init_script(), mode=0o755)
        # busybox acpid runs /etc/acpi/<action> for the power button's built-in action.
        cpio.file("etc/acpi/PWRF/00000080", POWER_BUTTON, mode=0o755)
        cpio.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        if agent is not None:  # /init starts it: `alacrity vm exec` and `vm cp` go through it
            cpio.file("usr/sbin/alacrity-agent", agent.read_bytes(), mode=0o755)
        for applet in busybox_applets(busybox):
            if applet != "bin/busybox":
                cpio.symlink(applet, "/bin/busybox")
        for mod in modules:
            cpio.file(f"lib/modules/{mod.name}.ko", read_uncompressed(mod.path))
        cpio.file("etc/alacrity/modules", "".join(f"{m.name}\n" for m in modules).encode())
        libs: dict[str, Path] = {}
        for binary in extras:
            cpio.file(str(binary), binary.read_bytes(), mode=0o755)
            libs.update((str(lib), lib) for lib in shared_libraries(binary))
        for name, lib in sorted(libs.items()):
            cpio.file(name, lib.resolve().read_bytes(), mode=0o755)
        cpio.close()
