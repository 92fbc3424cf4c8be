"""Dirty logging for live migration (vhost_user/dirty_log.py, virtio/device_queue.py, both
switch engines): the log marks every page the backend writes, and nothing else; logging
follows LOG_ALL while the rings run; a hostile log base, logged ring address or a write
beyond the log breaks that one connection (ProtocolError or QueueError), nothing more.

The backend is driven sans-I/O with the messages QEMU 7.2 sends when a migration starts:
SET_LOG_BASE (a memfd; QEMU waits for the empty reply), SET_FEATURES with LOG_ALL, then
SET_VRING_ADDR again with VRING_F_LOG and the used ring's guest-physical address."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alacrity import native_build
from alacrity.devices.blk import BlkDevice
from alacrity.native_build import NativeUnavailable
from alacrity.switch import native
from alacrity.switch.engine import Engine
from alacrity.switch.fdb import Fdb
from alacrity.vhost_user import dirty_log, sigbus
from alacrity.vhost_user.backend import PROTOCOL_FEATURES, Backend
from alacrity.vhost_user.dirty_log import MAX_LOG_MAP, DirtyLog
from alacrity.vhost_user.memory import MemoryTable
from alacrity.vhost_user.messages import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FLAG_REPLY,
    HEADER,
    LOG,
    MEM_HEADER,
    MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_STATE,
    Message,
    ProtocolError,
    ProtocolFeature,
    Req,
)
from alacrity.vhost_user.session import Session
from alacrity.virtio import blk as vb
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit
from alacrity.virtio.ring import QueueError, avail_ring_size, desc_table_size, used_ring_size
from tests.test_hostile import blk_request, image_bytes
from tests.test_switch_engine import Clock, Host, Memory

GUEST = 1 << 20  # guest memory: 256 pages from guest-physical 0
UVA = 0x7F00_0000_0000  # where the "frontend" has it
QSIZE = 64
RINGS = 0x3000  # the ring's guest-physical address: page 3 holds all three areas
LOG_BYTES = GUEST >> 15  # a bit for each page of GUEST
FEATURES = bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES)
U64_MAX = (1 << 64) - 1
ENGINES = [Engine]
if native.available():
    from alacrity.switch.native.engine import NativeEngine

    ENGINES.append(NativeEngine)


def memfd(size: int, *, sealable: bool = True) -> int:
    fd = os.memfd_create("alacrity-log-test", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr >> 12, ((addr + length - 1) >> 12) + 1)) if length > 0 else set()


def bits(log: memoryview | mmap.mmap) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bytes(log)) for b in range(8) if byte >> b & 1}


def open_fds() -> set[int]:
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


class Rig:
    """A Backend over a memfd guest with one running ring, fed messages as QEMU sends them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.backend = Backend(session)
        fd = memfd(GUEST)
        self.guest = memoryview(mmap.mmap(fd, GUEST))
        self.layout = RingLayout.at(RINGS, QSIZE)
        self.driver = DriverQueue(self.guest, self.layout, event_idx=True)
        self.log: mmap.mmap | None = None
        self.send(Req.SET_FEATURES, U64.pack(FEATURES))
        self.send(Req.SET_PROTOCOL_FEATURES, U64.pack(PROTOCOL_FEATURES))
        self.send(Req.SET_OWNER)
        self.send(Req.SET_MEM_TABLE, MEM_HEADER.pack(1, 0) + MEM_REGION.pack(0, GUEST, UVA, 0), [fd])
        self.send(Req.SET_VRING_NUM, VRING_STATE.pack(0, QSIZE))
        self.set_addr(0)
        self.send(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0))
        self.send(Req.SET_VRING_CALL, U64.pack(0), [os.eventfd(0, os.EFD_CLOEXEC)])
        self.send(Req.SET_VRING_KICK, U64.pack(0), [os.eventfd(0, os.EFD_CLOEXEC)])
        self.send(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        self.queue = self.backend.vrings[0].queue
        assert self.queue is not None

    def send(self, request: Req, payload: bytes = b"", fds: list[int] = ()) -> bytes | None:
        reply, actions = self.backend.step(Message(request, VERSION, payload, list(fds)))
        for action in actions:
            for fd in action.closing:
                os.close(fd)
        return reply

    def set_addr(self, flags: int, log_addr: int | None = None) -> None:
        lay = self.layout
        log_addr = lay.used if log_addr is None else log_addr
        self.send(Req.SET_VRING_ADDR,
                  VRING_ADDR.pack(0, flags, UVA + lay.desc, UVA + lay.used, UVA + lay.avail, log_addr))

    def set_log_base(self, size: int = LOG_BYTES) -> None:
        fd = memfd(size)
        self.log = mmap.mmap(fd, size)
        reply = self.send(Req.SET_LOG_BASE, LOG.pack(size, 0), [fd])
        assert reply == HEADER.pack(Req.SET_LOG_BASE, VERSION | FLAG_REPLY, 0)  # what QEMU waits for

    def start_logging(self, size: int = LOG_BYTES, *, ring: bool = True, log_addr: int | None = None) -> None:
        """What QEMU 7.2 does as a migration starts (vhost_migration_log)."""
        self.set_log_base(size)
        self.send(Req.SET_FEATURES, U64.pack(FEATURES | bit(F_LOG_ALL)))
        self.set_addr(VRING_F_LOG if ring else 0, log_addr)

    def stop_logging(self) -> None:
        self.send(Req.SET_FEATURES, U64.pack(FEATURES))
        self.set_addr(0)

    def dirty(self) -> set[int]:
        """The pages marked in the log, which is then cleared (as QEMU reads it)."""
        assert self.log is not None
        marked = bits(self.log)
        self.log[:] = bytes(len(self.log))
        return marked

    def run(self) -> int:
        queue = self.backend.vrings[0].queue
        assert queue is self.queue, "the ring was restarted"
        return self.session.process(0, queue)

    def blk(self, kind: int, data: int, length: int, status: int, *, sector: int = 0) -> int:
        """One request (header at 0xF0000): its status."""
        vb.REQUEST_HEADER.pack_into(self.guest, 0xF0000, kind, 0, sector)
        buffers = [(0xF0000, 16, False)]
        if length:
            buffers.append((data, length, kind == vb.T_IN))
        self.driver.add([*buffers, (status, 1, True)], kind)
        self.driver.publish()
        assert self.run() == 1
        assert [token for token, _ in self.driver.completed()] == [kind]
        return self.guest[status]

    def close(self) -> None:
        for fd in self.backend.close():
            os.close(fd)
        self.session.close()


@pytest.fixture
def disk(tmp_path):
    dev = BlkDevice("logged")
    dev.set_attribute("path", str(tmp_path / "disk.img"))
    dev.set_attribute("size", "1M")
    dev.set_attribute("shared", "1")
    return dev


@contextlib.contextmanager
def rig_on(dev: BlkDevice):
    rig = Rig(dev.open(os.getpid()))
    try:
        yield rig
    finally:
        rig.close()


# -- the log itself
#: How a log sets the bits it found clear: dirty_log.c's atomic ORs, one call per `mark`
#: (where it builds), or a FUTEX_WAKE_OP system call per bit (the fallback, and the reference).
SETTERS = [pytest.param(True, id="native"), pytest.param(False, id="futex")]
NATIVE = dirty_log.native_available()


def make_log(view: memoryview, native: bool) -> DirtyLog:
    if native and not NATIVE:
        pytest.skip(f"dirty_log.c is not available here: {dirty_log._setter.failed}")
    log = DirtyLog(view, native=native)
    assert (log._lib is not None) == native
    return log


@pytest.mark.parametrize("native", SETTERS)
def test_mark_sets_the_bits_of_the_pages_touched(native):
    log = make_log(memoryview(bytearray(4)), native)
    log.mark([(0x1FFF, 2)])  # pages 1 and 2
    log.mark([(0x8000, 1)])  # page 8: the next byte
    log.mark([(0x5000, 0)])  # nothing
    log.mark([(0x18000, 0x8000)])  # pages 24-31, a whole byte
    assert bits(log.view) == {1, 2, 8, *range(24, 32)}
    assert log.covers(0x1F000, 0x1000) and not log.covers(0x1F000, 0x1001)
    with pytest.raises(QueueError, match="beyond the 0x4-byte dirty log"):
        log.mark([(0x1F000, 0x1001)])
    with pytest.raises(QueueError):
        log.mark([(U64_MAX - 10, 5)])
    with pytest.raises(QueueError, match="beyond"):  # the ranges before the bad one are marked
        log.mark([(0x3000, 1), (0x3000, 2), (0x10000, 0x2000), (0x20000, 1), (0x4000, 1)])
    assert bits(log.view) == {1, 2, 3, 8, 16, 17, *range(24, 32)}


@pytest.mark.parametrize(("parent", "child"), [(True, True), (False, False), (True, False)],
                         ids=["native", "futex", "native-and-futex"])
def test_marks_from_two_processes_on_the_same_bytes_are_never_lost(parent, child):
    """QEMU gives one log to all a VM's vhost devices: alacrityd and a switch process mark the
    same bytes at once. In each round both walk a fresh log in step, each setting every other
    bit: all must be set in the end (a plain read-modify-write loses thousands). In half the
    rounds each `mark` sets one bit; in the others each process hands all its bits, listed
    before the start, to the setter at once (no scan, and a larger log, so that both run
    dirty_log.c's loop at the same time: a plain |= there loses bits too). The two may set
    bits differently (a switch process without dirty_log.c): that loses none either."""
    sizes = [1 << 11, 1 << 14] * 5  # bytes of each round's log: `mark` rounds, setter rounds
    fd = memfd(sum(sizes))
    shared = mmap.mmap(fd, sum(sizes))
    os.close(fd)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    views = [memoryview(shared)[at : at + size] for at, size in zip(starts, sizes, strict=True)]
    parent_logs = [make_log(view, parent) for view in views]
    child_logs = [make_log(view, child) for view in views]
    (to_child, go_child), (to_parent, go_parent) = os.pipe(), os.pipe()

    def rounds(logs: list[DirtyLog], first: int, go_other: int, wait: int):
        """Each round's log and its work (every other page from `first`), after the start."""
        for r, log in enumerate(logs):
            pages = range(first, 8 * log.size, 2)
            work = [list(pages)] if r % 2 else [[(page << 12, 1)] for page in pages]
            os.write(go_other, b"!")
            os.read(wait, 1)
            if r % 2:
                log._set(work[0])  # the setter alone
            else:
                for ranges in work:
                    log.mark(ranges)

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            rounds(child_logs, 1, go_parent, to_child)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 1
        os._exit(code)
    rounds(parent_logs, 0, go_child, to_parent)
    _, status = os.waitpid(pid, 0)
    for fd in (to_child, go_child, to_parent, go_parent):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(shared) == b"\xff" * sum(sizes)


GPAS = st.one_of(st.integers(0, 0x48000), st.sampled_from([0x3FFFF, 0x40000, U64_MAX - 9]))
RANGES = st.lists(st.tuples(GPAS, st.sampled_from([0, 1, 2, 8, 0xFFF, 0x1000, 0x1001, 0x3000, 0x9000])),
                  max_size=8)


@settings(max_examples=300, deadline=None)
@given(before=st.binary(min_size=8, max_size=8), calls=st.lists(RANGES, min_size=1, max_size=4))
def test_the_native_setter_marks_what_the_futex_one_marks(before, calls):
    """dirty_log.c against the reference, the futex path: the same bits from any ranges and
    any log state, the same refusals, the same ranges marked before one."""
    if not NATIVE:
        pytest.skip(f"dirty_log.c is not available here: {dirty_log._setter.failed}")
    logs = [DirtyLog(memoryview(bytearray(before)), native=native) for native in (True, False)]
    expect = bits(memoryview(before))
    for ranges in calls:
        outcomes = []
        for log in logs:
            try:
                log.mark(ranges)
                outcomes.append(None)
            except QueueError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
        for gpa, length in ranges:
            if length > 0 and (gpa + length - 1) >> 15 >= 8:
                break
            expect |= pages(gpa, length)
        assert bits(logs[0].view) == bits(logs[1].view) == expect


def test_without_a_build_the_log_sets_bits_with_the_futex(monkeypatch, caplog):
    """No trusted cache to build dirty_log.c into (a switch process after it dropped its
    privileges): no build is tried, one line says so, and every log uses the futex."""
    monkeypatch.setattr(dirty_log, "_setter", native_build.Once(dirty_log._load, dirty_log._unavailable))
    monkeypatch.setattr(native_build, "cache_dir", lambda: None)
    monkeypatch.setattr(native_build, "load", lambda spec: pytest.fail("a build was tried"))
    with caplog.at_level("WARNING", logger="alacrity.vhost_user"):
        log = DirtyLog(memoryview(bytearray(2)))
        again = DirtyLog(memoryview(bytearray(2)))
    assert log._lib is None and again._lib is None
    assert [r.getMessage() for r in caplog.records if "dirty log" in r.getMessage()] == [
        "dirty log: no native bit setter, so each bit newly set costs a system call: no trusted build "
        "cache ($XDG_CACHE_HOME or ~/.cache)"]
    with pytest.raises(NativeUnavailable):
        dirty_log.load()
    log.mark([(0x2000, 0x2000), (0x9000, 1)])
    assert bits(log.view) == {2, 3, 9}


def test_a_log_mapped_for_a_peer_uses_the_native_setter_where_it_builds():
    if not NATIVE:
        pytest.skip(f"dirty_log.c is not available here: {dirty_log._setter.failed}")
    fd = memfd(4096)
    try:
        log = DirtyLog.map(fd, 4096, 0)
    finally:
        os.close(fd)
    assert log._lib is not None
    log.mark([(0x7000, 0x3000)])
    assert bits(log.view) == {7, 8, 9}


def test_a_chain_taken_before_logging_began_is_logged_when_returned():
    mem = Memory(1 << 16)
    lay = RingLayout.at(0, 16)
    driver = DriverQueue(mem.view, lay, event_idx=True)
    queue = DeviceQueue(mem, 16, mem.view[lay.desc : lay.avail], mem.view[lay.avail : lay.used],
                        mem.view[lay.used : lay.end], event_idx=True)
    driver.add([(0x4000, 64, False), (0x8000, 0x1000, True), (0xA000, 0x1000, True)], "x")
    driver.publish()
    chain = queue.pop()
    log = DirtyLog(memoryview(bytearray(2)))
    queue.set_log(log, lay.used)
    chain.writable[0][:] = bytes(0x1000)
    chain.writable[1][:1] = b"\x01"
    queue.push(chain.head, 0x1001)
    assert bits(log.view) == {0, 8, 0xA}  # the used ring, and the 0x1001 bytes written


# -- the backend
def test_blk_marks_its_data_status_and_used_ring_pages_and_nothing_else(disk):
    with rig_on(disk) as rig:
        assert rig.blk(vb.T_OUT, 0x20000, 3 * 4096, 0x41000) == vb.S_OK  # before logging
        rig.start_logging()
        assert rig.dirty() == set()
        assert rig.blk(vb.T_IN, 0x10100, 3 * 4096, 0x40007) == vb.S_OK
        assert rig.dirty() == pages(0x10100, 3 * 4096) | {0x40, RINGS >> 12}
        assert rig.guest[0x10100 : 0x10100 + 3 * 4096] == rig.guest[0x20000 : 0x20000 + 3 * 4096]
        assert rig.blk(vb.T_OUT, 0x20000, 4096, 0x41000) == vb.S_OK  # writes only its status
        assert rig.dirty() == {0x41, RINGS >> 12}
        assert rig.blk(vb.T_IN, 0x30000, 512, 0x42000, sector=1 << 40) == vb.S_IOERR  # a failed read
        assert rig.dirty() == pages(0x30000, 512) | {0x42, RINGS >> 12}


def test_the_used_ring_is_logged_at_its_log_address_and_only_with_vring_f_log(disk):
    with rig_on(disk) as rig:
        rig.start_logging(log_addr=0xE7000)  # QEMU gives the ring's GPA; any address in the log will do
        rig.blk(vb.T_IN, 0x10000, 512, 0x40000)
        assert rig.dirty() == {0x10, 0x40, 0xE7}
        rig.set_addr(0)  # data still logged, the used ring no more
        rig.blk(vb.T_IN, 0x10000, 512, 0x40000)
        assert rig.dirty() == {0x10, 0x40}


def test_logging_follows_log_all_while_the_ring_runs(disk):
    with rig_on(disk) as rig:
        rig.start_logging()
        rig.blk(vb.T_IN, 0x10000, 4096, 0x40000)
        assert rig.dirty() == {0x10, 0x40, 3}
        rig.stop_logging()
        rig.blk(vb.T_IN, 0x11000, 4096, 0x40000)
        assert rig.dirty() == set()
        old = rig.log
        rig.send(Req.SET_FEATURES, U64.pack(FEATURES | bit(F_LOG_ALL)))  # the same log again
        rig.blk(vb.T_IN, 0x12000, 4096, 0x40000)
        assert rig.dirty() == {0x12, 0x40}
        rig.start_logging()  # a new log (QEMU resizes it so): the old one gets nothing more
        rig.blk(vb.T_IN, 0x13000, 4096, 0x40000)
        assert rig.dirty() == {0x13, 0x40, 3} and bits(old) == set()
        assert rig.run() == 0  # (run() checked that the ring never restarted)


def test_a_running_ring_may_change_its_log_flag_but_not_move(disk):
    with rig_on(disk) as rig:
        lay = rig.layout
        with pytest.raises(ProtocolError, match="running"):
            rig.send(Req.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, UVA + lay.desc + 0x1000, UVA + lay.used,
                                                         UVA + lay.avail, 0))


def test_log_base_needs_the_log_shmfd_protocol_feature():
    backend = Backend(Session())
    fd = memfd(64)
    with pytest.raises(ProtocolError, match="LOG_SHMFD"):
        backend.step(Message(Req.SET_LOG_BASE, VERSION, LOG.pack(64, 0), [fd]))


# -- hostile input
LOG_FD_KINDS = ["memfd", "memfd", "memfd", "unsealable", "readonly", "pipe", "eventfd", "devzero", "dir",
                "socket"]
MAPPABLE = {"memfd"} | ({"unsealable"} if sigbus.install() else set())


def log_fd(kind: str, size: int) -> list[int]:
    if kind in ("memfd", "unsealable", "readonly"):
        fd = memfd(size, sealable=kind != "unsealable")
        if kind != "readonly":
            return [fd]
        try:
            return [os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)]
        finally:
            os.close(fd)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC)]
    if kind == "devzero":
        return [os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)]
    if kind == "dir":
        return [os.open("/", os.O_RDONLY | os.O_CLOEXEC)]
    a, b = socket.socketpair()
    b.close()
    return [a.detach()]


SIZES = st.one_of(st.sampled_from([0, 1, 8, 4096, 4097, 1 << 16, MAX_LOG_MAP, MAX_LOG_MAP + 1, U64_MAX]),
                  st.integers(0, U64_MAX))
OFFSETS = st.one_of(st.sampled_from([0, 0, 0, 8, 4096, 1 << 16, MAX_LOG_MAP, 1 << 63, U64_MAX]),
                    st.integers(0, U64_MAX))


@settings(max_examples=300, deadline=None)
@given(size=SIZES, offset=OFFSETS, kind=st.sampled_from(LOG_FD_KINDS),
       file_size=st.sampled_from([0, 4096, 1 << 16]), nfds=st.sampled_from([1, 1, 1, 0, 2]),
       negotiated=st.booleans(), cut=st.sampled_from([16, 16, 16, 0, 8, 15]))
def test_set_log_base_takes_only_a_log_it_can_map(size, offset, kind, file_size, nfds, negotiated, cut):
    fds_before = open_fds()
    backend = Backend(Session())
    protocol = PROTOCOL_FEATURES if negotiated else PROTOCOL_FEATURES & ~bit(ProtocolFeature.LOG_SHMFD)
    backend.step(Message(Req.SET_PROTOCOL_FEATURES, VERSION, U64.pack(protocol)))
    fds = [fd for _ in range(nfds) for fd in log_fd(kind, file_size)]
    good = (negotiated and cut == 16 and nfds == 1 and kind in MAPPABLE and size > 0
            and offset + size <= min(file_size, MAX_LOG_MAP))
    try:
        reply, _ = backend.step(Message(Req.SET_LOG_BASE, VERSION, LOG.pack(size, offset)[:cut], fds))
    except ProtocolError:
        assert not good, "a good log base was refused"
        assert backend.log is None
    else:
        assert good, "a bad log base was taken"
        assert reply == HEADER.pack(Req.SET_LOG_BASE, VERSION | FLAG_REPLY, 0)
        assert backend.log is not None and backend.log.size == size
        backend.log.mark([(0, 1)])
    for fd in backend.close():
        os.close(fd)
    assert not open_fds() - fds_before, "file descriptors leaked"


LOG_ADDRS = st.one_of(
    st.sampled_from([0, RINGS + 0x488, 0xE7000, (LOG_BYTES << 15) - used_ring_size(QSIZE),
                     (LOG_BYTES << 15) - used_ring_size(QSIZE) + 1, 1 << 32, U64_MAX - 100, U64_MAX]),
    st.integers(0, U64_MAX))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_bytes=st.sampled_from([1, 2, LOG_BYTES, LOG_BYTES]), log_addr=LOG_ADDRS,
       flags=st.sampled_from([VRING_F_LOG] * 3 + [0, 3]), addr_first=st.booleans())
def test_logged_used_ring_beyond_the_log_breaks_the_connection(disk, log_bytes, log_addr, flags, addr_first):
    """QEMU may send VRING_F_LOG before or after the log base (at a device start, the features
    and rings come first): whichever completes the pair checks that the log covers the ring."""
    with rig_on(disk) as rig:
        good = not flags & VRING_F_LOG or (log_addr + used_ring_size(QSIZE) - 1) >> 15 < log_bytes
        try:
            if addr_first:
                rig.set_addr(flags, log_addr)
                rig.send(Req.SET_FEATURES, U64.pack(FEATURES | bit(F_LOG_ALL)))
                rig.set_log_base(log_bytes)
            else:
                rig.set_log_base(log_bytes)
                rig.send(Req.SET_FEATURES, U64.pack(FEATURES | bit(F_LOG_ALL)))
                rig.set_addr(flags, log_addr)
        except ProtocolError as exc:
            assert not good and "dirty log does not cover the used ring" in str(exc)
            return
        assert good
        if log_bytes == LOG_BYTES:
            rig.blk(vb.T_IN, 0x10000, 512, 0x40000)
            expect = {0x10, 0x40} | (pages(log_addr + 2, 2) | pages(log_addr + 4, 8) if flags & VRING_F_LOG
                                     else set())
            assert rig.dirty() == expect


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_bytes=st.integers(1, LOG_BYTES), data=st.integers(0x8000, GUEST - 0x3000),
       length=st.sampled_from([1, 512, 4096, 8192]))
def test_a_write_beyond_the_log_breaks_only_that_connection(disk, log_bytes, data, length):
    """A log too small for the guest: the request that writes beyond it raises QueueError
    (its connection closes: test_hostile's log_too_small), and a neighbour carries on."""
    with rig_on(disk) as rig, rig_on(disk) as neighbour:
        rig.start_logging(log_bytes)
        neighbour.start_logging()
        status = data + length
        written = pages(data, length + 1)
        if max(written) >> 3 < log_bytes:
            assert rig.blk(vb.T_IN, data, length, status) in (vb.S_OK, vb.S_IOERR)
            assert rig.dirty() == written | {3}
        else:
            vb.REQUEST_HEADER.pack_into(rig.guest, 0xF0000, vb.T_IN, 0, 0)
            rig.driver.add([(0xF0000, 16, False), (data, length, True), (status, 1, True)], "beyond")
            rig.driver.publish()
            with pytest.raises(QueueError, match="beyond the"):
                rig.run()
        assert neighbour.blk(vb.T_IN, 0x10000, 4096, 0x40000) == vb.S_OK
        assert neighbour.dirty() == {0x10, 0x40, 3}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(blk_request(), min_size=1, max_size=4), readonly=st.booleans())
def test_blk_logs_every_byte_it_writes_into_hostile_chains(reqs, readonly):
    """test_hostile's hostile blk chains, logged: every byte of guest memory that changed is
    on a marked page, and only the writable buffers of completed requests and the used ring
    are marked."""
    size, base = 1 << 16, 8192
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        dev = BlkDevice("logged-hostile")
        dev.set_attribute("path", path)
        dev.set_attribute("readonly", "1" if readonly else "0")
        session = dev.open(os.getpid())
        fd = memfd(size)
        table = MemoryTable.map([(0, size, UVA, 0)], [fd])
        os.close(fd)
        try:
            guest = table.regions[0].view
            lay = RingLayout.at(0, 64)
            driver = DriverQueue(guest, lay, event_idx=False)
            queue = DeviceQueue(table, 64, guest[lay.desc : lay.desc + desc_table_size(64)],
                                guest[lay.avail : lay.avail + avail_ring_size(64)],
                                guest[lay.used : lay.used + used_ring_size(64)], event_idx=False)
            log = DirtyLog(memoryview(bytearray(size >> 15)))
            queue.set_log(log, lay.used)
            guest[base:] = b"\x33" * (size - base)
            addr, placed = base, []
            for i, (pieces, writable) in enumerate(reqs):
                buffers = []
                for piece in pieces:
                    guest[addr : addr + len(piece)] = piece
                    buffers.append((addr, len(piece), False))
                    addr += len(piece) + 8
                wbufs = []
                for n in writable:
                    buffers.append((addr, n, True))
                    wbufs.append((addr, n))
                    addr += n + 8
                driver.add(buffers or [(addr, 0, False)], i)
                placed.append(wbufs)
            driver.publish()
            before = bytes(guest)
            with contextlib.suppress(QueueError):  # a request without header or status
                session.process(0, queue)
            after = bytes(guest)
            completed = dict(driver.completed())
            allowed = pages(lay.used, used_ring_size(64))
            for i in completed:
                for a, n in placed[i]:
                    allowed |= pages(a, n)
                assert completed[i] == sum(n for _, n in placed[i]), "the used length covers the status"
            changed = {k >> 12 for k in range(len(before)) if before[k] != after[k]}
            marked = bits(log.view)
            assert changed <= marked, f"pages written but not logged: {sorted(changed - marked)}"
            assert marked <= allowed, f"pages logged but not the device's: {sorted(marked - allowed)}"
        finally:
            del guest, driver, queue
            session.close()
            table.release()


# -- the switch
@pytest.mark.parametrize("kind", ENGINES, ids=lambda k: k.kind)
@pytest.mark.parametrize("rx_buffer", [2048, 256])  # 256: frames over several chains (MRG_RXBUF)
def test_switch_frames_mark_exactly_rx_buffers_and_used_rings(kind, rx_buffer):
    engine = kind(Fdb(), clock=Clock())
    a, b = Host(1, queue_size=64, rx_buffer=rx_buffer), Host(2, queue_size=64, rx_buffer=rx_buffer)
    logs = {}
    for h in (a, b):
        engine.add_port(h.port)
        logs[h] = DirtyLog(memoryview(bytearray((len(h.mem.buf) >> 15) + 1)))
        for queue, lay in ((h.port.rx, h.driver.rx_layout), (h.port.tx, h.driver.tx_layout)):
            queue.set_log(logs[h], lay.used)
    b.send(a.mac, b"so that the switch knows b")
    engine.poll_once()
    assert len(a.received()) == 1
    for log in logs.values():
        log.view[:] = bytes(len(log.view))
    rx_used, tx_used = b.port.rx.used_idx, a.port.tx.used_idx
    for i in range(20):
        a.send(b.mac, bytes([i]) * (100 + 30 * i))
    assert engine.poll_once() == 20
    if kind is not Engine:
        assert engine.native_frames == 21 and engine.punts == 0
    d = b.driver
    buffers = set()
    for slot, written in d.rxq.completed():
        buffers |= pages(d.rx_base + slot * d.rx_buffer, written)

    def used(lay: RingLayout, start: int, end: int) -> set[int]:
        elements = {p for i in range(start, end) for p in pages(lay.used + 4 + 8 * (i % lay.size), 8)}
        return elements | pages(lay.used + 2, 2)

    assert bits(logs[b].view) == buffers | used(d.rx_layout, rx_used, b.port.rx.used_idx)
    assert bits(logs[a].view) == used(a.driver.tx_layout, tx_used, a.port.tx.used_idx)


# -- a real migration
@pytest.mark.vm
def test_a_guest_reading_its_disk_through_a_migration_reads_it_right(daemon, guest_image, tmp_path):
    """A TCG guest reads its whole disk into its page cache (blk's reads into guest memory),
    then checksums that cache half a second later, over and over, while `alacrity vm migrate`
    moves it four times: QEMU 7.2 migrates it (it refuses without LOG_ALL), every checksum is
    the disk's, and at each switch-over the two QEMUs' guest memory is equal (--verify). A
    page blk filled after QEMU had copied it would reach the new QEMU stale without its mark
    (this fails with buffer writes left unmarked)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    want = hashlib.md5(disk.read_bytes()).hexdigest()  # noqa: S324 - busybox's sum
    daemon.make_disk("d0", "a", disk, size="4M")
    cli = [sys.executable, "-m", "alacrity.cli"]
    # fd 3 keeps /dev/vda open: Linux drops a block device's page cache at its last close.
    loop = ("exec 3< /dev/vda; i=0; while :; do i=$((i+1)); echo 3 > /proc/sys/vm/drop_caches; "
            "cat /dev/vda > /dev/null; sleep 0.5; echo \"sum $i $(md5sum < /dev/vda)\"; done")
    # init_on_alloc=0: Debian's kernel zeroes each page it allocates, which would mark for QEMU
    # the page cache pages blk is about to fill, hiding a missing mark of ours.
    subprocess.run([*cli, "vm", "run", "--bus", "a", "--name", "vm1", "--detach", "--cmd", loop,
                    "--append", "init_on_alloc=0", "--kernel", str(guest_image.kernel),
                    "--initrd", str(guest_image.initrd)],
                   env=daemon.env, check=True, capture_output=True, timeout=300)
    record = Path(daemon.env["ALACRITY_VM_DIR"]) / "vm1" / "vm.json"

    def sums_past(index: int) -> dict[int, str]:
        """The current QEMU's console's sums, once it shows one numbered past `index`."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = Path(json.loads(record.read_text())["console"]).read_text(errors="replace")
            got = {int(i): s for i, s in re.findall(r"sum (\d+) ([0-9a-f]{32})", text)}
            if got and max(got) > index:
                return got
            time.sleep(0.2)
        raise AssertionError(f"the guest printed no sum past {index}")

    checked: dict[int, str] = {}
    try:
        for _ in range(4):
            checked.update(sums_past(max(checked, default=0) + 1))
            # --verify: at the switch-over both QEMUs' memory is equal, every page of it.
            out = subprocess.run([*cli, "vm", "migrate", "vm1", "--verify"], env=daemon.env,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0 and "guest memory verified" in out.stdout, out.stderr
        checked.update(sums_past(max(checked) + 1))  # the sums across the last move are in
        wrong = sorted(i for i, s in checked.items() if s != want)
        assert not wrong, f"sums {wrong} of {len(checked)} wrong: pages reached the new QEMU stale"
    finally:
        subprocess.run([*cli, "vm", "stop", "vm1"], env=daemon.env, capture_output=True, timeout=60)
