"""Entropy from an rng device on the bus: `RngClient(sock).read(n)`."""

from __future__ import annotations

import socket

from alacrity.client.driver import Driver, DriverError


class RngError(DriverError):
    pass


class RngClient(Driver):
    """Reads the device's random bytes, a buffer of at most `chunk` bytes at a time."""

    error = RngError

    def __init__(self, sock: socket.socket, *, chunk: int = 4096, timeout: float = 30.0) -> None:
        super().__init__(sock, buffers=chunk, timeout=timeout)
        try:
            self.negotiate()
            self.ring = self.shm(0, 16)
            self.enable(0)
        except BaseException:
            self.close()
            raise

    def read(self, n: int) -> bytes:
        """`n` random bytes (the device may return fewer per buffer: we ask again)."""
        out = bytearray()
        offset, room = self.buffers
        while len(out) < n:
            asked = min(n - len(out), room)
            self.ring.queue.add([(offset, asked, True)], None)
            self.publish(self.ring)
            for _token, written in self.wait(self.ring):
                out += self.area.view[offset : offset + min(written, asked)]  # the device's claim
        return bytes(out[:n])
