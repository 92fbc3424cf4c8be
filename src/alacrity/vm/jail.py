"""The jail each guest's QEMU runs in, set up the way Firecracker's jailer does it.

`alacrity vm run` (root) starts `python -m alacrity.vm.jail CONFIG -- QEMU ARGS`. That
process is single-threaded, so forking and unsharing in it are safe. It

1. unshares the mount, pid, ipc, uts and network namespaces (the network one is empty:
   every NIC is vhost-user, so QEMU needs no network), then forks: the child is pid 1
   of the new pid namespace and sees no host process;
2. in the child: builds a root of its own on a tmpfs that only this mount namespace
   sees, holding what QEMU needs at the paths the command line names (QEMU, its
   libraries and firmware, the kernel and initrd, the device sockets) read-only, its
   writable directory, and /dev/null, /dev/urandom and /dev/kvm (if used) made with
   mknod there; pivots into it and makes it read-only;
3. moves itself into the VM's cgroup (memory.max, cpu.max, pids.max) where the host has
   cgroup v2 with those controllers, sets rlimits, drops every capability from the
   bounding set, takes the VM's uid and gid (no supplementary groups, which clears the
   rest), sets no_new_privs, and executes QEMU, which adds its own seccomp filter
   (`SANDBOX`).

The parent stays outside as a plain waiter: it relays SIGTERM, SIGINT and SIGHUP to
QEMU and exits with QEMU's status. Its pid is the VM's process group, so killing that
group kills the jailed QEMU too. A failure before QEMU runs is one line on stderr
(`alacrity jail: ...`) and exit status JAIL_FAILED.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

JAIL_FAILED = 125
#: QEMU's own seccomp filter: no obsolete syscalls, no setuid, no fork or exec, no
#: changing scheduling or affinity.
SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
#: Where QEMU keeps its data files (firmware, option ROMs, modules), exposed read-only.
QEMU_DATA = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu",
             "/usr/lib/x86_64-linux-gnu/qemu", "/etc/ld.so.cache")
#: Device nodes made in the jail: name -> (major, minor, mode).
DEVICES = {"null": (1, 3, 0o666), "urandom": (1, 9, 0o666), "kvm": (10, 232, 0o600)}
#: rlimits: open files, and processes and threads of the jail's uid (QEMU's threads).
NOFILE = 4096
NPROC = 512
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "alacrity"
#: memory.max is the guest's memory and this much for QEMU itself.
QEMU_OVERHEAD_MIB = 256

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
#: statvfs flags of a mount -> the mount flags that keep them (a user namespace may not
#: clear a flag locked on the mount it binds).
_KEPT_FLAGS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38


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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        return cls(**json.loads(text))


# -- what QEMU needs, found on the host before the jail is made

def qemu_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise JailError(f"{name} not found on PATH: install qemu-system-x86")
    return os.path.realpath(path)


def shared_libraries(binary: str) -> list[str]:
    """The libraries the dynamic loader maps for `binary` (as ldd lists them)."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise JailError(f"cannot list the libraries of {binary} with ldd: {exc}") from None
    found = re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", out)
    return sorted(set(found))


def chardev_paths(argv: list[str]) -> list[str]:
    """The socket paths that `-chardev socket,...,path=P` options name (`,,` is a comma)."""
    paths = []
    for option, value in zip(argv, argv[1:], strict=False):
        if option == "-chardev" and value.startswith("socket,"):
            m = re.search(r"(?:^|,)path=((?:[^,]|,,)*)", value)
            if m:
                paths.append(m.group(1).replace(",,", ","))
    return paths


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


# -- inside the jail (the forked child, still root)

def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _place(root: str, path: str) -> str:
    """Make `path` exist inside `root` as the host has it: each symlink on the way is
    copied as a symlink (merged /usr: /lib -> usr/lib), and the path it ends at is returned
    (inside `root`), with its parent directories made."""
    host = "/"
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        current = os.path.join(host, part)
        inside = root + current
        if os.path.islink(current):
            hops += 1
            if hops > 32:
                raise JailError(f"too many symlinks below {path}")
            target = os.readlink(current)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            resolved = os.path.normpath(os.path.join(host, target))
            parts = [p for p in resolved.split("/") if p] + parts
            host = "/"
            continue
        if parts and not os.path.isdir(inside):
            os.mkdir(inside, 0o755)
        host = current
    return root + host


def _bind(root: str, path: str, read_only: bool, device: bool = False) -> None:
    inside = _place(root, path)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        os.makedirs(inside, mode=0o755, exist_ok=True)
    elif not os.path.lexists(inside):
        os.close(os.open(inside, os.O_CREAT | os.O_WRONLY, 0o600))
    _mount(path, inside, None, MS_BIND | MS_REC)
    kept = os.statvfs(path).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if device else MS_NODEV) | (MS_RDONLY if read_only else 0)
    flags |= sum(ms for st_flag, ms in _KEPT_FLAGS.items() if kept & st_flag)
    _mount(None, inside, None, flags)


def build_root(spec: JailSpec) -> None:
    """The jail's root at spec.root: a tmpfs (size-capped, no setuid) holding only the
    exposed paths and device nodes."""
    root = spec.root
    _mount("none", root, "tmpfs", MS_NOSUID, "size=1m,mode=0755")
    for path in spec.read_only:
        _bind(root, path, read_only=True)
    for path in spec.sockets:
        # The socket's directory is bound, not the socket: a daemon restart makes a new
        # socket there, which the jail must see. A read-only mount still lets a socket be
        # connected. The link the command line names (DEVICE.sock) is copied as a link.
        real = os.path.realpath(path)
        _bind(root, os.path.dirname(real), read_only=True)
        _place(root, path)
    _bind(root, spec.writable, read_only=False)
    os.makedirs(f"{root}/dev", 0o755, exist_ok=True)
    for name in spec.devices:
        if spec.user_namespace:
            _bind(root, f"/dev/{name}", read_only=False, device=True)
            continue
        major, minor, mode = DEVICES[name]
        node = f"{root}/dev/{name}"
        os.mknod(node, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(node, mode)
        if mode == 0o600:
            os.chown(node, spec.uid, spec.uid)


def _enter(spec: JailSpec) -> None:
    """pivot_root into the built root and drop the host's tree."""
    os.chdir(spec.root)
    _check(_libc.syscall(155, b".", b"."), "pivot_root")  # SYS_pivot_root on x86-64
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _drop_privileges(spec: JailSpec, last_cap: int) -> None:
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capabilities")
    if not spec.user_namespace:  # there, setgroups is denied and the user's groups stay
        os.setgroups([])
    os.setresgid(spec.uid, spec.uid, spec.uid)
    os.setresuid(spec.uid, spec.uid, spec.uid)  # with no uid 0 left, every capability goes
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def _limits(spec: JailSpec) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    if not spec.user_namespace:  # it counts every process of the uid: the user's own too
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.cgroup:
        Path(spec.cgroup, "cgroup.procs").write_text("0\n")  # this process


def _die_with(parent_alive: int) -> None:
    """SIGKILL when the jailer dies. Set after the uid change, which clears it; the pipe
    tells whether the jailer died before that (its write end closes with it)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
    if select.select([parent_alive], [], [], 0)[0]:
        raise JailError("the jailer exited while the jail was being made")


def child(spec: JailSpec, argv: list[str], parent_alive: int) -> None:
    """In the new namespaces, as pid 1: build the jail, enter it, become the VM's uid and
    execute QEMU. Never returns."""
    try:
        _die_with(parent_alive)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
        _check(_libc.sethostname(spec.hostname.encode(), len(spec.hostname)), "sethostname")
        _limits(spec)
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # no /proc in the jail
        build_root(spec)
        _enter(spec)
        _drop_privileges(spec, last_cap)
        _die_with(parent_alive)
        os.execv(argv[0], argv)
    except (JailError, OSError, ValueError) as exc:
        print(f"alacrity jail: {exc}", file=sys.stderr, flush=True)
    os._exit(JAIL_FAILED)


def _map_own_ids() -> None:
    """In a new user namespace: the user's uid and gid map to themselves, nothing else."""
    uid, gid = os.getuid(), os.getgid()
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
    Path("/proc/self/setgroups").write_text("deny\n")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")


def run(spec: JailSpec, argv: list[str]) -> int:
    """Unshare, fork the jailed QEMU and wait for it; its exit status (128+N for signal N)."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
    if spec.user_namespace:
        ids = (os.getuid(), os.getgid())
        _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare the namespaces (with a user namespace)")
        _map_own_ids()
        if (os.getuid(), os.getgid()) != ids:
            raise JailError("the user namespace did not map our own ids")
    else:
        _check(_libc.unshare(flags), "unshare the namespaces")
    parent_alive, alive_w = os.pipe()  # both close on exec; alive_w closes when we exit
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        child(spec, argv, parent_alive)
    os.close(parent_alive)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: os.kill(pid, n))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return JAIL_FAILED
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m alacrity.vm.jail SPEC_JSON -- QEMU [ARGS...]", file=sys.stderr)
        return 2
    try:
        spec = JailSpec.from_json(args[0])
        return run(spec, args[2:])
    except (JailError, OSError, TypeError, ValueError) as exc:
        print(f"alacrity jail: {exc}", file=sys.stderr, flush=True)
        return JAIL_FAILED


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
    sys.exit(128 + signal.SIGINT)


__all__ = ["JAIL_FAILED", "JailError", "JailSpec", "SANDBOX", "chardev_paths", "jailed_pid", "make_cgroup",
           "qemu_binary", "remove_cgroup", "shared_libraries"]
