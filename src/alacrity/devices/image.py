"""Image files opened as root without being led astray.

The daemon opens image paths that an administrator wrote, but the directories on
the way may be writable by users. So an image is reached without following any
symlink (openat2 with RESOLVE_NO_SYMLINKS, or a walk with O_NOFOLLOW where the
kernel lacks openat2), must be a regular file, and is never looked up under a FUSE
filesystem (its server, possibly this daemon's own admin tree, could stall us) or
under the daemon's own directories. `inspect` runs every check a later open could
fail, for the write of `path` or `size`; `open_image` repeats the cheap ones, since
the gate opens the image later and the filesystem may have changed in between.
Every refusal is an AdminError.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import re
import secrets
import stat
import unicodedata

from alacrity.devices.base import reserved_paths
from alacrity.errors import AdminError, invalid

log = logging.getLogger("alacrity.devices.image")

NAME_MAX = 255
_AT_FDCWD = -100
# openat2 has number 437 on every architecture with the unified syscall table (x86_64, arm64, ...).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# ---- the path as text


def path_problem(path: str) -> str | None:
    """What is wrong with `path` as an image path, from its text alone (None: nothing)."""
    if any(unicodedata.category(c) == "Cc" for c in path):
        return "contains a NUL byte or a control character"
    if not path.startswith("/"):
        return "must be absolute"
    if posixpath.normpath(path) != path or "//" in path:
        return "must be normalized (no '.', '..', '//' or trailing '/')"
    if path == "/":
        return "names a directory"
    if any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mounts() -> list[str]:
    """Mount points of FUSE filesystems, read from /proc/self/mountinfo (nothing on
    them is touched: a FUSE server may be slow, hostile, or this daemon itself)."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and right.startswith("fuse"):
                mounts.append(_unescape(fields[4]))
    return mounts


def check_place(path: str) -> None:
    """Refuse (EINVAL) a path that is malformed, under the daemon's own directories,
    or under a FUSE filesystem. Reads only the path's text and the mount table."""
    problem = path_problem(path)
    if problem:
        raise invalid(f"image path {path!r} {problem}")
    for root in reserved_paths():
        if _under(path, root):
            raise invalid(f"image path {path} is under alacrityd's own directory {root}: put it elsewhere")
    for root in fuse_mounts():
        if _under(path, root):
            raise invalid(
                f"image path {path} is on the FUSE filesystem mounted at {root}: "
                "put images on a local filesystem"
            )


# ---- reaching the directory without symlinks


def _openat2(path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def _walk(path: str) -> int:
    """The fallback for kernels without openat2 (before 5.6): one component at a time."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in filter(None, path.split("/")):
            try:
                step = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:
                # O_NOFOLLOW|O_DIRECTORY reports a symlink as ENOTDIR: say ELOOP, as openat2 does.
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                raise
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(path: str) -> int:
    """An O_PATH fd of directory `path`, reached without following any symlink."""
    try:
        return _openat2(path, _DIR_FLAGS, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    return _walk(path)


def _directory(path: str) -> tuple[int, str, str]:
    """(O_PATH fd of the image's directory, that directory, the image's file name)."""
    directory, name = posixpath.split(path)
    try:
        return _open_dir(directory), directory, name
    except OSError as exc:
        raise _dir_error(directory, exc) from None


def _dir_error(directory: str, exc: OSError) -> AdminError:
    if exc.errno == errno.ELOOP:
        return invalid(f"{directory} goes through a symlink: write the path without symlinks (readlink -f)")
    if exc.errno == errno.ENOENT:
        return invalid(f"directory {directory} does not exist: create it first")
    if exc.errno == errno.ENOTDIR:
        return invalid(f"{directory} is not a directory")
    return invalid(f"cannot reach directory {directory}: {exc.strerror}")


# ---- the file itself


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _require_regular(path: str, st: os.stat_result) -> None:
    """A regular file with one name. A second hard link is another path to the same data,
    which O_NOFOLLOW cannot see: a user who can write the image's directory could link a
    file of theirs, or anyone's on that filesystem, into the guest's disk."""
    if not stat.S_ISREG(st.st_mode):
        raise invalid(f"image {path} is {_kind(st.st_mode)}: an image must be a regular file")
    if st.st_nlink > 1:
        raise invalid(f"image {path} has {st.st_nlink} hard links: an image must have one name "
                      "(copy it, or remove the other links)")


def _probe_file(dir_fd: int, directory: str) -> int:
    """An fd of a new, already unlinked file in the directory: nothing is left behind."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):  # EISDIR: no O_TMPFILE support
            raise invalid(f"cannot create an image in {directory}: {exc.strerror}") from None
    name = f".alacrity-probe-{secrets.token_hex(8)}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise invalid(f"cannot create an image in {directory}: {exc.strerror}") from None
    os.unlink(name, dir_fd=dir_fd)
    return fd


def _too_big(directory: str, size: int, exc: Exception) -> AdminError:
    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
    return invalid(
        f"the filesystem holding {directory} cannot hold a file of {size} bytes ({reason}): "
        "write a smaller size or a path on another filesystem"
    )


def _check_fits(dir_fd: int, directory: str, size: int) -> None:
    """Find out for real: a sparse file of `size` bytes in `directory`, then gone."""
    fd = _probe_file(dir_fd, directory)
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as exc:
        raise _too_big(directory, size, exc) from None
    finally:
        os.close(fd)


def inspect(path: str, size: int) -> None:
    """Every check a later `open_image(path, size, ...)` could fail. Stats and creates
    (then removes) files: never call it with the model lock held."""
    check_place(path)
    dir_fd, directory, name = _directory(path)
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            _check_fits(dir_fd, directory, size)
            return
        except OSError as exc:
            raise invalid(f"cannot look at image {path}: {exc.strerror}") from None
        _require_regular(path, st)
    finally:
        os.close(dir_fd)


def _create(dir_fd: int, directory: str, name: str, size: int) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, size)  # sparse
    except (OSError, OverflowError) as exc:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise _too_big(directory, size, exc) from None
    log.info("created sparse image %s/%s of %d bytes", directory, name, size)
    return fd


def _open_existing(dir_fd: int, path: str, name: str, writable: bool) -> int:
    # Look before opening: opening some devices acts (a watchdog starts, a tape rewinds).
    _require_regular(path, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    # O_NONBLOCK: a fifo swapped in since must not hold the caller in open().
    flags = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        _require_regular(path, os.fstat(fd))
    except AdminError:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return fd


def open_image(path: str, size: int, writable: bool) -> int:
    """Open the image (created sparse at `size` if absent): a regular file reached
    without symlinks. Raises AdminError only, whatever the filesystem does."""
    check_place(path)
    dir_fd, directory, name = _directory(path)
    try:
        try:
            return _open_existing(dir_fd, path, name, writable)
        except FileNotFoundError:
            return _create(dir_fd, directory, name, size)
    except AdminError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise invalid(f"image {path} is a symlink: an image must be a regular file") from None
        raise AdminError(exc.errno or errno.EIO, f"cannot open image {path}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
