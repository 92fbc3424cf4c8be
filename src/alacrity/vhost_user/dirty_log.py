"""The dirty log of live migration: a bitmap over guest-physical memory, one bit per 4 KiB
page, in a file the frontend shares (SET_LOG_BASE), where we mark every page we write.

QEMU reads and clears the log with atomic exchanges while we mark it, and it gives one log
to all the vhost devices of a VM: alacrityd (blk) and a switch process (net) mark the same
bytes at once. So a bit is set with an atomic OR, or another writer's bit could be lost.
Python has no atomic instructions; the kernel's FUTEX_WAKE_OP is an atomic read-modify-write
of a word of memory (here an OR, waking nobody): one system call per bit newly set. A bit
already set needs none, since QEMU clears a bit before it copies the page: provided our
writes are visible before we look at the bit (a fence), a write made before we saw the bit
set is in that copy. The switch's C engine does the same with __atomic_fetch_or.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from alacrity.vhost_user.memory import map_file
from alacrity.virtio.ring import QueueError, fence

PAGE_SHIFT = 12  # VHOST_LOG_PAGE is 4096 bytes
#: The most we map of a log file (offset and size): 1 GiB covers 32 TiB of guest-physical space.
MAX_LOG_MAP = 1 << 30

_SYS_FUTEX = 202  # x86-64
_FUTEX_WAKE_OP_PRIVATE = 5 | 128
_FUTEX_OP_OR_SHIFTED = (2 | 8) << 28  # FUTEX_OP_OR | FUTEX_OP_OPARG_SHIFT: word |= 1 << oparg
_libc = ctypes.CDLL(None, use_errno=True)
_futex = _libc.syscall
_futex.restype = ctypes.c_long
_futex.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int]


def _address(view: memoryview) -> int:
    pointer = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(pointer)
    del pointer  # releases the export at once: nothing holds `view` but us
    return address


class DirtyLog:
    """A log over the bytes of `view` (writable; it keeps its buffer, and so its address)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.size = len(view)
        self.address = _address(view)

    @classmethod
    def map(cls, fd: int, size: int, offset: int) -> DirtyLog:
        """The log at `offset` of the peer's file `fd`, `size` bytes long (SET_LOG_BASE).
        ValueError says why it cannot be."""
        if size == 0 or offset + size > MAX_LOG_MAP:
            raise ValueError(f"a log of {size:#x} bytes at offset {offset:#x} (a non-empty log "
                             f"within the first {MAX_LOG_MAP:#x} bytes of its file)")
        mapping = map_file(fd, offset + size, "the dirty log")
        return cls(memoryview(mapping)[offset : offset + size])

    def covers(self, gpa: int, length: int) -> bool:
        """Does the log have bits for all of [gpa, gpa + length)?"""
        return length <= 0 or (gpa + length - 1) >> PAGE_SHIFT >> 3 < self.size

    def mark(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark the pages of each (gpa, length) range dirty: call it after writing them.
        QueueError if the log does not cover them (it is too small for this guest) or cannot
        be written."""
        fence()  # our writes are visible before we read a bit that says they need no mark
        bits, size = self.view, self.size
        for gpa, length in ranges:
            if length <= 0:
                continue
            page, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
            if last >> 3 >= size:
                raise QueueError(f"a write at guest address {gpa:#x}+{length:#x} is beyond the "
                                 f"{size:#x}-byte dirty log")
            if page == last:  # the common case, and the hot one: a used ring's fields, a frame
                if not bits[page >> 3] >> (page & 7) & 1:
                    self._set(page >> 3, page & 7)
                continue
            while page <= last:
                index = page >> 3
                byte = bits[index]
                if byte == 0xFF:
                    page = (index + 1) << 3
                    continue
                if not byte >> (page & 7) & 1:
                    self._set(index, page & 7)
                page += 1

    def _set(self, index: int, bit: int) -> None:
        at = self.address + index
        word = at & ~3
        shift = (at & 3) * 8 + bit
        if _futex(_SYS_FUTEX, word, _FUTEX_WAKE_OP_PRIVATE, 0, None, word,
                  _FUTEX_OP_OR_SHIFTED | shift << 12) < 0:
            code = ctypes.get_errno()  # EFAULT: the peer truncated the log's file
            raise QueueError(f"the dirty log cannot be written: {os.strerror(code)}")
