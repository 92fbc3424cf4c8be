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

The system call costs about 1.2 µs a bit, and a guest's reads land on pages whose bits are
clear (QEMU clears them as it copies them): blk served 0.58x the 4 KiB reads with logging
on (bench/dirty_log.py, "spread"). So `mark` scans in Python, as it did, and sets all the
bits it found clear with one call into dirty_log.c (__atomic_fetch_or each, 0.3 µs a call).
The C module is built at the first log (`load()`, through `alacrity.native_build`, cached
like the switch's fast path); where it cannot be built or loaded, or where there is no
trusted build cache to build it into (a switch process after it dropped its privileges:
its C engine marks its own writes), the futex stays, with one line logged.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable
from typing import Any

from alacrity import native_build
from alacrity.native_build import NativeUnavailable
from alacrity.vhost_user.memory import map_file
from alacrity.virtio.ring import QueueError, fence

log = logging.getLogger("alacrity.vhost_user")

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = native_build.NativeSpec("_alacrity_dirtylog_", HERE, "dirty_log.h", "dirty_log.c")

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


def _load() -> tuple[Any, Any]:
    if native_build.cache_dir() is None:  # not a build in a temp dir on every start
        raise NativeUnavailable("no trusted build cache ($XDG_CACHE_HOME or ~/.cache)")
    return native_build.load(SPEC)


def _unavailable(exc: NativeUnavailable) -> None:
    log.warning("dirty log: no native bit setter, so each bit newly set costs a system call: %s", exc)


_setter = native_build.Once(_load, _unavailable)


def load() -> tuple[Any, Any]:
    """(ffi, lib) of dirty_log.c, built and loaded if need be (at most once, and built only
    into a trusted cache). Raises NativeUnavailable, and remembers why: no second attempt."""
    return _setter.get()


def native_available() -> bool:
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def _address(view: memoryview) -> int:
    pointer = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(pointer)
    del pointer  # releases the export at once: nothing holds `view` but us
    return address


class DirtyLog:
    """A log over the bytes of `view` (writable; it keeps its buffer, and so its address).
    `native=False`: bits are set with FUTEX_WAKE_OP even where dirty_log.c is available."""

    def __init__(self, view: memoryview, *, native: bool = True) -> None:
        self.view = view
        self.size = len(view)
        self.address = _address(view)
        self._lib = self._base = None
        if native and native_available():
            ffi, self._lib = load()
            self._base = ffi.cast("uint8_t *", self.address)

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
        be written; the ranges before that one are marked."""
        fence()  # our writes are visible before we read a bit that says they need no mark
        bits, size = self.view, self.size
        clear: list[int] | None = None  # pages whose bits we found clear: set at the end, together
        for gpa, length in ranges:
            if length <= 0:
                continue
            page, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
            if last >> 3 >= size:
                if clear:
                    self._set(clear)
                raise QueueError(f"a write at guest address {gpa:#x}+{length:#x} is beyond the "
                                 f"{size:#x}-byte dirty log")
            if page == last:  # the common case, and the hot one: a used ring's fields, a frame
                if not bits[page >> 3] >> (page & 7) & 1:
                    if clear is None:
                        clear = [page]
                    else:
                        clear.append(page)
                continue
            while page <= last:
                index = page >> 3
                byte = bits[index]
                if byte == 0xFF:
                    page = (index + 1) << 3
                    continue
                if not byte >> (page & 7) & 1:
                    if clear is None:
                        clear = [page]
                    else:
                        clear.append(page)
                page += 1
        if clear:
            self._set(clear)

    def _set(self, pages: list[int]) -> None:
        """Set the bits of `pages` (in the log), each with an atomic OR."""
        if self._lib is not None:
            if len(pages) == 1:
                if self._lib.dirty_log_set_one(self._base, self.size, pages[0]):
                    raise QueueError("a page beyond the dirty log")  # (never: mark checked it)
            elif self._lib.dirty_log_set(self._base, self.size, pages, len(pages)):
                raise QueueError("a page beyond the dirty log")  # (never: mark checked them)
            return
        for page in dict.fromkeys(pages):  # a page found clear twice (two ranges on it): one call
            at = self.address + (page >> 3)
            word = at & ~3
            shift = (at & 3) * 8 + (page & 7)
            if _futex(_SYS_FUTEX, word, _FUTEX_WAKE_OP_PRIVATE, 0, None, word,
                      _FUTEX_OP_OR_SHIFTED | shift << 12) < 0:
                code = ctypes.get_errno()  # EFAULT: the peer truncated the log's file
                raise QueueError(f"the dirty log cannot be written: {os.strerror(code)}")
