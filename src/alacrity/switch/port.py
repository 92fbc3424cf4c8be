"""A switch port: one virtio-net device seen from the switch, with its two rings
(RX = queue 0, the port's receive side; TX = queue 1), its negotiated features and
its counters. `Port` is sans-I/O (the engine's tests drive it over in-memory rings);
`VhostPort` is a port served over a vhost-user connection."""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct

from alacrity.vhost_user.backend import Action, Backend
from alacrity.vhost_user.connection import signal_error
from alacrity.vhost_user.eventfd import drain, notify
from alacrity.vhost_user.messages import MAX_FDS, ProtocolError
from alacrity.vhost_user.session import Session
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.features import F_IN_ORDER, bit, has

log = logging.getLogger("alacrity.switch")

RX, TX = 0, 1

#: Offloads a port may negotiate when the switch offers them (see `NetSession`).
OFFLOAD_FEATURES = (
    bit(vn.F_CSUM)
    | bit(vn.F_GUEST_CSUM)
    | bit(vn.F_HOST_TSO4)
    | bit(vn.F_HOST_TSO6)
    | bit(vn.F_GUEST_TSO4)
    | bit(vn.F_GUEST_TSO6)
)

COUNTERS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",  # no room in this port's RX ring (or its RX ring is not running)
    "rx_dropped_offload",  # a frame needed an offload this port did not negotiate
    "tx_packets",
    "tx_bytes",
    "tx_dropped",  # sent to nobody (destination is the sender's own port, or no other port)
    "tx_errors",
    "kicks",
    "interrupts",
)


class Port:
    """What the engine needs of a port. Subclasses set `rx`/`tx` as the rings start and stop."""

    def __init__(self, port_id: int, *, mac: bytes = b"", mtu: int = 1500, features: int = 0,
                 label: str = "") -> None:
        self.id = port_id
        self.mac = mac
        self.mtu = mtu
        self.label = label or f"port{port_id}"
        self.rx: DeviceQueue | None = None
        self.tx: DeviceQueue | None = None
        self.broken: str | None = None
        self.peer_pid = 0
        for name in COUNTERS:
            setattr(self, name, 0)
        self.set_features(features)

    def set_features(self, features: int) -> None:
        self.features = features
        self.hdr_size = vn.header_size(features)
        self.mrg_rxbuf = has(features, vn.F_MRG_RXBUF)
        self.max_frame = self.mtu + vn.ETH_HLEN + vn.VLAN_HLEN
        self.host_csum = has(features, vn.F_CSUM)
        self.guest_csum = has(features, vn.F_GUEST_CSUM)
        self.host_gso = {
            vn.GSO_TCPV4: has(features, vn.F_HOST_TSO4),
            vn.GSO_TCPV6: has(features, vn.F_HOST_TSO6),
            vn.GSO_UDP: has(features, vn.F_HOST_UFO),
        }
        self.guest_gso = {
            vn.GSO_TCPV4: has(features, vn.F_GUEST_TSO4),
            vn.GSO_TCPV6: has(features, vn.F_GUEST_TSO6),
            vn.GSO_UDP: has(features, vn.F_GUEST_UFO),
        }

    def signal(self, index: int) -> None:
        """Interrupt the driver for ring `index` (an eventfd write for a vhost-user port)."""
        self.interrupts += 1

    def call_fd(self, index: int) -> int | None:
        """The eventfd that `signal(index)` writes, for the native wake-up loop to write
        instead; None if there is none (then `signal` does all there is to do)."""
        return None

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


class NetSession(Session):
    """The virtio-net device a port shows its driver: features and config space."""

    num_queues = 2
    max_queue_size = 1024

    def __init__(self, mac: bytes, mtu: int, *, offloads: bool = False) -> None:
        self.mac = mac
        self.mtu = mtu
        # IN_ORDER: both engines take every ring's chains in ring order and complete each
        # before the next (the differential test checks it), and a driver that knows it
        # skips reading used entries (DPDK's virtio-user: 0.64-0.75x -> 0.88x testpmd at
        # 64 B, bench/README.md). Linux guests do not negotiate it.
        self.device_features = (
            bit(vn.F_MAC) | bit(vn.F_MTU) | bit(vn.F_STATUS) | bit(vn.F_MRG_RXBUF) | bit(F_IN_ORDER)
            | (OFFLOAD_FEATURES if offloads else 0)
        )
        self.features = 0
        self.announced: list[bytes] = []  # RARP frames for the engine to send (`Switch`)

    def set_features(self, features: int) -> None:
        self.features = features

    def send_rarp(self, mac: bytes) -> None:
        if mac[0] & 1 or not any(mac):
            raise ProtocolError(f"SEND_RARP for {vn.mac_text(mac)}, which is not a guest's address")
        self.announced.append(rarp_frame(mac))

    def get_config(self, offset: int, size: int) -> bytes:
        return vn.pack_config(self.mac, mtu=self.mtu)[offset : offset + size]

    # set_config (a MAC write by a legacy driver) is ignored: the switch assigns MACs.
    # The rings are serviced by the switch's engine, not through process().


#: RARP (ethertype 0x8035), hardware type Ethernet, protocol IPv4, lengths 6 and 4, opcode 3
#: (request reverse): the announcement QEMU makes for a migrated guest (net/announce.c).
_RARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast a guest with MAC `mac` sends after a migration, as QEMU builds it
    (`announce_self_create`): 42 bytes, padded to 60."""
    frame = _RARP.pack(b"\xff" * 6, mac, 0x8035, 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return frame.ljust(60, b"\0")


_FD_ARRAY = array.array("i")


def recv_fds_nowait(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """`socket.recv_fds` without blocking (in Python 3.11 it drops its `flags` argument)."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        size, socket.CMSG_LEN(MAX_FDS * _FD_ARRAY.itemsize), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


class VhostPort(Port):
    """A port whose driver speaks vhost-user on `sock` (a VM's QEMU or a NetClient).

    The socket is read without blocking; `service_socket()` feeds whole messages to the
    sans-I/O `Backend`, sends replies and refreshes the rings. ProtocolError, QueueError
    or OSError from it mean: remove this port."""

    def __init__(self, port_id: int, sock: socket.socket, *, mac: bytes, mtu: int,
                 offloads: bool = False, label: str = "", peer_pid: int = 0) -> None:
        super().__init__(port_id, mac=mac, mtu=mtu, label=label)
        self.peer_pid = peer_pid
        self.sock = sock
        self.session = NetSession(mac, mtu, offloads=offloads)
        self.backend = Backend(self.session)
        self.closed = False
        self.changed = True  # the fds the main loop must poll changed

    def fileno(self) -> int:
        return self.sock.fileno()

    def kick_fds(self) -> list[int]:
        vring = self.backend.vrings[TX]
        return [vring.kick] if vring.queue is not None and vring.kick is not None else []

    def take_kick(self, fd: int) -> None:
        """Drain the TX kick eventfd `fd`, if it is still this port's. An OSError means the
        peer's fd is broken: the caller removes the port."""
        if fd in self.kick_fds() and drain(fd):
            self.kicks += 1

    def service_socket(self, max_messages: int = 64) -> bool:
        """Read what the peer sent; False when the peer closed the connection."""
        backend = self.backend
        for _ in range(max_messages):
            try:
                data, fds = recv_fds_nowait(self.sock, backend.framer.pending())
            except BlockingIOError:
                return True
            if not data:
                for fd in fds:
                    os.close(fd)
                return False
            for msg in backend.feed(data, fds):
                reply, actions = backend.step(msg)
                self._apply(actions)
                if reply is not None:
                    self.sock.sendall(reply)
        return True

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            for fd in action.closing:
                os.close(fd)
        self.set_features(self.backend.features)
        self.rx = self.backend.vrings[RX].queue
        self.tx = self.backend.vrings[TX].queue
        if self.tx is not None:
            self.tx.disable_notify()
        if self.rx is not None:
            # We never wait for RX buffers (a full ring is a drop), so we want no RX kicks.
            self.rx.disable_notify()
        self.changed = True

    def call_fd(self, index: int) -> int | None:
        return self.backend.vrings[index].call

    def signal(self, index: int) -> None:
        """OSError (the peer's fd failed) must break this port: the engine does that."""
        call = self.backend.vrings[index].call
        if call is not None:
            notify(call)
            self.interrupts += 1

    def fail(self, reason: str) -> None:
        """Tell the driver (the ring's err eventfd) before the connection closes."""
        self.broken = self.broken or reason
        signal_error(self.backend)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rx = self.tx = None
        for fd in self.backend.close():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


__all__ = ["COUNTERS", "NetSession", "Port", "ProtocolError", "RX", "TX", "VhostPort"]
