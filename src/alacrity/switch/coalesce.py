"""Interrupt coalescing: a port's interrupt held back while more frames are expected.

The engine decides, per batch, which rings' drivers asked to be interrupted (EVENT_IDX,
`DeviceQueue.needs_notify`). With coalescing on, such an interrupt is held instead of sent
when frames come to that ring faster than `quiet_us` apart (a busy stream), and sent at the
first of:
- `delay_us` after it was held (the bound on the added latency);
- `frames` more frames on that ring since it was held (the bound in count);
- fewer than `low_room` of the ring's buffers left for the driver to see (a receiver must
  never run short because we waited);
- the ring stopping or the port going (nothing is sent then: there is no one to tell).
A request that comes after `quiet_us` without one, as a lone ping or the first frame to an
idle guest, is sent at once. And coalescing costs latency only while it saves interrupts: a
hold that ends at its time bound with no frame added was useless (request and response:
the next frame waits for this interrupt), so that ring's next requests are sent at once,
1, 2, 4... up to MAX_BACKOFF of them after each useless hold in a row; a useful one resets it.

A held interrupt is never lost: the driver asked once (EVENT_IDX moved the ring's signalled
mark), and it gets exactly one interrupt for it, later. Sans-I/O: the caller gives the time
and sends what `due` returns; both engines share it through `Engine._signal`, so they make
the same decisions (the differential test drives them with one clock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from alacrity.virtio.ring import QueueError


class Ring(Protocol):
    """What coalescing reads of a ring (a DeviceQueue)."""

    size: int
    used_idx: int

    def pending(self) -> int: ...


#: The defaults a switch device starts with (devices/switch.py attributes, launcher.py).
COALESCE_US = 0.0
COALESCE_FRAMES = 32
#: How long a TX ring's interrupt decision may wait (Engine._defer_or_notify); chosen by
#: measurement (bench/README.md, vm_net.py: VM-to-VM TCP 0.93x the bridge's -> 1.0x).
TX_DEFER_US = 1000.0


#: The most requests sent at once after useless holds in a row (see above).
MAX_BACKOFF = 64


@dataclass(frozen=True)
class Bounds:
    """A switch's coalescing settings; `delay_us` 0 turns coalescing off. `tx_defer_us` is
    the engine's, not the coalescer's: how long a TX ring's interrupt decision may wait
    (Engine._defer_or_notify; 0: decided at once)."""

    delay_us: float = 0.0
    frames: int = 32
    quiet_us: float = 500.0
    low_room: float = 0.25
    tx_defer_us: float = TX_DEFER_US

    def __post_init__(self) -> None:
        if not 0 <= self.delay_us <= 10_000:
            raise ValueError(f"coalescing delay {self.delay_us} µs: give 0 (off) to 10000")
        if not 1 <= self.frames <= 4096:
            raise ValueError(f"coalescing frames {self.frames}: give 1 to 4096")
        if not 0 <= self.quiet_us <= 1_000_000:
            raise ValueError(f"coalescing quiet time {self.quiet_us} µs: give 0 to 1000000")
        if not 0 <= self.tx_defer_us <= 10_000:
            raise ValueError(f"TX interrupt deferral {self.tx_defer_us} µs: give 0 (off) to 10000")
        if not 0 <= self.low_room < 1:
            raise ValueError(f"coalescing low room {self.low_room}: give a fraction of the ring, 0 to <1")

    @property
    def on(self) -> bool:
        return self.delay_us > 0


@dataclass
class _Held:
    ring: Ring
    deadline: float
    used_at_hold: int


class Coalescer:
    """Held interrupts, keyed by (port, ring index); the port is any hashable object."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self._held: dict[tuple[object, int], _Held] = {}
        self._last_request: dict[tuple[object, int], float] = {}
        self._backoff: dict[tuple[object, int], int] = {}  # after useless holds in a row
        self._skip: dict[tuple[object, int], int] = {}  # requests still to send at once
        self.held_total = 0  # interrupts held at least once
        self.saved = 0  # requests folded into an interrupt already held
        self.useless = 0  # holds that ended at their time bound with no frame added

    def hold(self, port: object, index: int, ring: Ring, now: float) -> bool:
        """The driver of `port`'s ring `index` asked for an interrupt: True if it is held
        (the caller sends nothing now), False if the caller sends it now."""
        key = (port, index)
        if not self.bounds.on:
            return False
        last = self._last_request.get(key)
        self._last_request[key] = now
        if key in self._held:
            self.saved += 1
            return True
        if last is None or (now - last) * 1e6 > self.bounds.quiet_us or self._short(ring):
            return False
        skip = self._skip.get(key, 0)
        if skip:
            self._skip[key] = skip - 1
            return False
        self._held[key] = _Held(ring, now + self.bounds.delay_us * 1e-6, ring.used_idx)
        self.held_total += 1
        return True

    def due(self, now: float, ring_of: Callable[[object, int], Ring | None]) -> list[tuple[object, int]]:
        """The held interrupts to send now, released. `ring_of(port, index)` is the ring the
        port has now: one that stopped or changed since is released unsent."""
        out: list[tuple[object, int]] = []
        for key, held in list(self._held.items()):
            ring = held.ring
            if ring_of(*key) is not ring:
                del self._held[key]
                continue
            added = (ring.used_idx - held.used_at_hold) & 0xFFFF
            if now >= held.deadline or added >= self.bounds.frames or self._short(ring):
                del self._held[key]
                out.append(key)
                if added:
                    self._backoff.pop(key, None)
                else:
                    self.useless += 1
                    backoff = min(2 * self._backoff.get(key, 0) or 1, MAX_BACKOFF)
                    self._skip[key] = self._backoff[key] = backoff
        return out

    def next_deadline(self) -> float | None:
        """When the next held interrupt is due at the latest (None: none held)."""
        return min((held.deadline for held in self._held.values()), default=None)

    def held(self) -> int:
        return len(self._held)

    def forget(self, port: object) -> None:
        """`port` went: its held interrupts go unsent."""
        for key in [key for key in self._held if key[0] is port]:
            del self._held[key]
        for table in (self._last_request, self._backoff, self._skip):
            for key in [key for key in table if key[0] is port]:
                del table[key]

    def _short(self, ring: Ring) -> bool:
        try:
            return ring.pending() < self.bounds.low_room * ring.size
        except QueueError:  # a bad avail index: send now, and the engine breaks the port
            return True


__all__ = ["COALESCE_FRAMES", "COALESCE_US", "MAX_BACKOFF", "TX_DEFER_US", "Bounds", "Coalescer", "Ring"]
