"""The switch's forwarding engine, sans-I/O: ports are NetDrivers and DeviceQueues over
bytearray "guest memory", so every test is deterministic and needs no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alacrity.client.net import NetDriver
from alacrity.switch.engine import Engine
from alacrity.switch.fdb import Fdb
from alacrity.switch.port import TX, Port
from alacrity.vhost_user.memory import Region
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.features import F_VERSION_1, bit
from alacrity.virtio.ring import DESC, AddressError, avail_ring_size, desc_table_size, used_ring_size

BROADCAST = b"\xff" * 6
BASE_FEATURES = bit(F_VERSION_1) | bit(vn.F_MRG_RXBUF)


class Memory:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.regions = [Region(0, size, 0, self.view)]  # as in a MemoryTable: the native engine maps them

    def gpa(self, addr: int, length: int) -> memoryview:
        if addr < 0 or length < 0 or addr + length > len(self.buf):
            raise AddressError(f"{addr:#x}+{length:#x} outside the memory")
        return self.view[addr : addr + length]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Host:
    """One port: a driver (the 'guest') and the switch's Port over the same memory."""

    def __init__(self, port_id: int, *, queue_size: int = 64, rx_buffer: int = 2048,
                 features: int = BASE_FEATURES, stock: bool = True, tx_slot: int = 2048,
                 mtu: int = 1500) -> None:
        self.mac = bytes([2, 0, 0, 0, 0, port_id])
        size = NetDriver.area_size(queue_size, rx_buffer, tx_slot)
        self.mem = Memory(size)
        self.driver = NetDriver(self.mem.view, queue_size=queue_size, rx_buffer=rx_buffer, tx_slot=tx_slot)
        self.port = Port(port_id, mac=self.mac, features=features, mtu=mtu)
        self.port.rx = self._device(self.driver.rx_layout)
        self.port.tx = self._device(self.driver.tx_layout)
        self.signals: list[int] = []
        self.port.signal = self.signals.append  # type: ignore[method-assign]
        if stock:
            self.driver.stock_rx()

    def _device(self, lay) -> DeviceQueue:
        v = self.mem.view
        return DeviceQueue(
            self.mem, lay.size, v[lay.desc : lay.desc + desc_table_size(lay.size)],
            v[lay.avail : lay.avail + avail_ring_size(lay.size)],
            v[lay.used : lay.used + used_ring_size(lay.size)], event_idx=True,
        )

    def send(self, dst: bytes, payload: bytes = b"hello", header: bytes | None = None) -> None:
        assert self.driver.add_tx(frame(dst, self.mac, payload), header)
        self.driver.publish_tx()

    def send_raw(self, raw: bytes, header: bytes | None = None) -> None:
        """Send a whole frame as it is (its own addresses), with an optional virtio-net header."""
        assert self.driver.add_tx(raw, header)
        self.driver.publish_tx()

    def received(self) -> list[bytes]:
        frames = self.driver.reap_rx()
        self.driver.stock_rx()
        self.driver.reap_tx()
        return frames

    def received_with_headers(self) -> list[tuple[vn.NetHeader, bytes]]:
        """Like `received`, with each frame's virtio-net header (read by hand, not by NetDriver)."""
        d = self.driver
        out, parts, want, header = [], [], 0, None
        for slot, written in d.rxq.completed():
            data = bytes(d.area[d.rx_base + slot * d.rx_buffer : d.rx_base + slot * d.rx_buffer + written])
            if not parts:
                header = vn.NetHeader.parse(data[:12])
                want = header.num_buffers
            parts.append(data)
            if len(parts) == want:
                out.append((header, b"".join(parts)[12:]))
                parts = []
        assert not parts, "a frame's buffers were not all completed"
        d.stock_rx()
        d.reap_tx()
        return out


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x88\xb5" + payload


#: The engine class `make()` builds; tests/test_switch_native.py runs these tests again with NativeEngine.
ENGINE: type[Engine] = Engine


def make(n: int, **kw) -> tuple[Engine, list[Host], Clock]:
    clock = Clock()
    engine = ENGINE(Fdb(ageing_s=300), clock=clock)
    hosts = [Host(i + 1, **kw) for i in range(n)]
    for h in hosts:
        engine.add_port(h.port)
    return engine, hosts, clock


# -- wire format and FDB
def test_header_round_trip_and_config():
    hdr = vn.NetHeader(1, vn.GSO_TCPV4, 54, 1448, 34, 16, 3)
    assert len(hdr.pack()) == 12 and vn.NetHeader.parse(hdr.pack()) == hdr
    assert vn.NetHeader.parse(hdr.pack(10)) == vn.NetHeader(1, vn.GSO_TCPV4, 54, 1448, 34, 16, 1)
    mac = vn.parse_mac("52:54:00:12:34:56")
    assert vn.parse_config(vn.pack_config(mac, mtu=9000)) == (mac, vn.S_LINK_UP, 1, 9000)
    assert vn.mac_text(mac) == "52:54:00:12:34:56"
    assert vn.header_size(bit(F_VERSION_1)) == 12 and vn.header_size(0) == 10
    with pytest.raises(ValueError):
        vn.parse_mac("52:54:00")


def test_fdb_learns_ages_moves_and_is_bounded():
    fdb = Fdb(ageing_s=10, max_entries=3)
    a, b = b"\x02" * 6, b"\x04" * 6
    fdb.learn(a, 1, 0.0)
    assert fdb.lookup(a, 5.0) == 1
    fdb.learn(a, 2, 6.0)
    assert fdb.lookup(a, 7.0) == 2 and fdb.moves == 1
    assert fdb.lookup(a, 17.0) is None  # aged out
    fdb.learn(BROADCAST, 1, 0.0)
    assert len(fdb) == 0  # group addresses are never learned
    for i in range(10):
        fdb.learn(bytes([2, 0, 0, 0, 0, i]), 3, 20.0 + i)
    assert len(fdb) == 3 and fdb.evictions == 7
    assert [e.mac for e in fdb.entries(30.0)] == [f"02:00:00:00:00:0{i}" for i in (7, 8, 9)]
    fdb.learn(b, 4, 30.0)
    fdb.forget_port(3)
    assert [(e.mac, e.port) for e in fdb.entries(30.0)] == [("04:04:04:04:04:04", 4)]


# -- forwarding
def test_unknown_floods_then_learning_gives_unicast():
    engine, (a, b, c), _ = make(3)
    a.send(b.mac, b"first")
    assert engine.poll_once() == 1
    assert b.received() == [frame(b.mac, a.mac, b"first")]
    assert c.received() == [frame(b.mac, a.mac, b"first")]  # flooded: b unknown yet
    b.send(a.mac, b"reply")
    engine.poll_once()
    assert a.received() == [frame(a.mac, b.mac, b"reply")]
    assert c.received() == []  # a was learned
    a.send(b.mac, b"again")
    engine.poll_once()
    assert b.received() == [frame(b.mac, a.mac, b"again")] and c.received() == []
    assert {(e.mac, e.port) for e in engine.fdb.entries(engine.clock())} == {
        (vn.mac_text(a.mac), 1), (vn.mac_text(b.mac), 2)}
    assert a.port.tx_packets == 2 and b.port.rx_packets == 2 and c.port.rx_packets == 1


def test_broadcast_floods_to_all_others_only():
    engine, hosts, _ = make(4)
    hosts[0].send(BROADCAST, b"arp?")
    engine.poll_once()
    assert hosts[0].received() == []
    for h in hosts[1:]:
        assert h.received() == [frame(BROADCAST, hosts[0].mac, b"arp?")]


def test_learned_entry_ages_out_and_floods_again():
    engine, (a, b, c), clock = make(3)
    b.send(a.mac)
    engine.poll_once()
    for h in (a, b, c):
        h.received()
    a.send(b.mac)
    engine.poll_once()
    assert c.received() == []
    clock.now += 301
    a.send(b.mac)
    engine.poll_once()
    assert len(c.received()) == 1


def test_signals_once_per_batch():
    engine, (a, b), _ = make(2)
    b.send(a.mac)
    engine.poll_once()
    a.received()
    a.driver.rxq.enable_interrupts()  # a wants to hear about new frames
    a.signals.clear()
    for i in range(20):
        b.send(a.mac, bytes([i]) * 10)
    assert engine.poll_once() == 20
    assert a.signals.count(0) == 1  # one RX interrupt for the batch of 20
    assert len(a.received()) == 20


def deferring(defer_s: float = 0.001) -> tuple[Engine, Host, Host, Clock]:
    """Two hosts on 16-entry rings that know each other, B asking for TX interrupts, and
    TX interrupt decisions deferred up to `defer_s`."""
    engine, (a, b), clock = make(2, queue_size=16)
    a.send(b.mac)
    b.send(a.mac)
    engine.poll_once()
    a.received()
    b.received()
    engine.tx_defer_s = defer_s
    b.driver.txq.enable_interrupts()
    b.signals.clear()
    return engine, a, b, clock


def test_a_tx_interrupt_decision_waits_its_bound_and_is_then_taken():
    """A sender's TX interrupt is decided tx_defer_s after its frame went, not at once; the
    driver did not collect its buffer meanwhile, so it gets the interrupt it asked for."""
    engine, a, b, clock = deferring()
    b.send(a.mac, b"one")
    engine.poll_once()
    assert b.signals == [] and engine.next_decision() == pytest.approx(clock.now + 0.001)
    clock.now += 0.0009
    engine.poll_once()
    assert b.signals == []
    clock.now += 0.0002
    engine.poll_once()
    assert b.signals == [TX] and engine.next_decision() is None
    assert engine.tx_decisions() == (1, 0)
    assert a.received() == [frame(a.mac, b.mac, b"one")]


def test_a_sender_that_collected_its_buffers_needs_no_tx_interrupt():
    """The driver took its completed buffer back by itself (as Linux does when it sends the
    next frame) and asked for an interrupt only past it: the deferred decision finds none due."""
    engine, a, b, clock = deferring()
    b.send(a.mac, b"one")
    engine.poll_once()
    b.driver.reap_tx()
    b.driver.txq.enable_interrupts()  # used_event moves past what it took
    clock.now += 0.0011
    engine.poll_once()
    assert b.signals == [] and engine.tx_decisions() == (1, 1)


def test_a_quarter_of_the_tx_ring_waiting_is_decided_at_once():
    """However short the wait, a driver never lacks a quarter of its TX ring because of it."""
    engine, a, b, clock = deferring(defer_s=0.01)
    for i in range(3):
        b.send(a.mac, bytes([i]))
    engine.poll_once()
    assert b.signals == []
    b.send(a.mac, b"fourth")  # 4 of 16 waiting to be reported
    engine.poll_once()
    assert b.signals == [TX] and engine.next_decision() is None


def test_a_gone_port_takes_its_deferred_decision_with_it():
    engine, a, b, clock = deferring()
    b.send(a.mac)
    engine.poll_once()
    engine.remove_port(b.port.id)
    clock.now += 0.0011
    engine.poll_once()
    assert b.signals == [] and engine.next_decision() is None


def test_mergeable_buffers_spread_a_frame_and_count_them():
    engine, (a, b), _ = make(2, rx_buffer=256)
    payload = bytes(range(256)) * 5 + b"tail"
    a.send(b.mac, payload)
    engine.poll_once()
    # 12-byte header + 1298-byte frame over 256-byte buffers: six buffers, said in the header
    assert b.port.rx.used_idx == 6
    first = b.driver.rx_base  # descriptor 0 is handed out first
    assert vn.NetHeader.parse(b.driver.area[first : first + 12]).num_buffers == 6
    assert b.received() == [frame(b.mac, a.mac, payload)]


def test_full_rx_ring_is_a_counted_drop_and_frees_nothing():
    engine, (a, b), _ = make(2, queue_size=8, rx_buffer=256)
    b.driver.reap_rx()
    for _ in range(3):
        a.send(b.mac, bytes(700))  # needs 3 buffers each; 8 buffers hold two
    engine.poll_once()
    assert b.port.rx_packets == 2 and b.port.rx_dropped == 1
    assert len(b.received()) == 2
    a.send(b.mac, bytes(700))
    engine.poll_once()
    assert len(b.received()) == 1  # after restocking, frames flow again


def test_stalled_receiver_costs_drops_not_throughput():
    engine, (a, b, c), _ = make(3, queue_size=32)
    for _ in range(40):  # c never reads: its 32 buffers fill, then every flood to it is a drop
        a.send(BROADCAST)
        engine.poll_once()
        a.received(), b.received()
    assert c.port.rx_dropped == 8
    b.send(a.mac)
    a.send(b.mac)
    engine.poll_once()
    a.received(), b.received()
    for i in range(500):
        a.send(b.mac, i.to_bytes(4, "little"))
        b.send(a.mac, i.to_bytes(4, "little"))
        engine.poll_once()
        assert len(a.received()) == 1 and len(b.received()) == 1
    assert c.port.rx_packets == 32 and engine.broken == []


def test_partial_checksum_goes_whole_or_completed():
    offloads = BASE_FEATURES | bit(vn.F_CSUM) | bit(vn.F_GUEST_CSUM)
    engine, (a, b), _ = make(2, features=offloads)
    c = Host(3)
    engine.add_port(c.port)
    hdr = vn.NetHeader(vn.HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 6).pack()
    payload = bytes(range(40))
    a.send(BROADCAST, payload, header=hdr)
    engine.poll_once()
    # b took partial checksums: the frame as sent, flag and all
    assert b.received_with_headers() == [(vn.NetHeader(vn.HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 6, 1),
                                          frame(BROADCAST, a.mac, payload))]
    # c did not: the sum from byte 14 on is folded into bytes 20-21, which held the "pseudo-header"
    # sum (0x0607 here) that a receiver adds back when it checks
    (head, got), = c.received_with_headers()
    assert head.flags == 0 and head.gso_type == 0 and got[:20] == frame(BROADCAST, a.mac, payload)[:20]
    total = 0x0607 + sum(struct.unpack("!20H", got[14:]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF and got[22:] == payload[8:]
    assert c.port.rx_dropped_offload == 0 and engine.broken == [] and engine.completed == 1


def test_self_addressed_and_lonely_frames_are_counted():
    engine, (a,), _ = make(1)
    a.send(BROADCAST)
    engine.poll_once()
    assert a.port.tx_dropped == 1 and a.port.tx_packets == 1


# -- hostile drivers
def exchange_still_works(engine: Engine, x: Host, y: Host) -> None:
    x.received(), y.received()
    x.send(y.mac, b"ping")
    y.send(x.mac, b"pong")
    engine.poll_once()
    assert x.received()[-1].endswith(b"pong") and y.received()[-1].endswith(b"ping")


def test_bad_descriptor_breaks_only_that_port():
    engine, (a, b, bad), _ = make(3)
    bad.send(a.mac)
    lay = bad.driver.tx_layout
    head = struct.unpack_from("<H", bad.mem.buf, lay.avail + 4)[0]
    addr, length, flags, nxt = DESC.unpack_from(bad.mem.buf, lay.desc + 16 * head)
    DESC.pack_into(bad.mem.buf, lay.desc + 16 * head, 1 << 40, length, flags, nxt)
    engine.poll_once()
    broken = engine.take_broken()
    assert [p.id for p in broken] == [3] and "outside" in broken[0].broken
    assert 3 not in engine.ports
    exchange_still_works(engine, a, b)


def test_bad_rx_ring_breaks_the_receiver_not_the_sender():
    engine, (a, bad), _ = make(2)
    lay = bad.driver.rx_layout
    struct.pack_into("<H", bad.mem.buf, lay.avail + 2, 60000)  # avail index jumps
    c = Host(3)
    engine.add_port(c.port)
    a.send(BROADCAST)
    engine.poll_once()
    assert [p.id for p in engine.take_broken()] == [2]
    assert len(c.received()) == 1
    exchange_still_works(engine, a, c)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flags=st.integers(0, 255),
    gso_type=st.sampled_from([0, 1, 3, 4, 0x81, 5, 0xFF]),
    hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 0xFFFF),
    csum_offset=st.integers(0, 0xFFFF),
    payload=st.integers(0, 1600),
)
def test_absurd_headers_break_only_the_liar(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                                            payload):
    everything = BASE_FEATURES | bit(vn.F_CSUM) | bit(vn.F_HOST_TSO4) | bit(vn.F_HOST_TSO6)
    engine, (a, b), _ = make(2, queue_size=16)
    liar = Host(3, queue_size=16, features=everything)
    engine.add_port(liar.port)
    header = struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
    liar.send(BROADCAST, bytes(payload), header=header)
    engine.poll_once()
    length = 14 + payload
    broken = engine.take_broken()
    if broken:
        assert [p.id for p in broken] == [3]
    else:  # whatever passed is a believable header for this frame
        assert hdr_len <= length and length <= 1518 + (65535 if gso_type else 0)
        if gso_type:
            assert 0 < gso_size < length and hdr_len < length
        if flags & 1:
            assert csum_start + csum_offset + 2 <= length
    assert hdr_len <= length or broken
    assert gso_size < length or gso_type == 0 and gso_size == 0 or broken
    exchange_still_works(engine, a, b)


@settings(max_examples=200, deadline=None)
@given(chains=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 5000), st.integers(0, 7),
                                 st.integers(0, 70)), min_size=1, max_size=8))
def test_random_tx_descriptors_break_only_their_port(chains):
    engine, (a, b), _ = make(2, queue_size=16)
    bad = Host(3, queue_size=64)
    engine.add_port(bad.port)
    lay = bad.driver.tx_layout
    for i, (addr, length, flags, nxt) in enumerate(chains):
        DESC.pack_into(bad.mem.buf, lay.desc + 16 * i, addr, length, flags, nxt)
        struct.pack_into("<H", bad.mem.buf, lay.avail + 4 + 2 * i, i)
    struct.pack_into("<H", bad.mem.buf, lay.avail + 2, len(chains))
    engine.poll_once()
    assert [p.id for p in engine.take_broken()] in ([], [3])
    exchange_still_works(engine, a, b)
