"""The SIGBUS guard (sigbus.c): a peer that truncates the file behind the memory it gave us
costs that peer its connection, never the process.

`install()` loads the C module (built with cffi at first use, `alacrity.native_build`) and
installs its process-wide SIGBUS handler. alacrityd and each switch process call it at
start, before they drop privileges; `guarded_mmap` installs it on first use otherwise. When
it cannot be built, `install()` logs one line and returns False, and memory.py refuses
memory that it cannot seal against shrinking instead (`GuardUnavailable` says why).

`guarded_mmap(fd, length)` maps guest memory MAP_SHARED and registers it before anyone can
touch it; the registration goes just before the unmap (when the last view into the mapping
goes). A truncated page that is touched afterwards reads as zeros and takes writes (ours
alone): the process carries on, and `GuardedMap.faults()` tells the memory table that its
memory is damaged, so that its connection is broken.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from alacrity import native_build
from alacrity.native_build import NativeUnavailable

log = logging.getLogger("alacrity.vhost_user")

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = native_build.NativeSpec("_alacrity_sigbus_", HERE, "sigbus.h", "sigbus.c")


class GuardUnavailable(NativeUnavailable):
    """The guard cannot be built, loaded or installed here (one line: why)."""


def _load() -> tuple[Any, Any]:
    ffi, lib = native_build.load(SPEC)
    err = lib.guard_install()
    if err:
        raise GuardUnavailable(f"sigaction(SIGBUS): {os.strerror(err)}")
    return ffi, lib


_guard = native_build.Once(_load)


def load() -> tuple[Any, Any]:
    """(ffi, lib) of the guard, built, loaded and installed if need be. Raises GuardUnavailable
    (and remembers why: no second attempt)."""
    try:
        return _guard.get()
    except GuardUnavailable:
        raise
    except NativeUnavailable as exc:
        raise GuardUnavailable(str(exc)) from None


def install() -> bool:
    """Load and install the guard now (at process start, while the build cache is readable);
    log one line and return False if it cannot be."""
    try:
        load()
    except GuardUnavailable as exc:
        log.warning("SIGBUS guard unavailable, so guest memory that cannot be sealed against "
                    "shrinking will be refused: %s", exc)
        return False
    return True


def active() -> bool:
    """Is the guard installed, and still the handler that SIGBUS reaches?"""
    return _guard.loaded is not None and bool(_guard.loaded[1].guard_active())


def total_faults() -> int:
    """Faults the guard repaired in this process."""
    return _guard.loaded[1].guard_total_faults() if _guard.loaded is not None else 0


def total_faults_function() -> int:
    """The address of the C function behind `total_faults` (`uint64_t (*)(void)`), for C code
    that checks it in a loop; 0 while the guard is not loaded."""
    if _guard.loaded is None:
        return 0
    ffi, lib = _guard.loaded
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "guard_total_faults")))


def last_fault_address() -> int:
    return _guard.loaded[1].guard_last_address() if _guard.loaded is not None else 0


def registrations() -> int:
    return _guard.loaded[1].guard_used() if _guard.loaded is not None else 0


class GuardedMap(mmap.mmap):
    """A MAP_SHARED mapping of guest memory that the guard covers from before its first
    access until it is unmapped (made by `guarded_mmap`)."""

    _lib: Any = None
    _slot = -1
    _token = 0

    def faults(self) -> int:
        """Pages of this mapping that vanished under us (and were replaced by zeros)."""
        return self._lib.guard_faults(self._slot, self._token) if self._slot >= 0 else 0

    def _forget(self) -> None:
        slot, self._slot = self._slot, -1
        if slot >= 0:
            self._lib.guard_unregister(slot, self._token)

    def close(self) -> None:
        super().close()  # raises BufferError (and stays mapped, and guarded) while views exist
        self._forget()

    def __del__(self) -> None:
        # Runs before mmap's own dealloc unmaps: the address is forgotten first.
        self._forget()


def guarded_mmap(fd: int, length: int) -> GuardedMap:
    """Map `length` bytes of `fd` shared, read-write, under the guard. Raises GuardUnavailable,
    or ValueError/OSError (the mapping itself, or a full table)."""
    ffi, lib = load()
    granule = lib.guard_hugepage_size(fd)
    if granule < 0:
        raise OSError(-granule, os.strerror(-granule))
    mapping = GuardedMap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    pointer = ffi.from_buffer("char[]", mapping)
    try:
        start = int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)
    token = ffi.new("uint64_t *")
    slot = lib.guard_register(start, length, max(granule, mmap.PAGESIZE), token)
    if slot < 0:
        mapping.close()
        raise ValueError(f"the SIGBUS guard cannot cover a mapping at {start:#x} of {length:#x} bytes "
                         f"({lib.guard_used()} of {lib.GUARD_SLOTS} slots in use)")
    mapping._lib, mapping._slot, mapping._token = lib, slot, token[0]
    return mapping


__all__ = ["GuardUnavailable", "GuardedMap", "active", "guarded_mmap", "install", "load", "total_faults"]
