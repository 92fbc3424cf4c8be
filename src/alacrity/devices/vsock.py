"""vsock: stream sockets between guests and host processes, without a network.

A vhost-user-vsock backend (QEMU 7.2: vhost-user-vsock-device on microvm,
vhost-user-vsock-pci on pc). The backend owns the rx (0) and tx (1) rings; QEMU keeps the
event ring. Each frontend that connects (a QEMU, or a process driving the device with
alacrity.client.vsock) is a guest: it gets a CID of its own from `cid_base` upward,
unique among the daemon's vsock devices while it is connected, read by the guest from the
config space (GET_CONFIG). Host processes reach a guest through the same gate socket
(devices/vsock_host.py, docs/devices.md "vsock"), so only members of the device's buses do.

The device may touch: the buffers of the chains it is given (bounds-checked views), the
sockets the gate hands it, and its own state. The stream logic is sans-I/O, in
devices/vsock_proto.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading

from alacrity.devices.base import (
    Attribute,
    Device,
    Handovers,
    Slot,
    chardev_socket,
    qemu_device,
    qemu_name_of,
)
from alacrity.devices.vsock_host import HostLoop
from alacrity.devices.vsock_proto import BUF_ALLOC, GuestError, GuestSockets
from alacrity.errors import AdminError
from alacrity.vhost_user import keeper
from alacrity.vhost_user.connection import Connection
from alacrity.vhost_user.messages import ProtocolError
from alacrity.vhost_user.session import Session
from alacrity.virtio.device_queue import Chain, DeviceQueue
from alacrity.virtio.ring import QueueError
from alacrity.virtio.vsock import CID_ANY, HDR_SIZE, Header

log = logging.getLogger("alacrity.devices.vsock")

RX, TX = 0, 1
#: Guests one device serves at once.
MAX_GUESTS = 64
CID_MIN, CID_MAX = 3, CID_ANY - 1

# CIDs taken by the guests of every vsock device of this daemon.
_cids: set[int] = set()
_cids_lock = threading.Lock()


def _parse_cid_base(text: str) -> int:
    value = int(text.strip())
    if not CID_MIN <= value <= CID_MAX - MAX_GUESTS:
        raise ValueError(f"cid_base {value} out of range ({CID_MIN} to {CID_MAX - MAX_GUESTS})")
    return value


def take_cid(base: int) -> int | None:
    """The lowest free CID from `base`, now taken; None if the range is full."""
    with _cids_lock:
        for cid in range(base, min(base + len(_cids) + MAX_GUESTS, CID_MAX) + 1):
            if cid not in _cids:
                _cids.add(cid)
                return cid
    return None


def take_this_cid(cid: int) -> bool:
    """Take `cid` itself (a guest that had it before the daemon restarted); False if taken."""
    with _cids_lock:
        if cid in _cids or not CID_MIN <= cid <= CID_MAX:
            return False
        _cids.add(cid)
        return True


def give_cid(cid: int) -> None:
    with _cids_lock:
        _cids.discard(cid)


class VsockDevice(Device):
    class_name = "vsock"
    summary = "virtio-vsock: stream sockets between each guest and host processes on its bus"
    attributes = (
        Attribute("cid_base", _parse_cid_base, "3", "the first CID given to a guest; each connected guest "
                  "gets the lowest free one from here, unique on the host"),
    )
    virtio_id = 19
    adopts_connections = True
    client_driver = "alacrity.client.vsock:VsockGuest"

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        # QEMU 7.2's vhost-user-vsock does not wait for a reconnecting chardev.
        return [*chardev_socket(slot.id, slot.socket, reconnect=False),
                *qemu_device("vhost-user-vsock", slot.transport, chardev=slot.id)]

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.counters.update({"guest_count": 0, "streams": 0, "refused": 0})
        self.guests: dict[int, VsockSession] = {}  # by CID
        self.closed_stats: dict[str, int] = {}
        self.handovers = Handovers(f"vsock {name}")
        self.host = HostLoop(self)

    # -- admin views
    def state(self) -> dict[str, str]:
        shown = super().state()
        with self.lock:
            totals = dict(self.closed_stats)
            guests = list(self.guests.values())
        for guest in guests:
            with guest.lock:
                for key, value in guest.sockets.stats.as_dict().items():
                    totals[key] = totals.get(key, 0) + value
        shown.update({k: str(v) for k, v in sorted(totals.items())})
        return shown

    def views(self) -> dict[str, str | dict[str, str]]:
        with self.lock:
            guests = sorted(self.guests.values(), key=lambda g: g.cid)
        return {"guests": {g.name: g.describe() for g in guests}}

    # -- connections from the gate
    def adopt(self, sock: socket.socket, peer_pid: int, label: str) -> None:
        """Queue it for the host loop, which tells a vhost-user frontend (a guest) from a
        host client by its first bytes; never waits."""
        self.handovers.put(sock, peer_pid, label)
        self.host.start()
        self.host.wake()

    def serve_guest(self, sock: socket.socket, pid: int, label: str) -> None:
        """A vhost-user frontend: serve it in a thread of its own, as the gate serves other
        devices (the connection's messages are read with blocking calls)."""
        threading.Thread(target=self._serve_guest, args=(sock, pid, label), name=label, daemon=True).start()

    def _serve_guest(self, sock: socket.socket, pid: int, label: str) -> None:
        try:
            session = self.open(pid)
        except AdminError as exc:
            log.warning("vsock %s: refused pid %d: %s", self.name, pid, exc.message)
            self.count("refused")
            sock.close()
            return
        sock.setblocking(True)
        assert isinstance(session, VsockSession)
        session.conn = Connection(sock, session, label, on_error=self.record_error)
        # QEMU 7.2's vhost-user-vsock never reconnects: a keeper holds the connection
        # through a daemon crash, and the next daemon resumes it (`resume`).
        kept = keeper.current()
        if kept is not None:
            session.conn.recorder = kept.keep(sock, {"device": self.name, "cid": session.cid,
                                                     "pid": pid, "label": label})
        session.conn.serve()

    def resume(self, kept: keeper.Kept) -> None:
        """Serve again a guest an earlier daemon served, with the CID it has: the keeper
        held its connection through that daemon's crash (vhost_user/keeper.py)."""
        sock, meta = kept.sock, kept.meta
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]  # as the kernel recorded it at connect time
        cid = meta.get("cid")
        if pid != meta.get("pid") or not isinstance(cid, int) or not take_this_cid(cid):
            log.warning("vsock %s: cannot resume %s (CID %s)", self.name, meta.get("label"), cid)
            sock.close()
            for _, fds in kept.messages:
                for fd in fds:
                    os.close(fd)
            return
        session = VsockSession(self, cid, qemu_name_of(pid) or f"pid{pid}", pid)
        with self.lock:
            self.guests[cid] = session
            self.counters["connections"] += 1
            self.counters["guest_count"] = len(self.guests)
        label = str(meta.get("label", f"{self.name}[pid {pid}]"))
        session.conn = Connection(sock, session, label, on_error=self.record_error)
        keeper_link = keeper.current()
        if keeper_link is not None:
            session.conn.recorder = keeper_link.resumed(kept)
        self.host.start()
        log.info("vsock %s: resumed %s as CID %d", self.name, session.name, cid)
        threading.Thread(target=self._resume, args=(session.conn, kept), name=label, daemon=True).start()

    @staticmethod
    def _resume(conn: Connection, kept: keeper.Kept) -> None:
        try:
            conn.resume(kept.messages, kept.answered)
        except (ProtocolError, QueueError, OSError) as exc:
            conn.fail(f"could not resume: {exc}")
            conn.close()
            return
        conn.serve()

    def refusal(self, peer_pid: int, peer_uid: int | None = None) -> str | None:
        with self.lock:
            if len(self.guests) >= MAX_GUESTS:
                return (f"vsock {self.name} serves {MAX_GUESTS} guests already: give the bus a vsock "
                        "device of its own")
        return None

    def open(self, peer_pid: int, peer_uid: int | None = None) -> Session:
        with self.lock:
            if len(self.guests) >= MAX_GUESTS:
                raise AdminError(16, f"vsock {self.name} serves {MAX_GUESTS} guests already")
        cid = take_cid(self.values["cid_base"])
        if cid is None:
            raise AdminError(16, f"no free CID from {self.values['cid_base']}")
        name = qemu_name_of(peer_pid) or f"pid{peer_pid}"
        session = VsockSession(self, cid, name, peer_pid)
        with self.lock:
            self.guests[cid] = session
            self.counters["connections"] += 1
            self.counters["guest_count"] = len(self.guests)
        log.info("vsock %s: %s is CID %d", self.name, name, cid)
        return session

    def release(self, session: Session) -> None:
        assert isinstance(session, VsockSession)
        with self.lock:
            if self.guests.pop(session.cid, None) is None:
                return
            self.counters["connections"] -= 1
            self.counters["guest_count"] = len(self.guests)
            for key, value in session.sockets.stats.as_dict().items():
                self.closed_stats[key] = self.closed_stats.get(key, 0) + value
        give_cid(session.cid)
        self.host.wake()

    def guest(self, target: str) -> VsockSession | None:
        """A connected guest by CID or name; with no target, the only one there is."""
        with self.lock:
            guests = list(self.guests.values())
        if not target:
            return guests[0] if len(guests) == 1 else None
        for guest in guests:
            if target in (str(guest.cid), guest.name):
                return guest
        return None

    def destroy(self) -> None:
        self.handovers.close(wake=False)
        self.host.stop()
        with self.lock:
            guests = list(self.guests.values())
        for guest in guests:  # their connections end; each session's close() cleans up
            if guest.conn is not None:
                guest.conn.shutdown()


class VsockSession(Session):
    """One guest: its rings, its CID and its sockets' state machine."""

    num_queues = 2
    max_queue_size = 1024

    def __init__(self, device: VsockDevice, cid: int, name: str, pid: int) -> None:
        self.device = device
        self.cid = cid
        self.name = name
        self.pid = pid
        self.lock = threading.Lock()  # the state machine: ring workers and the host loop
        self.sockets = GuestSockets(cid)
        self.bells = {RX: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                      TX: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)}
        self.bell_lock = threading.Lock()
        self.closed = False
        self.conn: Connection | None = None

    def describe(self) -> str:
        with self.lock:
            stats = self.sockets.stats.as_dict()
            streams = len(self.sockets.conns)
        lines = [f"cid {self.cid}", f"pid {self.pid}", f"streams {streams}"]
        if self.conn is not None:  # notifications: the guest's kicks, our interrupts
            lines += [f"kicks {self.conn.kicks}", f"calls {self.conn.calls}"]
        lines += [f"{k} {v}" for k, v in stats.items()]
        return "\n".join(lines) + "\n"

    # -- call
    def get_config(self, offset: int, size: int) -> bytes:
        return struct.pack("<Q", self.cid)[offset : offset + size]  # struct virtio_vsock_config

    # -- shm
    def doorbell(self, index: int) -> int | None:
        return self.bells.get(index)

    def ring(self, index: int) -> None:
        """Wake ring `index`'s worker (from the host loop, or from the other ring)."""
        with self.bell_lock:  # close() must not free the number under us: it may be reused
            bell = self.bells.get(index)  # none once the session closed
            if bell is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.eventfd_write(bell, 1)

    def buffers_are_work(self, index: int) -> bool:
        return index != RX  # the guest's receive buffers are room; replies ring the doorbell

    def process(self, index: int, queue: DeviceQueue) -> int:
        if index == TX:
            done = self._transmit(queue)
            if done:
                self.ring(RX)  # replies, credit
                self.device.host.wake()  # data and events for host sockets
            return done
        done = self._receive(queue)
        if done:
            self.device.host.wake()  # host sockets may read again
        return done

    def _transmit(self, queue: DeviceQueue) -> int:
        done = 0
        while done < queue.size:
            chain = queue.pop()
            if chain is None:
                break
            header, payload = read_packet(chain)
            with self.lock:
                self.sockets.feed(header, payload)
            queue.push(chain.head, 0)
            done += 1
        return done

    def _receive(self, queue: DeviceQueue) -> int:
        done = 0
        while done < queue.size:
            with self.lock:
                if not self.sockets.has_output():
                    break
                chain = queue.pop()
                if chain is None:
                    break
                try:
                    packet = self.sockets.pop_for_guest(chain.writable_len())
                except GuestError as exc:
                    raise QueueError(str(exc)) from None
            if packet is None:  # has_output promised one: never leave a chain unused
                queue.push(chain.head, 0)
                break
            queue.push(chain.head, write_packet(chain, packet))
            done += 1
        return done

    def stop(self, index: int) -> None:
        """Rings stop when the guest resets its device (or QEMU stops): the guest's
        sockets are gone with it, so the host's streams end too."""
        if index == TX:
            with self.lock:
                self.sockets.close_all("the guest's device was reset")
            self.device.host.wake()

    def close(self) -> None:
        self.closed = True
        with self.lock:
            self.sockets.close_all("the guest's device went away")
        self.device.release(self)
        with self.bell_lock:
            # Its workers are gone (the connection stops them before it closes the session).
            for fd in self.bells.values():
                os.close(fd)
            self.bells = {}


def read_packet(chain: Chain) -> tuple[Header, bytes]:
    """The packet in a tx chain: header, then exactly `len` bytes of payload. A chain too
    short for what its header claims, or a payload beyond any credit we give, breaks the
    device (QueueError): the guest lied about its own framing."""
    total = sum(len(view) for view in chain.readable)
    if total < HDR_SIZE:
        raise QueueError(f"tx packet of {total} bytes, shorter than the vsock header")
    head = _gather(chain.readable, 0, HDR_SIZE)
    header = Header.parse(head)
    if header.len > total - HDR_SIZE:
        raise QueueError(f"tx packet claims {header.len} bytes of payload, has {total - HDR_SIZE}")
    if header.len > BUF_ALLOC:
        raise QueueError(f"tx packet of {header.len} bytes, more than any credit ({BUF_ALLOC})")
    return header, _gather(chain.readable, HDR_SIZE, header.len)


def _gather(views: list[memoryview], start: int, length: int) -> bytes:
    """`length` bytes from offset `start` of the views taken end to end."""
    out = bytearray()
    for view in views:
        if len(out) == length:
            break
        if start >= len(view):
            start -= len(view)
            continue
        take = min(len(view) - start, length - len(out))
        out += view[start : start + take]
        start = 0
    return bytes(out)


def write_packet(chain: Chain, packet: bytes) -> int:
    """`packet` into the chain's writable buffers (pop_for_guest sized it to fit)."""
    written = 0
    for view in chain.writable:
        if written == len(packet):
            break
        part = min(len(view), len(packet) - written)
        view[:part] = packet[written : written + part]
        written += part
    return written
