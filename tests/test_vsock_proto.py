"""The vsock wire format and the sans-I/O stream sockets, with a hostile guest.

No process and no VM: the state machine (devices/vsock_proto.py) is fed packets and host
bytes directly, and the tx/rx chain handling (devices/vsock.py) is fed checked views.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.devices.vsock import give_cid, read_packet, take_cid, write_packet
from alacrity.devices.vsock_proto import (
    BUF_ALLOC,
    MAX_REPLIES,
    TO_GUEST_MAX,
    GuestError,
    GuestSockets,
    Refused,
)
from alacrity.virtio import vsock as vs
from alacrity.virtio.device_queue import Chain
from alacrity.virtio.ring import QueueError
from alacrity.virtio.vsock import HDR_SIZE, Header

CID = 7
U32 = 0xFFFFFFFF


def hdr(op: int, src_port: int = 1000, dst_port: int = 80, length: int = 0, *, flags: int = 0,
        buf_alloc: int = 1 << 16, fwd_cnt: int = 0, src_cid: int = CID, dst_cid: int = vs.CID_HOST,
        type_: int = vs.TYPE_STREAM) -> Header:
    return Header(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt)


def drain(g: GuestSockets, room: int = HDR_SIZE + 4096) -> list[tuple[Header, bytes]]:
    out = []
    while (packet := g.pop_for_guest(room)) is not None:
        h = Header.parse(packet)
        assert h.len == len(packet) - HDR_SIZE
        assert h.src_cid == vs.CID_HOST and h.dst_cid == CID or h.op == vs.OP_RST
        out.append((h, packet[HDR_SIZE:]))
    return out


def events(g: GuestSockets) -> list[tuple[str, tuple[int, int], str]]:
    out = list(g.events)
    g.events.clear()
    return out


def host_opened(g: GuestSockets, port: int = 52, buf_alloc: int = 1 << 16) -> tuple[int, int]:
    key = g.host_connect(port)
    [(request, _)] = drain(g)
    assert request.op == vs.OP_REQUEST and request.dst_port == port and request.src_port == key[1]
    g.feed(hdr(vs.OP_RESPONSE, port, key[1], buf_alloc=buf_alloc), b"")
    assert events(g) == [("connected", key, "")]
    return key


# -- the header
def test_header_is_44_bytes_little_endian():
    h = Header(3, 2, 1024, 52, 5, 1, 5, 0, 65536, 9)
    data = h.pack()
    assert len(data) == 44 == vs.HDR_SIZE
    assert data[:8] == (3).to_bytes(8, "little") and data[8:16] == (2).to_bytes(8, "little")
    assert struct.unpack_from("<HH", data, 28) == (1, 5)
    assert Header.parse(data + b"rest") == h


@given(st.tuples(*[st.integers(0, (1 << 64) - 1)] * 2, *[st.integers(0, U32)] * 3,
                 *[st.integers(0, 0xFFFF)] * 2, *[st.integers(0, U32)] * 3))
def test_header_round_trips(fields):
    assert Header.parse(Header(*fields).pack()).fields() == fields


@pytest.mark.parametrize("index,value", [(0, -1), (0, 1 << 64), (2, 1 << 32), (4, -5), (5, 1 << 16),
                                         (6, 70000), (9, 1 << 32)])
def test_header_refuses_fields_that_do_not_fit(index, value):
    fields = list(Header(3, 2, 1, 2, 0, 1, 1, 0, 0, 0).fields())
    fields[index] = value
    with pytest.raises(ValueError):
        Header(*fields).pack()


@given(st.binary(max_size=43))
def test_a_short_header_is_refused(data):
    with pytest.raises(ValueError):
        Header.parse(data)


# -- connections the host opens
def test_host_connect_echo_and_close():
    g = GuestSockets(CID)
    key = host_opened(g)
    assert g.host_send(key, b"ping") == 4
    [(rw, data)] = drain(g)
    assert (rw.op, data, rw.dst_port, rw.src_port) == (vs.OP_RW, b"ping", 52, key[1])
    g.feed(hdr(vs.OP_RW, 52, key[1], 4), b"pong")
    assert events(g) == [("data", key, "")]
    assert g.to_host(key) == b"pong"
    g.host_sent(key, 4)
    assert g.to_host(key) == b""
    g.host_close(key)
    [(rst, _)] = drain(g)
    assert rst.op == vs.OP_RST and key not in g.conns


def test_a_refused_connect_is_reported():
    g = GuestSockets(CID)
    key = g.host_connect(9)
    drain(g)
    g.feed(hdr(vs.OP_RST, 9, key[1]), b"")
    assert events(g) == [("closed", key, "refused by the guest")]
    assert not g.conns


def test_host_to_guest_waits_for_credit_with_bounded_memory():
    g = GuestSockets(CID)
    key = host_opened(g, buf_alloc=10000)
    taken = 0
    while (room := g.host_room(key)) > 0:
        taken += g.host_send(key, b"x" * min(room, 7000))
        drain(g)
    # The guest's 10000 bytes of credit went out; then at most TO_GUEST_MAX is held.
    assert taken == 10000 + TO_GUEST_MAX
    assert g.host_send(key, b"more") == 0
    conn = g.conns[key]
    assert conn.tx_cnt == 10000 and conn.credit() == 0
    g.feed(hdr(vs.OP_CREDIT_UPDATE, 52, key[1], buf_alloc=10000, fwd_cnt=10000), b"")
    sent = sum(len(d) for _, d in drain(g))
    assert sent == 10000 and g.host_room(key) == 10000


def test_credit_arithmetic_wraps_at_32_bits():
    g = GuestSockets(CID)
    key = host_opened(g, buf_alloc=100)
    conn = g.conns[key]
    conn.tx_cnt = U32 - 10  # just before the wrap
    g.feed(hdr(vs.OP_CREDIT_UPDATE, 52, key[1], buf_alloc=100, fwd_cnt=U32 - 10), b"")
    g.host_send(key, b"y" * 50)
    assert sum(len(d) for _, d in drain(g)) == 50
    assert conn.tx_cnt == 39 and conn.credit() == 50  # (39 - (2^32 - 11)) mod 2^32 = 50 in flight


@given(buf_alloc=st.integers(0, U32), fwd_cnt=st.integers(0, U32), tx_cnt=st.integers(0, U32))
def test_a_lying_credit_never_lets_us_send_beyond_it(buf_alloc, fwd_cnt, tx_cnt):
    g = GuestSockets(CID)
    key = host_opened(g)
    conn = g.conns[key]
    conn.tx_cnt = tx_cnt
    g.feed(hdr(vs.OP_CREDIT_UPDATE, 52, key[1], buf_alloc=buf_alloc, fwd_cnt=fwd_cnt), b"")
    in_flight = (tx_cnt - fwd_cnt) & U32
    credit = conn.credit()
    assert 0 <= credit <= buf_alloc
    assert credit == (buf_alloc - in_flight if in_flight <= buf_alloc else 0)
    g.host_send(key, b"z" * TO_GUEST_MAX)
    assert sum(len(d) for _, d in drain(g)) == min(credit, TO_GUEST_MAX)


# -- connections the guest opens
def test_guest_connects_to_a_listening_host_port():
    g = GuestSockets(CID)
    g.listen(80)
    g.feed(hdr(vs.OP_REQUEST, 1000, 80), b"")
    [(response, _)] = drain(g)
    assert response.op == vs.OP_RESPONSE and response.buf_alloc == BUF_ALLOC
    assert events(g) == [("accept", (1000, 80), "")]


def test_guest_connects_to_a_port_nobody_listens_on():
    g = GuestSockets(CID)
    g.feed(hdr(vs.OP_REQUEST, 1000, 81), b"")
    [(rst, _)] = drain(g)
    assert rst.op == vs.OP_RST and g.stats.no_listener == 1 and not g.conns


def test_guest_beyond_its_credit_is_reset_and_memory_stays_bounded():
    g = GuestSockets(CID)
    g.listen(80)
    g.feed(hdr(vs.OP_REQUEST, 1000, 80), b"")
    drain(g)
    chunk = b"d" * (64 << 10)
    for _ in range(BUF_ALLOC // len(chunk)):
        g.feed(hdr(vs.OP_RW, 1000, 80, len(chunk)), chunk)
    assert len(g.to_host((1000, 80))) == BUF_ALLOC  # the host reader has stopped
    g.feed(hdr(vs.OP_RW, 1000, 80, 1), b"!")
    assert g.stats.credit_violations == 1 and (1000, 80) not in g.conns
    assert drain(g)[-1][0].op == vs.OP_RST


def test_credit_update_after_the_host_reads():
    g = GuestSockets(CID)
    g.listen(80)
    g.feed(hdr(vs.OP_REQUEST, 1000, 80), b"")
    drain(g)
    data = b"q" * (BUF_ALLOC // 2)
    g.feed(hdr(vs.OP_RW, 1000, 80, len(data)), data)
    g.host_sent((1000, 80), len(data))
    [(update, _)] = drain(g)
    assert update.op == vs.OP_CREDIT_UPDATE and update.fwd_cnt == len(data)
    g.feed(hdr(vs.OP_CREDIT_REQUEST, 1000, 80), b"")
    [(update, _)] = drain(g)
    assert update.op == vs.OP_CREDIT_UPDATE


def test_shutdown_both_ways_ends_with_rst():
    g = GuestSockets(CID)
    key = host_opened(g)
    g.feed(hdr(vs.OP_RW, 52, key[1], 3), b"bye")
    g.feed(hdr(vs.OP_SHUTDOWN, 52, key[1], flags=vs.SHUTDOWN_BOTH), b"")
    assert key in g.conns  # "bye" is not delivered yet
    g.host_sent(key, 3)
    assert key not in g.conns and drain(g)[-1][0].op == vs.OP_RST
    assert [e[0] for e in events(g)] == ["data", "eof", "closed"]


def test_host_eof_sends_shutdown_after_the_data():
    g = GuestSockets(CID)
    key = host_opened(g)
    g.host_send(key, b"last")
    g.host_shutdown(key)
    packets = drain(g)
    assert [(h.op, h.flags) for h, _ in packets] == [(vs.OP_RW, 0), (vs.OP_SHUTDOWN, vs.SHUTDOWN_SEND)]


# -- hostile guests
@pytest.mark.parametrize("src_cid,dst_cid", [(CID + 1, 2), (3, 2), (CID, 3), (CID, 0), (CID, CID),
                                             (CID, 1 << 63)])
def test_wrong_cids_are_reset_and_counted_never_delivered(src_cid, dst_cid):
    g = GuestSockets(CID)
    g.listen(80)
    g.feed(hdr(vs.OP_REQUEST, 1000, 80, src_cid=src_cid, dst_cid=dst_cid), b"")
    [(rst, _)] = drain(g)
    assert rst.op == vs.OP_RST and g.stats.bad_cid == 1 and not g.conns and not events(g)


def test_packets_for_unknown_connections_get_rst():
    g = GuestSockets(CID)
    for op in (vs.OP_RW, vs.OP_RESPONSE, vs.OP_SHUTDOWN, vs.OP_CREDIT_UPDATE, vs.OP_CREDIT_REQUEST, 99):
        g.feed(hdr(op, 1000, 80), b"")
    g.feed(hdr(vs.OP_RST, 1000, 80), b"")  # never an RST for an RST
    assert [h.op for h, _ in drain(g)] == [vs.OP_RST] * 6
    assert g.stats.no_connection == 6


def test_unknown_op_and_type_reset_the_connection():
    g = GuestSockets(CID)
    key = host_opened(g)
    g.feed(hdr(42, 52, key[1]), b"")
    assert key not in g.conns and g.stats.bad_packets == 1
    g.feed(hdr(vs.OP_REQUEST, 5, 80, type_=vs.TYPE_SEQPACKET), b"")
    assert g.stats.bad_packets == 2


def test_a_guest_that_never_reads_rx_cannot_grow_our_replies():
    g = GuestSockets(CID)
    g.listen(80)
    for port in range(10 * MAX_REPLIES):
        g.feed(hdr(vs.OP_RW, port, 9), b"")  # RST for each, until the queue is full
        g.feed(hdr(vs.OP_REQUEST, port, 80), b"")
        g.feed(hdr(vs.OP_RST, port, 80), b"")
    assert len(g.replies) <= MAX_REPLIES + 1
    assert g.stats.resets_dropped > 0 and len(g.conns) == 0


def test_connection_limits():
    g = GuestSockets(CID, max_connections=4)
    keys = [g.host_connect(1) for _ in range(4)]
    assert len(set(keys)) == 4
    with pytest.raises(Refused):
        g.host_connect(1)
    with pytest.raises(Refused):
        g.host_connect(1 << 32)


def test_an_rx_buffer_too_small_for_a_header_breaks_the_device():
    g = GuestSockets(CID)
    g.host_connect(1)
    with pytest.raises(GuestError):
        g.pop_for_guest(HDR_SIZE - 1)


OPS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0xFFFF])


@st.composite
def guest_packet(draw):
    length = draw(st.integers(0, 3000))
    return Header(
        draw(st.sampled_from([CID, CID, CID, 0, 2, 3, (1 << 64) - 1])),
        draw(st.sampled_from([2, 2, 2, 0, 1, CID, 0xFFFFFFFF])),
        draw(st.integers(0, 3)), draw(st.sampled_from([52, 80, 1 << 30, (1 << 30) + 1])),
        length, draw(st.sampled_from([1, 1, 1, 2, 0, 0xFFFF])), draw(OPS),
        draw(st.integers(0, 3)), draw(st.sampled_from([0, 1, 4096, 1 << 18, U32])),
        draw(st.sampled_from([0, 1, 4096, U32, U32 - 5])),
    ), b"g" * length


host_action = st.one_of(
    st.tuples(st.just("connect"), st.integers(0, 3)),
    st.tuples(st.just("listen"), st.sampled_from([52, 80, 1 << 30])),
    st.tuples(st.just("send"), st.integers(0, 5000)),
    st.tuples(st.just("sent"), st.integers(0, 5000)),
    st.tuples(st.just("shutdown"), st.just(0)),
    st.tuples(st.just("close"), st.just(0)),
    st.tuples(st.just("pop"), st.integers(HDR_SIZE, HDR_SIZE + 5000)),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.one_of(guest_packet(), host_action), max_size=60))
def test_any_sequence_keeps_the_invariants(steps):
    """Whatever the guest sends and the host does: no exception but the documented ones,
    every packet we emit is well formed and addressed to the guest, connections and
    buffers stay within their bounds, and no credit is exceeded."""
    g = GuestSockets(CID, max_connections=8)
    g.listen(80)
    sent_to: dict[tuple[int, int], int] = {}
    for step in steps:
        if isinstance(step[0], Header):
            g.feed(*step)
        else:
            what, n = step
            keys = list(g.conns)
            key = keys[n % len(keys)] if keys else (0, 0)
            if what == "connect":
                try:
                    g.host_connect(n)
                except Refused:
                    assert len(g.conns) == 8
            elif what == "send":
                room = g.host_room(key)
                assert g.host_send(key, b"h" * n) == min(n, room)
            elif what == "sent":
                g.host_sent(key, min(n, len(g.to_host(key))))
            elif what == "listen":
                g.listen(n)
            elif what == "shutdown":
                g.host_shutdown(key)
            elif what == "close":
                g.host_close(key)
            else:
                promised = g.has_output()
                packet = g.pop_for_guest(n)
                assert (packet is not None) == promised  # the device pops a chain on the promise
                if packet is not None:
                    assert len(packet) <= n
                    h = Header.parse(packet)
                    assert h.len == len(packet) - HDR_SIZE and h.src_cid == vs.CID_HOST or h.op == vs.OP_RST
                    if h.op == vs.OP_RW:
                        assert h.dst_cid == CID and h.type == vs.TYPE_STREAM
                        k = (h.dst_port, h.src_port)
                        sent_to[k] = sent_to.get(k, 0) + h.len
        assert len(g.conns) <= 8
        assert len(g.replies) <= MAX_REPLIES + 3 * 8
        for conn in g.conns.values():
            assert len(conn.to_host) <= BUF_ALLOC and len(conn.to_guest) <= TO_GUEST_MAX
            assert conn.credit() <= conn.peer_buf_alloc


# -- packets in chains, as the rings give them
def chain(*parts: bytes, writable: tuple[int, ...] = ()) -> Chain:
    return Chain(0, [memoryview(bytearray(p)) for p in parts], [memoryview(bytearray(n)) for n in writable])


def test_read_packet_gathers_header_and_payload_across_buffers():
    h = hdr(vs.OP_RW, length=5).pack()
    header, payload = read_packet(chain(h[:10], h[10:] + b"he", b"llo", b"trailing"))
    assert header.len == 5 and payload == b"hello"


@given(claim=st.integers(0, U32), have=st.integers(0, 100))
def test_a_lying_len_breaks_the_device(claim, have):
    h = hdr(vs.OP_RW, length=claim).pack()
    if claim <= have and claim <= BUF_ALLOC:
        assert read_packet(chain(h, b"p" * have))[1] == b"p" * claim
    else:
        with pytest.raises(QueueError):
            read_packet(chain(h, b"p" * have))


@given(cut=st.integers(0, HDR_SIZE - 1))
def test_a_chain_shorter_than_a_header_breaks_the_device(cut):
    with pytest.raises(QueueError):
        read_packet(chain(hdr(vs.OP_RW).pack()[:cut]))


def test_write_packet_spreads_over_buffers():
    c = chain(writable=(10, 40, 100))
    packet = hdr(vs.OP_RW, length=6).pack() + b"abcdef"
    assert write_packet(c, packet) == 50
    assert b"".join(bytes(v) for v in c.writable)[:50] == packet


def test_cids_are_unique_while_taken():
    a, b = take_cid(1000), take_cid(1000)
    assert {a, b} == {1000, 1001}
    give_cid(a)
    assert take_cid(1000) == 1000
    give_cid(1000)
    give_cid(b)


# -- a session's rings, fed by a hostile driver (no process: the queues over a bytearray)
class FlatMemory:
    """Guest memory at guest-physical 0; `gpa` checks every range, as MemoryTable does."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)

    def gpa(self, addr: int, length: int) -> memoryview:
        if addr < 0 or length < 0 or addr + length > len(self.data):
            raise QueueError(f"range {addr:#x}+{length} outside memory")
        return self.view[addr : addr + length]


def rings(memory: FlatMemory, size: int = 16):
    from alacrity.virtio.device_queue import DeviceQueue
    from alacrity.virtio.driver_queue import DriverQueue, RingLayout

    pair = []
    offset = 0
    for _ in range(2):
        layout = RingLayout.at(offset, size)
        offset = layout.end
        driver = DriverQueue(memory.view, layout, event_idx=True)
        device = DeviceQueue(memory, size, memory.gpa(layout.desc, layout.avail - layout.desc),
                             memory.gpa(layout.avail, layout.used - layout.avail),
                             memory.gpa(layout.used, layout.end - layout.used), event_idx=True)
        pair.append((driver, device))
    return pair, (offset + 4095) & ~4095


tx_part = st.one_of(
    st.binary(max_size=100),
    st.builds(lambda h, tail: h.pack() + tail, st.builds(
        Header, st.sampled_from([CID, CID, 9]), st.sampled_from([2, 2, 5]), st.integers(0, 3),
        st.sampled_from([80, 1 << 30]), st.one_of(st.integers(0, 64), st.integers(0, U32)),
        st.sampled_from([1, 1, 2, 7]), st.integers(0, 9), st.integers(0, 3), st.integers(0, U32),
        st.integers(0, U32)), st.binary(max_size=64)),
)


@settings(max_examples=200, deadline=None)
@given(packets=st.lists(st.tuples(tx_part, st.integers(1, 3)), max_size=12),
       rx_sizes=st.lists(st.sampled_from([0, 1, 43, 44, 45, 100, 4140]), max_size=12))
def test_a_session_survives_any_tx_and_rx_buffers(packets, rx_sizes):
    """Whatever the driver puts in its rings, the session either serves it or raises
    QueueError (which breaks only that connection), and every rx packet is well formed."""
    from alacrity.devices.vsock import RX, TX, VsockDevice, VsockSession

    device = VsockDevice("t")
    session = VsockSession(device, CID, "t", 1)
    memory = FlatMemory(1 << 18)
    ((rx_driver, rx_queue), (tx_driver, tx_queue)), base = rings(memory)
    session.sockets.listen(80)
    session.sockets.host_connect(52)  # something for the guest besides replies
    try:
        addr = base
        for data, pieces in packets:
            cut = [len(data) * i // pieces for i in range(pieces + 1)]
            chain = []
            for a, b in zip(cut, cut[1:], strict=False):
                memory.data[addr : addr + b - a] = data[a:b]
                chain.append((addr, b - a, False))
                addr += b - a
            if tx_driver.free_count() >= len(chain):
                tx_driver.add(chain, None)
        tx_driver.publish()
        for size in rx_sizes:
            if rx_driver.free_count():
                rx_driver.add([(addr, size, True)], (addr, size))
                addr += size
        rx_driver.publish()
        try:
            session.process(TX, tx_queue)
            session.process(RX, rx_queue)
        except QueueError:
            return
        for (where, size), written in rx_driver.completed():
            assert HDR_SIZE <= written <= size
            h = Header.parse(memory.data[where : where + written])
            assert h.len == written - HDR_SIZE and h.dst_cid in (CID, 9) or h.op == vs.OP_RST
    finally:
        session.close()
