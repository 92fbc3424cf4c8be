"""The memory table: the peer's shared memory regions, mapped, with checked translation
of guest-physical addresses (descriptors) and the peer's user addresses (ring areas).

The peer keeps its memory's file and may shrink it under us, which would make our next
access to a vanished page raise SIGBUS and kill the process. So a memfd that allows sealing
is sealed against shrinking here (QEMU's memory-backend-memfd comes sealed already), and
any other memory (a memfd made without MFD_ALLOW_SEALING, as DPDK's; a file on tmpfs or
hugetlbfs; any memory on hugetlbfs, where a hole punched in the file faults when no huge
page is free) is mapped under the SIGBUS guard (sigbus.py), or refused where the guard is
unavailable. `MemoryTable.damaged()` tells whether the guard repaired a fault in ours."""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from alacrity.vhost_user import sigbus
from alacrity.virtio.ring import AddressError

_LIMIT = 1 << 64
_FILE_TYPES = {
    stat.S_IFIFO: "a pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    view: memoryview

    def contains_gpa(self, addr: int, length: int) -> bool:
        return self.gpa <= addr and addr + length <= self.gpa + self.size

    def contains_uva(self, addr: int, length: int) -> bool:
        return self.uva <= addr and addr + length <= self.uva + self.size


def _check_regular_file(fd: int, what: str) -> None:
    """The file behind `what` must be a regular file (memfds and hugetlbfs files are): a pipe
    or a device such as /dev/zero is no memory the peer can share."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "an anonymous inode")
        raise ValueError(f"{what}: its fd is {kind}, not a regular file")


def _seal(fd: int) -> str | None:
    """Seal the file against shrinking if we can: None if it is now sealed (by us or before
    us) on memory where that suffices, else why the SIGBUS guard must cover it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return "a file on a filesystem without seals"
    if not seals & fcntl.F_SEAL_SHRINK:
        if seals & fcntl.F_SEAL_SEAL:  # a memfd made without MFD_ALLOW_SEALING, a tmpfs file
            return "a file that does not allow sealing"
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError as exc:
            return f"sealing it failed: {exc.strerror}"
    # A sealed memfd is shmem (a hole punched in it is filled again on access) or hugetlbfs,
    # which reports its huge page size here: there a hole faults when no huge page is free.
    if os.fstatvfs(fd).f_bsize > mmap.PAGESIZE:
        return "on hugetlbfs"
    return None


def map_file(fd: int, length: int, what: str) -> mmap.mmap:
    """Map the first `length` bytes of the peer's file `fd`, shared and read-write: a regular
    file at least that long, sealed against shrinking if it can be, else under the SIGBUS
    guard. ValueError says why not, naming `what` ("region at 0x0", "the dirty log")."""
    _check_regular_file(fd, what)
    unsealed = _seal(fd)
    file_size = os.fstat(fd).st_size  # sealed memory can no longer shrink below this
    if length > file_size:
        raise ValueError(f"{what} needs {length:#x} bytes of a {file_size:#x}-byte file")
    if unsealed is None:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        return sigbus.guarded_mmap(fd, length)
    except sigbus.GuardUnavailable as exc:
        raise ValueError(f"{what}: its memory could be truncated under us ({unsealed}, not "
                         f"sealed against shrinking) and the SIGBUS guard is unavailable: {exc}") from None


class MemoryTable:
    """Regions in the order given; addresses are checked to fall wholly inside one region."""

    def __init__(self, regions: list[Region], guarded: list[sigbus.GuardedMap] | None = None) -> None:
        self.regions = regions
        self._guarded = guarded or []
        self._faults_seen = 0
        self._damaged = False

    @classmethod
    def map(cls, layout: list[tuple[int, int, int, int]], fds: list[int]) -> MemoryTable:
        """Map (gpa, size, uva, mmap_offset) regions from their fds. Raises ValueError."""
        if len(layout) != len(fds):
            raise ValueError(f"{len(layout)} regions but {len(fds)} file descriptors")
        regions: list[Region] = []
        guarded: list[sigbus.GuardedMap] = []
        for (gpa, size, uva, offset), fd in zip(layout, fds, strict=True):
            if size == 0 or gpa + size > _LIMIT or uva + size > _LIMIT:
                raise ValueError(f"region at {gpa:#x} of {size:#x} bytes is empty or wraps")
            for other in regions:
                if gpa < other.gpa + other.size and other.gpa < gpa + size:
                    raise ValueError(f"region at {gpa:#x} overlaps the one at {other.gpa:#x}")
            mapping = map_file(fd, offset + size, f"region at {gpa:#x}")
            if isinstance(mapping, sigbus.GuardedMap):
                guarded.append(mapping)
            regions.append(Region(gpa, size, uva, memoryview(mapping)[offset : offset + size]))
        return cls(regions, guarded)

    def damaged(self) -> bool:
        """Did a page of this memory vanish under us (its file was truncated)? The SIGBUS guard
        put zeros in its place and the process carried on; the connection must go."""
        if self._damaged or not self._guarded:
            return self._damaged
        total = sigbus.total_faults()
        if total != self._faults_seen:  # a fault somewhere in the process since we last looked
            self._faults_seen = total
            self._damaged = any(m.faults() for m in self._guarded)
        return self._damaged

    def gpa(self, addr: int, length: int) -> memoryview:
        for region in self.regions:
            if region.contains_gpa(addr, length):
                start = addr - region.gpa
                return region.view[start : start + length]
        raise AddressError(f"guest address {addr:#x}+{length:#x} is outside the memory table")

    def uva(self, addr: int, length: int) -> memoryview:
        for region in self.regions:
            if region.contains_uva(addr, length):
                start = addr - region.uva
                return region.view[start : start + length]
        raise AddressError(f"user address {addr:#x}+{length:#x} is outside the memory table")

    def release(self) -> None:
        """Drop our views; each mapping is unmapped when the last view into it goes (and the
        guard forgets it just before)."""
        self.damaged()
        self.regions = []
        self._guarded = []
