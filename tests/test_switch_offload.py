"""Software offloads (switch/offload.py) and the engine's use of them: checksum completion
and TCP segmentation, checked against an independent reference (RFC 1071 checksums by
hand, header fields read back by hand), and hostile headers that must break only their
sender."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alacrity.switch import offload
from alacrity.switch.offload import PortFault, Unsegmentable, complete_csum, parse_gso, segment_tcp
from alacrity.virtio import net as vn
from alacrity.virtio.features import bit
from tests.test_switch_engine import BASE_FEATURES, Host, exchange_still_works, make

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
IP4_A, IP4_B = bytes([10, 1, 2, 3]), bytes([10, 1, 2, 4])
IP6_A = bytes.fromhex("fd000000000000000000000000000001")
IP6_B = bytes.fromhex("fd000000000000000000000000000002")
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
TSO_TX = BASE_FEATURES | bit(vn.F_CSUM) | bit(vn.F_HOST_TSO4) | bit(vn.F_HOST_TSO6)
TSO_RX = BASE_FEATURES | bit(vn.F_GUEST_CSUM) | bit(vn.F_GUEST_TSO4) | bit(vn.F_GUEST_TSO6)


# -- an independent reference: RFC 1071 with an explicit end-around carry
def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def fold_pseudo(pseudo: bytes) -> int:
    return ref_sum(pseudo)


# -- frames built by hand
class Built:
    """A TCP frame and where its parts are."""

    def __init__(self, frame: bytes, l3: int, l4: int, payload_at: int, v6: bool) -> None:
        self.frame, self.l3, self.l4, self.payload_at, self.v6 = frame, l3, l4, payload_at, v6

    def header(self, mss: int, *, gso_type: int | None = None, hdr_len: int | None = None) -> tuple:
        kind = gso_type if gso_type is not None else (vn.GSO_TCPV6 if self.v6 else vn.GSO_TCPV4)
        return (vn.HDR_F_NEEDS_CSUM, kind, self.payload_at if hdr_len is None else hdr_len, mss,
                self.l4, 16)

    def packed(self, mss: int, **kw) -> bytes:
        return vn.HEADER.pack(*self.header(mss, **kw), 0)


def pseudo_header(v6: bool, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if v6:
        return src + dst + struct.pack("!IxxxB", length, proto)
    return src + dst + struct.pack("!xBH", proto, length)


def build_tcp(payload: bytes, *, v6: bool = False, seq: int = 1000, ack: int = 77, flags: int = ACK | PSH,
              ip_id: int = 0x1234, tcp_options: bytes = b"", ip_options: bytes = b"", ext: bool = False,
              vlan: bool = False, partial: bool = True, src: bytes = MAC_A, dst: bytes = MAC_B) -> Built:
    """Ethernet (+ a VLAN tag) + IPv4 (+ options) or IPv6 (+ hop-by-hop and destination options)
    + TCP (+ options) + payload. With `partial`, the TCP checksum field holds the pseudo-header
    sum, as Linux leaves it for a NEEDS_CSUM frame; else the full checksum."""
    l2 = dst + src + (b"\x81\x00\x00\x2a" if vlan else b"")
    tcp_hlen = 20 + len(tcp_options)
    tcp_len = tcp_hlen + len(payload)
    if v6:
        exts = b""
        nexthdr = 6
        if ext:  # hop-by-hop (8 bytes, PadN) then destination options (16 bytes, PadN)
            exts = bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([6, 1, 1, 12]) + bytes(12)
            nexthdr = 0
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(exts) + tcp_len, nexthdr, 64, IP6_A, IP6_B) + exts
        ethertype = b"\x86\xdd"
        pseudo = pseudo_header(True, IP6_A, IP6_B, 6, tcp_len)
    else:
        ihl = 20 + len(ip_options)
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + tcp_len, ip_id, 0x4000, 64, 6, 0,
                         IP4_A, IP4_B) + ip_options
        ip = ip[:10] + struct.pack("!H", ref_checksum(ip)) + ip[12:]
        ethertype = b"\x08\x00"
        pseudo = pseudo_header(False, IP4_A, IP4_B, 6, tcp_len)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, seq, ack, tcp_hlen // 4 << 4, flags, 65535, 0, 0) + tcp_options
    check = fold_pseudo(pseudo) if partial else ref_checksum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    l3 = len(l2) + 2
    frame = l2 + ethertype + ip + tcp + payload
    return Built(frame, l3, l3 + len(ip), l3 + len(ip) + tcp_hlen, v6)


def tcp_checksum_ok(frame: bytes, l3: int, l4: int, v6: bool) -> bool:
    """Does the TCP checksum verify (pseudo-header from the frame's own addresses and lengths)?"""
    if v6:
        length = struct.unpack_from("!H", frame, l3 + 4)[0] - (l4 - l3 - 40)
        pseudo = pseudo_header(True, frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40], 6, length)
    else:
        length = struct.unpack_from("!H", frame, l3 + 2)[0] - (l4 - l3)
        pseudo = pseudo_header(False, frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], 6, length)
    return len(frame) - l4 == length and ref_checksum(pseudo + frame[l4:]) == 0


def check_segments(built: Built, segs: list, mss: int) -> None:
    """Every field of every segment, read back by hand against the original frame."""
    orig, l3, l4, at = built.frame, built.l3, built.l4, built.payload_at
    payload = orig[at:]
    assert len(segs) == -(-len(payload) // mss)
    assert b"".join(bytes(s[at:]) for s in segs) == payload
    seq0 = struct.unpack_from("!I", orig, l4 + 4)[0]
    id0 = struct.unpack_from("!H", orig, l3 + 4)[0]
    flags0 = orig[l4 + 13]
    for i, seg in enumerate(segs):
        seg = bytes(seg)
        last = i == len(segs) - 1
        assert len(seg) - at == (len(payload) - i * mss if last else mss)
        want = bytearray(orig[:at])
        if built.v6:
            struct.pack_into("!H", want, l3 + 4, len(seg) - l3 - 40)
        else:
            struct.pack_into("!H", want, l3 + 2, len(seg) - l3)
            struct.pack_into("!H", want, l3 + 4, (id0 + i) & 0xFFFF)
            assert ref_checksum(seg[l3:l4]) == 0, "IPv4 header checksum"
            want[l3 + 10 : l3 + 12] = seg[l3 + 10 : l3 + 12]
        struct.pack_into("!I", want, l4 + 4, (seq0 + i * mss) % 2**32)
        want[l4 + 13] = flags0 & ~(CWR if i else 0) & ~(0 if last else FIN | PSH)
        want[l4 + 16 : l4 + 18] = seg[l4 + 16 : l4 + 18]
        assert seg[:at] == bytes(want)
        assert tcp_checksum_ok(seg, l3, l4, built.v6), f"TCP checksum of segment {i}"


# -- checksums
def test_csum_matches_the_reference():
    rng = random.Random(1)
    for n in [0, 1, 2, 3, 20, 21, 1500, 1501, 65535]:
        data = rng.randbytes(n)
        assert offload.csum_finish(offload.csum_add(data)) % 0xFFFF == ref_checksum(data) % 0xFFFF
    assert offload.csum_finish(offload.csum_add(bytes(10))) == 0xFFFF  # never 0 (UDP: "no checksum")
    assert offload.csum_finish(offload.csum_add(b"\xff\xff")) == 0xFFFF


@pytest.mark.parametrize("v6", [False, True])
def test_complete_csum_of_a_partial_tcp_frame(v6: bool):
    built = build_tcp(random.Random(2).randbytes(999), v6=v6, tcp_options=b"\x01\x01\x01\x00")
    done = complete_csum(built.frame, built.l4, 16)
    assert tcp_checksum_ok(bytes(done), built.l3, built.l4, v6)
    full = build_tcp(random.Random(2).randbytes(999), v6=v6, tcp_options=b"\x01\x01\x01\x00", partial=False)
    assert bytes(done) == full.frame
    for start, off in [(len(built.frame) - 1, 0), (0, len(built.frame)), (len(built.frame), 0)]:
        with pytest.raises(PortFault):
            complete_csum(built.frame, start, off)


def test_complete_csum_of_udp_never_writes_zero():
    # UDP over IPv4 whose data makes the sum come out as zero: the field must read 0xFFFF
    body = bytearray(struct.pack("!HHHH", 1, 2, 8 + 2, 0) + b"\0\0")
    pseudo = pseudo_header(False, bytes(4), bytes(4), 17, len(body))
    partial = ref_sum(pseudo)
    struct.pack_into("!H", body, 6, partial)
    # choose the data word so that everything sums to 0xFFFF before the complement
    struct.pack_into("!H", body, 8, 0)
    rest = ref_sum(bytes(body))
    struct.pack_into("!H", body, 8, (0xFFFF - rest) & 0xFFFF)
    frame = MAC_B + MAC_A + b"\x08\x00" + bytes(20) + bytes(body)
    done = complete_csum(frame, 34, 6)
    assert struct.unpack_from("!H", done, 40)[0] == 0xFFFF


# -- segmentation
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("dressed", [False, True])
def test_segments_of_a_real_tcp_frame(v6: bool, dressed: bool):
    payload = random.Random(3).randbytes(10000)
    built = build_tcp(payload, v6=v6, seq=0xFFFFF000, ip_id=0xFFFE, flags=ACK | PSH | FIN | CWR | ECE,
                      tcp_options=b"\x01\x01\x08\x0a" + bytes(8) if dressed else b"",
                      ip_options=b"\x01\x01\x01\x00" if dressed and not v6 else b"",
                      ext=dressed and v6, vlan=dressed)
    gso = parse_gso(built.frame, built.header(1448, hdr_len=7))  # hdr_len is only a hint
    assert (gso.l3, gso.l4, gso.payload, gso.ipv6) == (built.l3, built.l4, built.payload_at, v6)
    segs = segment_tcp(built.frame, gso)
    assert len(segs) == 7 and all(len(s) <= 1448 + built.payload_at for s in segs)
    check_segments(built, segs, 1448)
    flags = [s[built.l4 + 13] for s in segs]
    assert flags[0] == ACK | ECE | CWR and flags[1:-1] == [ACK | ECE] * 5
    assert flags[-1] == ACK | PSH | FIN | ECE
    if not v6:  # the IPv4 id wraps
        assert [struct.unpack_from("!H", s, built.l3 + 4)[0] for s in segs[:3]] == [0xFFFE, 0xFFFF, 0]


def test_one_segment_when_the_payload_fits():
    built = build_tcp(b"x" * 100)
    segs = segment_tcp(built.frame, parse_gso(built.frame, built.header(1448)))
    check_segments(built, segs, 1448)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 20000), mss=st.integers(offload.MIN_GSO_SIZE, 4000), v6=st.booleans(),
       vlan=st.booleans(), ext=st.booleans(), tcp_opt=st.integers(0, 10), ip_opt=st.integers(0, 10),
       seq=st.integers(0, 2**32 - 1), ip_id=st.integers(0, 0xFFFF), flags=st.integers(0, 255),
       seed=st.integers(0, 2**32))
def test_segmentation_round_trips(size, mss, v6, vlan, ext, tcp_opt, ip_opt, seq, ip_id, flags, seed):
    payload = random.Random(seed).randbytes(size)
    built = build_tcp(payload, v6=v6, vlan=vlan, ext=ext, seq=seq, ip_id=ip_id, flags=flags,
                      tcp_options=b"\x01" * 4 * tcp_opt, ip_options=b"\x01" * 4 * ip_opt)
    segs = segment_tcp(built.frame, parse_gso(built.frame, built.header(mss)))
    check_segments(built, segs, mss)


@pytest.mark.parametrize("lie", [
    "short", "not-ip", "ihl-big", "ihl-small", "version", "fragment", "udp", "tcp-cut", "doff-small",
    "doff-big", "no-payload", "csum-start", "csum-offset", "no-needs-csum", "v6-as-v4", "v6-ext-cut",
    "v6-fragment-header", "gso-size-zero", "vlan-cut",
])
def test_lying_gso_frames_are_port_faults(lie: str):
    built = build_tcp(bytes(3000))
    f = bytearray(built.frame)
    fields = list(built.header(1448))
    l3, l4 = built.l3, built.l4
    if lie == "short":
        f = f[:l4 + 10]
    elif lie == "not-ip":
        f[12:14] = b"\x88\xb5"
    elif lie == "ihl-big":
        f[l3] = 0x4F
        f = f[: l3 + 50]
    elif lie == "ihl-small":
        f[l3] = 0x44
    elif lie == "version":
        f[l3] = 0x65
    elif lie == "fragment":
        f[l3 + 6] = 0x20  # more fragments
    elif lie == "udp":
        f[l3 + 9] = 17
    elif lie == "tcp-cut":
        f = f[: l4 + 19]
    elif lie == "doff-small":
        f[l4 + 12] = 0x40
    elif lie == "doff-big":
        f[l4 + 12] = 0xF0
        f = f[: l4 + 40]
    elif lie == "no-payload":
        f = f[: built.payload_at]
    elif lie == "csum-start":
        fields[4] = l4 + 2
    elif lie == "csum-offset":
        fields[5] = 6
    elif lie == "no-needs-csum":
        fields[0] = 0
    elif lie == "v6-as-v4":
        fields[1] = vn.GSO_TCPV6
    elif lie == "v6-ext-cut":
        b6 = build_tcp(bytes(100), v6=True, ext=True)
        f = bytearray(b6.frame[: b6.l3 + 44])
        fields = list(b6.header(1448))
    elif lie == "v6-fragment-header":
        b6 = build_tcp(bytes(100), v6=True, ext=True)
        f = bytearray(b6.frame)
        f[b6.l3 + 6] = 44
        fields = list(b6.header(1448))
    elif lie == "gso-size-zero":
        fields[3] = 0
    elif lie == "vlan-cut":
        f = bytearray(MAC_B + MAC_A + b"\x81\x00\x00")
    with pytest.raises(PortFault):
        parse_gso(bytes(f), tuple(fields))


def test_believable_but_unsegmentable():
    built = build_tcp(bytes(3000))
    with pytest.raises(Unsegmentable):
        parse_gso(built.frame, built.header(1448, gso_type=vn.GSO_UDP))
    tiny = parse_gso(built.frame, built.header(offload.MIN_GSO_SIZE - 1))
    with pytest.raises(Unsegmentable):
        segment_tcp(built.frame, tiny)
    b6 = build_tcp(bytes(3000), v6=True, ext=True)
    routed = bytearray(b6.frame)
    routed[b6.l3 + 40] = 43  # the hop-by-hop header now leads to a routing header
    with pytest.raises(Unsegmentable):
        segment_tcp(bytes(routed), parse_gso(bytes(routed), b6.header(1448)))


BASE4 = build_tcp(random.Random(5).randbytes(4000), tcp_options=b"\x01\x01\x01\x00")
BASE6 = build_tcp(random.Random(6).randbytes(4000), v6=True, ext=True)


def mangled(v6: bool, pokes: list, cut: int, changes: dict) -> tuple[bytes, tuple]:
    """A valid TSO frame and its header with bytes overwritten, cut short, and header fields changed."""
    built = BASE6 if v6 else BASE4
    f = bytearray(built.frame[:cut])
    for at, value in pokes:
        if 12 <= at < len(f):
            f[at] = value
    fields = list(built.header(1000))
    for index, value in changes.items():
        fields[index] = value & (0xFF if index < 2 else 0xFFFF)
    return bytes(f), tuple(fields)


HOSTILE = dict(
    v6=st.booleans(),
    pokes=st.lists(st.tuples(st.integers(12, 140), st.integers(0, 255)), max_size=3),
    cut=st.one_of(st.just(5000), st.integers(14, 4200)),
    changes=st.dictionaries(
        st.integers(0, 5),
        st.one_of(st.sampled_from([0, 1, 3, 4, 0x81, 0xFF, 16, 48, 1448]), st.integers(0, 0xFFFF)),
        max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(**HOSTILE)
def test_absurd_frames_only_raise_port_faults(v6, pokes, cut, changes):
    f, fields = mangled(v6, pokes, cut, changes)
    try:
        gso = parse_gso(f, fields)
        segs = segment_tcp(f, gso)
    except (PortFault, Unsegmentable) as exc:
        event(type(exc).__name__)
        return
    event("segmented")
    # whatever got through is a TCP frame whose segments are right by the reference
    assert b"".join(bytes(s[gso.payload :]) for s in segs) == f[gso.payload :]
    for seg in segs:
        assert len(seg) <= gso.payload + gso.gso_size
        assert tcp_checksum_ok(bytes(seg), gso.l3, gso.l4, gso.ipv6)
        if not gso.ipv6:
            assert ref_checksum(bytes(seg[gso.l3 : gso.l4])) == 0


# -- in the engine
def gso_rig():
    """A TSO sender, a TSO receiver, a plain receiver and a GUEST_CSUM-only receiver."""
    engine, _, _ = make(0)
    sender = Host(1, features=TSO_TX, queue_size=16, tx_slot=70000)
    tso = Host(2, features=TSO_RX, queue_size=128)
    plain = Host(3, queue_size=128)
    csum_only = Host(4, features=BASE_FEATURES | bit(vn.F_GUEST_CSUM), queue_size=128)
    for h in (sender, tso, plain, csum_only):
        engine.add_port(h.port)
    return engine, sender, tso, plain, csum_only


@pytest.mark.parametrize("v6", [False, True])
def test_engine_gso_goes_whole_to_tso_receivers_and_cut_to_others(v6: bool):
    engine, sender, tso, plain, csum_only = gso_rig()
    built = build_tcp(random.Random(7).randbytes(20000), v6=v6, flags=ACK | PSH, src=sender.mac,
                      dst=bytes.fromhex("02aaaaaaaaaa"))  # unknown: flooded to all three
    mss = 1440 if v6 else 1460  # what fits a 1500-byte MTU
    sender.send_raw(built.frame, built.packed(mss))
    assert engine.poll_once() == 1
    (head, whole), = tso.received_with_headers()
    assert whole == built.frame
    assert head.pack()[:10] == built.packed(mss)[:10]
    for receiver in (plain, csum_only):
        got = receiver.received_with_headers()
        assert all(h.flags == 0 and h.gso_type == vn.GSO_NONE for h, _ in got)
        assert all(len(f) <= 1514 for _, f in got)
        check_segments(built, [f for _, f in got], mss)
        assert receiver.port.rx_packets == 14 and receiver.port.rx_dropped_offload == 0
    assert engine.segmented == 1  # cut once for both
    assert sender.port.tx_packets == 1 and engine.broken == []


def test_engine_ecn_gso_is_cut_for_receivers_without_guest_ecn():
    engine, sender, tso, plain, _ = gso_rig()
    built = build_tcp(bytes(5000), flags=ACK | CWR, src=sender.mac, dst=tso.mac)  # unknown yet: flooded
    sender.send_raw(built.frame, built.packed(1000, gso_type=vn.GSO_TCPV4 | vn.GSO_ECN))
    engine.poll_once()
    for receiver in (tso, plain):
        got = receiver.received_with_headers()
        assert len(got) == 5 and all(h.gso_type == 0 for h, _ in got)
        assert [f[built.l4 + 13] & CWR for _, f in got] == [CWR, 0, 0, 0, 0]


def test_engine_segments_too_big_for_the_receiver_are_counted_drops():
    engine, _, _ = make(0)
    sender = Host(1, features=TSO_TX, queue_size=16, tx_slot=70000)
    small = Host(2, queue_size=64, mtu=1000)
    for h in (sender, small):
        engine.add_port(h.port)
    built = build_tcp(bytes(5000), src=sender.mac, dst=small.mac)
    sender.send_raw(built.frame, built.packed(1448))
    engine.poll_once()
    assert small.received() == [] and small.port.rx_dropped_offload == 1 and engine.broken == []


def test_engine_unsegmentable_frames_go_whole_or_are_counted_drops():
    engine, sender, tso, plain, _ = gso_rig()
    built = build_tcp(bytes(3000), src=sender.mac, dst=bytes.fromhex("02aaaaaaaaaa"))
    sender.send_raw(built.frame, built.packed(20))  # an MSS of 20: believable, not cut here
    engine.poll_once()
    assert [f for _, f in tso.received_with_headers()] == [built.frame]
    assert plain.received() == [] and plain.port.rx_dropped_offload == 1
    assert engine.broken == []


def test_engine_lying_gso_frame_breaks_the_sender_before_anyone_receives_it():
    engine, sender, tso, plain, _ = gso_rig()
    built = build_tcp(bytes(3000), src=sender.mac, dst=bytes.fromhex("02aaaaaaaaaa"))
    lie = bytearray(built.frame)
    lie[built.l3] = 0x4F  # IHL 60: the TCP header is not where csum_start says
    sender.send_raw(bytes(lie), built.packed(1448))
    engine.poll_once()
    assert [p.id for p in engine.take_broken()] == [1]
    assert tso.received() == [] and plain.received() == []
    exchange_still_works(engine, tso, plain)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**HOSTILE)
def test_engine_hostile_offload_frames_break_only_the_liar(v6, pokes, cut, changes):
    engine, (a, b), _ = make(2, queue_size=64)
    tso = Host(3, features=TSO_RX, queue_size=64)
    liar = Host(4, features=TSO_TX, queue_size=16, tx_slot=8192)
    for h in (tso, liar):
        engine.add_port(h.port)
    f, fields = mangled(v6, pokes, cut, changes)
    f = f[:6] + liar.mac + f[12:]
    liar.send_raw(f, vn.HEADER.pack(*fields, 0))
    engine.poll_once()
    broken = engine.take_broken()
    assert [p.id for p in broken] in ([], [4])
    event("broken" if broken else f"forwarded, {engine.segmented} cut, {engine.completed} completed")
    if not broken:
        for receiver in (a, b):
            for head, got in receiver.received_with_headers():
                assert head.flags == 0 and head.gso_type == 0
                if fields[1] and engine.segmented:  # a segment: a TCP frame right by the reference
                    gso = parse_gso(f, fields)
                    assert tcp_checksum_ok(got, gso.l3, gso.l4, gso.ipv6)
    exchange_still_works(engine, a, b)
