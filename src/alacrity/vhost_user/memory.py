"""The memory table: the peer's shared memory regions, mapped, with checked translation
of guest-physical addresses (descriptors) and the peer's user addresses (ring areas)."""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

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


def _regular_file_size(fd: int, gpa: int) -> int:
    """The size of the file behind the region at `gpa`, which must be a regular file (memfds and
    hugetlbfs files are): a pipe or a device such as /dev/zero is no memory the peer can share."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "an anonymous inode")
        raise ValueError(f"region at {gpa:#x}: its fd is {kind}, not a regular file")
    return st.st_size


class MemoryTable:
    """Regions in the order given; addresses are checked to fall wholly inside one region."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions

    @classmethod
    def map(cls, layout: list[tuple[int, int, int, int]], fds: list[int]) -> MemoryTable:
        """Map (gpa, size, uva, mmap_offset) regions from their fds. Raises ValueError."""
        if len(layout) != len(fds):
            raise ValueError(f"{len(layout)} regions but {len(fds)} file descriptors")
        regions: list[Region] = []
        for (gpa, size, uva, offset), fd in zip(layout, fds, strict=True):
            if size == 0 or gpa + size > _LIMIT or uva + size > _LIMIT:
                raise ValueError(f"region at {gpa:#x} of {size:#x} bytes is empty or wraps")
            file_size = _regular_file_size(fd, gpa)
            if offset + size > file_size:
                raise ValueError(
                    f"region at {gpa:#x} needs {offset + size:#x} bytes of a {file_size:#x}-byte file"
                )
            for other in regions:
                if gpa < other.gpa + other.size and other.gpa < gpa + size:
                    raise ValueError(f"region at {gpa:#x} overlaps the one at {other.gpa:#x}")
            mapping = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            regions.append(Region(gpa, size, uva, memoryview(mapping)[offset : offset + size]))
        return cls(regions)

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
        """Drop our views; each mapping is unmapped when the last view into it goes."""
        self.regions = []
