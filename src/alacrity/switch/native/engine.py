"""`NativeEngine`: `Engine` with the common case of `poll_once` in C (fastpath.c).

One C call (`sw_poll`) runs the senders in order; per sender and batch, `sw_drain` (inside
it) forwards chains until the batch is done, the TX ring is empty, or a chain needs the
Python reference code (a punt: an offload to convert for a
receiver without it, a tap or other Python-only receiver, a header spread over buffers,
any ring or header fault); that one chain then goes through `Engine._drain` and C carries
on. Frames are taken in ring order either way, so nothing is reordered. GSO and NEEDS_CSUM
frames to receivers that negotiated the offloads stay in C, checked as the reference does.

State: the DeviceQueue objects are what the rest of the switch reads, and they are right
whenever Python runs: C works on its copy of each ring's indices, and everything it moved
(indices, signalled marks, counter deltas, floods) is copied back in one batch (`_sync_out`,
via `sw_export`) at the end of every poll and before every punt. Going in (`_refresh`, at
the start of every poll and after every punt), indices that Python moved are taken back,
and a changed ring (a new DeviceQueue, a broken port, new features, new dirty logging) is
noticed by identity and re-attached. The FDB lives in C (`NativeFdb`: the interface and
semantics of `Fdb`) and serves both paths.

Notifications: C keeps the ordered "touched" list of `poll_once` (the Python path adds its
rings to it) and makes the EVENT_IDX decision for the rings it has (`sw_notify`); Python
writes the eventfds (`port.signal`), and decides for the rings C does not have. So which
rings are signalled, and in which order, is exactly what the reference engine does.

Guest memory is pinned through buffers on the objects under the ring views (the mmap, or
a test's bytearray) for as long as C may use it: a port's buffers go when it is removed or
its rings change (noticed at the next poll).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from alacrity.switch.engine import BATCH, Engine
from alacrity.switch.fdb import Fdb, FdbEntry
from alacrity.switch.native import NativeUnavailable, load
from alacrity.switch.offload import PortFault
from alacrity.switch.port import TX, Port, VhostPort
from alacrity.switch.tap import TapPort
from alacrity.vhost_user import eventfd, sigbus
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.net import mac_text
from alacrity.virtio.ring import QueueError

#: Scratch for one frame's deliveries: RX buffers (all receivers together) and RX chains.
SCRATCH_SEGS = 4096
SCRATCH_CHAINS = 2048
SW_REC = 16  # values per port in a sync-out record (fastpath.h)
#: Why sw_run returned (SW_RUN_* in fastpath.h)
RUN_IO, RUN_EINTR, RUN_TIMEOUT, RUN_PUNT, RUN_FAULTS, RUN_CALL, RUN_SIGNALS, RUN_ERROR = range(1, 9)
_UNSET = object()


class NativeFdb:
    """`Fdb` over the C table that the native engine forwards with (same methods, same semantics)."""

    def __init__(self, *, ageing_s: float = 300.0, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("an FDB needs room for at least one entry")
        self._ffi, self._lib = load()
        k0, k1 = struct.unpack("<QQ", os.urandom(16))
        ptr = self._lib.sw_fdb_new(max_entries, ageing_s, k0, k1)
        if ptr == self._ffi.NULL:
            raise NativeUnavailable(f"no C FDB of {max_entries} entries (at most {1 << 24})")
        self.ptr = self._ffi.gc(ptr, self._lib.sw_fdb_free)
        self.max_entries = max_entries

    @classmethod
    def from_fdb(cls, fdb: Fdb) -> NativeFdb:
        """A copy of `fdb` (entries in their order, counters, settings)."""
        new = cls(ageing_s=fdb.ageing_s, max_entries=fdb.max_entries)
        for mac, (port, seen) in fdb.table.items():
            new.learn(mac, port, seen)
        new._lib.sw_fdb_set_counts(new.ptr, fdb.moves, fdb.evictions)
        return new

    @property
    def ageing_s(self) -> float:
        return self._lib.sw_fdb_ageing(self.ptr)

    @ageing_s.setter
    def ageing_s(self, value: float) -> None:
        self._lib.sw_fdb_set_ageing(self.ptr, float(value))

    @property
    def moves(self) -> int:
        return self._lib.sw_fdb_moves(self.ptr)

    @property
    def evictions(self) -> int:
        return self._lib.sw_fdb_evictions(self.ptr)

    def learn(self, mac: bytes, port: int, now: float) -> None:
        self._lib.sw_fdb_learn(self.ptr, int.from_bytes(mac, "big"), port, now)

    def lookup(self, mac: bytes, now: float) -> int | None:
        out = self._ffi.new("int64_t *")
        return out[0] if self._lib.sw_fdb_lookup(self.ptr, int.from_bytes(mac, "big"), now, out) else None

    def forget_port(self, port: int) -> None:
        self._lib.sw_fdb_forget_port(self.ptr, port)

    def expire(self, now: float) -> None:
        self._lib.sw_fdb_expire(self.ptr, now)

    @property
    def table(self) -> dict[bytes, list]:
        """A copy of the table as `Fdb.table` holds it: mac -> [port, last seen], in insertion order."""
        n = len(self)
        macs = self._ffi.new("uint64_t[]", max(n, 1))
        ports = self._ffi.new("int64_t[]", max(n, 1))
        seen = self._ffi.new("double[]", max(n, 1))
        n = self._lib.sw_fdb_dump(self.ptr, macs, ports, seen, n)
        return {macs[i].to_bytes(6, "big"): [ports[i], seen[i]] for i in range(n)}

    def entries(self, now: float) -> list[FdbEntry]:
        self.expire(now)
        return [FdbEntry(mac_text(m), e[0], round(now - e[1], 3)) for m, e in sorted(self.table.items())]

    def __len__(self) -> int:
        return self._lib.sw_fdb_len(self.ptr)


class _Slot:
    """A port as C sees it: its `struct sw_port` and what it was made from."""

    __slots__ = ("port", "c", "index", "rxq", "txq", "broken", "features", "max_frame", "rx_logging",
                 "tx_logging", "rx_native", "tx_native", "rx_sync", "tx_sync", "keep")

    def __init__(self, port: Port, c) -> None:
        self.port = port
        self.c = c
        self.index = 0
        self.rxq = self.txq = self.broken = _UNSET  # attach on the first refresh
        self.features = self.max_frame = None
        self.rx_logging = self.tx_logging = None  # the rings' DeviceQueue.logging, as attached
        self.rx_native = self.tx_native = False
        self.rx_sync = self.tx_sync = (-1, -1)  # (last_avail, used_idx) as C and Python last agreed
        self.keep: list = []  # buffers C points into: alive while attached


class WakeupLoop:
    """What wakeup.c's loop keeps between calls (`struct sw_wait`): the spin, the counters it
    gathers, the per-port arrays; and the eventfd watchdog's watch on the thread that runs it
    (so made by that thread: `Switch.run`)."""

    def __init__(self, ffi, lib) -> None:
        self._ffi, self._lib = ffi, lib
        self.c = ffi.new("struct sw_wait *")
        self.c.timeout_ms = 1000
        self.nports = -1
        self._arrays: tuple = ()
        self._unwatch = eventfd.watch_native(lambda: self.c.in_call)
        parked, self.c.watch_wake = eventfd.watchdog_parking()
        self.c.watch_parked = ffi.cast("int32_t *", parked)

    def size(self, nports: int) -> None:
        """Per-port arrays for `nports` ports (counters start again from nothing)."""
        if nports == self.nports:
            return
        ffi, c, n = self._ffi, self.c, max(nports, 1)
        self._arrays = (ffi.new("int32_t[]", 2 * n), ffi.new("int32_t[]", 2 * n), ffi.new("int64_t[]", n),
                        ffi.new("int64_t[]", n))
        c.calls, c.signals, c.kicks, c.interrupts = self._arrays
        self.nports = nports

    def faults(self):
        """The SIGBUS guard's fault counter as a C function (NULL until the guard is loaded)."""
        return self._ffi.cast("uint64_t (*)(void)", sigbus.total_faults_function())

    def close(self) -> None:
        self._unwatch()
        self._lib.sw_wait_free(self.c)


class NativeEngine(Engine):
    kind = "native"

    def __init__(self, fdb: Fdb | None = None, *, batch: int = BATCH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ffi, self._lib = ffi, lib = load()
        super().__init__(fdb, batch=batch, clock=clock)
        self.fdb = NativeFdb.from_fdb(self.fdb) if isinstance(self.fdb, Fdb) else self.fdb
        self.punts = 0  # chains the C side handed to the Python path
        self._c = c = ffi.new("struct sw_engine *")
        c.fdb = self.fdb.ptr
        self._segs = ffi.new("struct sw_seg[]", SCRATCH_SEGS)
        self._chains = ffi.new("struct sw_chain[]", SCRATCH_CHAINS)
        c.segs, c.segs_cap = self._segs, SCRATCH_SEGS
        c.chains, c.chains_cap = self._chains, SCRATCH_CHAINS
        self._slots: dict[int, _Slot] = {}
        self._order: list[_Slot] = []
        self._arrays: tuple = ()
        self._faults_seen = 0
        self._rebuild()

    @property
    def native_frames(self) -> int:
        """Frames forwarded by C, ever."""
        return self._c.frames

    @property
    def native_gso_frames(self) -> int:
        """GSO frames forwarded (whole) by C, ever."""
        return self._c.gso_frames

    # -- ports
    def add_port(self, port: Port) -> None:
        self._sync_out()
        super().add_port(port)
        slot = self._slots[port.id] = _Slot(port, self._ffi.new("struct sw_port *"))
        slot.c.id = port.id  # for the id map, before the first attach
        self._rebuild()

    def remove_port(self, port_id: int) -> Port | None:
        self._sync_out()
        port = super().remove_port(port_id)
        if self._slots.pop(port_id, None) is not None:
            self._rebuild()
        return port

    def _rebuild(self) -> None:
        """Give C the ports, in the order of `self.ports`."""
        ffi, c = self._ffi, self._c
        self._order = order = [self._slots[pid] for pid in self.ports if pid in self._slots]
        n = max(len(order), 1)
        cap = 8
        while cap < 2 * n:
            cap *= 2
        ports = ffi.new("struct sw_port *[]", n)
        for i, slot in enumerate(order):
            ports[i] = slot.c
            slot.index = i
            slot.c.dirty = slot.c.rx.touched = slot.c.tx.touched = 0
        self._out = ffi.new("int64_t[]", SW_REC * n + 1)
        self._signals = ffi.new("int32_t[]", 2 * n)
        arrays = (ports, ffi.new("int32_t[]", cap), ffi.new("int32_t[]", 2 * n), ffi.new("int32_t[]", n),
                  ffi.new("struct sw_rxplan[]", n))
        c.ports, c.idmap, c.order, c.dirty, c.plans = arrays
        c.nports, c.idmask, c.norder, c.ndirty = len(order), cap - 1, 0, 0
        self._arrays = arrays
        self._lib.sw_index_ports(c)

    # -- C <-> Python state
    def _attach(self, slot: _Slot) -> None:
        port, c = slot.port, slot.c
        rxq, txq = port.rx, port.tx
        slot.rxq, slot.txq, slot.broken = rxq, txq, port.broken
        slot.rx_logging = rxq.logging if rxq is not None else None
        slot.tx_logging = txq.logging if txq is not None else None
        slot.features, slot.max_frame = port.features, port.max_frame
        slot.keep = []
        c.hdr_size = port.hdr_size
        c.mrg_rxbuf = bool(port.mrg_rxbuf)
        c.host_csum = bool(port.host_csum)
        c.guest_csum = bool(port.guest_csum)
        # GSO types as bits 1 << type (fastpath.h); GUEST_ECN as 0x80, the GSO_ECN flag
        c.host_gso = sum(1 << t for t, on in port.host_gso.items() if on)
        c.guest_gso = (sum(1 << t for t, on in port.guest_gso.items() if on)
                       | (vn.GSO_ECN if port.features >> vn.F_GUEST_ECN & 1 else 0))
        c.max_frame = min(port.max_frame, 0xFFFFFFFF)
        c.broken = port.broken is not None
        c.tx_skip = txq is None or bool(port.broken)  # poll_once's loop passes it by
        slot.rx_native = slot.tx_native = False
        if isinstance(port, TapPort):
            c.rx_state = 0 if port.broken is not None else 2  # frames to a tap: Python writes them
        elif rxq is None or port.broken:
            c.rx_state = 0  # a counted drop
        elif self._queue(slot, c.rx, rxq):
            c.rx_state = 1
            slot.rx_native = True
        else:
            c.rx_state = 2  # a ring C cannot use: Python delivers to it
        if txq is not None and not port.broken and not isinstance(port, TapPort):
            slot.tx_native = self._queue(slot, c.tx, txq)
        c.rx.native, c.tx.native = slot.rx_native, slot.tx_native
        slot.rx_sync = (rxq.last_avail, rxq.used_idx) if slot.rx_native else (-1, -1)
        slot.tx_sync = (txq.last_avail, txq.used_idx) if slot.tx_native else (-1, -1)

    def _queue(self, slot: _Slot, cq, q: DeviceQueue) -> bool:
        """Point `cq` at the rings and memory of `q`; False if C cannot use them (Python will)."""
        ffi = self._ffi
        regions = getattr(q.memory, "regions", None)
        if regions is None or q.size & (q.size - 1):
            return False
        keep: list = []
        try:
            desc, avail, used = (self._pin(v, keep) for v in (q.desc, q.avail, q.used))
            table = ffi.new("struct sw_region[]", max(len(regions), 1))
            for i, region in enumerate(regions):
                if len(region.view) < region.size:
                    return False
                table[i].gpa, table[i].size = region.gpa, region.size
                table[i].host = self._pin(region.view, keep)
            log, log_size, used_log = ffi.NULL, 0, None
            if q.logging is not None:  # a log C cannot reach (no `view`) leaves the ring to Python
                log, log_size = self._pin(q.logging.log.view, keep), len(q.logging.log.view)
                used_log = q.logging.used_gpa
        except (TypeError, ValueError, BufferError, AttributeError):
            return False
        if int(ffi.cast("uintptr_t", avail)) % 2 or int(ffi.cast("uintptr_t", used)) % 4:
            return False
        cq.desc, cq.avail, cq.used = desc, avail, used
        cq.regions, cq.nregions = table, len(regions)
        cq.size, cq.indirect, cq.event_idx = q.size, bool(q.indirect), bool(q.event_idx)
        cq.last_avail, cq.used_idx, cq.signalled = q.last_avail, q.used_idx, q.signalled_used
        cq.published = q.used_idx
        cq.log, cq.log_size = log, log_size
        cq.log_used, cq.used_log = used_log is not None, used_log or 0
        cq.dirty = cq.publish = cq.pushed = 0
        slot.keep += [*keep, table]
        return True

    def _pin(self, view: memoryview, keep: list):
        """A pointer to `view`'s bytes, kept valid by a buffer on the object under it (in `keep`).

        Not a buffer on `view` itself: a memoryview with exports that the garbage collector
        clears (in a cycle) crashes when the export is released later (CPython 3.11)."""
        ffi = self._ffi
        base = view.obj
        if isinstance(base, memoryview) or not view.contiguous or view.itemsize != 1:
            raise ValueError("not a plain byte buffer")
        whole = ffi.from_buffer("uint8_t[]", base, require_writable=True)
        part = ffi.from_buffer("uint8_t[]", view, require_writable=True)
        start = int(ffi.cast("uintptr_t", part)) - int(ffi.cast("uintptr_t", whole))
        ffi.release(part)
        if not 0 <= start <= len(whole) - len(view):
            raise ValueError("a view outside its object")
        keep.append(whole)
        return ffi.cast("uint8_t *", whole) + start

    def _refresh(self) -> None:
        """Python -> C: re-attach what changed (a new ring, a broken port, new features), and take
        the indices of rings that the Python path (or anyone) moved since C last synced them."""
        for slot in self._order:
            port = slot.port
            rxq, txq = port.rx, port.tx
            if (rxq is not slot.rxq or txq is not slot.txq or port.broken is not slot.broken
                    or port.features != slot.features or port.max_frame != slot.max_frame
                    or (rxq is not None and rxq.logging is not slot.rx_logging)
                    or (txq is not None and txq.logging is not slot.tx_logging)):
                self._attach(slot)
                continue
            if slot.rx_native and (rxq.last_avail, rxq.used_idx) != slot.rx_sync:
                q = slot.c.rx
                q.last_avail, q.used_idx = slot.rx_sync = rxq.last_avail, rxq.used_idx
                q.published = q.used_idx
            if slot.tx_native and (txq.last_avail, txq.used_idx) != slot.tx_sync:
                q = slot.c.tx
                q.last_avail, q.used_idx = slot.tx_sync = txq.last_avail, txq.used_idx
                q.published = q.used_idx

    def _sync_out(self) -> None:
        """C -> Python: moved indices, signalled marks, counter deltas, floods."""
        c = self._c
        if not c.ndirty and not c.floods:
            return
        self._apply(self._lib.sw_export(c, self._out))

    def _apply(self, n: int) -> None:
        """Take the `n` values sw_export wrote (`self._out`) into the Python objects."""
        values = self._ffi.unpack(self._out, n)
        order = self._order
        for k in range(0, n - 1, SW_REC):
            (index, changed, rla, rused, rsig, rpushed, tla, tused, tsig, tpushed,
             rx_packets, rx_bytes, rx_dropped, tx_packets, tx_bytes, tx_dropped) = values[k : k + SW_REC]
            slot = order[index]
            if changed & 1:
                q = slot.rxq
                q.last_avail, q.used_idx, q.signalled_used = rla, rused, rsig
                q.requests += rpushed
                slot.rx_sync = (rla, rused)
            if changed & 2:
                q = slot.txq
                q.last_avail, q.used_idx, q.signalled_used = tla, tused, tsig
                q.requests += tpushed
                slot.tx_sync = (tla, tused)
            port = slot.port
            if rx_packets:
                port.rx_packets += rx_packets
                port.rx_bytes += rx_bytes
            if rx_dropped:
                port.rx_dropped += rx_dropped
            if tx_packets:
                port.tx_packets += tx_packets
                port.tx_bytes += tx_bytes
            if tx_dropped:
                port.tx_dropped += tx_dropped
        self.floods += values[-1]

    def _python(self, call: Callable[[dict], int]) -> int:
        """Run a piece of the reference code on the Python objects: sync out first, then tell C
        which rings it touched (in order) and take the indices it moved."""
        self._sync_out()
        touched: dict = {}
        try:
            return call(touched)
        finally:
            touch, slots = self._lib.sw_touch, self._slots
            for port, ring in touched:
                slot = slots.get(port.id)
                if slot is not None:
                    touch(self._c, slot.index, ring)
            self._refresh()

    # -- the loop body
    def _break_damaged(self) -> None:
        """The C path never asks a queue whether its memory is intact: after any SIGBUS the
        guard repaired in this process, find the ports whose memory it was."""
        faults = sigbus.total_faults()
        if faults == self._faults_seen:
            return
        self._faults_seen = faults
        for slot in self._order:
            port = slot.port
            queue = port.tx or port.rx
            if queue is not None and port.broken is None and queue.damaged():
                self._break(port, "guest memory was truncated under us")

    def poll_once(self) -> int:
        now = self.clock()
        c, lib = self._c, self._lib
        lib.sw_begin(c, now)
        self._break_damaged()
        self._refresh()
        work = self._python(lambda touched: self._announce(now, touched)) if self.announced else 0
        # The senders in order: C drains the native TX rings (sw_poll) and stops where Python
        # has to: a punt (carried on by _drain_native) or a TX ring that Python drains.
        order, poll, batch, i = self._order, lib.sw_poll, self.batch, 0
        nports = len(order)
        while True:
            work += poll(c, i, batch)
            i = c.stop
            if i >= nports:
                break
            slot = order[i]
            port = slot.port
            txq = port.tx
            i += 1
            if c.status:
                work += self._drain_native(slot, port, txq, now, c.pdone)
                continue
            if txq is None or port.broken:
                continue
            try:
                done = self._python(lambda touched, port=port, txq=txq: self._drain(port, txq, now, touched))
            except (QueueError, PortFault) as exc:
                self._break(port, f"TX: {exc}")
                self._refresh()
                continue
            if done:
                work += done
                lib.sw_touch(c, slot.index, TX)
        if self.taps:
            for tap in list(self.taps.values()):
                if tap.broken is None:
                    work += self._python(lambda touched, tap=tap: self._drain_tap(tap, now, touched))
        signals = self._signals
        n = lib.sw_finish(c, signals, self._out)
        if c.nout > 1 or self._out[0]:
            self._apply(c.nout)
        self._deliver_signals(signals, 0, n, now)
        if self._tx_deferred:
            self._decide_deferred(now)
        self.release_held()
        if work:
            self.batches += 1
        return work

    def _deliver_signals(self, signals, start: int, end: int, now: float) -> None:
        """Signal what sw_notify found in signals[start:end]: a ring C has, or (negative) one
        that Python decides (its TX decision deferred as C defers its own)."""
        order = self._order
        for k in range(start, end):
            entry = signals[k]
            if entry >= 0:
                self._signal(order[entry >> 1].port, entry & 1)
            else:
                entry = -1 - entry
                slot = order[entry >> 1]
                queue = slot.txq if entry & 1 else slot.rxq
                if slot.port.broken is None and queue is not None:
                    self._defer_or_notify(slot.port, entry & 1, queue, now)

    @Engine.tx_defer_s.setter
    def tx_defer_s(self, seconds: float) -> None:
        self._tx_defer_s = self._c.tx_defer = seconds  # C reads it at every decision, not we per poll

    def next_decision(self) -> float | None:
        ours, theirs = super().next_decision(), self._lib.sw_next_decision(self._c)  # theirs -1: none
        return min([t for t in (ours, theirs) if t is not None and t >= 0], default=None)

    def tx_decisions(self) -> tuple[int, int]:
        """(TX interrupt decisions deferred, of which needed no interrupt), ever."""
        return self.tx_deferred + self._c.tx_deferred, self.tx_unneeded + self._c.tx_unneeded

    # -- the wake-up loop (wakeup.c)
    def loop_ready(self) -> bool:
        """May `run_loop` serve the switch now? Only while every running ring is native and
        nothing needs Python between frames: no tap, no coalescing, no announcement, no dirty
        log, no broken port waiting to be taken."""
        if self.announced or self.taps or self.broken or self.coalescer.bounds.on or self.coalescer.held() \
                or self._tx_deferred:  # (decisions C defers it takes itself)
            return False
        self._refresh()
        for slot in self._order:
            port = slot.port
            if not isinstance(port, VhostPort) or port.broken is not None:
                return False
            if port.tx is not None and (not slot.tx_native or slot.tx_logging is not None):
                return False
            if port.rx is not None and (not slot.rx_native or slot.rx_logging is not None):
                return False
        return True

    def run_loop(self, loop: WakeupLoop, kicks: list[tuple[int, Port]], others: list[int]) -> int:
        """Sleep, wake, forward and signal in C (`sw_run`) until Python has something to do;
        returns why (SW_RUN_*). `kicks` are the TX kick fds and their ports, `others` the fds
        that only Python serves. Call after `loop_ready()`. Afterwards the Python objects are
        up to date, as after `poll_once`, and a call fd that failed has broken its port."""
        lib, w = self._lib, loop.c
        order = self._order
        loop.size(len(order))
        index = {slot.port.id: slot.index for slot in order}
        fds = [fd for fd, _port in kicks] + others
        owners = [index[port.id] for _fd, port in kicks]
        if lib.sw_wait_fds(w, fds or [-1], owners or [0], len(fds), len(kicks)) < 0:
            raise MemoryError("no room for the wake-up loop's fds")
        for slot in order:
            for ring in (0, 1):
                fd = slot.port.call_fd(ring)
                w.calls[2 * slot.index + ring] = -1 if fd is None else fd
        w.batch = self.batch
        w.faults = loop.faults()
        w.faults_seen = self._faults_seen
        reason = lib.sw_run(self._c, w)
        self._sync_out()
        for slot in order:
            i = slot.index
            if w.kicks[i]:
                slot.port.kicks += w.kicks[i]
                w.kicks[i] = 0
            if w.interrupts[i]:
                slot.port.interrupts += w.interrupts[i]
                w.interrupts[i] = 0
        self.batches += w.batches
        w.batches = 0
        if reason == RUN_CALL:
            entry = w.failed_entry
            self._break(order[entry >> 1].port,
                        f"{'TX' if entry & 1 else 'RX'} call fd: {eventfd.write_error(w.failed_errno)}")
        if reason in (RUN_CALL, RUN_SIGNALS):
            self._deliver_signals(w.signals, w.next_signal, w.nsignals, self._c.now)
        return reason

    def _drain_native(self, slot: _Slot, port: Port, txq: DeviceQueue, now: float, done: int) -> int:
        """`_drain` of a native TX ring from a punt on (C forwarded `done` chains before it): C
        does the chains it can; returns all of them, or 0 (no work counted) if the sender broke."""
        c, drain, index, budget = self._c, self._lib.sw_drain, slot.index, self.batch
        while True:
            # Punt: this one chain goes through the reference code.
            self.punts += 1
            try:
                one = self._python(lambda touched: self._drain(port, txq, now, touched, 1))
            except (QueueError, PortFault) as exc:
                self._break(port, f"TX: {exc}")
                self._refresh()
                return 0
            done += one
            if not one or port.tx is not txq or port.broken:
                if done and not port.broken:
                    self._lib.sw_touch(c, index, TX)
                return done
            done += drain(c, index, budget - done, done)
            if c.status == 0:
                return done  # (C put the TX ring in `touched` if it moved)
