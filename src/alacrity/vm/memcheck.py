"""Compare two QEMUs' guest memory page by page (`alacrity vm migrate --verify`).

At a migration's switch-over both QEMUs hold the VM paused, the source having sent it all:
their guest memory must then be equal, byte for byte. A page that differs is a store the
migration lost (a device that wrote guest memory without marking the dirty log, or QEMU's
own dirty tracking). The memory is read through each QEMU's memory backend, the memfd
`vm run` gives it (vm/qemu.py build_command), which root can open through /proc."""

from __future__ import annotations

import os
import stat

#: How QEMU names the memfd of a memory-backend-memfd object (what /proc/PID/fd shows).
MEMFD_LINK = "/memfd:memory-backend-memfd"
PAGE = 4096
CHUNK = 4 << 20  # compared whole first; only a chunk that differs is compared page by page


def guest_memory_fd(pid: int) -> int:
    """A read-only fd of QEMU `pid`'s guest memory. LookupError if it has no such memfd;
    PermissionError unless we may look into its fds (root)."""
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(MEMFD_LINK + " ") or target == MEMFD_LINK:
            fd = os.open(f"{fd_dir}/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            if stat.S_ISREG(os.fstat(fd).st_mode):  # a memfd is; nothing that could block a read
                return fd
            os.close(fd)
    raise LookupError(f"process {pid} holds no {MEMFD_LINK} (not a QEMU started by 'vm run')")


def differing_pages(fd_a: int, fd_b: int) -> list[int]:
    """The offsets of the pages that differ between two guest memories (fds of equal size).
    ValueError if the sizes differ."""
    size_a, size_b = os.fstat(fd_a).st_size, os.fstat(fd_b).st_size
    if size_a != size_b:
        raise ValueError(f"guest memory of {size_a} bytes against {size_b}")
    # Copied in chunks by pread (no page faults in our mappings) and compared with memcmp.
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    found: list[int] = []
    for start in range(0, size_a, CHUNK):
        got_a, got_b = os.preadv(fd_a, [buf_a], start), os.preadv(fd_b, [buf_b], start)
        if got_a != got_b:
            raise ValueError(f"guest memory shrank while it was compared (at {start:#x})")
        if got_a < CHUNK:  # the last, short chunk: compare only what was read
            buf_a, buf_b = buf_a[:got_a], buf_b[:got_b]
        if buf_a != buf_b:  # bytearrays compare with memcmp (memoryviews byte by byte)
            found += [start + p for p in range(0, got_a, PAGE) if buf_a[p:p + PAGE] != buf_b[p:p + PAGE]]
    return found


def compare_guests(pid_a: int, pid_b: int) -> tuple[int, list[int]]:
    """(bytes compared, the pages that differ: offsets in guest memory) between QEMUs
    `pid_a` and `pid_b`."""
    fd_a = guest_memory_fd(pid_a)
    try:
        fd_b = guest_memory_fd(pid_b)
        try:
            return os.fstat(fd_a).st_size, differing_pages(fd_a, fd_b)
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
