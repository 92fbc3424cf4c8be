"""The driver side of a split virtqueue, for host processes that drive a device
(alacrity.client): we own the rings, in our own shared memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alacrity.virtio.ring import (
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    AvailRing,
    QueueError,
    UsedRing,
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
    valid_size,
)


@dataclass(frozen=True)
class RingLayout:
    """Where a queue's three areas sit, as offsets from the start of a shared area."""

    size: int
    desc: int
    avail: int
    used: int
    end: int

    @classmethod
    def at(cls, offset: int, size: int) -> RingLayout:
        desc = _align(offset, 16)
        avail = desc + desc_table_size(size)
        used = _align(avail + avail_ring_size(size), 4)
        return cls(size, desc, avail, used, used + used_ring_size(size))


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class DriverQueue:
    """Adds buffer chains (guest-physical address, length), publishes them and
    collects completions. `area` is the shared memory the layout's offsets refer to."""

    def __init__(self, area: memoryview, layout: RingLayout, *, event_idx: bool) -> None:
        if not valid_size(layout.size):
            raise QueueError(f"queue size {layout.size} is not a power of two up to 32768")
        self.layout = layout
        self.size = layout.size
        self.desc = area[layout.desc : layout.desc + desc_table_size(layout.size)]
        self.avail = area[layout.avail : layout.avail + avail_ring_size(layout.size)]
        self.used = area[layout.used : layout.used + used_ring_size(layout.size)]
        self.event_idx = event_idx
        self.free = list(range(layout.size - 1, -1, -1))
        self.tokens: dict[int, tuple[Any, int]] = {}
        self.avail_idx = 0
        self.kicked_idx = 0
        self.last_used = 0
        for view in (self.desc, self.avail, self.used):
            view[:] = bytes(len(view))
        self.avail_ring = AvailRing(self.avail, layout.size)
        self.used_ring = UsedRing(self.used, layout.size)

    def free_count(self) -> int:
        return len(self.free)

    def add(self, buffers: list[tuple[int, int, bool]], token: Any) -> None:
        """Queue a chain of (address, length, device_writable) buffers; readable first."""
        if not buffers or len(buffers) > len(self.free):
            raise QueueError(f"chain of {len(buffers)} needs more free descriptors than {len(self.free)}")
        ids = [self.free.pop() for _ in buffers]
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else DESC_F_NEXT) | (DESC_F_WRITE if writable else 0)
            DESC.pack_into(self.desc, 16 * ids[i], addr, length, flags, 0 if last else ids[i + 1])
        head = ids[0]
        self.tokens[head] = (token, len(ids))
        self.avail_ring.set_head(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make added chains visible; True if the device asked to be kicked for them."""
        self.avail_ring.idx = self.avail_idx
        old, self.kicked_idx = self.kicked_idx, self.avail_idx
        if old == self.avail_idx:
            return False
        if self.event_idx:
            avail_event = self.used_ring.avail_event
            return need_event(avail_event, self.avail_idx, old)
        return not self.used_ring.flags & 1

    def completed(self) -> list[tuple[Any, int]]:
        """Collect (token, bytes written by the device) for every finished chain."""
        done = []
        used_idx = self.used_ring.idx
        if (used_idx - self.last_used) & 0xFFFF > self.size:
            raise QueueError("used index jumped beyond the queue size")
        while self.last_used != used_idx:
            head, written = self.used_ring.element(self.last_used % self.size)
            if head not in self.tokens:
                raise QueueError(f"device returned descriptor {head}, which is not in flight")
            token, count = self.tokens.pop(head)
            index = head
            for _ in range(count):
                self.free.append(index)
                index = DESC.unpack_from(self.desc, 16 * index)[3]
            done.append((token, written))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt on the next completion; True if some already came."""
        if self.event_idx:
            self.avail_ring.used_event = self.last_used
        else:
            self.avail_ring.flags = 0
        return self.used_ring.idx != self.last_used

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.avail_ring.flags = 1
