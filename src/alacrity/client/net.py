"""Join a switch from a host process: a virtio-net driver over a vhost-user socket,
with the rings and buffers in our own memfd.

`NetDriver` is the sans-I/O driver side (two rings and their buffers in one memory
area); `NetClient` is the `Driver` that registers them with the switch and waits on them:

    with NetClient(sock) as nic:
        nic.send(frame)
        reply = nic.recv(timeout=1.0)
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from collections import deque
from collections.abc import Iterable

from alacrity.client.driver import Driver, DriverError
from alacrity.vhost_user.messages import F_PROTOCOL_FEATURES, ProtocolError
from alacrity.virtio import net as vn
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit, has

RX, TX = 0, 1
POLL_BUDGET_S = 50e-6
HDR = vn.HEADER_SIZE


class NetError(DriverError):
    pass


class NetDriver:
    """The driver side of a virtio-net device in `area` (its guest-physical address 0 at
    `area[0]`): an RX ring kept stocked with `rx_buffer`-byte buffers, a TX ring with one
    `tx_slot`-byte slot per descriptor. Assumes VERSION_1 (12-byte headers) and MRG_RXBUF."""

    def __init__(self, area: memoryview, *, queue_size: int = 256, rx_buffer: int = 2048,
                 tx_slot: int = 2048, event_idx: bool = True) -> None:
        self.area = area
        self.queue_size = queue_size
        self.rx_buffer = rx_buffer
        self.tx_slot = tx_slot
        self.rx_layout = RingLayout.at(0, queue_size)
        self.tx_layout = RingLayout.at(self.rx_layout.end, queue_size)
        self.rx_base = (self.tx_layout.end + 4095) & ~4095
        self.tx_base = self.rx_base + queue_size * rx_buffer
        if self.tx_base + queue_size * tx_slot > len(area):
            need = self.area_size(queue_size, rx_buffer, tx_slot)
            raise ValueError(f"area of {len(area)} bytes, need {need}")
        self.rxq = DriverQueue(area, self.rx_layout, event_idx=event_idx)
        self.txq = DriverQueue(area, self.tx_layout, event_idx=event_idx)
        self.tx_free = list(range(queue_size))
        self.partial: list[tuple[int, int]] = []  # (slot, length) of a frame still arriving
        self.expected = 0
        self.rx_frames = 0
        self.tx_frames = 0

    @staticmethod
    def area_size(queue_size: int, rx_buffer: int, tx_slot: int) -> int:
        rings = RingLayout.at(RingLayout.at(0, queue_size).end, queue_size).end
        return ((rings + 4095) & ~4095) + queue_size * (rx_buffer + tx_slot)

    # -- RX
    def stock_rx(self, limit: int | None = None) -> bool:
        """Give every free RX descriptor a buffer; True if the device asked for a kick."""
        count = self.rxq.free_count() if limit is None else min(limit, self.rxq.free_count())
        for _ in range(count):
            slot = self.rxq.free[-1]  # a descriptor id names its buffer slot
            self.rxq.add([(self.rx_base + slot * self.rx_buffer, self.rx_buffer, True)], slot)
        return self.rxq.publish()

    def reap_rx(self) -> list[bytes]:
        """Frames (without their virtio-net header) the device has completed."""
        frames = []
        area, base, size = self.area, self.rx_base, self.rx_buffer
        for slot, written in self.rxq.completed():
            if written > size:
                raise NetError(f"device wrote {written} bytes into a {size}-byte buffer")
            if not self.partial:
                if written < HDR:
                    raise NetError(f"RX buffer of {written} bytes has no virtio-net header")
                self.expected = vn.HEADER.unpack_from(area, base + slot * size)[6]
                if not 0 < self.expected <= self.queue_size:
                    raise NetError(f"device says a frame spans {self.expected} buffers")
            self.partial.append((slot, written))
            if len(self.partial) == self.expected:
                parts = [bytes(area[base + s * size : base + s * size + n]) for s, n in self.partial]
                frames.append(b"".join(parts)[HDR:])
                self.partial = []
        self.rx_frames += len(frames)
        return frames

    # -- TX
    def reap_tx(self) -> None:
        for slot, _ in self.txq.completed():
            self.tx_free.append(slot)

    def add_tx(self, frame: bytes | memoryview, header: bytes | None = None) -> bool:
        """Queue one frame (False if no TX slot is free); `header` overrides the zero header."""
        if not self.tx_free:
            self.reap_tx()
            if not self.tx_free:
                return False
        header = header if header is not None else bytes(HDR)
        total = len(header) + len(frame)
        if total > self.tx_slot:
            raise ValueError(f"frame of {len(frame)} bytes does not fit a {self.tx_slot}-byte TX slot")
        slot = self.tx_free.pop()
        base = self.tx_base + slot * self.tx_slot
        self.area[base : base + len(header)] = header
        self.area[base + len(header) : base + total] = frame
        self.txq.add([(base, total, False)], slot)
        self.tx_frames += 1
        return True

    def publish_tx(self) -> bool:
        return self.txq.publish()


class NetClient(Driver):
    """A port on a switch, driven by this process: `send()`, `send_batch()`, `recv()`, `recv_batch()`."""

    device_features = bit(vn.F_MRG_RXBUF) | bit(vn.F_MAC) | bit(vn.F_MTU) | bit(vn.F_STATUS)
    required_features = (F_VERSION_1, vn.F_MRG_RXBUF, F_PROTOCOL_FEATURES)
    error = NetError

    def __init__(self, sock: socket.socket, *, queue_size: int = 256, rx_buffer: int = 2048,
                 max_frame: int = 1518, timeout: float = 10.0) -> None:
        tx_slot = (HDR + max_frame + 63) & ~63
        super().__init__(sock, buffers=NetDriver.area_size(queue_size, rx_buffer, tx_slot), timeout=timeout)
        self.inbox: deque[bytes] = deque()
        try:
            config = self.negotiate(vn.CONFIG.size, need_config=False)
            self.mac, self.mtu = _random_mac(), 1500
            if config:
                mac, _status, _pairs, mtu = vn.parse_config(config)
                if has(self.features, vn.F_MAC):
                    self.mac = mac
                if has(self.features, vn.F_MTU) and mtu:
                    self.mtu = mtu
            # NetDriver (sans-I/O, tested alone) lays out both rings and their buffers itself.
            self.driver = NetDriver(self.area.view, queue_size=queue_size, rx_buffer=rx_buffer,
                                    tx_slot=tx_slot, event_idx=has(self.features, RING_F_EVENT_IDX))
            self.rx = self.shm(RX, queue_size, self.driver.rxq)
            self.tx = self.shm(TX, queue_size, self.driver.txq)
            self.driver.stock_rx()
            self.enable(RX, TX)
        except (OSError, ProtocolError):
            self.close()
            raise

    # -- sending
    def send(self, frame: bytes | memoryview, *, header: bytes | None = None) -> None:
        """Send one Ethernet frame; `header` replaces the all-zero virtio-net header (for tests)."""
        self.send_batch([frame], header=header)

    def send_batch(self, frames: Iterable[bytes | memoryview], *, header: bytes | None = None) -> int:
        """Queue frames and kick once (if the switch asks); waits only for free TX slots."""
        count = 0
        for frame in frames:
            while not self.driver.add_tx(frame, header):
                self._flush_tx()
                self._wait_tx_slot()
            count += 1
        self._flush_tx()
        return count

    def _flush_tx(self) -> None:
        self.publish(self.tx)

    def _wait_tx_slot(self) -> None:
        txq = self.driver.txq
        deadline = time.monotonic() + self.timeout
        while True:
            self.driver.reap_tx()
            if self.driver.tx_free:
                txq.disable_interrupts()
                return
            if txq.enable_interrupts():
                continue
            self._sleep([self.tx.call], deadline, "completed no TX buffer")

    # -- receiving
    def recv_batch(self, timeout: float = 0.0) -> list[bytes]:
        """Every frame that has arrived; waits up to `timeout` seconds for the first."""
        if not self.inbox:
            self._receive(timeout)
        frames = list(self.inbox)
        self.inbox.clear()
        return frames

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next frame, or None after `timeout` seconds (default: the client's timeout)."""
        if not self.inbox:
            self._receive(self.timeout if timeout is None else timeout)
        return self.inbox.popleft() if self.inbox else None

    def _receive(self, timeout: float) -> None:
        d = self.driver
        deadline = time.monotonic() + timeout
        poll_until = time.monotonic() + min(POLL_BUDGET_S, timeout)
        while True:
            frames = d.reap_rx()
            if frames:
                self.inbox.extend(frames)
                if d.stock_rx():
                    os.eventfd_write(self.rx.kick, 1)
                    self.kicks += 1
                d.rxq.disable_interrupts()
                return
            if time.monotonic() < poll_until:
                continue
            if d.rxq.enable_interrupts():
                continue
            if time.monotonic() >= deadline:
                return
            if not self._sleep([self.rx.call], deadline, None):
                return

    def _sleep(self, fds: list[int], deadline: float, what: str | None) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if what:
                raise NetError(f"the switch {what} in {self.timeout} s")
            return False
        readable, _, _ = select.select([*fds, self.frontend.sock], [], [], remaining)
        if self.frontend.sock in readable:
            raise NetError("the switch closed the connection")
        for fd in readable:
            try:
                os.eventfd_read(fd)
                self.interrupts += 1
            except BlockingIOError:
                pass
        return True


def _random_mac() -> bytes:
    """A locally administered unicast address."""
    return bytes([0x02, *(random.getrandbits(8) for _ in range(5))])
