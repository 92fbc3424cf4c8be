"""The device side of a split virtqueue, over memory the driver controls.

Every index, address and length read from the rings is checked before use:
a violation raises QueueError and the queue must not be used again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from alacrity.virtio.ring import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    USED_F_NO_NOTIFY,
    AvailRing,
    QueueError,
    UsedRing,
    avail_ring_size,
    desc_table_size,
    fence,
    need_event,
    used_ring_size,
    valid_size,
)


class Memory(Protocol):
    def gpa(self, addr: int, length: int) -> memoryview:
        """The guest-physical range as a view; raises AddressError if not wholly mapped."""
        ...

    # Optional: `damaged() -> bool`, True once pages of the memory vanished under us (the
    # peer truncated their file: vhost_user/memory.py); the queue then fails.


def _intact() -> bool:
    return False


@dataclass
class Chain:
    """One request: the head index and its buffers, driver-readable first."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


class DeviceQueue:
    """Pops chains the driver made available and pushes them to the used ring."""

    def __init__(
        self,
        memory: Memory,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool,
        indirect: bool = False,
        last_avail: int = 0,
    ) -> None:
        if not valid_size(size):
            raise QueueError(f"queue size {size} is not a power of two up to 32768")
        if (
            len(desc) < desc_table_size(size)
            or len(avail) < avail_ring_size(size)
            or len(used) < used_ring_size(size)
        ):
            raise QueueError("ring areas are smaller than the queue size needs")
        self.memory = memory
        self.damaged = getattr(memory, "damaged", _intact)
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.avail_ring = AvailRing(avail, size)
        self.used_ring = UsedRing(used, size)
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = last_avail & 0xFFFF
        # The used index lives in shared memory; we own it and resume from it.
        self.used_idx = self.used_ring.idx
        self.signalled_used = self.used_idx
        self.notify_enabled = True
        self.requests = 0

    # -- driver -> device
    def avail_idx(self) -> int:
        return self.avail_ring.idx

    def pending(self) -> int:
        pending = (self.avail_idx() - self.last_avail) & 0xFFFF
        if pending > self.size:
            if self.damaged():  # pages the guard replaced read as zeros: say why
                raise QueueError("guest memory was truncated under us")
            raise QueueError(f"avail index jumped by {pending} on a queue of {self.size}")
        return pending

    def pop(self) -> Chain | None:
        if not self.pending():
            return None
        slot = self.last_avail % self.size
        head = self.avail_ring.head(slot)
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise QueueError(f"descriptor head {head} out of range (queue size {size})")
        addr, length, flags, _ = DESC.unpack_from(self.desc, 16 * head)
        if flags & DESC_F_INDIRECT:
            if not self.indirect:
                raise QueueError("indirect descriptor, but INDIRECT_DESC was not negotiated")
            if flags & DESC_F_NEXT or not length or length % 16 or length > 16 * MAX_QUEUE_SIZE:
                raise QueueError(f"descriptor {head}: bad indirect table of {length} bytes")
            table = self._view(head, addr, length)
            return self._chain(head, table, 0, length // 16, nested=True)
        return self._chain(head, self.desc, head, size, nested=False)

    def _view(self, index: int, addr: int, length: int) -> memoryview:
        try:
            return self.memory.gpa(addr, length)
        except QueueError as exc:
            raise QueueError(f"descriptor {index}: {exc}") from None

    def _chain(self, head: int, table: memoryview, first: int, count: int, nested: bool) -> Chain:
        """Walk `count` descriptors of `table` from `first`; at most `count` links."""
        chain = Chain(head)
        index = first
        for _ in range(count):
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise QueueError(
                    f"descriptor {index}: indirect {'inside a table' if nested else 'in a chain'}"
                )
            view = self._view(index, addr, length)
            if flags & DESC_F_WRITE:
                chain.writable.append(view)
            elif chain.writable:
                raise QueueError(f"descriptor {index}: readable buffer after a writable one")
            else:
                chain.readable.append(view)
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise QueueError(f"descriptor {index}: next {nxt} out of range")
            index = nxt
        raise QueueError(f"descriptor chain from {head} loops or exceeds its table")

    # -- device -> driver
    def push(self, head: int, written: int, *, publish: bool = True) -> None:
        """Return a chain; `written` is how many bytes the device wrote into it.
        With `publish=False` the driver sees it only at the next `publish()`: a frame
        spread over several chains (MRG_RXBUF) must appear all at once."""
        slot = self.used_idx % self.size
        self.used_ring.set_element(slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.requests += 1
        if publish:
            # x86 keeps stores in order: the element is visible before the index moves.
            self.used_ring.idx = self.used_idx

    def publish(self) -> None:
        """Show the driver every chain pushed so far."""
        self.used_ring.idx = self.used_idx

    def needs_notify(self) -> bool:
        """Should the driver be interrupted for what was pushed since the last time?"""
        if self.used_idx == self.signalled_used:
            return False
        old, self.signalled_used = self.signalled_used, self.used_idx
        fence()  # the used index we wrote must be visible before we read their event index
        if self.event_idx:
            used_event = self.avail_ring.used_event
            return need_event(used_event, self.used_idx, old)
        return not self.avail_ring.flags & AVAIL_F_NO_INTERRUPT

    def disable_notify(self) -> None:
        """While polling we need no kicks."""
        if self.notify_enabled:
            self.notify_enabled = False
            if not self.event_idx:
                self.used_ring.flags = USED_F_NO_NOTIFY
            # With EVENT_IDX an avail_event left behind suppresses kicks by itself.

    def enable_notify(self) -> bool:
        """Ask for a kick on the next buffer; True if work arrived meanwhile (don't sleep)."""
        self.notify_enabled = True
        if self.event_idx:
            self.used_ring.avail_event = self.last_avail
        else:
            self.used_ring.flags = 0
        fence()
        # Checked here, where a worker goes idle, not per request: the SIGBUS guard keeps us
        # alive meanwhile (the lost pages read as zeros), and the check costs a C call.
        if self.damaged():
            raise QueueError("guest memory was truncated under us")
        return self.pending() > 0
