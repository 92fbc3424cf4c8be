"""virtio-rng: a guest's (or a process's) /dev/hwrng, filled from the host's getrandom().

The smallest device class, and the one to copy (docs/devices.md walks through it).
The device may touch: the buffers of the chains it is given (already bounds-checked
views), the kernel's random source, and its own counters and token bucket.
"""

from __future__ import annotations

import os
import threading
import time

from alacrity.devices.base import Attribute, Device, Slot, chardev_socket, qemu_device
from alacrity.vhost_user.session import Session
from alacrity.virtio.device_queue import Chain, DeviceQueue

#: The most we hand one request, whatever buffer the driver offers: bounds our allocation.
MAX_REQUEST = 1 << 16
#: The slowest rate: a guest's request (64 bytes) is served whole within 0.25 s.
MIN_RATE = 256
#: A request waits at most this long for its bytes (longer only when clients contend);
#: then it gets what there is, possibly nothing, and the driver asks again.
MAX_WAIT_S = 1.0


def _parse_rate(text: str) -> int:
    value = int(text)
    if value and not MIN_RATE <= value <= 1 << 40:
        raise ValueError(f"rate {value} out of range ({MIN_RATE} to 2^40 bytes per second; 0: unlimited)")
    return value


class TokenBucket:
    """`rate` bytes per second, with bursts of a tenth of a second's worth (at least 64).

    Requests are served whole where the burst allows: Linux's virtio-rng driver (6.1)
    stops asking after a run of short answers, so a request waits for all its bytes
    (up to a burst's worth) rather than taking the few there are."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = max(rate / 10, 64.0)
        self.tokens = self.burst
        self.when = time.monotonic()
        self.lock = threading.Lock()

    def take(self, wanted: int, wait_s: float) -> tuple[int, bool]:
        """Up to `wanted` bytes' worth: waits (at most `wait_s`) for min(wanted, burst)
        tokens, then grants what there is. (granted, whether it had to wait)."""
        if not self.rate:
            return wanted, False
        need = min(wanted, int(self.burst))
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.when) * self.rate)
                self.when = now
                short = (need - self.tokens) / self.rate
                if short <= 0 or now + short > deadline:
                    granted = max(0, min(wanted, int(self.tokens)))
                    self.tokens -= granted
                    return granted, waited
            waited = True
            time.sleep(short)


class RngDevice(Device):
    class_name = "rng"
    summary = "virtio-rng: random bytes from the host's getrandom(), optionally rate-limited"
    attributes = (
        Attribute("rate", _parse_rate, "0", "bytes per second for all its clients together; 0: unlimited",
                  live=True),
    )
    virtio_id = 4
    client_driver = "alacrity.client.rng:RngClient"

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        return [*chardev_socket(slot.id, slot.socket, reconnect=False),
                *qemu_device("vhost-user-rng", slot.transport, chardev=slot.id)]

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.counters.update({"bytes": 0, "requests": 0, "throttled": 0})
        self.bucket = TokenBucket(0)

    def set_attribute(self, name: str, text: str) -> None:
        super().set_attribute(name, text)
        self.bucket = TokenBucket(self.values["rate"])

    def open(self, peer_pid: int, peer_uid: int | None = None) -> Session:
        self.count("connections")
        return RngSession(self)

    def release(self, session: Session) -> None:
        self.count("connections", -1)


class RngSession(Session):
    num_queues = 1
    max_queue_size = 1024

    def __init__(self, device: RngDevice) -> None:
        self.device = device

    def process(self, index: int, queue: DeviceQueue) -> int:
        done = 0
        while done < queue.size:
            chain = queue.pop()
            if chain is None:
                break
            written, throttled = self._fill(chain)
            queue.push(chain.head, written)
            done += 1
            if throttled:  # let the worker release its lock between waits
                break
        return done

    def _fill(self, chain: Chain) -> tuple[int, bool]:
        """Random bytes into the chain's writable buffers, as many as the rate allows:
        (bytes written, whether the rate held the request back)."""
        wanted = min(sum(len(view) for view in chain.writable), MAX_REQUEST)
        granted, throttled = self.device.bucket.take(wanted, MAX_WAIT_S)
        if throttled:
            self.device.count("throttled")
        data = os.urandom(granted)
        written = 0
        for view in chain.writable:
            if written == granted:
                break
            part = min(len(view), granted - written)
            view[:part] = data[written : written + part]
            written += part
        self.device.count("bytes", written)
        self.device.count("requests")
        return written, throttled

    def close(self) -> None:
        self.device.release(self)
