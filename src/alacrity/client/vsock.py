"""vsock from a host process, both ends.

- `connect(socket_path, port, vm)`: a stream to port `port` of guest `vm`, through the
  device's gate socket (`CONNECT PORT VM` -> `OK HOSTPORT`); `listen(...)` takes the
  guest's connections to a host port (`LISTEN PORT VM`, then `accept()`).
- `VsockGuest`: this process *is* a guest of the device, as a process on a switch is a
  port: a virtio-vsock driver over vhost-user with its rings in our memfd, speaking raw
  packets (`send`, `recv`). It is how the tests play a guest without a VM.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time

from alacrity.client.driver import Driver, DriverError
from alacrity.virtio.vsock import CID_HOST, HDR_SIZE, TYPE_STREAM, Header

RX, TX = 0, 1


class VsockError(DriverError):
    pass


def _hello(sock: socket.socket, line: str, timeout: float) -> str:
    sock.settimeout(timeout)
    sock.sendall(line.encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        part = sock.recv(1)  # byte by byte: what follows the line is the stream's
        if not part:
            raise VsockError(f"the device closed the connection after {line!r}: {answer.decode()!r}")
        answer += part
        if len(answer) > 256:
            raise VsockError("the device's answer is too long")
    text = answer.decode().strip()
    if not text.startswith("OK"):
        raise VsockError(f"{line}: {text}")
    sock.settimeout(None)
    return text


def connect(path: str, port: int, vm: str = "", timeout: float = 15.0) -> tuple[socket.socket, int]:
    """A stream to `port` of guest `vm` (CID or name; "" for the device's only guest),
    and the host port the guest sees."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        answer = _hello(sock, f"CONNECT {port} {vm}".strip(), timeout)
        return sock, int(answer.split()[1])
    except BaseException:
        sock.close()
        raise


class Listener:
    """Guest connections to one host port: `accept()` -> (stream, guest port)."""

    def __init__(self, path: str, port: int, vm: str = "", timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
            _hello(self.sock, f"LISTEN {port} {vm}".strip(), timeout)
        except BaseException:
            self.sock.close()
            raise

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        self.sock.settimeout(timeout)
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 1)
        if not msg or len(fds) != 1 or not msg.startswith(b"ACCEPT "):
            for fd in fds:
                os.close(fd)
            raise VsockError(f"listener ended: {msg!r}")
        return socket.socket(fileno=fds[0]), int(msg.split()[1])

    def close(self) -> None:
        self.sock.close()


class VsockGuest(Driver):
    """A guest of a vsock device: its CID from the config space, raw packets on rx/tx."""

    error = VsockError

    def __init__(self, sock: socket.socket, *, slots: int = 32, rx_size: int = HDR_SIZE + 4096,
                 tx_size: int = HDR_SIZE + (64 << 10), timeout: float = 30.0) -> None:
        super().__init__(sock, buffers=slots * (rx_size + tx_size), timeout=timeout)
        self.slots, self.rx_size, self.tx_size = slots, rx_size, tx_size
        self.pending: list[tuple[int, int]] = []  # rx completions not yet returned
        base, _ = self.buffers
        self.rx_base, self.tx_base = base, base + slots * rx_size
        try:
            self.cid = struct.unpack("<Q", self.negotiate(8))[0]
            self.rx = self.shm(RX, slots)
            self.tx = self.shm(TX, slots)
            self.tx_free = list(range(slots))
            for slot in range(slots):
                self._give_rx(slot)
            self.publish(self.rx)
            self.enable(RX, TX)
        except BaseException:
            self.close()
            raise

    def _give_rx(self, slot: int) -> None:
        self.rx.queue.add([(self.rx_base + slot * self.rx_size, self.rx_size, True)], slot)

    def header(self, op: int, src_port: int, dst_port: int, *, length: int = 0, flags: int = 0,
               buf_alloc: int = 1 << 18, fwd_cnt: int = 0, src_cid: int | None = None,
               dst_cid: int = CID_HOST, type: int = TYPE_STREAM) -> Header:  # noqa: A002 (the field's name)
        return Header(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port, length, type,
                      op, flags, buf_alloc, fwd_cnt)

    def send(self, header: Header, payload: bytes = b"", *, claim: int | None = None) -> None:
        """One packet on the tx ring; `claim` overrides the header's len (a lying guest)."""
        if claim is None:
            header = Header(*header.fields()[:4], len(payload), *header.fields()[5:])
        else:
            header = Header(*header.fields()[:4], claim, *header.fields()[5:])
        packet = header.pack() + payload
        if len(packet) > self.tx_size:
            raise ValueError(f"packet of {len(packet)} bytes, slots hold {self.tx_size}")
        deadline = time.monotonic() + self.timeout
        while not self.tx_free:
            for slot, _written in self.tx.queue.completed():
                self.tx_free.append(slot)
            if not self.tx_free:
                if time.monotonic() > deadline:
                    raise self.error("the device took no tx packet in time")
                self._sleep(self.tx, 0.05)
        slot = self.tx_free.pop()
        offset = self.tx_base + slot * self.tx_size
        self.area.view[offset : offset + len(packet)] = packet
        self.tx.queue.add([(offset, len(packet), False)], slot)
        self.publish(self.tx)

    def recv(self, timeout: float = 5.0) -> tuple[Header, bytes] | None:
        """The next packet from the device, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            for slot, _written in self.tx.queue.completed():
                self.tx_free.append(slot)
            self.pending.extend(self.rx.queue.completed())
            if self.pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.rx.queue.enable_interrupts():
                continue
            self._sleep(self.rx, min(left, 0.05))
        slot, written = self.pending.pop(0)
        offset = self.rx_base + slot * self.rx_size
        if not HDR_SIZE <= written <= self.rx_size:
            raise self.error(f"the device wrote {written} bytes into a {self.rx_size}-byte buffer")
        data = bytes(self.area.view[offset : offset + written])
        header = Header.parse(data)
        if header.len != written - HDR_SIZE:
            raise self.error(f"packet claims {header.len} bytes of payload, has {written - HDR_SIZE}")
        self._give_rx(slot)
        self.publish(self.rx)
        return header, data[HDR_SIZE:]

    def _sleep(self, ring, timeout: float) -> None:
        readable, _, _ = select.select([ring.call, self.frontend.sock], [], [], timeout)
        if self.frontend.sock in readable:
            raise self.error("the device closed the connection")
        if ring.call in readable:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(ring.call)
