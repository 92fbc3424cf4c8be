"""virtio-net wire definitions (virtio 1.1, 5.1): feature bits, the per-packet header
and the config space. Nothing here trusts a header: `NetHeader.parse` only decodes;
the switch validates fields against the frame before it acts on them."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

# Feature bits
F_CSUM = 0  # the driver hands us partially checksummed frames (NEEDS_CSUM)
F_GUEST_CSUM = 1  # the driver accepts partially checksummed frames
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
F_SPEED_DUPLEX = 63

# Header flags and GSO types
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

#: virtio_net_hdr_mrg_rxbuf: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
HEADER = struct.Struct("<BBHHHHH")
#: The legacy header without num_buffers (neither VERSION_1 nor MRG_RXBUF negotiated).
LEGACY_HEADER = struct.Struct("<BBHHHH")
HEADER_SIZE = HEADER.size  # 12

# Config space: mac[6], status, max_virtqueue_pairs, mtu
CONFIG = struct.Struct("<6sHHH")
S_LINK_UP = 1
S_ANNOUNCE = 2

ETH_HLEN = 14
VLAN_HLEN = 4
#: The largest GSO frame a driver may hand over: 64 KiB of IP packet plus its Ethernet header.
MAX_GSO_FRAME = 65535 + ETH_HLEN + VLAN_HLEN


def header_size(features: int) -> int:
    """12 bytes with VERSION_1 or MRG_RXBUF, else the 10-byte legacy header."""
    return HEADER_SIZE if features >> 32 & 1 or features >> F_MRG_RXBUF & 1 else LEGACY_HEADER.size


@dataclass(frozen=True)
class NetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1

    @classmethod
    def parse(cls, data: bytes | memoryview) -> NetHeader:
        if len(data) >= HEADER_SIZE:
            return cls(*HEADER.unpack_from(data))
        if len(data) >= LEGACY_HEADER.size:
            return cls(*LEGACY_HEADER.unpack_from(data))
        raise ValueError(f"virtio-net header of {len(data)} bytes, need at least {LEGACY_HEADER.size}")

    def pack(self, size: int = HEADER_SIZE) -> bytes:
        fields = (self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)
        if size == LEGACY_HEADER.size:
            return LEGACY_HEADER.pack(*fields)
        return HEADER.pack(*fields, self.num_buffers)


def pack_config(mac: bytes, *, status: int = S_LINK_UP, pairs: int = 1, mtu: int = 1500) -> bytes:
    return CONFIG.pack(mac, status, pairs, mtu)


def parse_config(data: bytes) -> tuple[bytes, int, int, int]:
    """(mac, status, max_virtqueue_pairs, mtu) from config bytes (short reads zero-padded)."""
    return CONFIG.unpack(bytes(data[: CONFIG.size]).ljust(CONFIG.size, b"\0"))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (use xx:xx:xx:xx:xx:xx)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


def check_mac(text: str) -> str:
    """`text` as a lowercase xx:xx:xx:xx:xx:xx unicast MAC address, else ValueError."""
    parts = text.strip().split(":")
    try:
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ValueError
        octets = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r} (use xx:xx:xx:xx:xx:xx)") from None
    if octets[0] & 1:
        raise ValueError(f"{text!r} is a multicast address; a NIC needs a unicast one")
    if octets == bytes(6):
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return ":".join(f"{b:02x}" for b in octets)


def local_mac(seed: str | None = None) -> str:
    """A locally administered unicast MAC: derived from `seed` (stable, e.g. "VMNAME/0"),
    or random without one."""
    raw = bytearray(hashlib.sha256(seed.encode()).digest()[:6] if seed is not None else os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)
