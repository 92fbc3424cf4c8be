"""Unit tests of both sides of the split virtqueue, over a bytearray "guest memory".

The driver side (`DriverQueue`) builds chains, the device side (`DeviceQueue`) serves
them; no sockets, no threads.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.ring import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    AddressError,
    QueueError,
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
)

U16 = struct.Struct("<H")  # tests poke rings from one thread, so struct is fine here

BUFFERS = 1 << 16  # where data buffers start in guest memory; rings live below


class GuestMemory:
    """A bytearray as guest-physical memory at address 0."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)

    def gpa(self, addr: int, length: int) -> memoryview:
        if addr < 0 or length < 0 or addr + length > len(self.buf):
            raise AddressError(f"{addr:#x}+{length:#x} outside {len(self.buf):#x} bytes")
        return self.view[addr : addr + length]


class Pair:
    """A driver and a device sharing one ring in one GuestMemory."""

    def __init__(self, size: int = 16, *, event_idx: bool = True, start: int = 0, mem: int = 1 << 18):
        self.mem = GuestMemory(mem)
        self.layout = RingLayout.at(0, size)
        assert self.layout.end <= BUFFERS
        self.driver = DriverQueue(self.mem.view, self.layout, event_idx=event_idx)
        # Resume both sides at `start` (as after a migration / SET_VRING_BASE).
        self.driver.avail_idx = self.driver.kicked_idx = self.driver.last_used = start
        U16.pack_into(self.mem.view, self.layout.avail + 2, start)
        U16.pack_into(self.mem.view, self.layout.used + 2, start)
        self.device = self.make_device(start, event_idx)
        self.next_addr = BUFFERS

    def make_device(self, start: int, event_idx: bool) -> DeviceQueue:
        lay, v = self.layout, self.mem.view
        return DeviceQueue(
            self.mem,
            lay.size,
            v[lay.desc : lay.desc + desc_table_size(lay.size)],
            v[lay.avail : lay.avail + avail_ring_size(lay.size)],
            v[lay.used : lay.used + used_ring_size(lay.size)],
            event_idx=event_idx,
            last_avail=start,
        )

    def alloc(self, length: int) -> int:
        addr = self.next_addr
        self.next_addr += length
        if self.next_addr > len(self.mem.buf):
            self.next_addr = BUFFERS + length
            addr = BUFFERS
        return addr

    def avail_idx_in_memory(self) -> int:
        return U16.unpack_from(self.mem.view, self.layout.avail + 2)[0]

    def used_idx_in_memory(self) -> int:
        return U16.unpack_from(self.mem.view, self.layout.used + 2)[0]


# A chain: readable lengths then writable lengths (at least one buffer in all).
chain_spec = st.tuples(
    st.lists(st.integers(0, 300), max_size=3), st.lists(st.integers(0, 300), max_size=3)
).filter(lambda rw: rw[0] or rw[1])


def add_chain(pair: Pair, spec: tuple[list[int], list[int]], token: object) -> list[tuple[int, int, bool]]:
    readable, writable = spec
    buffers = [(pair.alloc(n), n, False) for n in readable] + [(pair.alloc(n), n, True) for n in writable]
    # Recognisable contents in the readable buffers.
    for i, (addr, n, w) in enumerate(buffers):
        if not w:
            pair.mem.buf[addr : addr + n] = bytes([(i * 37 + 1) & 0xFF]) * n
    pair.driver.add(buffers, token)
    return buffers


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([4, 8, 16, 64]),
    event_idx=st.booleans(),
    rounds=st.lists(st.lists(chain_spec, min_size=1, max_size=4), min_size=1, max_size=12),
)
def test_chains_round_trip(size: int, event_idx: bool, rounds: list) -> None:
    pair = Pair(size, event_idx=event_idx)
    driver, device = pair.driver, pair.device
    for total, batch in enumerate(rounds):
        added = {}
        for n, spec in enumerate(batch):
            if len(spec[0]) + len(spec[1]) > driver.free_count():
                break
            added[(total, n)] = (spec, add_chain(pair, spec, (total, n)))
        driver.publish()
        assert pair.avail_idx_in_memory() == driver.avail_idx
        popped = []
        while (chain := device.pop()) is not None:
            popped.append(chain)
        assert device.pop() is None
        assert len(popped) == len(added)
        for chain, (spec, buffers) in zip(popped, added.values(), strict=True):
            readable, writable = spec
            assert [len(v) for v in chain.readable] == readable
            assert [len(v) for v in chain.writable] == writable
            # The views are the driver's buffers, in order.
            for view, (addr, n, _w) in zip(chain.readable + chain.writable, buffers, strict=True):
                assert bytes(view) == bytes(pair.mem.buf[addr : addr + n])
            for view in chain.writable:
                view[:] = b"\xab" * len(view)
            device.push(chain.head, chain.writable_len())
        assert pair.used_idx_in_memory() == device.used_idx
        done = driver.completed()
        expected = {token: sum(spec[1]) for token, (spec, _b) in added.items()}
        assert dict(done) == expected
        assert [t for t, _ in done] == list(added)  # in order
        for _spec, buffers in added.values():
            for addr, n, w in buffers:
                if w:
                    assert pair.mem.buf[addr : addr + n] == b"\xab" * n
        assert driver.free_count() == size  # every descriptor came back


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [65530, 65535, 0xFFFF - 15])
def test_index_wrap_around(start: int, event_idx: bool) -> None:
    pair = Pair(16, event_idx=event_idx, start=start)
    driver, device = pair.driver, pair.device
    assert device.last_avail == start and device.used_idx == start
    served = 0
    for round_ in range(10):
        n = 1 + round_ % 5
        for i in range(n):
            add_chain(pair, ([16], [round_ + i + 1]), (round_, i))
        driver.publish()
        assert device.pending() == n
        for i in range(n):
            chain = device.pop()
            assert chain is not None and len(chain.writable[0]) == round_ + i + 1
            device.push(chain.head, len(chain.writable[0]))
        assert device.pop() is None
        served += n
        assert device.last_avail == (start + served) & 0xFFFF
        assert pair.used_idx_in_memory() == (start + served) & 0xFFFF
        assert driver.completed() == [((round_, i), round_ + i + 1) for i in range(n)]
    assert (start + served) & 0xFFFF < start  # we really wrapped


def test_pending_detects_index_jump_across_wrap() -> None:
    pair = Pair(8, start=65533)
    U16.pack_into(pair.mem.view, pair.layout.avail + 2, (65533 + 9) & 0xFFFF)
    with pytest.raises(QueueError):
        pair.device.pop()
    U16.pack_into(pair.mem.view, pair.layout.avail + 2, (65533 + 8) & 0xFFFF)
    assert pair.device.pending() == 8  # exactly a full ring is fine


def test_event_idx_publish_kicks_only_when_avail_event_says_so() -> None:
    pair = Pair(16, event_idx=True)
    driver, device = pair.driver, pair.device
    assert device.enable_notify() is False  # avail_event = 0, nothing pending
    add_chain(pair, ([16], [1]), "a")
    assert driver.publish() is True  # 0 -> 1 crosses avail_event 0
    assert driver.publish() is False  # nothing new
    add_chain(pair, ([16], [1]), "b")
    assert driver.publish() is False  # avail_event still 0: the device is polling
    device.disable_notify()
    assert device.pop() is not None and device.pop() is not None
    # The device sleeps again: the next new buffer must kick.
    assert device.enable_notify() is False
    assert U16.unpack_from(pair.mem.view, pair.layout.used + 4 + 8 * 16)[0] == 2
    add_chain(pair, ([16], [1]), "c")
    add_chain(pair, ([16], [1]), "d")
    assert driver.publish() is True  # 2 -> 4 crosses avail_event 2
    # avail_event ahead of what is published: no kick until it is crossed.
    U16.pack_into(pair.mem.view, pair.layout.used + 4 + 8 * 16, 5)
    add_chain(pair, ([16], [1]), "e")
    assert driver.publish() is False  # 4 -> 5 does not pass 5
    add_chain(pair, ([16], [1]), "f")
    assert driver.publish() is True  # 5 -> 6 does


def test_no_event_idx_publish_follows_no_notify_flag() -> None:
    pair = Pair(16, event_idx=False)
    driver, device = pair.driver, pair.device
    add_chain(pair, ([16], [1]), "a")
    assert driver.publish() is True
    device.disable_notify()
    add_chain(pair, ([16], [1]), "b")
    assert driver.publish() is False
    assert device.enable_notify() is True  # a and b are pending
    add_chain(pair, ([16], [1]), "c")
    assert driver.publish() is True


def test_event_idx_needs_notify_respects_used_event() -> None:
    pair = Pair(16, event_idx=True)
    driver, device = pair.driver, pair.device
    for t in "abcd":
        add_chain(pair, ([16], [1]), t)
    driver.publish()
    chains = [device.pop() for _ in range(4)]
    assert device.needs_notify() is False  # nothing pushed yet
    assert driver.enable_interrupts() is False  # used_event = 0
    device.push(chains[0].head, 1)
    assert device.needs_notify() is True  # 0 -> 1 crosses used_event 0
    assert device.needs_notify() is False  # already signalled
    device.push(chains[1].head, 1)
    assert device.needs_notify() is False  # the driver has not re-armed
    assert [t for t, _ in driver.completed()] == ["a", "b"]
    assert driver.enable_interrupts() is False  # used_event = 2
    device.push(chains[2].head, 1)
    assert device.needs_notify() is True
    # used_event set ahead: no interrupt until it is passed.
    U16.pack_into(pair.mem.view, pair.layout.avail + 4 + 2 * 16, 10)
    device.push(chains[3].head, 1)
    assert device.needs_notify() is False
    # enable_interrupts reports completions that raced in before it.
    assert driver.completed() and driver.enable_interrupts() is False
    add_chain(pair, ([16], [1]), "e")
    driver.publish()
    device.push(device.pop().head, 1)
    assert driver.enable_interrupts() is True


def test_no_event_idx_needs_notify_follows_no_interrupt_flag() -> None:
    pair = Pair(16, event_idx=False)
    driver, device = pair.driver, pair.device
    for t in "ab":
        add_chain(pair, ([16], [1]), t)
    driver.publish()
    a, b = device.pop(), device.pop()
    driver.disable_interrupts()
    device.push(a.head, 1)
    assert device.needs_notify() is False
    assert driver.enable_interrupts() is True  # a completed meanwhile
    device.push(b.head, 1)
    assert device.needs_notify() is True


def test_enable_notify_reports_work_that_raced_in() -> None:
    for event_idx in (False, True):
        pair = Pair(16, event_idx=event_idx)
        driver, device = pair.driver, pair.device
        device.disable_notify()
        assert device.enable_notify() is False
        device.disable_notify()
        add_chain(pair, ([16], [1]), "a")
        driver.publish()  # the driver may not kick: the device said it polls
        assert device.enable_notify() is True  # so the device must not sleep
        assert device.pop() is not None
        assert device.enable_notify() is False


@settings(max_examples=200, deadline=None)
@given(
    event_idx=st.booleans(),
    start=st.sampled_from([0, 100, 65530, 65535]),
    ops=st.lists(st.sampled_from(["add", "publish", "serve", "sleep", "reap", "arm"]), max_size=60),
)
def test_no_lost_wakeups(event_idx: bool, start: int, ops: list[str]) -> None:
    """Whatever the interleaving: a device that went to sleep (enable_notify() said no work)
    is kicked for the next published buffer, and a driver that armed interrupts and saw no
    completion is interrupted for the next completion."""
    pair = Pair(8, event_idx=event_idx, start=start)
    driver, device = pair.driver, pair.device
    device_sleeping = False
    driver_sleeping = False
    held = []
    n = 0
    for op in ops:
        if op == "add" and driver.free_count() >= 2:
            add_chain(pair, ([16], [1]), n)
            n += 1
        elif op == "publish":
            new = driver.avail_idx != driver.kicked_idx
            kicked = driver.publish()
            if device_sleeping and new:
                assert kicked, "the device slept through new buffers"
            if kicked:
                device_sleeping = False
        elif op == "serve":  # woken (or spuriously running): poll, serve, complete
            device.disable_notify()
            while (chain := device.pop()) is not None:
                held.append(chain)
            device_sleeping = False
            pushed = bool(held)
            while held:
                device.push(held.pop(0).head, 1)
            interrupted = device.needs_notify()
            if driver_sleeping and pushed:
                assert interrupted, "the driver slept through a completion"
            if interrupted:
                driver_sleeping = False
        elif op == "sleep" and not device_sleeping and not device.enable_notify():
            device_sleeping = True
        elif op == "reap":
            driver.completed()
            driver.disable_interrupts()
            driver_sleeping = False
        elif op == "arm" and not driver_sleeping and not driver.enable_interrupts():
            driver_sleeping = True


def test_need_event_matches_definition() -> None:
    for old in (0, 1, 65534, 65535):
        for step in range(0, 6):
            new = (old + step) & 0xFFFF
            for delta in range(-3, 9):
                event = (old + delta) & 0xFFFF
                crossed = any((old + k) & 0xFFFF == event for k in range(step))
                assert need_event(event, new, old) is crossed


def test_device_queue_rejects_bad_geometry() -> None:
    pair = Pair(16)
    lay, v = pair.layout, pair.mem.view
    desc = v[lay.desc : lay.desc + desc_table_size(16)]
    avail = v[lay.avail : lay.avail + avail_ring_size(16)]
    used = v[lay.used : lay.used + used_ring_size(16)]
    for size in (0, 3, 12, 65536):
        with pytest.raises(QueueError):
            DeviceQueue(pair.mem, size, desc, avail, used, event_idx=True)
    with pytest.raises(QueueError):
        DeviceQueue(pair.mem, 32, desc, avail, used, event_idx=True)  # areas too small
    with pytest.raises(QueueError):
        DriverQueue(pair.mem.view, RingLayout(12, 0, 192, 224, 400), event_idx=True)


def test_device_pop_rejects_bad_descriptors() -> None:
    pair = Pair(8)
    driver, device = pair.driver, pair.device
    add_chain(pair, ([16], [1]), "a")
    driver.publish()
    head = U16.unpack_from(pair.mem.view, pair.layout.avail + 4)[0]
    desc_at = pair.layout.desc + 16 * head
    good = bytes(pair.mem.view[desc_at : desc_at + 16])
    addr, length, flags, nxt = DESC.unpack(good)
    for bad in (
        (len(pair.mem.buf) - 8, 16, flags, nxt),  # runs off the end of memory
        (addr, length, flags | DESC_F_INDIRECT, nxt),  # not negotiated
        (addr, length, flags | DESC_F_NEXT, 8),  # next out of range
        (addr, length, flags | DESC_F_NEXT, head),  # loops onto itself
    ):
        DESC.pack_into(pair.mem.view, desc_at, *bad)
        with pytest.raises(QueueError):
            device.pop()
        assert device.last_avail == 0
    pair.mem.view[desc_at : desc_at + 16] = good
    U16.pack_into(pair.mem.view, pair.layout.avail + 4, 8)  # head out of range
    with pytest.raises(QueueError):
        device.pop()


def test_ring_index_stores_are_never_seen_half_written():
    """Another process reading an index we store must only ever see a value we stored:
    a byte-wise store (struct.pack_into zero-fills first) shows transient values. The
    writer flips between 0x00ff and 0x0100, which differ in both bytes, so any tear shows
    as a third value, however the two processes are scheduled."""
    import mmap
    import multiprocessing

    from alacrity.virtio.ring import UsedRing

    size = 8
    stored = (0x00FF, 0x0100)
    shared = mmap.mmap(-1, used_ring_size(size))
    ring = UsedRing(memoryview(shared), size)
    ring.idx = stored[0]
    ready = multiprocessing.Event()

    def reader(done, result) -> None:
        view = UsedRing(memoryview(shared), size)
        torn, reads = 0, 0
        ready.set()
        while not done.is_set():
            if view.idx not in stored:
                torn += 1
            reads += 1
        result.put((torn, reads))

    ctx = multiprocessing.get_context("fork")
    done, result = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=reader, args=(done, result))
    proc.start()
    try:
        assert ready.wait(10)
        # Time-bounded, so a reader starved on a busy machine still gets its turns.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(500):
                ring.idx = stored[1]
                ring.idx = stored[0]
        done.set()
        torn, reads = result.get(timeout=30)
    finally:
        done.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert reads > 1000
    assert torn == 0
