"""Split-virtqueue layout (virtio 1.1, 2.6): sizes, offsets and the EVENT_IDX rule.

Shared by the device side (`device_queue.py`) and the driver side (`driver_queue.py`).
"""

from __future__ import annotations

import struct
import threading

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


MAX_QUEUE_SIZE = 32768


class QueueError(Exception):
    """The other side broke the ring's rules; the queue (and its connection) is dead."""


class AddressError(QueueError):
    """An address range that the memory table does not wholly map."""


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return 4 + 2 * num + 2  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return 4 + 8 * num + 2  # flags, idx, ring[num], avail_event


def valid_size(num: int) -> bool:
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier: stores before it are visible to the other side before loads
    after it read. x86 may let a load pass an earlier store, and the ring's notification
    protocol (write our event index, then read theirs) loses wakeups if it does. Python has
    no fence of its own; taking a lock is a locked (hence fencing) instruction."""
    _fence_lock.acquire()
    _fence_lock.release()


def need_event(event: int, new: int, old: int) -> bool:
    """The EVENT_IDX test: did the index move past `event` going from `old` to `new`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


# Fields the other side reads while we write them go through memoryview.cast views:
# each access is one aligned 16- or 32-bit load or store. struct.pack_into would zero
# the field and write it byte by byte, and a reader on the other core could see the
# half-written index. (x86 is little-endian, as virtio's rings are.)


class _Ring:
    """The two 16-bit fields both rings start with."""

    u16: memoryview

    @property
    def flags(self) -> int:
        return self.u16[0]

    @flags.setter
    def flags(self, value: int) -> None:
        self.u16[0] = value

    @property
    def idx(self) -> int:
        return self.u16[1]

    @idx.setter
    def idx(self, value: int) -> None:
        self.u16[1] = value


class AvailRing(_Ring):
    """flags, idx, ring[size], used_event — written by the driver."""

    def __init__(self, view: memoryview, size: int) -> None:
        self.u16 = view[: avail_ring_size(size)].cast("H")
        self.size = size

    def head(self, slot: int) -> int:
        return self.u16[2 + slot]

    def set_head(self, slot: int, head: int) -> None:
        self.u16[2 + slot] = head

    @property
    def used_event(self) -> int:
        return self.u16[2 + self.size]

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.u16[2 + self.size] = value


class UsedRing(_Ring):
    """flags, idx, ring[size] of (id, len), avail_event — written by the device."""

    def __init__(self, view: memoryview, size: int) -> None:
        self.u16 = view[: used_ring_size(size)].cast("H")
        self.u32 = view[4 : 4 + 8 * size].cast("I")
        self.size = size

    def element(self, slot: int) -> tuple[int, int]:
        return self.u32[2 * slot], self.u32[2 * slot + 1]

    def set_element(self, slot: int, head: int, written: int) -> None:
        self.u32[2 * slot] = head
        self.u32[2 * slot + 1] = written

    @property
    def avail_event(self) -> int:
        return self.u16[2 + 4 * self.size]

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        self.u16[2 + 4 * self.size] = value
