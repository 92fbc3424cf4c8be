"""Drive a virtio-blk device from a host process: a vhost-user frontend plus the
virtio driver side, with the rings and buffers in our own memfd."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from alacrity.client.area import SharedArea
from alacrity.vhost_user.frontend import Frontend
from alacrity.vhost_user.messages import F_PROTOCOL_FEATURES, ProtocolFeature, Req
from alacrity.virtio import blk as vb
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit, has

RING_AREA = 1 << 16
SLOT_META = 64  # header (16) and status (1) per in-flight request, cache-line apart
POLL_BUDGET_S = 50e-6


class BlkError(OSError):
    pass


@dataclass
class Op:
    """One request: kind (T_IN, T_OUT, T_FLUSH, ...), byte offset, length, data to write."""

    kind: int
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | None = None


class BlkClient:
    """`read(offset, length)`, `write(offset, data)`, `flush()` on a vhost-user-blk socket.

    Requests are split into `max_request`-byte pieces, with up to `depth` in flight.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        depth: int = 16,
        max_request: int = 1 << 20,
        queue_size: int = 256,
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self.depth = min(depth, queue_size // 3)
        self.max_request = max_request
        self.area = SharedArea(RING_AREA + self.depth * (SLOT_META + max_request))
        self.layout = RingLayout.at(0, queue_size)
        self.frontend = Frontend(sock)
        self.kicks = 0
        self.interrupts = 0
        self.requests = 0
        self._negotiate()
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.queue = DriverQueue(self.area.view, self.layout, event_idx=self.event_idx)
        self._start_ring()
        self.free_slots = list(range(self.depth))

    def _negotiate(self) -> None:
        fe = self.frontend
        offered = fe.get_features()
        if not has(offered, F_VERSION_1):
            raise BlkError("backend does not offer VIRTIO_F_VERSION_1")
        wanted = bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES)
        wanted |= bit(vb.F_FLUSH) | bit(vb.F_RO) | bit(vb.F_BLK_SIZE) | bit(vb.F_SEG_MAX)
        self.features = offered & wanted
        self.event_idx = has(self.features, RING_F_EVENT_IDX)
        if has(offered, F_PROTOCOL_FEATURES):
            protocol = fe.get_protocol_features()
            fe.set_protocol_features(
                protocol & (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG))
            )
            fe.reply_ack = has(protocol, ProtocolFeature.REPLY_ACK)
            if not has(protocol, ProtocolFeature.CONFIG):
                raise BlkError("backend does not offer the CONFIG protocol feature")
        fe.set_owner()
        config = fe.get_config(vb.CONFIG.size)
        self.capacity = vb.CONFIG.unpack(config)[0] * vb.SECTOR
        self.readonly = has(self.features, vb.F_RO)
        fe.set_features(self.features)

    def _start_ring(self) -> None:
        fe, lay, uva = self.frontend, self.layout, self.area.uva
        fe.set_mem_table([self.area.region()], [self.area.fd])
        fe.set_vring_num(0, lay.size)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, uva + lay.desc, uva + lay.used, uva + lay.avail)
        fe.set_vring_fd(Req.SET_VRING_KICK, 0, self.kick)
        fe.set_vring_fd(Req.SET_VRING_CALL, 0, self.call)
        if has(self.features, F_PROTOCOL_FEATURES):
            fe.set_vring_enable(0, True)

    # -- the public verbs
    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pieces = list(self._pieces(offset, length))
        for (piece_off, piece_len), data in zip(
            pieces, self.run(Op(vb.T_IN, o, n) for o, n in pieces), strict=True
        ):
            out[piece_off - offset : piece_off - offset + piece_len] = data
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        ops = (
            Op(vb.T_OUT, o, n, view[o - offset : o - offset + n]) for o, n in self._pieces(offset, len(view))
        )
        for _ in self.run(ops):
            pass

    def flush(self) -> None:
        for _ in self.run([Op(vb.T_FLUSH)]):
            pass

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        if offset % vb.SECTOR or length % vb.SECTOR:
            raise ValueError(f"offset and length must be multiples of {vb.SECTOR} bytes")
        if offset < 0 or offset + length > self.capacity:
            raise ValueError(f"range {offset}+{length} is beyond the disk's {self.capacity} bytes")
        for start in range(offset, offset + length, self.max_request):
            yield start, min(self.max_request, offset + length - start)

    # -- the pipeline
    def run(self, ops: Iterable[Op]) -> Iterator[bytes]:
        """Execute requests, up to `depth` at once; yields each one's read data, in order."""
        pending = iter(ops)
        inflight: dict[int, Op] = {}
        results: dict[int, bytes] = {}
        next_id = next_yield = 0
        exhausted = False
        while True:
            while not exhausted and self.free_slots:
                op = next(pending, None)
                if op is None:
                    exhausted = True
                    break
                self._add(next_id, op, inflight)
                next_id += 1
            if self.queue.publish():
                os.eventfd_write(self.kick, 1)
                self.kicks += 1
            while next_yield in results:
                yield results.pop(next_yield)
                next_yield += 1
            if not inflight:
                return
            for (rid, slot), _written in self._wait():
                op = inflight.pop(rid)
                self.free_slots.append(slot)
                base = self._slot(slot)
                status = self.area.view[base + 16]
                if status != vb.S_OK:
                    name = {vb.S_IOERR: "IOERR", vb.S_UNSUPP: "UNSUPP"}.get(status, str(status))
                    raise BlkError(f"device answered {name} to request type {op.kind} at {op.offset}")
                data = b""
                if op.kind == vb.T_IN:
                    data = bytes(self.area.view[base + SLOT_META : base + SLOT_META + op.length])
                results[rid] = data

    def _slot(self, slot: int) -> int:
        return RING_AREA + slot * (SLOT_META + self.max_request)

    def _add(self, rid: int, op: Op, inflight: dict[int, Op]) -> None:
        slot = self.free_slots.pop()
        base = self._slot(slot)
        view = self.area.view
        vb.REQUEST_HEADER.pack_into(view, base, op.kind, 0, op.offset // vb.SECTOR)
        view[base + 16] = 0xFF
        buffers = [(base, 16, False)]
        if op.kind == vb.T_OUT:
            view[base + SLOT_META : base + SLOT_META + op.length] = op.data
            buffers.append((base + SLOT_META, op.length, False))
        elif op.kind == vb.T_IN:
            buffers.append((base + SLOT_META, op.length, True))
        buffers.append((base + 16, 1, True))
        self.queue.add(buffers, (rid, slot))
        inflight[rid] = op
        self.requests += 1

    def _wait(self) -> list:
        """Completions: poll briefly, then sleep on the call eventfd."""
        deadline = time.monotonic() + POLL_BUDGET_S
        while True:
            done = self.queue.completed()
            if done:
                return done
            if time.monotonic() < deadline:
                continue
            if self.queue.enable_interrupts():
                continue
            readable, _, _ = select.select([self.call, self.frontend.sock], [], [], self.timeout)
            if not readable:
                raise BlkError(f"device completed nothing in {self.timeout} s")
            if self.frontend.sock in readable:
                raise BlkError("the backend closed the connection")
            try:
                os.eventfd_read(self.call)
                self.interrupts += 1
            except BlockingIOError:
                pass
            self.queue.disable_interrupts()

    def close(self) -> None:
        self.frontend.close()
        os.close(self.kick)
        os.close(self.call)
        self.area.close()

    def __enter__(self) -> BlkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
