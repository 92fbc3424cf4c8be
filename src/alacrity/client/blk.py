"""Drive a virtio-blk device from a host process (a `Driver`: the rings and buffers in our
own memfd): reads, writes and flushes, pipelined up to a depth."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from alacrity.client.driver import Driver, DriverError
from alacrity.virtio import blk as vb
from alacrity.virtio.features import bit, has

SLOT_META = 64  # header (16) and status (1) per in-flight request, cache-line apart


class BlkError(DriverError):
    pass


@dataclass
class Op:
    """One request: kind (T_IN, T_OUT, T_FLUSH, ...), byte offset, length, data to write."""

    kind: int
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | None = None


class BlkClient(Driver):
    """`read(offset, length)`, `write(offset, data)`, `flush()` on a vhost-user-blk socket.

    Requests are split into `max_request`-byte pieces, with up to `depth` in flight.
    """

    device_features = bit(vb.F_FLUSH) | bit(vb.F_RO) | bit(vb.F_BLK_SIZE) | bit(vb.F_SEG_MAX)
    error = BlkError

    def __init__(
        self,
        sock: socket.socket,
        *,
        depth: int = 16,
        max_request: int = 1 << 20,
        queue_size: int = 256,
        timeout: float = 30.0,
    ) -> None:
        self.depth = min(depth, queue_size // 3)
        self.max_request = max_request
        super().__init__(sock, buffers=self.depth * (SLOT_META + max_request), timeout=timeout)
        self.requests = 0
        try:
            config = self.negotiate(vb.CONFIG.size)
            self.capacity = vb.CONFIG.unpack(config)[0] * vb.SECTOR
            self.readonly = has(self.features, vb.F_RO)
            self.ring = self.shm(0, queue_size)
            self.enable(0)
        except BaseException:
            self.close()
            raise
        self.queue = self.ring.queue
        self.free_slots = list(range(self.depth))

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
            self.publish(self.ring)
            while next_yield in results:
                yield results.pop(next_yield)
                next_yield += 1
            if not inflight:
                return
            for (rid, slot), _written in self.wait(self.ring):
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
        return self.buffers[0] + slot * (SLOT_META + self.max_request)

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
