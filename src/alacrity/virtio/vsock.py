"""virtio-vsock wire format (virtio 1.2, 5.10 "Socket Device"): the 44-byte packet header.

Pure data: `Header.parse` checks the length of what it is given and nothing about the
values (the state machine, devices/vsock_proto.py, judges those); `Header.pack` refuses
values that do not fit their fields, so we never put a truncated number on the ring.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: src_cid, dst_cid (u64); src_port, dst_port, len (u32); type, op (u16); flags, buf_alloc, fwd_cnt (u32).
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44
assert HDR_SIZE == 44

CID_HYPERVISOR = 0
CID_LOCAL = 1
CID_HOST = 2
#: VMADDR_CID_ANY: never a guest's CID.
CID_ANY = 0xFFFFFFFF

TYPE_STREAM = 1
TYPE_SEQPACKET = 2  # not offered (VIRTIO_VSOCK_F_SEQPACKET)

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OPS = {OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST", OP_SHUTDOWN: "SHUTDOWN",
       OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE", OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

#: SHUTDOWN flags: the sender will receive no more / send no more.
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
_LIMITS = (U64, U64, U32, U32, U32, 0xFFFF, 0xFFFF, U32, U32, U32)


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def fields(self) -> tuple[int, ...]:
        return (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    def pack(self) -> bytes:
        """The 44 bytes, little-endian. ValueError if a field does not fit."""
        values = self.fields()
        for value, limit in zip(values, _LIMITS, strict=True):
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"vsock header field out of range: {self!r}")
        return HDR.pack(*values)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Header:
        """The header at the start of `data`. ValueError if `data` is shorter than 44 bytes."""
        if len(data) < HDR_SIZE:
            raise ValueError(f"vsock packet of {len(data)} bytes, shorter than its 44-byte header")
        return cls(*HDR.unpack_from(data, 0))

    def describe(self) -> str:
        op = OPS.get(self.op, f"op {self.op}")
        return f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len {self.len}"
