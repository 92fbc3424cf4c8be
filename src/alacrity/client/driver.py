"""The driver side of any device, for a host process: vbus's two verbs over vhost-user.

`Driver` connects through the gate's socket (the caller's), negotiates, keeps the rings
and buffers in a memfd of its own (`SharedArea`), and waits on eventfds. `call` is the
control verb (features, config space); `shm` registers a ring and starts it. The
per-class drivers (blk.py, net.py, rng.py) are thin layers over it, and any device can
be driven with it directly:

    dev = bus.open("rng0", generic=True)       # a Driver
    dev.negotiate()
    ring = dev.shm(0, 64)                       # a DriverRing
    ring.queue.add([(dev.buffers[0], 16, True)], "token"); dev.publish(ring); dev.wait(ring)
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass
from typing import ClassVar

from alacrity.client.area import SharedArea
from alacrity.vhost_user.frontend import Frontend
from alacrity.vhost_user.messages import F_PROTOCOL_FEATURES, ProtocolFeature, Req
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit, has

#: Bytes of the area kept for rings, ahead of the buffers.
RING_AREA = 1 << 16
POLL_BUDGET_S = 50e-6


class DriverError(OSError):
    """The device misbehaved, or did not answer in time."""


@dataclass
class DriverRing:
    """One ring this process drives: its queue (in the shared area) and its eventfds."""

    index: int
    queue: DriverQueue
    kick: int
    call: int


class Driver:
    """A device on a vhost-user socket, driven from this process."""

    #: Device feature bits the driver accepts if offered (transport bits are added).
    device_features: ClassVar[int] = 0
    #: Feature bits without which the driver cannot work.
    required_features: ClassVar[tuple[int, ...]] = (F_VERSION_1,)
    error: ClassVar[type[DriverError]] = DriverError

    def __init__(self, sock: socket.socket, *, buffers: int = 1 << 16, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.frontend = Frontend(sock)
        self.area = SharedArea(RING_AREA + buffers)
        self.rings: dict[int, DriverRing] = {}
        self.features = 0
        self.protocol_features = 0
        self.kicks = 0
        self.interrupts = 0
        self._ring_end = 0

    # -- call: control
    def negotiate(self, config_size: int = 0, *, need_config: bool = True) -> bytes:
        """Features, protocol features and ownership; the first `config_size` bytes of the
        config space (the features are set after the config is read, as a driver does).
        Without the CONFIG protocol feature: DriverError, or b"" if not `need_config`."""
        fe = self.frontend
        offered = fe.get_features()
        for needed in self.required_features:
            if not has(offered, needed):
                raise self.error(f"the device does not offer feature bit {needed}")
        wanted = bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES) | self.device_features
        self.features = offered & wanted
        if has(offered, F_PROTOCOL_FEATURES):
            protocol = fe.get_protocol_features()
            self.protocol_features = protocol & (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG))
            fe.set_protocol_features(self.protocol_features)
            fe.reply_ack = has(protocol, ProtocolFeature.REPLY_ACK)
        fe.set_owner()
        config = b""
        if config_size:
            if has(self.protocol_features, ProtocolFeature.CONFIG):
                config = fe.get_config(config_size)
            elif need_config:
                raise self.error("the device does not offer the CONFIG protocol feature")
        fe.set_features(self.features)
        return config

    def call(self, what: str, *args: int) -> bytes:
        """Generic control: call("get_config", size) -> bytes; call("features") -> the
        negotiated feature word, little-endian."""
        if what == "get_config":
            return self.frontend.get_config(*args)
        if what == "features":
            return self.features.to_bytes(8, "little")
        raise ValueError(f"unknown call {what!r} (get_config, features)")

    # -- shm: rings
    def shm(self, index: int, size: int, queue: DriverQueue | None = None) -> DriverRing:
        """Register ring `index` of `size` entries with the device (memory table, addresses,
        eventfds) and start it: laid out in the area kept for rings, or `queue`, a ring the
        caller laid out in the area itself."""
        if queue is None:
            layout = RingLayout.at(self._ring_end, size)
            if layout.end > RING_AREA:
                raise ValueError(f"rings need more than the {RING_AREA} bytes kept for them")
            self._ring_end = (layout.end + 4095) & ~4095
            queue = DriverQueue(self.area.view, layout, event_idx=has(self.features, RING_F_EVENT_IDX))
        layout = queue.layout
        fe, uva = self.frontend, self.area.uva
        if not self.rings:
            fe.set_mem_table([self.area.region()], [self.area.fd])
        ring = DriverRing(index, queue, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                          os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.rings[index] = ring
        fe.set_vring_num(index, size)
        fe.set_vring_base(index, 0)
        fe.set_vring_addr(index, uva + layout.desc, uva + layout.used, uva + layout.avail)
        fe.set_vring_fd(Req.SET_VRING_KICK, index, ring.kick)
        fe.set_vring_fd(Req.SET_VRING_CALL, index, ring.call)
        return ring

    def publish(self, ring: DriverRing) -> None:
        """Make the buffers added to `ring` visible, and kick the device if it asked for it."""
        if ring.queue.publish():
            os.eventfd_write(ring.kick, 1)
            self.kicks += 1

    def enable(self, *indexes: int) -> None:
        """Start rings once they are stocked (with protocol features, rings start disabled)."""
        if has(self.features, F_PROTOCOL_FEATURES):
            for index in indexes:
                self.frontend.set_vring_enable(index, True)

    @property
    def buffers(self) -> tuple[int, int]:
        """(offset, length) of the area's buffer space, after the rings."""
        return RING_AREA, self.area.size - RING_AREA

    def wait(self, ring: DriverRing, timeout: float | None = None) -> list:
        """Completions of `ring`: poll briefly, then sleep on its call eventfd.
        DriverError if nothing completes within `timeout` or the device hangs up."""
        timeout = self.timeout if timeout is None else timeout
        queue = ring.queue
        deadline = time.monotonic() + POLL_BUDGET_S
        while True:
            done = queue.completed()
            if done:
                return done
            if time.monotonic() < deadline:
                continue
            if queue.enable_interrupts():
                continue
            readable, _, _ = select.select([ring.call, self.frontend.sock], [], [], timeout)
            if not readable:
                raise self.error(f"the device completed nothing in {timeout} s")
            if self.frontend.sock in readable:
                raise self.error("the device closed the connection")
            try:
                os.eventfd_read(ring.call)
                self.interrupts += 1
            except BlockingIOError:
                pass
            queue.disable_interrupts()

    def close(self) -> None:
        self.frontend.close()
        for ring in self.rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.rings.clear()
        self.area.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
