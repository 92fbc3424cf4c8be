"""Property-based tests with a hostile guest / peer.

The standards: every address, length and index coming from guest memory or from the
peer is checked before use; bad input breaks that one connection (QueueError or
ProtocolError, never another exception), never hangs, never touches memory outside
the table, and other connections keep working.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import socket
import struct
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alacrity.client.blk import BlkClient, BlkError
from alacrity.devices.blk import BlkDevice, BlkSession
from alacrity.devices.rng import RngDevice
from alacrity.vhost_user.backend import PROTOCOL_FEATURES, TRANSPORT_FEATURES, Backend
from alacrity.vhost_user.connection import Connection
from alacrity.vhost_user.memory import MemoryTable
from alacrity.vhost_user.messages import (
    CONFIG_HEADER,
    F_LOG_ALL,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    LOG,
    MAX_PAYLOAD,
    MEM_HEADER,
    MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    Framer,
    Message,
    ProtocolError,
    ProtocolFeature,
    Req,
    encode,
)
from alacrity.vhost_user.session import Session
from alacrity.virtio import blk as vb
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit
from alacrity.virtio.ring import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    QueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

U16 = struct.Struct("<H")  # tests poke rings from one thread, so struct is fine here

PAGE = mmap.PAGESIZE
U64_MAX = (1 << 64) - 1
CANARY = 0x5A
UVA = 0x7F12_3400_0000  # the peer's (pretend) user address of its memory


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def open_fds() -> set[int]:
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


def memfd(size: int, fill: int = 0) -> int:
    fd = os.memfd_create("alacrity-hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


# --------------------------------------------------------------------------------------
# 1. Malformed descriptor chains on a DeviceQueue over a real, mmap'd memory table
# --------------------------------------------------------------------------------------

REGION = 2 * PAGE  # each of the two regions; each memfd is [canary page][region][canary page]
QSIZES = (1, 2, 4, 8, 16)


class CanaryTable:
    """Two gpa-adjacent regions from two memfds; the pages around each are canaries that
    the table does not cover (the leading one is even inside the table's mapping)."""

    def __init__(self, base_gpa: int) -> None:
        self.base = base_gpa
        fds = [memfd(REGION + 2 * PAGE, CANARY) for _ in range(2)]
        layout = [(base_gpa + i * REGION, REGION, UVA + i * 0x10_0000, PAGE) for i in range(2)]
        self.table = MemoryTable.map(layout, fds)
        self.files = [mmap.mmap(fd, REGION + 2 * PAGE) for fd in fds]  # our own window
        for fd in fds:
            os.close(fd)
        self.bounds = [
            (address_of(r.view), address_of(r.view) + r.size, r.gpa) for r in self.table.regions
        ]

    def canaries_intact(self) -> bool:
        good = bytes([CANARY]) * PAGE
        return all(f[:PAGE] == good and f[PAGE + REGION :] == good for f in self.files)

    def close(self) -> None:
        self.table.release()
        for f in self.files:
            f.close()


def reference_walk(table: CanaryTable, descs: list, size: int, head: int):
    """What the virtio spec allows: list of (gpa, len, writable), or None if the chain is bad."""
    if head >= size:
        return None
    out, index = [], head
    for _ in range(size):
        addr, length, flags, nxt = descs[index]
        if flags & DESC_F_INDIRECT:
            return None
        if not any(g <= addr and addr + length <= g + REGION for _s, _e, g in table.bounds):
            return None
        writable = bool(flags & DESC_F_WRITE)
        if not writable and any(w for _a, _l, w in out):
            return None
        out.append((addr, length, writable))
        if not flags & DESC_F_NEXT:
            return out
        if nxt >= size:
            return None
        index = nxt
    return None


@st.composite
def hostile_ring(draw):
    base = draw(st.sampled_from([0, 0x10000, 1 << 40, (1 << 64) - 2 * REGION]))
    size = draw(st.sampled_from(QSIZES))
    end = base + 2 * REGION
    addr = st.one_of(
        st.integers(0, U64_MAX),
        st.integers(max(0, base - 64), min(U64_MAX, end + 64)),
        st.sampled_from([base, base + REGION - 1, base + REGION, end - 1, end, U64_MAX, 0]).map(
            lambda a: min(a, U64_MAX)
        ),
    )
    length = st.one_of(
        st.integers(0, (1 << 32) - 1),
        st.integers(0, 64),
        st.sampled_from([REGION, REGION + 1, 2 * REGION, 1, 0]),
    )
    flags = st.one_of(
        st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_NEXT | DESC_F_WRITE, DESC_F_INDIRECT,
                         DESC_F_NEXT | DESC_F_INDIRECT]),
        st.integers(0, 0xFFFF),
    )
    nxt = st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF))
    plausible = st.tuples(
        st.integers(0, 1), st.integers(0, REGION - 1), st.integers(0, 64), st.sampled_from([0, 0, 0, 1])
    ).map(lambda t: (base + t[0] * REGION + t[1], min(t[2], REGION - t[1]) + t[3]))
    good_flags = st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_NEXT | DESC_F_WRITE])
    desc = st.one_of(
        st.tuples(addr, length, flags, nxt),
        st.tuples(plausible, good_flags, st.integers(0, size - 1)).map(lambda t: (*t[0], t[1], t[2])),
        st.tuples(plausible, good_flags, st.integers(0, size - 1)).map(lambda t: (*t[0], t[1], t[2])),
    )
    descs = draw(st.lists(desc, min_size=size, max_size=size))
    head = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    heads = draw(st.lists(head, min_size=size, max_size=size))
    last_avail = draw(st.one_of(st.sampled_from([0, 0xFFFF, 0xFFFF - size // 2]), st.integers(0, 0xFFFF)))
    jump = draw(st.one_of(st.integers(1, size), st.integers(0, size), st.sampled_from([size + 1, 0xFFFF]),
                          st.integers(0, 0xFFFF)))
    return base, size, descs, heads, last_avail, jump


@settings(max_examples=200, deadline=None)
@given(ring=hostile_ring())
def test_malformed_chains_stay_inside_the_table(ring) -> None:
    base, size, descs, heads, last_avail, jump = ring
    mem = CanaryTable(base)
    try:
        region = mem.table.regions[0].view
        # Rings at the start of region 0: desc table, avail, used (user addresses).
        desc_off = 0
        avail_off = desc_table_size(size)
        used_off = (avail_off + avail_ring_size(size) + 3) & ~3
        for i, d in enumerate(descs):
            DESC.pack_into(region, desc_off + 16 * i, *d)
        avail_idx = (last_avail + jump) & 0xFFFF
        U16.pack_into(region, avail_off + 2, avail_idx)
        for i, h in enumerate(heads):
            U16.pack_into(region, avail_off + 4 + 2 * i, h)
        uva = mem.table.regions[0].uva
        queue = DeviceQueue(
            mem.table,
            size,
            mem.table.uva(uva + desc_off, desc_table_size(size)),
            mem.table.uva(uva + avail_off, avail_ring_size(size)),
            mem.table.uva(uva + used_off, used_ring_size(size)),
            event_idx=False,
            last_avail=last_avail,
        )
        taken: list[memoryview] = []
        pops = 0
        while pops <= size + 1:
            slot = (last_avail + pops) % size
            if jump > size:
                expected = None  # the avail index jumped by more than the ring holds
            elif pops < jump:
                expected = reference_walk(mem, descs, size, heads[slot])
            else:
                expected = "none"
            t0 = time.monotonic()
            try:
                chain = queue.pop()
            except QueueError:
                assert expected is None, f"pop {pops} refused a good chain {expected}"
                break
            finally:
                assert time.monotonic() - t0 < 1.0, "pop() took too long"
            if chain is None:
                assert expected == "none"
                break
            assert expected not in (None, "none"), "pop() accepted a bad chain"
            got = [(len(v), False) for v in chain.readable] + [(len(v), True) for v in chain.writable]
            assert got == [(n, w) for _a, n, w in expected]
            for view, (addr, length, _w) in zip(chain.readable + chain.writable, expected, strict=True):
                if not length:
                    continue
                start = address_of(view)
                inside = [(s, e, g) for s, e, g in mem.bounds if s <= start and start + length <= e]
                assert inside, "a view lies outside every region"
                s, _e, g = inside[0]
                assert start - s == addr - g, "a view is not where its descriptor points"
                taken.append(view)
            pops += 1
        for view in taken:  # the device may write anywhere in the views it was given
            view[:] = b"\xee" * len(view)
        assert mem.canaries_intact()
    finally:
        mem.close()


# --------------------------------------------------------------------------------------
# 2. The blk device fed hostile (but queue-valid) chains
# --------------------------------------------------------------------------------------

CAPACITY = 64  # sectors
GUEST = 1 << 16
DATA = 8192  # guest memory where request buffers start
BLK_QSIZE = 64
KINDS = [vb.T_IN, vb.T_OUT, vb.T_FLUSH, vb.T_GET_ID, vb.T_DISCARD, vb.T_WRITE_ZEROES]


def image_bytes() -> bytes:
    return bytes((i * 7 + i // 512) & 0xFF for i in range(CAPACITY * vb.SECTOR))


@st.composite
def blk_request(draw):
    kind = draw(st.one_of(st.sampled_from(KINDS), st.integers(0, 0xFFFF_FFFF)))
    sector = draw(st.one_of(
        st.integers(0, CAPACITY + 2),
        st.sampled_from([CAPACITY - 1, CAPACITY, 1 << 55, 1 << 63, U64_MAX]),
        st.integers(0, U64_MAX),
    ))
    header = vb.REQUEST_HEADER.pack(kind, draw(st.integers(0, 0xFFFF_FFFF)), sector)
    header = header[: draw(st.sampled_from([16, 16, 16, 16, 0, 8, 15]))]
    if kind in (vb.T_DISCARD, vb.T_WRITE_ZEROES) and draw(st.booleans()):
        segs = draw(st.lists(st.tuples(
            st.one_of(st.integers(0, CAPACITY + 1), st.integers(0, U64_MAX)),
            st.one_of(st.integers(0, 8), st.sampled_from([CAPACITY, 1 << 22]), st.integers(0, 0xFFFF_FFFF)),
            st.integers(0, 0xFFFF_FFFF),
        ), max_size=3))
        out = b"".join(vb.SEGMENT.pack(*s) for s in segs) + draw(st.sampled_from([b"", b"", b"junk"]))
    else:
        n = draw(st.one_of(st.sampled_from([0, 0, 512, 1024, 511, 513]), st.integers(0, 1100)))
        out = draw(st.binary(min_size=n, max_size=n)) if n < 64 else bytes([draw(st.integers(1, 255))]) * n
    readable = header + out
    cuts = sorted(draw(st.lists(st.integers(0, len(readable)), max_size=3)))
    bounds = [0, *cuts, len(readable)]
    pieces = [readable[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    if not readable:
        pieces = draw(st.sampled_from([[], [b""]]))
    sizes = st.one_of(st.sampled_from([0, 0, 1, 1, 512, 511, 513, 1024, 21]), st.integers(0, 1100))
    writable = draw(st.one_of(
        st.lists(sizes, max_size=4),
        st.lists(sizes, max_size=3).map(lambda w: [*w, 1]),  # a separate status byte
        st.lists(st.sampled_from([0, 512]), min_size=1, max_size=3).map(lambda w: [*w, 0, 1]),
    ))
    return pieces, writable


def blk_model(req, image: bytearray, readonly: bool, serial: bytes):
    """Expected outcome: None (QueueError), or (status set, used len, data_in bytes or None,
    byte ranges that may now read as zeros). Updates `image` for writes. The used length is
    always all the writable bytes, up to the status byte (the dirty log marks them)."""
    pieces, writable = req
    readable = b"".join(pieces)
    if len(readable) < 16 or not writable or writable[-1] == 0:
        return None
    kind, _, sector = vb.REQUEST_HEADER.unpack(readable[:16])
    out = readable[16:]
    n_in = sum(writable) - 1
    used = sum(writable)

    def ok(sec: int, nbytes: int) -> bool:
        return nbytes % 512 == 0 and sec + nbytes // 512 <= CAPACITY

    if kind == vb.T_IN:
        if ok(sector, n_in):
            return {vb.S_OK}, used, bytes(image[sector * 512 : sector * 512 + n_in]), []
        return {vb.S_IOERR}, used, None, []
    if kind == vb.T_OUT:
        if readonly or not ok(sector, len(out)):
            return {vb.S_IOERR}, used, None, []
        image[sector * 512 : sector * 512 + len(out)] = out
        return {vb.S_OK}, used, None, []
    if kind == vb.T_FLUSH:
        return {vb.S_OK}, used, None, []
    if kind == vb.T_GET_ID:
        ident = serial.ljust(vb.ID_BYTES, b"\0")[:n_in]
        return {vb.S_OK}, used, ident, []
    if kind in (vb.T_DISCARD, vb.T_WRITE_ZEROES):
        if readonly or not out or len(out) % 16:
            return {vb.S_IOERR}, used, None, []
        zeros = []
        for off in range(0, len(out), 16):
            sec, count, _f = vb.SEGMENT.unpack_from(out, off)
            if not ok(sec, count * 512):
                return {vb.S_IOERR}, used, None, zeros
            zeros.append((sec * 512, (sec + count) * 512))
        return {vb.S_OK, vb.S_IOERR}, used, None, zeros  # IOERR if the filesystem refuses
    return {vb.S_UNSUPP}, used, None, []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(blk_request(), min_size=1, max_size=4), readonly=st.booleans())
def test_blk_device_fed_hostile_chains(reqs, readonly: bool) -> None:
    _blk_attack(reqs, readonly)


def _blk_attack(reqs, readonly: bool) -> None:
    """A blk session on a real image file and a real memfd guest, fed `reqs`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        dev = BlkDevice("hostile")
        dev.set_attribute("path", path)
        dev.set_attribute("readonly", "1" if readonly else "0")
        session = dev.open(os.getpid())
        fd = memfd(GUEST)
        table = MemoryTable.map([(0, GUEST, UVA, 0)], [fd])
        os.close(fd)
        try:
            _run_blk_requests(session, table, reqs, readonly, path)
        finally:
            session.close()
            table.release()


def _run_blk_requests(session: BlkSession, table: MemoryTable, reqs, readonly: bool, path: str) -> None:
    guest = table.regions[0].view
    layout = RingLayout.at(0, BLK_QSIZE)
    driver = DriverQueue(guest, layout, event_idx=False)
    queue = DeviceQueue(
        table, BLK_QSIZE,
        guest[layout.desc : layout.avail], guest[layout.avail : layout.used],
        guest[layout.used : layout.end], event_idx=False,
    )
    guest[DATA:] = b"\x33" * (GUEST - DATA)  # background: must stay unless the device may write
    addr = DATA
    placed = []
    for i, (pieces, writable) in enumerate(reqs):
        buffers = []
        for p in pieces:
            guest[addr : addr + len(p)] = p
            buffers.append((addr, len(p), False))
            addr += len(p) + 8
        wbufs = []
        for n in writable:
            buffers.append((addr, n, True))
            wbufs.append((addr, n))
            addr += n + 8
        if not buffers:
            buffers = [(addr, 0, False)]
        driver.add(buffers, i)
        placed.append(wbufs)
    driver.publish()
    before = bytes(guest[DATA:])

    image = bytearray(image_bytes())
    serial = b"hostile"
    outcomes = []
    for req in reqs:
        outcome = blk_model(req, image, readonly, serial)
        outcomes.append(outcome)
        if outcome is None:
            break
    expect_error = outcomes[-1] is None

    try:
        session.process(0, queue)
    except QueueError:
        assert expect_error, "QueueError on a request with a header and a status byte"
    else:
        assert not expect_error, f"request {len(outcomes) - 1} has no header or no status byte"

    completed = dict(driver.completed())
    done = [o for o in outcomes if o is not None]
    assert sorted(completed) == list(range(len(done)))
    allowed = bytearray(before)  # guest memory as it may now be; None-bytes = anything
    after = bytes(guest[DATA:])
    zero_ok: list[tuple[int, int]] = []
    for i, (statuses, used_len, data_in, zeros) in enumerate(done):
        assert completed[i] == used_len, f"request {i}: used length"
        wbufs = placed[i]
        status_addr = wbufs[-1][0] + wbufs[-1][1] - 1
        assert guest[status_addr] in statuses, f"request {i}: status {guest[status_addr]}"
        allowed[status_addr - DATA] = guest[status_addr]
        if data_in is not None:  # the first len(data_in) bytes of the writable buffers
            k = 0
            for a, n in wbufs:
                for j in range(n):
                    if k < len(data_in) and a + j != status_addr:
                        allowed[a + j - DATA] = data_in[k]
                        k += 1
        zero_ok += zeros
    assert after == bytes(allowed), "the device wrote guest memory it had no business with"

    with open(path, "rb") as f:
        disk = f.read()
    assert len(disk) == CAPACITY * 512, "the image changed size"
    for pos in range(0, len(disk), 512):
        got, want = disk[pos : pos + 512], image[pos : pos + 512]
        if got != want:
            zeroable = any(a <= pos and pos + 512 <= b for a, b in zero_ok)
            assert zeroable and got == bytes(512), f"image sector {pos // 512} changed unexpectedly"


def test_blk_empty_writable_buffer_before_the_status_byte() -> None:
    """writable = [0-byte buffer, 1-byte status] is a valid chain; devices/blk.py `_execute`
    crashed on it with IndexError (split() leaves the empty view first in `status_view`),
    which escapes RingWorker.run and kills the ring thread without failing the connection."""
    reqs = [([vb.REQUEST_HEADER.pack(vb.T_FLUSH, 0, 0)], [0, 1])]
    _blk_attack(reqs, False)


# --------------------------------------------------------------------------------------
# 3. Malformed vhost-user messages through Backend.handle(), and the Framer
# --------------------------------------------------------------------------------------

MEMSIZE = 1 << 16
FD_KINDS = ["eventfd", "memfd", "memfd_small", "readonly"]
fd_specs = st.lists(st.sampled_from(FD_KINDS), max_size=3)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, U64_MAX)
ring_index = st.one_of(st.sampled_from([0, 0, 0, 1, 2, 255]), u32)
flags_st = st.one_of(st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY]), u32)


def msg(request, payload=b"", fds=(), flags=VERSION):
    return (int(request), flags, payload, list(fds))


raw_msg = st.builds(msg, st.one_of(st.integers(0, 64), u32), st.binary(max_size=80), fd_specs, flags_st)

region_st = st.tuples(
    st.one_of(st.sampled_from([0, 0, 0x1000, MEMSIZE, U64_MAX - 0xFFF]), u64),
    st.one_of(st.sampled_from([MEMSIZE, MEMSIZE, 0x1000, 0, MEMSIZE + 1, U64_MAX]), u64),
    st.one_of(st.sampled_from([UVA, UVA, UVA + 0x1000, U64_MAX - 0xFFF]), u64),
    st.one_of(st.sampled_from([0, 0, 0x1000, MEMSIZE, 1 << 63]), u64),
)


@st.composite
def mem_table_msg(draw):
    regions = draw(st.lists(region_st, min_size=1, max_size=3))
    count = draw(st.one_of(st.just(len(regions)), st.sampled_from([0, 9, len(regions) + 1]), u32))
    payload = MEM_HEADER.pack(count, 0) + b"".join(MEM_REGION.pack(*r) for r in regions)
    payload = payload[: draw(st.sampled_from([len(payload)] * 4 + [0, 4, 8, 20]))]
    fds = draw(st.one_of(st.just(["memfd"] * len(regions)), fd_specs))
    return msg(Req.SET_MEM_TABLE, payload, fds, draw(flags_st))


ring_addr = st.one_of(
    st.sampled_from([UVA, UVA + 0x1000, UVA + 0x2000, UVA + 1, UVA + 2, UVA + MEMSIZE - 16, 0]), u64
)
vring_msgs = st.one_of(
    st.builds(lambda i, n: msg(Req.SET_VRING_NUM, VRING_STATE.pack(i, n)), ring_index,
              st.one_of(st.sampled_from([0, 1, 3, 64, 256, 1000, 1024, 2048, 32768, 65536]), u32)),
    st.builds(lambda i, f, d, u, a, lg: msg(Req.SET_VRING_ADDR, VRING_ADDR.pack(i, f, d, u, a, lg)),
              ring_index, u32, ring_addr, ring_addr, ring_addr, u64),
    st.builds(lambda i, n: msg(Req.SET_VRING_BASE, VRING_STATE.pack(i, n)), ring_index,
              st.one_of(st.sampled_from([0, 0xFFFF, 0x10000]), u32)),
    st.builds(lambda i: msg(Req.GET_VRING_BASE, VRING_STATE.pack(i, 0)), ring_index),
    st.builds(lambda r, i, nofd, fds: msg(r, U64.pack(i | (VRING_NOFD_MASK if nofd else 0)), fds),
              st.sampled_from([Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR]),
              st.one_of(st.sampled_from([0, 0, 1, 255]), u64.map(lambda x: x & ~VRING_NOFD_MASK)),
              st.booleans(),
              st.one_of(st.just(["eventfd"]), fd_specs)),
    st.builds(lambda i, e: msg(Req.SET_VRING_ENABLE, VRING_STATE.pack(i, e)), ring_index,
              st.one_of(st.sampled_from([0, 1]), u32)),
)
control_msgs = st.one_of(
    st.builds(lambda r, f: msg(r, flags=f),
              st.sampled_from([Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM,
                               Req.SET_OWNER, Req.RESET_OWNER, Req.SET_LOG_BASE, Req.RESET_DEVICE]),
              flags_st),
    st.builds(lambda f: msg(Req.SET_FEATURES, U64.pack(f)),
              st.one_of(st.just(TRANSPORT_FEATURES), st.sampled_from([bit(F_VERSION_1), 0]), u64)),
    st.builds(lambda f: msg(Req.SET_PROTOCOL_FEATURES, U64.pack(f)),
              st.one_of(st.just(PROTOCOL_FEATURES), u64)),
    st.builds(lambda size, offset, fds, f: msg(Req.SET_LOG_BASE, LOG.pack(size, offset), fds, f),
              st.one_of(st.sampled_from([0, 1, 2, 0x1000, MEMSIZE, MEMSIZE + 1, U64_MAX]), u64),
              st.one_of(st.sampled_from([0, 0, 0x1000, MEMSIZE, 1 << 63]), u64),
              st.one_of(st.just(["memfd"]), fd_specs), flags_st),
    st.builds(lambda o, s, fl, extra: msg(Req.GET_CONFIG, CONFIG_HEADER.pack(o, s, fl) + extra),
              st.one_of(st.integers(0, 300), u32), st.one_of(st.integers(0, 300), u32), u32,
              st.binary(max_size=64)),
    st.builds(lambda o, s, data: msg(Req.SET_CONFIG, CONFIG_HEADER.pack(o, s, 0) + data),
              st.one_of(st.integers(0, 300), u32), st.one_of(st.integers(0, 300), u32),
              st.binary(max_size=300)),
)
hostile_msg = st.one_of(raw_msg, mem_table_msg(), vring_msgs, control_msgs)


def valid_setup(protocol: bool) -> list:
    features = bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | (TRANSPORT_FEATURES if protocol else 0)
    setup = [
        msg(Req.SET_FEATURES, U64.pack(features)),
        msg(Req.SET_OWNER),
        msg(Req.SET_MEM_TABLE, MEM_HEADER.pack(1, 0) + MEM_REGION.pack(0, MEMSIZE, UVA, 0), ["memfd"]),
        msg(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256)),
        msg(Req.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0)),
        msg(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0)),
        msg(Req.SET_VRING_CALL, U64.pack(0), ["eventfd"]),
        msg(Req.SET_VRING_KICK, U64.pack(0), ["eventfd"]),
    ]
    if protocol:
        setup.insert(1, msg(Req.SET_PROTOCOL_FEATURES, U64.pack(PROTOCOL_FEATURES)))
        setup.append(msg(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1)))
    return setup


def make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        return memfd(MEMSIZE)
    if kind == "memfd_small":
        return memfd(PAGE)
    fd = memfd(MEMSIZE)  # "readonly": cannot be mapped shared+writable
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def play(session: Session, messages: list) -> None:
    """Feed messages as Connection would; enforce the handle() contract and fd hygiene."""
    backend = Backend(session)
    try:
        for request, flags, payload, fd_kinds in messages:
            message = Message(request, flags, payload, [make_fd(k) for k in fd_kinds])
            try:
                reply = backend.handle(message)
            except ProtocolError:
                return  # the connection is broken; Connection.serve would stop here
            finally:
                for fd in message.fds:  # fds the message carried but the backend did not take
                    os.close(fd)
                actions, backend.actions = backend.actions, []
                for action in actions:
                    assert action.kind in ("start", "stop", "close")
                    assert 0 <= action.index < session.num_queues
                    for fd in action.closing:
                        os.close(fd)
            assert reply is None or isinstance(reply, bytes)
            if reply is not None:
                req, rflags, size = HEADER.unpack_from(reply)
                assert req == request and rflags == VERSION | FLAG_REPLY and size == len(reply) - 12
            for vring in backend.vrings:
                if vring.queue is not None:
                    assert backend.memory is not None and vring.queue.size == vring.num
                    assert vring.enabled and vring.kick is not None
                    for area in (vring.queue.desc, vring.queue.avail, vring.queue.used):
                        a = address_of(area)
                        assert any(address_of(r.view) <= a and a + len(area) <= address_of(r.view) + r.size
                                   for r in backend.memory.regions)
                    try:  # the rings are whatever the memfd holds: work or a QueueError
                        assert isinstance(session.process(vring.index, vring.queue), int)
                    except QueueError:
                        return  # Connection would fail here
    finally:
        for fd in backend.close():
            os.close(fd)


@pytest.fixture(scope="module")
def blk_device():
    with tempfile.TemporaryDirectory() as tmp:
        dev = BlkDevice("proto")
        dev.set_attribute("path", os.path.join(tmp, "disk.img"))
        dev.set_attribute("size", "1M")
        dev.set_attribute("shared", "1")
        yield dev


@pytest.fixture(scope="module")
def rng_device():
    dev = RngDevice("proto-rng")
    dev.set_attribute("rate", "1000000")
    return dev


@pytest.fixture(params=["blk", "rng"])
def any_device(request, blk_device, rng_device):
    """Each device class served by the daemon's connections, fed the same hostile input."""
    return blk_device if request.param == "blk" else rng_device


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    protocol=st.booleans(),
    prefix=st.integers(0, 10),
    messages=st.lists(hostile_msg, min_size=1, max_size=8),
)
def test_backend_handles_hostile_messages(any_device, protocol: bool, prefix: int, messages: list) -> None:
    fds_before = open_fds()
    session = any_device.open(os.getpid())
    try:
        play(session, valid_setup(protocol)[:prefix] + messages)
    finally:
        session.close()
    leaked = open_fds() - fds_before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


@pytest.mark.parametrize("request_", [Req.SET_VRING_CALL, Req.SET_VRING_ERR, Req.SET_VRING_KICK])
def test_ring_fd_for_a_missing_ring_is_not_leaked(blk_device, request_) -> None:
    """Regression: `_take_fd` pops the fd before `_vring()` checks the index (backend.py)."""
    fds_before = open_fds()
    session = blk_device.open(os.getpid())
    try:
        play(session, [msg(request_, U64.pack(1), ["eventfd"])])
    finally:
        session.close()
    assert not open_fds() - fds_before


@settings(max_examples=200, deadline=None)
@given(stream=st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(
        st.builds(lambda r, p, nr: encode(r, p, need_reply=nr), st.integers(0, 50), st.binary(max_size=64),
                  st.booleans()),
        st.builds(lambda r, f, s: HEADER.pack(r, f, s), u32, flags_st, st.one_of(st.integers(0, 80), u32)),
        st.binary(max_size=20),
    ), max_size=6).map(b"".join),
), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_framer_random_streams(stream: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def run(pieces):
        framer, out = Framer(), []
        try:
            for piece in pieces:
                t0 = time.monotonic()
                got = framer.feed(piece)
                assert time.monotonic() - t0 < 1.0
                assert all(isinstance(m, Message) for m in got)
                out += got
                assert len(framer.buffer) < HEADER.size + MAX_PAYLOAD + 1, "framer buffers unboundedly"
                assert 0 < framer.pending() <= HEADER.size + MAX_PAYLOAD
        except ProtocolError:
            return out, "error"
        return out, bytes(framer.buffer)

    whole, whole_end = run([stream[i : i + 1] for i in range(len(stream))])  # byte by byte
    chunked, chunked_end = run(chunks)
    # Chunking does not change what is understood (a feed that fails may drop the
    # messages it completed: the connection is broken anyway).
    key = [(m.request, m.flags, m.payload) for m in whole]
    assert [(m.request, m.flags, m.payload) for m in chunked] == key[: len(chunked)]
    assert (chunked_end == "error") == (whole_end == "error")
    if chunked_end != "error":
        assert len(chunked) == len(whole) and chunked_end == whole_end
    # The messages are exactly the stream's prefix, re-encoded.
    consumed = b"".join(HEADER.pack(m.request, m.flags, len(m.payload)) + m.payload for m in whole)
    assert stream.startswith(consumed)
    for m in whole:
        assert m.flags & 3 == VERSION and not m.flags & FLAG_REPLY and len(m.payload) <= MAX_PAYLOAD
    if whole_end != "error":
        assert consumed + whole_end == stream


def test_framer_refuses_oversized_payload_before_it_arrives() -> None:
    framer = Framer()
    with pytest.raises(ProtocolError):
        framer.feed(HEADER.pack(Req.SET_MEM_TABLE, VERSION, MAX_PAYLOAD + 1))
    framer = Framer()
    assert framer.feed(HEADER.pack(Req.SET_CONFIG, VERSION, MAX_PAYLOAD)) == []
    assert framer.pending() == MAX_PAYLOAD
    with pytest.raises(ProtocolError):
        Framer().feed(b"", list(range(100, 109)))  # more fds than one message may carry


# --------------------------------------------------------------------------------------
# 4. Through real sockets and threads: one hostile connection, one good one
# --------------------------------------------------------------------------------------

WAIT = 5.0


class Served:
    def __init__(self, device: BlkDevice, label: str) -> None:
        self.sock, self.peer = socket.socketpair()
        self.session = device.open(os.getpid())
        self.conn = Connection(self.sock, self.session, label, on_error=device.record_error)
        self.thread = threading.Thread(target=self.conn.serve, name=f"serve-{label}", daemon=True)
        self.thread.start()

    def client(self) -> BlkClient:
        return BlkClient(self.peer, depth=4, max_request=1 << 16, queue_size=64, timeout=WAIT)

    def wait_closed(self) -> None:
        assert self.conn.closed.wait(WAIT), "the backend did not close the hostile connection"
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert not self.conn.workers


def peer_sees_eof(sock: socket.socket) -> bool:
    sock.settimeout(WAIT)
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


class Traffic(threading.Thread):
    """The good client doing writes and read-backs until told to stop."""

    def __init__(self, client: BlkClient, base: int) -> None:
        super().__init__(daemon=True)
        self.client, self.base = client, base
        self.stopping = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                data = os.urandom(8192)
                self.client.write(self.base, data)
                assert self.client.read(self.base, 8192) == data
                self.rounds += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stopping.set()
        self.join(WAIT * 2)
        assert not self.is_alive(), "the good client hung"
        assert self.error is None, f"the good client failed: {self.error!r}"


CORRUPTIONS = ["garbage", "garbage_after_setup", "avail_jump", "head_range", "desc_outside", "loop",
               "indirect", "no_status", "log_too_small"]


def corrupt(kind: str, client: BlkClient, data: st.DataObject) -> None:
    area, lay, q = client.area.view, client.queue.layout, client.queue
    if kind == "avail_jump":
        jump = data.draw(st.integers(lay.size + 1, 0xFFFF), label="jump")
        U16.pack_into(area, lay.avail + 2, (q.avail_idx + jump) & 0xFFFF)
    elif kind == "head_range":
        head = data.draw(st.integers(lay.size, 0xFFFF), label="head")
        U16.pack_into(area, lay.avail + 4 + 2 * (q.avail_idx % lay.size), head)
        U16.pack_into(area, lay.avail + 2, (q.avail_idx + 1) & 0xFFFF)
    elif kind == "desc_outside":
        addr = data.draw(st.one_of(st.integers(client.area.size - 15, U64_MAX - 16),
                                   st.just(client.area.size)), label="addr")
        q.add([(addr, 16, False), (0x100, 1, True)], "bad")
        q.publish()
    elif kind == "loop":
        q.add([(0xF000, 16, False), (0xF100, 1, True)], "bad")
        head = U16.unpack_from(area, lay.avail + 4 + 2 * ((q.avail_idx - 1) % lay.size))[0]
        a, n, _f, _nx = DESC.unpack_from(area, lay.desc + 16 * head)
        DESC.pack_into(area, lay.desc + 16 * head, a, n, DESC_F_NEXT, head)
        q.publish()
    elif kind == "indirect":
        q.add([(0xF000, 16, False), (0xF100, 1, True)], "bad")
        head = U16.unpack_from(area, lay.avail + 4 + 2 * ((q.avail_idx - 1) % lay.size))[0]
        a, n, f, nx = DESC.unpack_from(area, lay.desc + 16 * head)
        DESC.pack_into(area, lay.desc + 16 * head, a, n, f | DESC_F_INDIRECT, nx)
        q.publish()
    elif kind == "no_status":
        vb.REQUEST_HEADER.pack_into(area, 0xF000, vb.T_IN, 0, 0)
        q.add([(0xF000, 16, False)], "bad")
        q.publish()
    elif kind == "log_too_small":  # a dirty log of one byte, 8 pages: the status byte is beyond
        fe = client.frontend
        fe.set_protocol_features(client.protocol_features | bit(ProtocolFeature.LOG_SHMFD))
        fd = os.memfd_create("log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 1)
            fe.set_log_base(fd, 1)
        finally:
            os.close(fd)
        fe.set_features(client.features | bit(F_LOG_ALL))
        vb.REQUEST_HEADER.pack_into(area, 0xF000, vb.T_IN, 0, 0)
        q.add([(0xF000, 16, False), (0xF100, 1, True)], "bad")
        q.publish()
    os.eventfd_write(client.ring.kick, 1)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(CORRUPTIONS), shared=st.booleans(), data=st.data())
def test_hostile_connection_does_not_hurt_its_neighbour(tmp_path, kind: str, shared: bool, data) -> None:
    fds_before = open_fds()
    _attack(tempfile.mkdtemp(dir=tmp_path), kind, shared, data)
    leaked = open_fds() - fds_before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


def _attack(tmp: str, kind: str, shared: bool, data) -> None:
    if shared:
        dev = BlkDevice("shared")
        dev.set_attribute("path", os.path.join(tmp, "shared.img"))
        dev.set_attribute("size", "4M")
        dev.set_attribute("shared", "1")
        bad_dev = good_dev = dev
    else:
        bad_dev, good_dev = BlkDevice("bad"), BlkDevice("good")
        for d in (bad_dev, good_dev):
            d.set_attribute("path", os.path.join(tmp, d.name + ".img"))
            d.set_attribute("size", "4M")
    good = Served(good_dev, "good")
    bad = Served(bad_dev, "bad")
    good_client = good.client()
    bad_client = None
    traffic = Traffic(good_client, 1 << 20)
    try:
        if kind != "garbage":
            bad_client = bad.client()
            bad_client.write(0, b"\x01" * 4096)
            assert bad_client.read(0, 4096) == b"\x01" * 4096
        errors_before = bad_dev.counters["errors"]
        traffic.start()
        deadline = time.monotonic() + WAIT
        while traffic.rounds < 2 and time.monotonic() < deadline and traffic.is_alive():
            time.sleep(0.001)
        assert traffic.rounds >= 2, "the good client made no progress before the attack"

        if kind.startswith("garbage"):
            junk = data.draw(st.binary(min_size=1, max_size=200), label="junk")
            # Whatever the junk started, the zeros complete it and then fail the version check.
            with contextlib.suppress(OSError):
                bad.peer.sendall(junk + bytes(HEADER.size + MAX_PAYLOAD + HEADER.size))
        else:
            corrupt(kind, bad_client, data)

        bad.wait_closed()
        assert peer_sees_eof(bad.peer), "the hostile peer's socket was not closed"
        assert bad_dev.counters["errors"] > errors_before
        assert bad_dev.last_error
        rounds = traffic.rounds
        deadline = time.monotonic() + WAIT
        while traffic.rounds < rounds + 2 and time.monotonic() < deadline and traffic.is_alive():
            time.sleep(0.001)
        traffic.finish()
        # ...and after: the good connection is still fully usable.
        assert not good.conn.closed.is_set()
        payload = os.urandom(3 * 4096)
        good_client.write(8192, payload)
        good_client.flush()
        assert good_client.read(8192, len(payload)) == payload
        if shared and bad_client is not None:
            assert good_client.read(0, 4096) == b"\x01" * 4096  # the bad session's valid write
    finally:
        traffic.stopping.set()
        if traffic.is_alive():
            traffic.join(WAIT)
        good_client.close()
        if bad_client is not None:
            with contextlib.suppress(OSError, BlkError):
                bad_client.close()
        else:
            bad.peer.close()
        for served in (good, bad):
            served.conn.closed.wait(WAIT)
            served.thread.join(WAIT)
    assert not good.thread.is_alive() and not bad.thread.is_alive()
    assert good_dev.counters["connections"] == 0 and bad_dev.counters["connections"] == 0


@pytest.mark.parametrize("ending", ["bad_header", "eof_mid_message"])
def test_fds_sent_with_broken_messages_are_closed(tmp_path, ending: str) -> None:
    """fds that arrive with a header the Framer refuses, or with a message the peer never
    finishes, are still closed when the connection ends (connection.py / messages.py)."""
    fds_before = open_fds()
    dev = BlkDevice("fds")
    dev.set_attribute("path", str(tmp_path / "fds.img"))
    dev.set_attribute("size", "1M")
    served = Served(dev, "fds")
    sent = [os.eventfd(0), os.eventfd(0)]
    if ending == "bad_header":
        socket.send_fds(served.peer, [HEADER.pack(Req.SET_MEM_TABLE, 0, 8)], sent)
    else:
        socket.send_fds(served.peer, [HEADER.pack(Req.SET_MEM_TABLE, VERSION, 40)[:8]], sent)
        served.peer.shutdown(socket.SHUT_WR)
    for fd in sent:
        os.close(fd)
    served.wait_closed()
    assert peer_sees_eof(served.peer)
    served.peer.close()
    del served
    leaked = open_fds() - fds_before
    assert not leaked, f"the backend kept {len(leaked)} received fds open"


def test_empty_writable_buffer_before_status_over_a_socket(tmp_path) -> None:
    """The chain of test_blk_empty_writable_buffer_before_the_status_byte, through a real
    Connection: the request must complete (or the connection be closed), never hang with a
    dead ring thread."""
    dev = BlkDevice("odd")
    dev.set_attribute("path", str(tmp_path / "odd.img"))
    dev.set_attribute("size", "1M")
    served = Served(dev, "odd")
    client = served.client()
    try:
        area, q = client.area.view, client.queue
        vb.REQUEST_HEADER.pack_into(area, 0xF000, vb.T_FLUSH, 0, 0)
        area[0xF100] = 0xFF
        q.add([(0xF000, 16, False), (0xF080, 0, True), (0xF100, 1, True)], "odd")
        q.publish()
        os.eventfd_write(client.ring.kick, 1)
        deadline = time.monotonic() + WAIT
        done = []
        while not done and not served.conn.closed.is_set() and time.monotonic() < deadline:
            done = q.completed()
            time.sleep(0.001)
        assert done or served.conn.closed.is_set(), "the request neither completed nor broke the connection"
        if done:
            assert done == [("odd", 1)] and area[0xF100] == vb.S_OK
        else:
            assert dev.counters["errors"] == 1
    finally:
        client.close()
        served.conn.closed.wait(WAIT)
        served.thread.join(WAIT)
