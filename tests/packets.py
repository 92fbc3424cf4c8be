"""Ethernet, ARP, IPv4 and ICMP frames built and parsed by hand for the tests, with an
internet checksum written independently of the switch's offload code."""

from __future__ import annotations

import ipaddress
import struct

BROADCAST = b"\xff" * 6
ETH_ARP, ETH_IP = 0x0806, 0x0800


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, src_mac, ip(src_ip), b"\0" * 6, ip(target_ip))
    return BROADCAST + src_mac + struct.pack("!H", ETH_ARP) + body


def arp_reply_from(frame: bytes, asked_ip: str) -> bytes | None:
    """The MAC that `frame` gives for `asked_ip`, if it is an ARP reply about it."""
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_ARP:
        return None
    op, sender_mac, sender_ip = struct.unpack_from("!6xH6s4s", frame, 14)
    return sender_mac if op == 2 and sender_ip == ip(asked_ip) else None


def icmp_echo(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, ident: int, seq: int,
              payload: bytes = b"alacrity") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0x4000, 64, 1, 0,
                         ip(src_ip), ip(dst_ip))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_IP) + header + icmp


def echo_reply_ok(frame: bytes, src_ip: str, ident: int, seq: int, payload: bytes = b"alacrity") -> bool:
    """True if `frame` is a well-formed ICMP echo reply from `src_ip` with valid checksums."""
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_IP:
        return False
    ihl = (frame[14] & 0x0F) * 4
    header = frame[14 : 14 + ihl]
    total = struct.unpack_from("!H", header, 2)[0]
    icmp = frame[14 + ihl : 14 + total]
    if header[9] != 1 or header[12:16] != ip(src_ip) or checksum(header) or checksum(icmp):
        return False
    kind, _code, _sum, got_ident, got_seq = struct.unpack_from("!BBHHH", icmp)
    return kind == 0 and (got_ident, got_seq) == (ident, seq) and icmp[8:] == payload
