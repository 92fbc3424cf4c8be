"""Software offloads for receivers that did not negotiate them: checksum completion and
TCP segmentation (TSO/GSO). Sans-I/O: bytes in, bytes out.

A sender that negotiated CSUM hands over frames with NEEDS_CSUM: the checksum field at
`csum_start + csum_offset` holds the pseudo-header sum (as Linux leaves it for
CHECKSUM_PARTIAL) and the ones'-complement sum from `csum_start` to the end is still to
be folded in. A sender that negotiated HOST_TSO4/6 hands over one TCP packet of up to
64 KiB with `gso_size` (the MSS) for the device to cut.

Nothing in the frame is trusted: `parse_gso` reads the real Ethernet/IP/TCP header
lengths from the frame (the header's `hdr_len` is only a hint, ignored here), bounds-
checks every offset and raises `PortFault` when the frame contradicts its virtio-net
header. What is well formed but beyond this code (UFO, an IPv6 routing header, a tiny
MSS that would multiply one frame into thousands) raises `Unsegmentable`: the frame can
still go whole to receivers that take it as is.

Checksums use `int.from_bytes(data) % 0xFFFF`: since 2**16 = 1 (mod 0xFFFF) the big
integer is congruent to the sum of its 16-bit words, which is the ones'-complement sum
(RFC 1071) up to the choice between 0 and 0xFFFF, both of which are zero.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from alacrity.virtio import net as vn

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TYPES = (0x8100, 0x88A8)
MAX_VLAN_TAGS = 2
IPPROTO_TCP = 6
IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS = 0, 43, 60
MAX_IPV6_EXTENSIONS = 8
TCP_CHECK = 16  # offset of the checksum in the TCP header
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
#: Segmenting below this MSS is refused (Linux never sends less: tcp_min_snd_mss = 48), so that
#: one 64 KiB frame cannot become tens of thousands of segments.
MIN_GSO_SIZE = 48

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class PortFault(Exception):
    """The port broke the rules (a header that lies about its frame); it must be removed."""


class Unsegmentable(Exception):
    """A believable frame this code does not cut: it goes whole to receivers that take it, others drop it."""


# -- checksums
def csum_add(data: bytes | bytearray | memoryview) -> int:
    """The ones'-complement sum of `data` (odd lengths padded with a zero byte), modulo 0xFFFF."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def csum_finish(total: int) -> int:
    """The checksum to store for a (partial) sum: its complement, never 0 (0xFFFF instead, as UDP needs)."""
    return 0xFFFF - total % 0xFFFF


def complete_csum(frame: bytes | bytearray | memoryview, csum_start: int, csum_offset: int) -> bytearray:
    """`frame` with its partial checksum completed: the sum from `csum_start` folded into the
    16 bits at `csum_start + csum_offset` (which hold the pseudo-header sum)."""
    where = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or where + 2 > len(frame):
        raise PortFault(f"checksum at {csum_start}+{csum_offset} beyond the {len(frame)}-byte frame")
    out = bytearray(frame)
    _U16.pack_into(out, where, csum_finish(csum_add(memoryview(out)[csum_start:])))
    return out


# -- segmentation
@dataclass(frozen=True, slots=True)
class GsoFrame:
    """Where the headers of a validated TCP GSO frame are."""

    l3: int  # the IP header
    l4: int  # the TCP header
    payload: int  # the first payload byte (the real header length)
    ipv6: bool
    gso_size: int
    routing: bool = False  # an IPv6 routing header: the pseudo-header's address is not the header's


def _ethertype(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(ethertype, offset of the L3 header), through up to two VLAN tags."""
    length = len(frame)
    if length < vn.ETH_HLEN:
        raise PortFault(f"frame of {length} bytes, shorter than an Ethernet header")
    kind, off = _U16.unpack_from(frame, 12)[0], vn.ETH_HLEN
    for _ in range(MAX_VLAN_TAGS):
        if kind not in VLAN_TYPES:
            break
        if off + 4 > length:
            raise PortFault("VLAN tag beyond the frame")
        kind = _U16.unpack_from(frame, off + 2)[0]
        off += 4
    return kind, off


def parse_gso(frame: bytes | bytearray | memoryview, fields: tuple) -> GsoFrame:
    """Check a GSO frame against its header `fields` (flags, gso_type, hdr_len, gso_size,
    csum_start, csum_offset, ...) and find its headers; PortFault if they disagree."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = fields[:6]
    base = gso_type & ~vn.GSO_ECN
    length = len(frame)
    if base == vn.GSO_UDP:
        raise Unsegmentable("UDP fragmentation offload (UFO) is not done in software")
    if base not in (vn.GSO_TCPV4, vn.GSO_TCPV6):
        raise PortFault(f"unknown GSO type {gso_type:#x}")
    if not flags & vn.HDR_F_NEEDS_CSUM:
        raise PortFault("a GSO frame without NEEDS_CSUM")
    kind, l3 = _ethertype(frame)
    routing = False
    if base == vn.GSO_TCPV4:
        if kind != ETH_P_IP:
            raise PortFault(f"GSO_TCPV4 frame of ethertype {kind:#06x}")
        if l3 + 20 > length:
            raise PortFault("IPv4 header beyond the frame")
        ver_ihl = frame[l3]
        ihl = (ver_ihl & 0xF) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or l3 + ihl > length:
            raise PortFault(f"IPv4 version/IHL byte {ver_ihl:#04x} in a {length}-byte frame")
        if _U16.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
            raise PortFault("a GSO frame that is an IPv4 fragment")
        if frame[l3 + 9] != IPPROTO_TCP:
            raise PortFault(f"GSO_TCPV4 frame carrying IP protocol {frame[l3 + 9]}")
        l4 = l3 + ihl
    else:
        if kind != ETH_P_IPV6:
            raise PortFault(f"GSO_TCPV6 frame of ethertype {kind:#06x}")
        if l3 + 40 > length:
            raise PortFault("IPv6 header beyond the frame")
        if frame[l3] >> 4 != 6:
            raise PortFault(f"IPv6 version {frame[l3] >> 4}")
        nexthdr, l4 = frame[l3 + 6], l3 + 40
        for _ in range(MAX_IPV6_EXTENSIONS):
            if nexthdr not in (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS):
                break
            if l4 + 8 > length:
                raise PortFault("IPv6 extension header beyond the frame")
            routing = routing or nexthdr == IPV6_ROUTING
            nexthdr, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if nexthdr != IPPROTO_TCP:
            raise PortFault(f"GSO_TCPV6 frame carrying next header {nexthdr}")
    if l4 + 20 > length:
        raise PortFault("TCP header beyond the frame")
    doff = (frame[l4 + 12] >> 4) * 4
    payload = l4 + doff
    if doff < 20 or payload > length:
        raise PortFault(f"TCP data offset {doff} in a {length}-byte frame")
    if payload == length:
        raise PortFault("a GSO frame without payload")
    if csum_start != l4 or csum_offset != TCP_CHECK:
        raise PortFault(f"checksum at {csum_start}+{csum_offset}, but the TCP header is at {l4}")
    if gso_size <= 0:
        raise PortFault(f"gso_size {gso_size}")
    return GsoFrame(l3, l4, payload, base == vn.GSO_TCPV6, gso_size, routing)


def segment_tcp(frame: bytes | bytearray | memoryview, gso: GsoFrame) -> list[bytearray]:
    """Cut a frame `parse_gso` accepted into full-sized frames of at most `gso_size` payload
    bytes each, with their IP lengths, IPv4 ids and checksums, TCP sequence numbers, flags
    and checksums right."""
    mss = gso.gso_size
    if mss < MIN_GSO_SIZE:
        raise Unsegmentable(f"gso_size {mss} below the {MIN_GSO_SIZE}-byte minimum")
    if gso.routing:
        raise Unsegmentable("TCPv6 behind a routing header")
    l3, l4, start, total = gso.l3, gso.l4, gso.payload, len(frame)
    head = bytearray(frame[:start])
    head[l4 + TCP_CHECK : l4 + TCP_CHECK + 2] = b"\0\0"
    seq0 = _U32.unpack_from(frame, l4 + 4)[0]
    tcp_flags = frame[l4 + 13]
    if gso.ipv6:
        pseudo = csum_add(frame[l3 + 8 : l3 + 40]) + IPPROTO_TCP
        ip_id = 0
    else:
        head[l3 + 10 : l3 + 12] = b"\0\0"
        pseudo = csum_add(frame[l3 + 12 : l3 + 20]) + IPPROTO_TCP
        ip_id = _U16.unpack_from(frame, l3 + 4)[0]
    out = []
    last = start + (total - start - 1) // mss * mss
    for i, off in enumerate(range(start, total, mss)):
        seg = head + frame[off : off + mss]
        tcp_len = len(seg) - l4
        if gso.ipv6:
            _U16.pack_into(seg, l3 + 4, l4 - l3 - 40 + tcp_len)
        else:
            _U16.pack_into(seg, l3 + 2, len(seg) - l3)
            _U16.pack_into(seg, l3 + 4, (ip_id + i) & 0xFFFF)
            _U16.pack_into(seg, l3 + 10, csum_finish(csum_add(memoryview(seg)[l3:l4])))
        _U32.pack_into(seg, l4 + 4, (seq0 + off - start) & 0xFFFFFFFF)
        flags = tcp_flags
        if i:
            flags &= ~TCP_CWR
        if off != last:
            flags &= ~(TCP_FIN | TCP_PSH)
        seg[l4 + 13] = flags
        _U16.pack_into(seg, l4 + TCP_CHECK, csum_finish(pseudo + tcp_len + csum_add(memoryview(seg)[l4:])))
        out.append(seg)
    return out
