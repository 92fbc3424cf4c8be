"""The forwarding engine: run-to-completion and sans-I/O.

`poll_once()` takes a batch from every port's TX ring and, for each frame:
validates the virtio-net header against the frame, learns the source MAC, looks
up the destination (group or unknown addresses flood to every other port), and
copies the frame once from the sender's buffers into each receiver's RX buffers
(spread over several chains with MRG_RXBUF). Then it completes the TX chains and
signals each touched ring once per batch.

Punishment follows the fault: a broken TX ring or a header that lies about the
frame breaks the sender (`port.broken` is set and the port is reported by
`take_broken()`); a broken RX ring breaks the receiver; a full RX ring is a
counted drop for that receiver; a call eventfd that cannot be written breaks its
port. Nothing here blocks or waits.

Offloads: a frame with NEEDS_CSUM or a GSO type goes whole (with its header) to a
receiver that negotiated the matching GUEST_* features; a receiver without them gets
the checksum completed, or the TCP segments cut, in software (switch/offload.py). A GSO
frame is checked against its headers as it leaves the sender (a lie breaks the sender,
whoever receives it) and then forwarded from that checked copy; it is cut at most once,
however many receivers need the segments.

Tap ports (switch/tap.py) have no rings: the engine reads a batch of frames from the tap
fd and forwards them like TX chains, and writes frames to it. A tap is the kernel, not a
guest: a frame from it that fails the checks is dropped and counted (`tx_errors`), and
only an unexpected error on the fd breaks the port.

This is the reference engine. `make_engine()` returns `NativeEngine` (switch/native) when
it can: the same engine with the common case of a batch in C, which hands anything else
(offload conversions, taps, faults) back to the code here one chain at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from alacrity.switch.coalesce import Bounds, Coalescer
from alacrity.switch.fdb import Fdb
from alacrity.switch.offload import PortFault, Unsegmentable, complete_csum, parse_gso, segment_tcp
from alacrity.switch.port import RX, TX, Port
from alacrity.switch.tap import TapPort
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import Chain, DeviceQueue
from alacrity.virtio.ring import QueueError

log = logging.getLogger("alacrity.switch")

BATCH = 128  # chains per port per poll: at saturation batches are full, and each poll costs Python
HEADER = vn.HEADER
_GSO_TYPES = (vn.GSO_TCPV4, vn.GSO_UDP, vn.GSO_TCPV6)
_PLAIN = (0, vn.GSO_NONE, 0, 0, 0, 0)  # the header of a frame with no offload left to do


def check_header(port: Port, fields: tuple, length: int) -> int:
    """Raise PortFault unless the TX header `fields` is believable for a frame of `length` bytes.

    Returns non-zero if the frame asks for an offload (NEEDS_CSUM or GSO)."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = fields[:6]
    if length < vn.ETH_HLEN:
        raise PortFault(f"frame of {length} bytes, shorter than an Ethernet header")
    if hdr_len > length:
        raise PortFault(f"hdr_len {hdr_len} beyond the {length}-byte frame")
    if flags & ~(vn.HDR_F_NEEDS_CSUM | vn.HDR_F_DATA_VALID):
        raise PortFault(f"unknown virtio-net header flags {flags:#x}")
    if flags & vn.HDR_F_NEEDS_CSUM:
        if not port.host_csum:
            raise PortFault("NEEDS_CSUM without the negotiated CSUM feature")
        if csum_start + csum_offset + 2 > length:
            raise PortFault(f"checksum at {csum_start}+{csum_offset} beyond the {length}-byte frame")
    base = gso_type & ~vn.GSO_ECN
    if gso_type == vn.GSO_NONE:
        if gso_size:
            raise PortFault(f"gso_size {gso_size} on a frame without GSO")
        if length > port.max_frame:
            raise PortFault(f"frame of {length} bytes over the port's maximum {port.max_frame}")
        return flags & vn.HDR_F_NEEDS_CSUM
    if base not in _GSO_TYPES or not port.host_gso[base]:
        raise PortFault(f"GSO type {gso_type:#x} was not negotiated")
    if not flags & vn.HDR_F_NEEDS_CSUM:
        raise PortFault("a GSO frame without NEEDS_CSUM")
    if not 0 < gso_size < length or length > vn.MAX_GSO_FRAME:
        raise PortFault(f"gso_size {gso_size} for a frame of {length} bytes")
    if hdr_len >= length:
        raise PortFault(f"hdr_len {hdr_len} leaves no payload in a GSO frame of {length} bytes")
    return 1


def _read_tx(port: Port, chain: Chain) -> tuple[tuple, list[memoryview], int]:
    """(header fields, frame segments, frame length) of one TX chain."""
    views = chain.readable
    hs = port.hdr_size
    if chain.writable:
        raise PortFault("TX chain with device-writable buffers")
    first = views[0] if views else None
    if first is not None and len(first) >= hs:
        fields = HEADER.unpack_from(first) if hs == 12 else vn.LEGACY_HEADER.unpack_from(first) + (1,)
        if len(views) == 1:
            return fields, [first[hs:]], len(first) - hs
        segs = [first[hs:], *views[1:]] if len(first) > hs else views[1:]
        return fields, segs, sum(len(s) for s in segs)
    # The header is spread over several buffers (legal, if odd): gather it.
    raw = b"".join(bytes(v) for v in views)
    if len(raw) < hs:
        raise PortFault(f"TX chain of {len(raw)} bytes, shorter than the {hs}-byte virtio-net header")
    fields = HEADER.unpack_from(raw) if hs == 12 else vn.LEGACY_HEADER.unpack_from(raw) + (1,)
    return fields, [memoryview(raw)[hs:]], len(raw) - hs


def _addresses(segs: list[memoryview]) -> tuple[bytes, bytes]:
    first = segs[0]
    if len(first) < 12:
        first = memoryview(b"".join(bytes(s) for s in segs)[:12])
    return bytes(first[0:6]), bytes(first[6:12])


def _joined(segs: list[memoryview]) -> bytes:
    """A copy of the frame: what is checked is what is sent, whatever the sender writes meanwhile."""
    return bytes(segs[0]) if len(segs) == 1 else b"".join(segs)


def _flat(segs: list[memoryview]) -> memoryview | bytes:
    return segs[0] if len(segs) == 1 else b"".join(segs)


def _takes_whole(dst: Port, gso_type: int) -> bool:
    """Does `dst` accept a frame with NEEDS_CSUM (and this GSO type) as it is?"""
    if not dst.guest_csum:
        return False
    if gso_type:
        if not dst.guest_gso.get(gso_type & ~vn.GSO_ECN):
            return False
        if gso_type & vn.GSO_ECN and not dst.features >> vn.F_GUEST_ECN & 1:
            return False
    return True


class Engine:
    """The reference engine, in Python. `make_engine()` picks it or `NativeEngine` (switch/native)."""

    kind = "python"

    def __init__(self, fdb: Fdb | None = None, *, batch: int = BATCH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fdb = fdb or Fdb()
        self.batch = batch
        self.clock = clock
        self.ports: dict[int, Port] = {}
        self.taps: dict[int, TapPort] = {}
        self.broken: list[Port] = []
        self.floods = 0
        self.batches = 0
        self.segmented = 0  # GSO frames cut in software (once each, however many receivers)
        self.completed = 0  # partial checksums completed in software
        # The frame being forwarded on the offload path: its (checked) segments, what
        # `parse_gso` found, and the software-offloaded frames once made (or why not).
        self._soft_segs: list[memoryview] | None = None
        self._soft_gso = None
        self._soft_frames: list | Unsegmentable | None = None
        self.announced: list[tuple[int, bytes]] = []  # (port id, frame): `announce`
        self.coalescer = Coalescer(Bounds())  # off until the switch sets its bounds
        # TX interrupt decisions deferred (`_defer_or_notify`): port -> since when; tx_defer_s 0: none are.
        self._tx_defer_s = 0.0
        self._tx_deferred: dict[Port, float] = {}
        self.tx_deferred = 0  # decisions deferred, ever
        self.tx_unneeded = 0  # ...that then needed no interrupt

    # -- ports
    def add_port(self, port: Port) -> None:
        self.ports[port.id] = port
        if isinstance(port, TapPort):
            self.taps[port.id] = port

    def remove_port(self, port_id: int) -> Port | None:
        port = self.ports.pop(port_id, None)
        self.taps.pop(port_id, None)
        self.fdb.forget_port(port_id)
        if port is not None:
            self.coalescer.forget(port)
            self._tx_deferred.pop(port, None)
        return port

    def _break(self, port: Port, reason: str) -> None:
        if port.broken is None:
            port.broken = reason
            port.tx_errors += 1
            self.broken.append(port)
            log.warning("%s: broken: %s", port.label, reason)
        port.rx = port.tx = None

    def _signal(self, port: Port, index: int) -> None:
        """`port`'s driver asked to be interrupted for ring `index`: now, or once the
        coalescer releases it (`release_held`)."""
        if self.coalescer.bounds.on:  # (off by default: then nothing more to do per signal)
            queue = port.rx if index == RX else port.tx
            if queue is not None and self.coalescer.hold(port, index, queue, self.clock()):
                return
        self._interrupt(port, index)

    @property
    def tx_defer_s(self) -> float:
        """How long a TX ring's interrupt decision may wait, in seconds (0: decided at once)."""
        return self._tx_defer_s

    @tx_defer_s.setter
    def tx_defer_s(self, seconds: float) -> None:
        self._tx_defer_s = seconds

    def _defer_or_notify(self, port: Port, index: int, queue: DeviceQueue, now: float) -> None:
        """Chains of `port`'s ring `index` were used this batch: signal it if its driver asks
        (EVENT_IDX). For a TX ring that decision waits, up to `tx_defer_s`, or until a quarter
        of the ring waits to be reported (`_decide_deferred`): a sender's driver collects its
        sent buffers by itself whenever it sends or takes an interrupt for a frame it receives
        (Linux's virtio-net does both), and then asks for no interrupt; taken at once, the
        decision would interrupt it for nearly every frame it sends."""
        if index == TX and self._tx_defer_s > 0:
            if queue.used_idx != queue.signalled_used and port not in self._tx_deferred:
                self._tx_deferred[port] = now
                self.tx_deferred += 1
            return
        if queue.needs_notify():
            self._signal(port, index)

    def _decide_deferred(self, now: float) -> None:
        """Take the deferred TX decisions that are due, in the order of the ports."""
        for port in [port for port in self.ports.values() if port in self._tx_deferred]:
            queue = port.tx
            if port.broken is not None or queue is None:
                del self._tx_deferred[port]
                continue
            waiting = (queue.used_idx - queue.signalled_used) & 0xFFFF
            if now - self._tx_deferred[port] < self._tx_defer_s and waiting < queue.size // 4:
                continue
            del self._tx_deferred[port]
            if waiting and queue.needs_notify():
                self._signal(port, TX)
            else:
                self.tx_unneeded += 1

    def next_decision(self) -> float | None:
        """When the next deferred TX decision is due at the latest (None: none is deferred)."""
        if not self._tx_deferred:
            return None
        return min(self._tx_deferred.values()) + self._tx_defer_s

    def tx_decisions(self) -> tuple[int, int]:
        """(TX interrupt decisions deferred, of which needed no interrupt), ever."""
        return self.tx_deferred, self.tx_unneeded

    def release_held(self) -> None:
        """Send the held interrupts that are due; both engines call it after each batch."""
        if self.coalescer.held():
            for port, index in self.coalescer.due(self.clock(), _ring_of):
                self._interrupt(port, index)  # type: ignore[arg-type]

    def _interrupt(self, port: Port, index: int) -> None:
        """Interrupt `port`'s driver for ring `index`. Its call fd is the peer's: if writing it
        fails, that breaks the port alone, never the loop."""
        try:
            port.signal(index)
        except OSError as exc:
            self._break(port, f"{'RX' if index == RX else 'TX'} call fd: {exc}")

    def announce(self, port_id: int, frame: bytes) -> None:
        """Send `frame` (a plain Ethernet frame) at the next poll as if port `port_id` had:
        its source is learned there and it goes where that port's frames would."""
        self.announced.append((port_id, frame))

    def _announce(self, now: float, touched: dict) -> int:
        announced, self.announced = self.announced, []
        for port_id, frame in announced:
            port = self.ports.get(port_id)
            if port is not None and port.broken is None:
                self._forward(port, _PLAIN, [memoryview(frame)], len(frame), now, touched)
        return len(announced)

    def take_broken(self) -> list[Port]:
        """Ports that broke the rules since the last call (removed from the engine)."""
        broken, self.broken = self.broken, []
        for port in broken:
            self.remove_port(port.id)
        return broken

    # -- the loop body
    def poll_once(self) -> int:
        """Forward one batch from every port; returns the number of frames consumed."""
        now = self.clock()
        touched: dict[tuple[Port, int], DeviceQueue] = {}
        work = self._announce(now, touched) if self.announced else 0
        for port in list(self.ports.values()):
            txq = port.tx
            if txq is None or port.broken:
                continue
            try:
                done = self._drain(port, txq, now, touched)
            except (QueueError, PortFault) as exc:
                self._break(port, f"TX: {exc}")
                continue
            if done:
                work += done
                touched[(port, TX)] = txq
        if self.taps:
            for tap in list(self.taps.values()):
                if tap.broken is None:
                    work += self._drain_tap(tap, now, touched)
        for (port, index), queue in touched.items():
            if port.broken is None:
                self._defer_or_notify(port, index, queue, now)
        if self._tx_deferred:
            self._decide_deferred(now)
        self.release_held()
        if work:
            self.batches += 1
        return work

    def _drain(self, port: Port, txq: DeviceQueue, now: float, touched: dict,
               limit: int | None = None) -> int:
        fdb = self.fdb
        ports = self.ports
        done = 0
        for _ in range(self.batch if limit is None else limit):
            chain = txq.pop()
            if chain is None:
                break
            fields, segs, length = _read_tx(port, chain)
            if check_header(port, fields, length):
                self._forward_offload(port, fields, segs, length, now, touched)
                txq.push(chain.head, 0)
                done += 1
                continue
            # What `_forward` does, inlined: this is the hot path.
            dst, src = _addresses(segs)
            if not src[0] & 1:
                fdb.learn(src, port.id, now)
            out = None if dst[0] & 1 else fdb.lookup(dst, now)
            receivers = 0
            if out is None:
                self.floods += 1
                for other in list(ports.values()):
                    if other is not port:
                        receivers += 1
                        self._deliver(fields, segs, length, other, touched)
            elif out != port.id:
                other = ports.get(out)
                if other is not None:
                    receivers = 1
                    self._deliver(fields, segs, length, other, touched)
            txq.push(chain.head, 0)
            done += 1
            port.tx_packets += 1
            port.tx_bytes += length
            if not receivers:
                port.tx_dropped += 1
        return done

    def _forward(self, port: Port, fields: tuple, segs: list[memoryview], length: int, now: float,
                 touched: dict) -> None:
        """Learn the source, look up the destination, deliver (or flood) one frame from `port`."""
        dst, src = _addresses(segs)
        if not src[0] & 1:
            self.fdb.learn(src, port.id, now)
        out = None if dst[0] & 1 else self.fdb.lookup(dst, now)
        receivers = 0
        if out is None:
            self.floods += 1
            for other in list(self.ports.values()):
                if other is not port:
                    receivers += 1
                    self._deliver(fields, segs, length, other, touched)
        elif out != port.id:
            other = self.ports.get(out)
            if other is not None:
                receivers = 1
                self._deliver(fields, segs, length, other, touched)
        port.tx_packets += 1
        port.tx_bytes += length
        if not receivers:
            port.tx_dropped += 1

    def _forward_offload(self, port: Port, fields: tuple, segs: list[memoryview], length: int, now: float,
                         touched: dict) -> None:
        """`_forward` for a frame with NEEDS_CSUM or GSO. A GSO frame is checked first (PortFault
        before anyone received it) and forwarded from the checked copy, which the sender can no
        longer change under us."""
        gso = None
        if fields[1]:
            frame = _joined(segs)
            with contextlib.suppress(Unsegmentable):  # believable, but it can only go whole
                gso = parse_gso(frame, fields)
            segs = [memoryview(frame)]
        self._soft_segs, self._soft_gso, self._soft_frames = segs, gso, None
        try:
            self._forward(port, fields, segs, length, now, touched)
        finally:
            # Let go of the sender's buffers (guest memory must be unmappable).
            self._soft_segs = self._soft_gso = self._soft_frames = None

    def _drain_tap(self, tap: TapPort, now: float, touched: dict) -> int:
        """Read and forward up to a batch of frames from a tap."""
        done = 0
        for _ in range(self.batch):
            try:
                n = tap.read()
            except OSError as exc:
                self._break(tap, f"read: {exc}")
                break
            if n is None:
                break
            done += 1
            try:
                if n < HEADER.size:
                    raise PortFault(f"read of {n} bytes, shorter than the virtio-net header")
                fields = HEADER.unpack_from(tap.buf)
                segs = [tap.view[HEADER.size : n]]
                length = n - HEADER.size
                if check_header(tap, fields, length):
                    self._forward_offload(tap, fields, segs, length, now, touched)
                else:
                    self._forward(tap, fields, segs, length, now, touched)
            except PortFault as exc:
                tap.tx_errors += 1
                if tap.tx_errors <= 10 or tap.tx_errors % 1000 == 0:
                    log.warning("%s: frame dropped (%d so far): %s", tap.label, tap.tx_errors, exc)
        return done

    def _deliver(self, fields: tuple, segs: list[memoryview], length: int, dst: Port, touched: dict) -> bool:
        """Copy one frame into `dst`'s RX ring; False (and a counted drop) if it does not fit."""
        rxq = dst.rx
        if rxq is None or dst.broken:
            if dst.broken is None and isinstance(dst, TapPort):
                return self._deliver_tap(fields, segs, length, dst)
            dst.rx_dropped += 1
            return False
        flags, gso_type = fields[0] & vn.HDR_F_NEEDS_CSUM, fields[1]
        if (flags or gso_type) and not _takes_whole(dst, gso_type):
            return self._deliver_soft(fields, segs, dst, touched)
        hs = dst.hdr_size
        need = hs + length
        start = rxq.last_avail
        try:
            chain = rxq.pop()
            if chain is None:
                dst.rx_dropped += 1
                return False
            writable = chain.writable
            if len(writable) == 1 and len(segs) == 1 and len(writable[0]) >= need:
                # The common case: one buffer each side.
                view = writable[0]
                if hs == 12:
                    HEADER.pack_into(view, 0, flags, gso_type, *fields[2:6], 1)
                else:
                    vn.LEGACY_HEADER.pack_into(view, 0, flags, gso_type, *fields[2:6])
                view[hs:need] = segs[0]
                rxq.push(chain.head, need)
            else:
                chains = [chain]
                room = chain.writable_len()
                if room < need and dst.mrg_rxbuf:
                    while room < need:
                        more = rxq.pop()
                        if more is None:
                            break
                        chains.append(more)
                        room += more.writable_len()
                if room < need:
                    rxq.last_avail = start  # leave the buffers for a frame that fits
                    dst.rx_dropped += 1
                    return False
                header = (HEADER.pack(flags, gso_type, *fields[2:6], len(chains)) if hs == 12
                          else vn.LEGACY_HEADER.pack(flags, gso_type, *fields[2:6]))
                _scatter(rxq, chains, [memoryview(header), *segs])
        except QueueError as exc:
            self._break(dst, f"RX: {exc}")
            return False
        dst.rx_packets += 1
        dst.rx_bytes += length
        touched[(dst, RX)] = rxq
        return True

    def _deliver_soft(self, fields: tuple, segs: list[memoryview], dst: Port, touched: dict) -> bool:
        """Deliver the frame to a receiver lacking its offload: segments, or the checksum completed."""
        frames = self._soft_frames if self._soft_segs is segs else None
        if frames is None:
            frames = self._soft(fields, segs)
            if self._soft_segs is segs:
                self._soft_frames = frames
        if isinstance(frames, Unsegmentable) or max(len(f) for f in frames) > dst.max_frame:
            dst.rx_dropped_offload += 1
            return False
        ok = True
        for frame in frames:
            ok = self._deliver(_PLAIN, [memoryview(frame)], len(frame), dst, touched) and ok
        return ok

    def _soft(self, fields: tuple, segs: list[memoryview]) -> list | Unsegmentable:
        """The frame made plain, once per frame: [checksum completed] or its TCP segments."""
        checked = self._soft_segs is segs  # from `_forward_offload`: parsed, and a copy if GSO
        try:
            if not fields[1]:
                self.completed += 1
                return [complete_csum(_flat(segs), fields[4], fields[5])]  # sums its own copy
            frame = _flat(segs) if checked else _joined(segs)
            gso = self._soft_gso if checked else None
            if gso is None:  # `parse_gso` said Unsegmentable, or the frame skipped `_forward_offload`
                gso = parse_gso(frame, fields)
            frames = segment_tcp(frame, gso)
            self.segmented += 1
            return frames
        except Unsegmentable as exc:
            return exc

    def _deliver_tap(self, fields: tuple, segs: list[memoryview], length: int, tap: TapPort) -> bool:
        flags, gso_type = fields[0] & vn.HDR_F_NEEDS_CSUM, fields[1]
        if (flags or gso_type) and not _takes_whole(tap, gso_type):
            return self._deliver_soft(fields, segs, tap, {})
        try:
            sent = tap.write(HEADER.pack(flags, gso_type, *fields[2:6], 0), segs)
        except OSError as exc:
            self._break(tap, f"write: {exc}")
            return False
        if not sent:
            tap.rx_dropped += 1
            return False
        tap.rx_packets += 1
        tap.rx_bytes += length
        return True


def _ring_of(port: Port, index: int) -> DeviceQueue | None:
    return None if port.broken is not None else port.rx if index == RX else port.tx


def _scatter(rxq: DeviceQueue, chains: list[Chain], sources: list[memoryview]) -> None:
    """Copy `sources` in order into the chains' writable buffers and push each chain used."""
    src_i, src_off = 0, 0
    for chain in chains:
        written = 0
        for view in chain.writable:
            pos = 0
            while pos < len(view) and src_i < len(sources):
                src = sources[src_i]
                n = min(len(view) - pos, len(src) - src_off)
                view[pos : pos + n] = src[src_off : src_off + n]
                pos += n
                src_off += n
                if src_off == len(src):
                    src_i += 1
                    src_off = 0
            written += pos
            if src_i == len(sources):
                break
        rxq.push(chain.head, written, publish=False)
    # The driver reads num_buffers from the first chain and expects the rest to be there.
    rxq.publish()
