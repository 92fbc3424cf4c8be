"""Split-virtqueue layout (virtio 1.1, 2.6): sizes, offsets and the EVENT_IDX rule.

Shared by the device side (`device_queue.py`) and the driver side (`driver_queue.py`).
"""

from __future__ import annotations

import struct

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len

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


def need_event(event: int, new: int, old: int) -> bool:
    """The EVENT_IDX test: did the index move past `event` going from `old` to `new`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
