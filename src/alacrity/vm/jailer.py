"""The jailer: the program `alacrity vm run` starts to put QEMU in its jail (vm/jail.py
says what the jail holds and makes its spec). Run as `python -I -S jailer.py OPTIONS --
QEMU ARGS` (`parse`, JailSpec.options): it imports only a few standard modules, not the
package and not even json, so it starts in a few milliseconds, and it is
single-threaded, so forking and unsharing in it are safe.

1. It unshares the mount, pid, ipc, uts and network namespaces (and, for a user who is
   not root, a user namespace mapping only the user's ids first), then forks: the child
   is pid 1 of the new pid namespace and sees no host process.
2. The child builds a root of its own on a tmpfs only this mount namespace sees, pivots
   into it and makes it read-only; moves into the VM's cgroup and sets rlimits; drops
   the bounding set, takes the VM's uid and gid and no_new_privs; executes QEMU.
3. The parent stays outside as a plain waiter: it relays SIGTERM, SIGINT and SIGHUP to
   QEMU and exits with QEMU's status. Its pid is the VM's process group. A failure
   before QEMU runs is one line on stderr (`alacrity jail: ...`), exit status 125.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import stat
import sys
from types import SimpleNamespace

JAIL_FAILED = 125
#: Device nodes made in the jail: name -> (major, minor, mode).
DEVICES = {"null": (1, 3, 0o666), "urandom": (1, 9, 0o666), "kvm": (10, 232, 0o600)}
#: rlimits: open files, and processes and threads of the jail's uid (QEMU's threads).
NOFILE = 4096
NPROC = 512

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
SYS_PIVOT_ROOT = 155  # x86-64


class JailError(RuntimeError):
    """The jail could not be set up; the message says what was missing."""


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


def build_root(spec: SimpleNamespace) -> None:
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


def _enter(spec: SimpleNamespace) -> None:
    """pivot_root into the built root and drop the host's tree."""
    os.chdir(spec.root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _drop_privileges(spec: SimpleNamespace, last_cap: int) -> None:
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capabilities")
    if not spec.user_namespace:  # there, setgroups is denied and the user's groups stay
        os.setgroups([])
    os.setresgid(spec.uid, spec.uid, spec.uid)
    os.setresuid(spec.uid, spec.uid, spec.uid)  # with no uid 0 left, every capability goes
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def _limits(spec: SimpleNamespace) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    if not spec.user_namespace:  # it counts every process of the uid: the user's own too
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.cgroup:
        _write(os.path.join(spec.cgroup, "cgroup.procs"), "0\n")  # this process


def _die_with(parent_alive: int) -> None:
    """SIGKILL when the jailer dies. Set after the uid change, which clears it; the pipe
    tells whether the jailer died before that (its write end closes with it)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
    if select.select([parent_alive], [], [], 0)[0]:
        raise JailError("the jailer exited while the jail was being made")


def child(spec: SimpleNamespace, argv: list[str], parent_alive: int) -> None:
    """In the new namespaces, as pid 1: build the jail, enter it, become the VM's uid and
    execute QEMU. Never returns."""
    try:
        _die_with(parent_alive)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
        _check(_libc.sethostname(spec.hostname.encode(), len(spec.hostname)), "sethostname")
        _limits(spec)
        last_cap = int(_read("/proc/sys/kernel/cap_last_cap"))  # no /proc in the jail
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
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _join(control: str, bus: str) -> None:
    """Become a member of `bus` ourselves (a detached VM outlives the `vm run` that made
    it a member by ancestry): one request on the gate's control socket, bounded."""
    import json  # only here: their imports cost every other start
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(control)
        sock.sendall(json.dumps({"op": "join", "bus": bus, "own": True}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline() or b"{}")
    if "bus" not in reply:
        raise JailError(f"cannot stay on bus {bus}: {reply.get('error', 'no answer from the gate')}")


def run(spec: SimpleNamespace, argv: list[str]) -> int:
    """Unshare, fork the jailed QEMU and wait for it; its exit status (128+N for signal N)."""
    if spec.join:
        _join(spec.join["control"], spec.join["bus"])
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


USAGE = ("usage: jailer.py --uid N --root DIR --writable DIR [--hostname NAME] [--ro PATH]... "
         "[--socket PATH]... [--dev null|urandom|kvm]... [--cgroup DIR] [--user-namespace] "
         "[--join CONTROL BUS] -- QEMU [ARGS...]")


def parse(args: list[str]) -> tuple[SimpleNamespace, list[str]]:
    """The spec (vm/jail.py: JailSpec.options) and QEMU's command line. ValueError if bad."""
    spec = SimpleNamespace(uid=-1, root="", writable="", hostname="alacrity", read_only=[], sockets=[],
                           devices=[], cgroup="", user_namespace=False, join=None)
    single = {"--uid": "uid", "--root": "root", "--writable": "writable", "--hostname": "hostname",
              "--cgroup": "cgroup"}
    many = {"--ro": "read_only", "--socket": "sockets", "--dev": "devices"}
    i = 0
    while i < len(args) and args[i] != "--":
        option = args[i]
        if option == "--user-namespace":
            spec.user_namespace, i = True, i + 1
        elif option == "--join" and i + 2 < len(args):
            spec.join, i = {"control": args[i + 1], "bus": args[i + 2]}, i + 3
        elif option in single and i + 1 < len(args):
            setattr(spec, single[option], args[i + 1])
            i += 2
        elif option in many and i + 1 < len(args):
            getattr(spec, many[option]).append(args[i + 1])
            i += 2
        else:
            raise ValueError(f"bad option {option!r}; {USAGE}")
    spec.uid = int(spec.uid)
    if spec.uid < 0 or not spec.root or not spec.writable or i + 1 >= len(args):
        raise ValueError(USAGE)
    if any(name not in DEVICES for name in spec.devices):
        raise ValueError(f"--dev takes one of {', '.join(DEVICES)}")
    return spec, args[i + 1:]


def main(args: list[str]) -> int:
    try:
        spec, qemu = parse(args)
        return run(spec, qemu)
    except (JailError, OSError, TypeError, ValueError) as exc:
        print(f"alacrity jail: {exc}", file=sys.stderr, flush=True)
        return JAIL_FAILED




def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)


