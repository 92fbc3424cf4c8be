"""The FUSE admin tree over the bus model, with configfs semantics.

Only root, and an administrators' group if the daemon was given one, may read it: the
tree names every bus's devices, image paths and member pids, which a member must not
learn about other buses (a member asks the gate's control socket about its own bus).
The kernel enforces that from the modes shown (default_permissions). Only uid 0 may
change anything, which modes cannot express for root-owned files: every change checks
the caller itself.
A refused change fails in the system call that made it (mkdir, write, ln -s...)
with the model's errno, and the reason goes to the `alacrity.admin` log.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from alacrity.admin.nodes import BUS_FILES, Missing, Node, resolve
from alacrity.bus.model import Model
from alacrity.errors import AdminError

log = logging.getLogger("alacrity.admin")

F = TypeVar("F", bound=Callable[..., Any])


def _refuse(err: int, op: str, path: str, message: str) -> mfusepy.FuseOSError:
    log.warning("refused %s %s: %s", op, path, message)
    return mfusepy.FuseOSError(err)


def _change(op: str) -> Callable[[F], F]:
    """Wrap a mutating operation: root only, AdminError -> errno, refusals logged."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(self: AdminTree, path: str, *args: Any) -> Any:
            uid = mfusepy.fuse_get_context()[0]
            if uid != 0:
                raise _refuse(errno.EACCES, op, path, f"uid {uid} is not root; only root may")
            try:
                return fn(self, path, *args)
            except AdminError as exc:
                raise _refuse(exc.errno, op, path, exc.message) from None
            except Missing:
                raise _refuse(errno.ENOENT, op, path, "no such file") from None

        return inner  # type: ignore[return-value]

    return wrap


class AdminTree(mfusepy.Operations):
    use_ns = True

    def __init__(self, model: Model, mountpoint: str, admin_gid: int | None = None) -> None:
        self.model = model
        self.mountpoint = os.path.abspath(mountpoint)
        # Group read (and search) for the administrators' group, if there is one.
        self.gid, self.group_bits = (admin_gid, 0o050) if admin_gid is not None else (0, 0)
        self.started = time.time_ns()
        self._handles: dict[int, bytes] = {}
        self._next_fh = itertools.count(1)
        self._fh_lock = threading.Lock()

    def _node(self, path: str) -> Node:
        try:
            return resolve(self.model, path)
        except Missing:
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        except AdminError as exc:  # a device's state could not be had (e.g. a switch not answering)
            log.warning("lookup %s: %s", path, exc.message)
            raise mfusepy.FuseOSError(exc.errno) from None

    def _content(self, node: Node) -> bytes:
        try:
            content = node.read()
        except AdminError as exc:  # the object vanished between lookup and read
            raise mfusepy.FuseOSError(exc.errno) from None
        return content if isinstance(content, bytes) else content.encode()

    # ---- reading

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path)
        times = {"st_atime": self.started, "st_mtime": self.started, "st_ctime": self.started}
        base = {"st_uid": 0, "st_gid": self.gid, **times}
        if node.kind == "dir":
            return {**base, "st_mode": stat.S_IFDIR | 0o700 | self.group_bits, "st_nlink": 2}
        if node.kind == "link":
            size = len(node.read().encode())
            return {**base, "st_mode": stat.S_IFLNK | 0o777, "st_nlink": 1, "st_size": size}
        mode = (0o600 if node.writable else 0o400) | (self.group_bits & 0o040)
        size = len(self._content(node))
        return {**base, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": size}

    def readdir(self, path: str, fh: int) -> list[str]:
        node = self._node(path)
        if node.kind != "dir":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        try:
            return [".", "..", *node.entries()]
        except AdminError as exc:
            raise mfusepy.FuseOSError(exc.errno) from None

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if node.kind != "link":
            raise mfusepy.FuseOSError(errno.EINVAL)
        return node.read()

    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if node.kind != "file":
            raise mfusepy.FuseOSError(errno.EISDIR if node.kind == "dir" else errno.ELOOP)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            uid = mfusepy.fuse_get_context()[0]
            if uid != 0:
                raise _refuse(errno.EACCES, "open", path, f"uid {uid} may not write; only root")
            if not node.writable:
                raise _refuse(errno.EACCES, "open", path, "read-only file")
        # Reads serve this snapshot, so one `cat` never mixes two states.
        content = self._content(node)
        with self._fh_lock:
            fh = next(self._next_fh)
            self._handles[fh] = content
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._fh_lock:
            content = self._handles.get(fh)
        if content is None:
            content = self._content(self._node(path))
        return content[offset : offset + size]

    def release(self, path: str, fh: int) -> int:
        with self._fh_lock:
            self._handles.pop(fh, None)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    # ---- changing

    @_change("write")
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        node = resolve(self.model, path)
        if not node.writable or node.write is None:
            raise AdminError(errno.EACCES, "read-only file")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise AdminError(errno.EINVAL, "not UTF-8 text") from None
        node.write(text)
        return len(data)

    @_change("truncate")
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        # `echo x > file` truncates before writing; attribute files are replaced
        # whole by each write, so truncation itself changes nothing.
        if not resolve(self.model, path).writable:
            raise AdminError(errno.EACCES, "read-only file")
        return 0

    @_change("create")
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise AdminError(
            errno.EPERM,
            "files here are made by the bus, not created; mkdir devices/NAME or buses/NAME instead",
        )

    @_change("mknod")
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise AdminError(errno.EPERM, "files here cannot be created")

    @_change("mkdir")
    def mkdir(self, path: str, mode: int) -> int:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "devices":
            self.model.mkdir_device(parts[1])
        elif len(parts) == 2 and parts[0] == "buses":
            self.model.mkdir_bus(parts[1])
        else:
            raise AdminError(errno.EPERM, "mkdir only makes devices/NAME or buses/NAME")
        return 0

    @_change("rmdir")
    def rmdir(self, path: str) -> int:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "devices":
            self.model.rmdir_device(parts[1])
        elif len(parts) == 2 and parts[0] == "buses":
            self.model.rmdir_bus(parts[1])
        else:
            resolve(self.model, path)
            raise AdminError(errno.EPERM, "rmdir only removes devices/NAME or buses/NAME")
        return 0

    @_change("symlink")
    def symlink(self, path: str, source: str) -> int:
        parts = [p for p in path.split("/") if p]
        if len(parts) != 3 or parts[0] != "buses":
            raise AdminError(errno.EPERM, "links attach devices: ln -s ../../devices/D buses/B/D")
        if parts[2] in BUS_FILES:
            raise AdminError(errno.EEXIST, f"{parts[2]} is a file of the bus; pick another name")
        self.model.link(parts[1], parts[2], source, mountpoint=self.mountpoint)
        return 0

    @_change("unlink")
    def unlink(self, path: str) -> int:
        parts = [p for p in path.split("/") if p]
        node = resolve(self.model, path)
        if len(parts) != 3 or parts[0] != "buses" or node.kind != "link":
            raise AdminError(errno.EPERM, "only links under buses/ can be removed")
        self.model.unlink(parts[1], parts[2])
        return 0

    @_change("rename")
    def rename(self, path: str, new: str) -> int:
        raise AdminError(errno.EPERM, "nothing here can be renamed; rmdir and mkdir instead")

    @_change("link")
    def link(self, path: str, source: str) -> int:
        raise AdminError(errno.EPERM, "hard links are not supported; use ln -s")

    @_change("chmod")
    def chmod(self, path: str, mode: int) -> int:
        raise AdminError(errno.EPERM, "modes are fixed")

    @_change("chown")
    def chown(self, path: str, uid: int, gid: int) -> int:
        raise AdminError(errno.EPERM, "owners are fixed")

    @_change("utimens")
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        resolve(self.model, path)  # `touch` on an existing file is harmless
        return 0


class Mount:
    """A mounted admin tree served by a background thread."""

    def __init__(self, mountpoint: str, thread: threading.Thread) -> None:
        self.mountpoint = mountpoint
        self.thread = thread
        self.error: BaseException | None = None

    def unmount(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            done = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
            if done.returncode != 0:
                # Busy (a shell sits in it): detach now, the kernel finishes later.
                subprocess.run(["fusermount3", "-uz", self.mountpoint], capture_output=True)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.error("admin tree at %s did not stop within %ss", self.mountpoint, timeout)


def _clear_stale(mountpoint: str) -> None:
    # A daemon killed with -9 leaves its mount behind, answering ENOTCONN.
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.warning("clearing stale mount at %s", mountpoint)
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)
    os.makedirs(mountpoint, exist_ok=True)


def mount(model: Model, mountpoint: str | os.PathLike[str], *, timeout: float = 10.0,
          admin_gid: int | None = None) -> Mount:
    """Serve the admin tree of `model` at `mountpoint` (multithreaded, allow_other, readable
    by root and `admin_gid`); returns once the mount is visible. Raises OSError if it could
    not be mounted."""
    path = os.path.abspath(os.fspath(mountpoint))
    _clear_stale(path)
    tree = AdminTree(model, path, admin_gid)
    handle: Mount

    def serve() -> None:
        try:
            mfusepy.FUSE(
                tree,
                path,
                foreground=True,
                allow_other=True,
                default_permissions=True,
                direct_io=True,
                fsname="alacrity",
                subtype="alacrity",
                entry_timeout=0,
                attr_timeout=0,
                negative_timeout=0,
            )
        except BaseException as exc:
            handle.error = exc
            log.error("admin tree at %s stopped: %s", path, exc)

    handle = Mount(path, threading.Thread(target=serve, name="alacrity-admin", daemon=True))
    handle.thread.start()
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if not handle.thread.is_alive() or time.monotonic() > deadline:
            handle.unmount(timeout=1.0)
            raise OSError(errno.EIO, f"could not mount the admin tree at {path}: {handle.error}")
        time.sleep(0.02)
    return handle
