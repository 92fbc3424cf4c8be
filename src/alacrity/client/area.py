"""Shared memory a host process hands to a backend: a memfd, mapped here,
offered to the backend as one region at guest-physical address 0. It is sealed against
shrinking, so the backend may map it without the SIGBUS guard (vhost_user/memory.py)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os


class SharedArea:
    def __init__(self, size: int, name: str = "alacrity-client") -> None:
        size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        # Backends translate ring addresses in our address space: tell them the real one.
        self.uva = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def region(self) -> tuple[int, int, int, int]:
        """(guest_phys_addr, size, userspace_addr, mmap_offset) for SET_MEM_TABLE."""
        return (0, self.size, self.uva, 0)

    def close(self) -> None:
        self.view.release()
        # A view still exported keeps the mapping; it goes with the view.
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)
