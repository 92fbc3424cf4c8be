"""vhost-user wire format: request codes, flags, payload layouts, and a framer.

Sans-I/O: `Framer.feed()` takes bytes and fds as they arrive and returns whole
messages; `encode()` builds bytes to send. Nothing here touches a socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CONFIG = 9
    RESET_DEVICE = 13
    STATUS = 16


F_PROTOCOL_FEATURES = 30  # virtio feature bit that vhost-user borrows
F_LOG_ALL = 26  # vhost's feature bit: the backend logs its writes to guest memory (migration)
VRING_F_LOG = 0x1  # SET_VRING_ADDR flag: log the used ring's writes, at its `log` address

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail (user addresses), log (a GPA)
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_HEADER = struct.Struct("<II")  # nregions, padding
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
LOG = struct.Struct("<QQ")  # mmap_size, mmap_offset (SET_LOG_BASE)

MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_REGIONS = 8
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def u64(self) -> int:
        return unpack_exact(U64, self.payload, self.request)[0]


def unpack_exact(layout: struct.Struct, payload: bytes, request: int) -> tuple:
    if len(payload) < layout.size:
        raise ProtocolError(f"{_name(request)}: payload of {len(payload)} bytes, need {layout.size}")
    return layout.unpack_from(payload)


def _name(request: int) -> str:
    try:
        return Req(request).name
    except ValueError:
        return f"request {request}"


def encode(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


class Framer:
    """Cuts a byte stream into messages; fds received go with the message they came with."""

    def __init__(self, expect_reply: bool = False) -> None:
        self.buffer = bytearray()
        self.fds: list[int] = []
        self.expect_reply = expect_reply

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Message]:
        self.buffer += data
        if fds:
            self.fds.extend(fds)
            if len(self.fds) > MAX_FDS:
                raise ProtocolError(f"{len(self.fds)} file descriptors with one message, at most {MAX_FDS}")
        messages = []
        while len(self.buffer) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self.buffer)
            if flags & 0x3 != VERSION:
                raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
            if bool(flags & FLAG_REPLY) != self.expect_reply:
                raise ProtocolError(f"unexpected reply flag in {flags:#x}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"{_name(request)}: payload of {size} bytes exceeds {MAX_PAYLOAD}")
            if len(self.buffer) < HEADER.size + size:
                break
            payload = bytes(self.buffer[HEADER.size : HEADER.size + size])
            del self.buffer[: HEADER.size + size]
            messages.append(Message(request, flags, payload, self.fds))
            self.fds = []
        return messages

    def pending(self) -> int:
        """Bytes still needed to complete the current message (at least the header)."""
        if len(self.buffer) < HEADER.size:
            return HEADER.size - len(self.buffer)
        size = HEADER.unpack_from(self.buffer)[2]
        return HEADER.size + size - len(self.buffer)
