"""The vhost-user frontend (driver side) over a connected socket: what QEMU does
for a guest, done for a host process. Blocking request/reply; framing from messages.py."""

from __future__ import annotations

import socket

from alacrity.vhost_user.messages import (
    CONFIG_HEADER,
    LOG,
    MEM_HEADER,
    MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    Framer,
    Message,
    ProtocolError,
    Req,
    encode,
)


class Frontend:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.framer = Framer(expect_reply=True)
        self.reply_ack = False

    def close(self) -> None:
        self.sock.close()

    # -- transport
    def send(self, request: Req, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        data = encode(request, payload, need_reply=self.reply_ack and not _has_reply(request))
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)
        if self.reply_ack and not _has_reply(request):
            status = self._reply(request).u64()
            if status:
                raise ProtocolError(f"backend refused {request.name} (status {status})")

    def _reply(self, request: Req) -> Message:
        while True:
            data = self.sock.recv(self.framer.pending())
            if not data:
                raise ProtocolError(f"backend closed the connection awaiting {request.name}")
            messages = self.framer.feed(data)
            if messages:
                reply = messages[0]
                if reply.request != request:
                    raise ProtocolError(f"reply to {reply.request}, expected {request.name}")
                return reply

    def query(self, request: Req, payload: bytes = b"") -> bytes:
        self.sock.sendall(encode(request, payload))
        return self._reply(request).payload

    # -- messages
    def get_features(self) -> int:
        return U64.unpack(self.query(Req.GET_FEATURES))[0]

    def set_features(self, features: int) -> None:
        self.send(Req.SET_FEATURES, U64.pack(features))

    def get_protocol_features(self) -> int:
        return U64.unpack(self.query(Req.GET_PROTOCOL_FEATURES))[0]

    def set_protocol_features(self, features: int) -> None:
        self.send(Req.SET_PROTOCOL_FEATURES, U64.pack(features))

    def get_queue_num(self) -> int:
        return U64.unpack(self.query(Req.GET_QUEUE_NUM))[0]

    def set_owner(self) -> None:
        self.send(Req.SET_OWNER)

    def get_config(self, size: int, offset: int = 0) -> bytes:
        reply = self.query(Req.GET_CONFIG, CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        return reply[CONFIG_HEADER.size : CONFIG_HEADER.size + size]

    def set_mem_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        payload = MEM_HEADER.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)
        self.send(Req.SET_MEM_TABLE, payload, tuple(fds))

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Share a dirty log (LOG_SHMFD negotiated): `size` bytes at `offset` of file `fd`."""
        socket.send_fds(self.sock, [encode(Req.SET_LOG_BASE, LOG.pack(size, offset))], [fd])
        self._reply(Req.SET_LOG_BASE)  # empty: the backend has mapped it

    def set_vring_num(self, index: int, num: int) -> None:
        self.send(Req.SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.send(Req.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self.send(Req.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, desc, used, avail, 0))

    def set_vring_fd(self, request: Req, index: int, fd: int | None) -> None:
        if fd is None:
            self.send(request, U64.pack(index | VRING_NOFD_MASK))
        else:
            self.send(request, U64.pack(index), (fd,))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.send(Req.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        return VRING_STATE.unpack(self.query(Req.GET_VRING_BASE, VRING_STATE.pack(index, 0)))[1]


def _has_reply(request: Req) -> bool:
    return request in (
        Req.GET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.GET_QUEUE_NUM,
        Req.GET_CONFIG,
        Req.GET_VRING_BASE,
    )
