"""The jail each guest's QEMU runs in, set up the way Firecracker's jailer does it: what
it holds and who runs in it (`JailSpec`), found on the host before it is made. The
jailer program that makes it and executes QEMU inside is vm/jailer.py; docs/vm.md, "The
jail", has the whole picture.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs

#: The jailer's exit status when it could not make the jail (vm/jailer.py).
JAIL_FAILED = 125
#: QEMU's own seccomp filter: no obsolete syscalls, no setuid, no fork or exec, no
#: changing scheduling or affinity.
SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
#: Where QEMU keeps its data files (firmware, option ROMs, modules), exposed read-only.
QEMU_DATA = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu",
             "/usr/lib/x86_64-linux-gnu/qemu", "/etc/ld.so.cache")
#: pids.max of a VM's cgroup (the jailer's RLIMIT_NPROC is the same).
NPROC = 512
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "alacrity"
#: memory.max is the guest's memory and this much for QEMU itself.
QEMU_OVERHEAD_MIB = 256

class JailError(RuntimeError):
    """The jail could not be set up; the message says what was missing."""


@dataclass
class JailSpec:
    """What a VM's jail holds, and who runs in it."""

    uid: int  # also the gid
    root: str  # an empty directory: the jail's tmpfs is mounted there, in the jail only
    writable: str  # QEMU's own directory (qmp.sock, the console log), owned by `uid`
    read_only: list[str] = field(default_factory=list)  # files and directories, same paths inside
    sockets: list[str] = field(default_factory=list)  # the device sockets (by their directories)
    devices: list[str] = field(default_factory=lambda: ["null", "urandom"])
    hostname: str = "alacrity"
    mem_mib: int = 512
    cpus: int = 1
    cgroup: str = ""  # the VM's cgroup directory, or "" where the host has none to give
    # Set up by a user who is not root: the namespaces are made inside a new user namespace
    # that maps only the user's own uid and gid, which QEMU then keeps (the range's ids
    # are root's to give); device nodes are bound from the host, as mknod is root's.
    user_namespace: bool = False
    # A detached VM's jailer joins this bus itself first ({"control": PATH, "bus": NAME}).
    join: dict[str, str] | None = None

    def options(self) -> list[str]:
        """The spec as the jailer's options (vm/jailer.py parses them; no JSON there,
        whose import alone costs the jailer a third of its start-up)."""
        out = ["--uid", str(self.uid), "--root", self.root, "--writable", self.writable,
               "--hostname", self.hostname]
        out += [item for path in self.read_only for item in ("--ro", path)]
        out += [item for path in self.sockets for item in ("--socket", path)]
        out += [item for name in self.devices for item in ("--dev", name)]
        if self.cgroup:
            out += ["--cgroup", self.cgroup]
        if self.user_namespace:
            out.append("--user-namespace")
        if self.join:
            out += ["--join", self.join["control"], self.join["bus"]]
        return out


# -- what QEMU needs, found on the host before the jail is made

def qemu_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise JailError(f"{name} not found on PATH: install qemu-system-x86")
    return os.path.realpath(path)


def shared_libraries(binary: str, cache: Path | None = None) -> list[str]:
    """The libraries the dynamic loader maps for `binary` (as ldd lists them). ldd costs a
    VM's start about 13 ms, so with `cache` (a directory of the caller's own: the image
    cache) the answer is kept there for as long as the binary is the same file."""
    st = os.stat(binary)
    key = hashlib.sha256(f"{binary}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    kept = cache / f".qemu-libraries-{key}" if cache is not None else None
    if kept is not None:
        with contextlib.suppress(OSError):
            if kept.stat().st_uid == os.geteuid():  # written by us, not planted by someone
                return kept.read_text().splitlines()
    try:
        found = sorted({str(lib) for lib in initramfs.shared_libraries(Path(binary))})
    except OSError as exc:
        raise JailError(f"cannot list the libraries of {binary} with ldd: {exc}") from None
    if not found:
        raise JailError(f"ldd lists no libraries for {binary}, so its jail would not start it")
    if kept is not None:
        with contextlib.suppress(OSError):  # no cache (a user without a home): ldd next time too
            cache.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(f".{os.getpid()}")
            partial.write_text("".join(f"{lib}\n" for lib in found))
            os.replace(partial, kept)
    return found


def jailed_pid(jailer: int) -> int | None:
    """The pid (in our namespace) of the jailer's child, the jailed QEMU, or None."""
    try:
        with open(f"/proc/{jailer}/task/{jailer}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


# -- cgroup v2

def cgroup_controllers() -> set[str]:
    """The controllers a unified (v2) hierarchy at CGROUP_ROOT offers, or none."""
    try:
        return set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def make_cgroup(name: str, mem_mib: int, cpus: int) -> str:
    """The VM's cgroup below CGROUP_ROOT/alacrity, with its limits written; "" where the
    host has no cgroup v2 with the memory, cpu and pids controllers."""
    wanted = {"memory", "cpu", "pids"}
    if not wanted <= cgroup_controllers():
        return ""
    parent = CGROUP_ROOT / CGROUP_PARENT
    parent.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):  # enabled already, or managed by someone else
        (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory +cpu +pids")
    (parent / "cgroup.subtree_control").write_text("+memory +cpu +pids")
    group = parent / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(f"{(mem_mib + QEMU_OVERHEAD_MIB) << 20}\n")
    (group / "cpu.max").write_text(f"{cpus * 100000} 100000\n")
    (group / "pids.max").write_text(f"{NPROC}\n")
    return str(group)


def remove_cgroup(path: str) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def jailer_argv(spec: JailSpec, qemu: list[str]) -> list[str]:
    """The jailer's command line around QEMU's (its own file, run without site packages)."""
    program = Path(__file__).with_name("jailer.py")
    return [sys.executable, "-I", "-S", str(program), *spec.options(), "--", *qemu]
