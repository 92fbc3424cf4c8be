"""The device side of a split virtqueue, over memory the driver controls.

Every index, address and length read from the rings is checked before use:
a violation raises QueueError and the queue must not be used again.

With a dirty log (`set_log`, live migration), the queue marks every byte the device writes
into guest memory: the first `written` bytes of a chain's writable buffers at `push`, whose
addresses it noted when it walked the chain, and the used ring's fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

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


class PageLog(Protocol):
    """Where a queue marks the guest pages it wrote (vhost_user/dirty_log.py)."""

    def mark(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark each (gpa, length) range dirty, after writing it; QueueError if the log lacks one."""
        ...

    def covers(self, gpa: int, length: int) -> bool: ...


class Logging(NamedTuple):
    """A queue's dirty logging: buffers into `log`, and the used ring too, as the guest-physical
    range at `used_gpa`, unless that is None. `used_page`: a range naming the used ring's one
    page, when it lies in one (then a push marks it once for both the element and the index)."""

    log: PageLog
    used_gpa: int | None
    used_page: tuple[int, int] | None = None


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
        self.logging: Logging | None = None
        self._written_to: dict[int, list[tuple[int, int]]] = {}  # head -> its writable (gpa, length)

    def set_log(self, log: PageLog | None, used_gpa: int | None = None) -> None:
        """Mark every write into guest memory in `log` from now on (None: stop); the used ring's
        too, at guest-physical `used_gpa`, unless None. QueueError if the log lacks the ring."""
        if log is None:
            self.logging = None
            self._written_to = {}
            return
        if used_gpa is not None and not log.covers(used_gpa, used_ring_size(self.size)):
            raise QueueError(f"the dirty log does not cover the used ring, logged at {used_gpa:#x}")
        one_page = (used_gpa is not None  # in the log's 4 KiB pages
                    and used_gpa >> 12 == (used_gpa + used_ring_size(self.size) - 1) >> 12)
        self.logging = Logging(log, used_gpa, (used_gpa, 1) if one_page else None)

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
        written_to = None
        if self.logging is not None:
            written_to = self._written_to[head] = []
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
                if written_to is not None:
                    written_to.append((addr, length))
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
        """Return a chain; `written` is how many bytes the device wrote into it, from the
        start of its writable buffers (all it wrote: the dirty log marks those bytes).
        With `publish=False` the driver sees it only at the next `publish()`: a frame
        spread over several chains (MRG_RXBUF) must appear all at once."""
        slot = self.used_idx % self.size
        self.used_ring.set_element(slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.requests += 1
        if publish:
            # x86 keeps stores in order: the element is visible before the index moves.
            self.used_ring.idx = self.used_idx
        if self.logging is not None:
            self._log_push(self.logging, head, written, slot, publish)

    def _log_push(self, logging: Logging, head: int, written: int, slot: int, publish: bool) -> None:
        ranges = []
        if written > 0:
            buffers = self._written_to.get(head)  # (replaced when the head is popped again)
            if buffers is None:  # popped before logging began: walk it again for its addresses
                self._walk(head)
                buffers = self._written_to[head]
            for addr, length in buffers:
                ranges.append((addr, min(length, written)))
                written -= length
                if written <= 0:
                    break
        if logging.used_page is not None:
            ranges.append(logging.used_page)
        elif logging.used_gpa is not None:
            ranges.append((logging.used_gpa + 4 + 8 * slot, 8))
            if publish:
                ranges.append((logging.used_gpa + 2, 2))
        logging.log.mark(ranges)

    def _log_used(self, offset: int, length: int) -> None:
        """Mark a write to the used ring at `offset`, if the ring is logged."""
        logging = self.logging
        if logging is not None and logging.used_gpa is not None:
            logging.log.mark(((logging.used_gpa + offset, length),))

    def publish(self) -> None:
        """Show the driver every chain pushed so far."""
        self.used_ring.idx = self.used_idx
        self._log_used(2, 2)

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
                self._log_used(0, 2)
            # With EVENT_IDX an avail_event left behind suppresses kicks by itself.

    def enable_notify(self) -> bool:
        """Ask for a kick on the next buffer; True if work arrived meanwhile (don't sleep)."""
        self.notify_enabled = True
        if self.event_idx:
            self.used_ring.avail_event = self.last_avail
            self._log_used(4 + 8 * self.size, 2)
        else:
            self.used_ring.flags = 0
            self._log_used(0, 2)
        fence()
        # Checked here, where a worker goes idle, not per request: the SIGBUS guard keeps us
        # alive meanwhile (the lost pages read as zeros), and the check costs a C call.
        if self.damaged():
            raise QueueError("guest memory was truncated under us")
        return self.pending() > 0
