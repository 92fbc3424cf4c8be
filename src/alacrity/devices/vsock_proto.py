"""Sans-I/O stream sockets between one guest and the host, over virtio-vsock packets.

`GuestSockets` is fed the guest's packets (`feed`) and the host side's bytes and closes
(`host_*`), and gives back the packets for the guest (`pop_for_guest`) and events for the
host side (`events`). It does no I/O and keeps no clock, so tests and hypothesis drive it
directly (tests/test_vsock_proto.py). The device (devices/vsock.py) wires it to the rings
and the host's sockets.

Flow control is the spec's credit scheme, both ways:
- guest -> host: we promise BUF_ALLOC bytes per connection and count what we forwarded to
  the host socket (`fwd_cnt`). Bytes beyond the promise are a violation (RST, counted),
  so what we hold for a host reader is at most BUF_ALLOC per connection.
- host -> guest: we send at most the guest's credit, peer_buf_alloc - (tx_cnt -
  peer_fwd_cnt), modulo 2^32; a credit that does not add up (a fwd_cnt ahead of what we
  sent) is 0. What waits for credit is at most TO_GUEST_MAX per connection: the I/O side
  reads its socket only while `host_room` is positive.
Whatever the guest writes, memory stays bounded: MAX_CONNECTIONS per guest, and about
MAX_REPLIES control packets waiting for its rx ring. A guest that floods its tx ring and
never reads its rx ring has its RSTs for stray packets dropped (counted) and its new
connections refused past that; replies on open connections are a few per connection.
So the device always reads the tx ring, and never has to wait for the guest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from alacrity.virtio.vsock import (
    CID_HOST,
    HDR_SIZE,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    U32,
    Header,
)

#: Bytes we promise to hold per connection for the host reader (our buf_alloc).
BUF_ALLOC = 256 << 10
#: Host bytes held per connection while the guest has no credit.
TO_GUEST_MAX = 64 << 10
#: The most one packet carries (Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 << 10
MAX_CONNECTIONS = 256
MAX_REPLIES = 256
#: Tell the guest its credit once this much was forwarded since it last heard.
CREDIT_UPDATE_AT = BUF_ALLOC // 4
#: Host-side ports we give connections the host opens (as Firecracker does: clear of
#: the well-known and ephemeral ranges).
HOST_PORT_FIRST = 1 << 30

Key = tuple[int, int]  # (guest port, host port)


class GuestError(Exception):
    """The guest broke the framing itself: its device must be reset (connection closed)."""


class Refused(Exception):
    """The host side asked for more than the limits allow."""


@dataclass(eq=False)
class Conn:
    guest_port: int
    host_port: int
    from_host: bool  # who opened it
    established: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest, mod 2^32
    fwd_cnt: int = 0  # guest bytes forwarded to the host, mod 2^32
    told_fwd: int = 0  # fwd_cnt as the guest last heard it
    to_host: bytearray = field(default_factory=bytearray)
    to_guest: bytearray = field(default_factory=bytearray)
    guest_eof: bool = False  # the guest sends no more
    guest_no_rcv: bool = False  # the guest takes no more
    host_eof: bool = False  # the host sends no more
    shutdown_sent: bool = False
    credit_due: bool = False

    @property
    def key(self) -> Key:
        return self.guest_port, self.host_port

    def credit(self) -> int:
        """What the guest can take now: 0 if its numbers do not add up."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)


@dataclass
class Stats:
    packets_in: int = 0
    packets_out: int = 0
    bytes_to_host: int = 0
    bytes_to_guest: int = 0
    resets_sent: int = 0
    no_connection: int = 0  # packets for connections that do not exist
    bad_cid: int = 0  # wrong src_cid, or a dst_cid other than the host
    bad_packets: int = 0  # unknown op or type, or an op out of sequence
    credit_violations: int = 0
    no_listener: int = 0  # guest connections to a host port nobody listens on, or over the limit
    resets_dropped: int = 0  # RSTs for stray packets not queued: the guest does not read them

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class GuestSockets:
    """The stream sockets of the guest with CID `cid`."""

    def __init__(self, cid: int, max_connections: int = MAX_CONNECTIONS) -> None:
        self.cid = cid
        self.max_connections = max_connections
        self.conns: dict[Key, Conn] = {}
        self.listening: set[int] = set()
        self.replies: deque[bytes] = deque()
        self.events: deque[tuple[str, Key, str]] = deque()
        self.stats = Stats()
        self.next_port = HOST_PORT_FIRST
        self._turn = 0  # where the round robin of data to the guest goes on

    # -- packets for the guest
    def _header(self, op: int, guest_port: int, host_port: int, length: int = 0, flags: int = 0,
                conn: Conn | None = None) -> Header:
        fwd = conn.fwd_cnt if conn else 0
        if conn is not None:
            conn.told_fwd = fwd
            conn.credit_due = False
        return Header(CID_HOST, self.cid, host_port, guest_port, length, TYPE_STREAM, op, flags,
                      BUF_ALLOC, fwd)

    def _reply(self, op: int, guest_port: int, host_port: int, flags: int = 0,
               conn: Conn | None = None) -> None:
        self.replies.append(self._header(op, guest_port, host_port, flags=flags, conn=conn).pack())
        if op == OP_RST:
            self.stats.resets_sent += 1

    def _rst_raw(self, hdr: Header) -> None:
        """Answer a packet that has no connection: RST back to where it came from (never
        an RST to an RST, so two peers cannot ping-pong). Goes only to this guest."""
        if hdr.op == OP_RST:
            return
        if len(self.replies) >= MAX_REPLIES:
            self.stats.resets_dropped += 1
            return
        packet = Header(hdr.dst_cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, OP_RST, 0,
                        BUF_ALLOC, 0)
        self.replies.append(packet.pack())
        self.stats.resets_sent += 1

    def has_output(self) -> bool:
        if self.replies:
            return True
        return any(self._sendable(c) for c in self.conns.values())

    def _sendable(self, conn: Conn) -> bool:
        if conn.credit_due:
            return True
        if not conn.established:
            return False
        if conn.to_guest and conn.credit() > 0:
            return True
        return conn.host_eof and not conn.to_guest and not conn.shutdown_sent

    def pop_for_guest(self, room: int) -> bytes | None:
        """The next packet (header and payload) for an rx buffer of `room` bytes, or None.
        GuestError if the buffer cannot hold a header."""
        if room < HDR_SIZE:
            raise GuestError(f"rx buffer of {room} bytes cannot hold a {HDR_SIZE}-byte header")
        if self.replies:
            self.stats.packets_out += 1
            return self.replies.popleft()
        conns = list(self.conns.values())
        for i in range(len(conns)):  # round robin: each connection its turn
            conn = conns[(self._turn + i) % len(conns)]
            if self._sendable(conn):
                self._turn = (self._turn + i + 1) % len(conns)
                self.stats.packets_out += 1
                return self._data_packet(conn, room - HDR_SIZE)
        return None

    def _data_packet(self, conn: Conn, room: int) -> bytes:
        if conn.established and conn.to_guest and conn.credit() > 0:
            n = min(len(conn.to_guest), conn.credit(), room, MAX_PAYLOAD)
            if n:
                data = bytes(conn.to_guest[:n])
                del conn.to_guest[:n]
                conn.tx_cnt = (conn.tx_cnt + n) & U32
                self.stats.bytes_to_guest += n
                return self._header(OP_RW, *conn.key, length=n, conn=conn).pack() + data
        if conn.established and conn.host_eof and not conn.to_guest and not conn.shutdown_sent:
            conn.shutdown_sent = True
            return self._header(OP_SHUTDOWN, *conn.key, flags=SHUTDOWN_SEND, conn=conn).pack()
        return self._header(OP_CREDIT_UPDATE, *conn.key, conn=conn).pack()

    # -- packets from the guest
    def feed(self, hdr: Header, payload: bytes) -> None:
        """One packet from the guest's tx ring; `payload` is its `hdr.len` bytes (the
        device checked the chain holds them)."""
        self.stats.packets_in += 1
        if hdr.src_cid != self.cid or hdr.dst_cid != CID_HOST:
            self.stats.bad_cid += 1
            return self._rst_raw(hdr)
        if hdr.type != TYPE_STREAM:
            self.stats.bad_packets += 1
            return self._rst_raw(hdr)
        key = (hdr.src_port, hdr.dst_port)
        conn = self.conns.get(key)
        if hdr.op == OP_REQUEST:
            return self._request(hdr, conn)
        if conn is None:
            if hdr.op != OP_RST:
                self.stats.no_connection += 1
            return self._rst_raw(hdr)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        if op == OP_RESPONSE:
            if conn.established or not conn.from_host:
                return self._violation(conn, "RESPONSE on an open connection")
            conn.established = True
            self.events.append(("connected", key, ""))
        elif op == OP_RST:
            self._forget(conn, "reset by the guest" if conn.established else "refused by the guest")
        elif op == OP_SHUTDOWN:
            self._shutdown(conn, hdr.flags)
        elif op == OP_RW:
            self._rw(conn, payload)
        elif op == OP_CREDIT_REQUEST:
            conn.credit_due = True
        elif op != OP_CREDIT_UPDATE:
            self._violation(conn, f"unknown op {op}")
        return None

    def _request(self, hdr: Header, conn: Conn | None) -> None:
        if conn is not None:
            return self._violation(conn, "REQUEST for an open connection")
        host_port = hdr.dst_port
        if (host_port not in self.listening or len(self.conns) >= self.max_connections
                or len(self.replies) >= MAX_REPLIES):
            self.stats.no_listener += 1
            return self._rst_raw(hdr)
        conn = Conn(hdr.src_port, host_port, from_host=False, established=True,
                    peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt)
        self.conns[conn.key] = conn
        self._reply(OP_RESPONSE, *conn.key, conn=conn)
        self.events.append(("accept", conn.key, ""))
        return None

    def _rw(self, conn: Conn, payload: bytes) -> None:
        if not conn.established or conn.guest_eof:
            return self._violation(conn, "data before RESPONSE or after SHUTDOWN")
        if len(conn.to_host) + len(payload) > BUF_ALLOC:
            self.stats.credit_violations += 1
            return self._violation(conn, "data beyond the credit we gave")
        if not payload:
            return None
        conn.to_host += payload
        self.events.append(("data", conn.key, ""))
        return None

    def _shutdown(self, conn: Conn, flags: int) -> None:
        if flags & SHUTDOWN_SEND and not conn.guest_eof:
            conn.guest_eof = True
            self.events.append(("eof", conn.key, ""))
        if flags & SHUTDOWN_RCV:
            conn.guest_no_rcv = True
            conn.to_guest.clear()
        self._maybe_done(conn)

    def _maybe_done(self, conn: Conn) -> None:
        """Both ways shut and everything delivered: close with RST, as the spec asks."""
        if conn.guest_eof and not conn.to_host and (conn.guest_no_rcv or conn.shutdown_sent):
            self._reply(OP_RST, *conn.key, conn=conn)
            self._forget(conn, "closed")

    def _violation(self, conn: Conn, why: str) -> None:
        self.stats.bad_packets += 1
        self._reply(OP_RST, *conn.key, conn=conn)
        self._forget(conn, f"reset: the guest sent {why}")

    def _forget(self, conn: Conn, why: str) -> None:
        if self.conns.pop(conn.key, None) is not None:
            self.events.append(("closed", conn.key, why))

    # -- the host side
    def host_connect(self, guest_port: int) -> Key:
        """A host process asks for the guest's `guest_port`: REQUEST sent; an event
        "connected" or "closed" follows. Refused over the connection limit."""
        if not 0 <= guest_port <= U32:
            raise Refused(f"port {guest_port} is not a 32-bit number")
        if len(self.conns) >= self.max_connections:
            raise Refused(f"the guest has {self.max_connections} connections")
        for _ in range(self.max_connections + 1):  # a free port is among the next few
            host_port = self.next_port
            span = U32 - HOST_PORT_FIRST
            self.next_port = HOST_PORT_FIRST + (self.next_port + 1 - HOST_PORT_FIRST) % span
            if (guest_port, host_port) not in self.conns:
                break
        conn = Conn(guest_port, host_port, from_host=True)
        self.conns[conn.key] = conn
        self._reply(OP_REQUEST, *conn.key, conn=conn)
        return conn.key

    def host_room(self, key: Key) -> int:
        """How many bytes the host side may hand over now (0: stop reading its socket)."""
        conn = self.conns.get(key)
        if conn is None or conn.host_eof:
            return 0
        if conn.guest_no_rcv:
            return TO_GUEST_MAX  # the guest takes no more: read and discard
        return max(0, TO_GUEST_MAX - len(conn.to_guest))

    def host_send(self, key: Key, data: bytes) -> int:
        """Bytes read from the host socket, at most `host_room`; how many were taken."""
        conn = self.conns.get(key)
        if conn is None:
            return 0
        data = data[: self.host_room(key)]
        if not conn.guest_no_rcv:
            conn.to_guest += data
        return len(data)

    def to_host(self, key: Key) -> bytes:
        conn = self.conns.get(key)
        return bytes(conn.to_host) if conn is not None else b""

    def host_sent(self, key: Key, n: int) -> None:
        """The host socket took `n` bytes of `to_host`: they count as forwarded."""
        conn = self.conns.get(key)
        if conn is None or n <= 0:
            return
        n = min(n, len(conn.to_host))
        del conn.to_host[:n]
        conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        self.stats.bytes_to_host += n
        if (conn.fwd_cnt - conn.told_fwd) & U32 >= CREDIT_UPDATE_AT:
            conn.credit_due = True
        self._maybe_done(conn)

    def host_shutdown(self, key: Key) -> None:
        """The host side sends no more (EOF on its socket): SHUTDOWN once the rest is sent."""
        conn = self.conns.get(key)
        if conn is not None:
            conn.host_eof = True

    def host_close(self, key: Key) -> None:
        """The host side is gone: RST to the guest."""
        conn = self.conns.pop(key, None)
        if conn is not None:
            self._reply(OP_RST, *conn.key, conn=conn)

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def unlisten(self, port: int) -> None:
        self.listening.discard(port)

    def close_all(self, why: str) -> None:
        """The guest's device went away: every connection is closed."""
        for conn in list(self.conns.values()):
            self._forget(conn, why)
        self.replies.clear()
