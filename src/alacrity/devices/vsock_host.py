"""The host side of a vsock device: every socket the gate hands it, in one loop.

The gate has admitted the peer (a member of one of the device's buses). Its first bytes
say what it is: a vhost-user frontend (a guest; its first message's request number is a
small binary integer) goes to a connection thread of its own; anything else is a host
client, which sends one line:

    CONNECT PORT [VM]   a stream to the guest's PORT      -> OK HOSTPORT, then the stream
    LISTEN PORT [VM]    take the guest's connections to host port PORT  -> OK
                        then, per connection: ACCEPT GUESTPORT with the stream's fd (SCM_RIGHTS)
    -> ERR reason, and close, on a refusal

VM is the guest's CID or name (a QEMU's -name); without it, the device's only guest.
All sockets are non-blocking and nothing here waits on a peer: a host reader that stops
reading leaves bytes in our bounded buffer and the guest without credit; a guest that stops
reading leaves the host's bytes in its socket, as we stop reading it (vsock_proto.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from alacrity.devices.base import Handovers
from alacrity.devices.vsock_proto import GuestSockets, Key, Refused

log = logging.getLogger("alacrity.devices.vsock")

MAX_LINE = 256
#: A client has this long to send its line; a CONNECT this long for the guest's answer.
HELLO_S = 10.0
#: Host sockets (clients, streams, listeners) one device keeps at once. Every stream holds
#: at most BUF_ALLOC + TO_GUEST_MAX (320 KiB): this bounds a device's buffers to 80 MiB.
MAX_HOST_SOCKETS = 256
READ_CHUNK = 64 << 10
_LINE = re.compile(r"(CONNECT|LISTEN) ([0-9]{1,10})(?: ([A-Za-z0-9_.-]{1,64}))?")


class VsockSession(Protocol):
    """What the loop needs of a guest (devices/vsock.py: VsockSession)."""

    cid: int
    name: str
    lock: threading.Lock
    sockets: GuestSockets
    closed: bool

    def ring(self, index: int) -> None: ...


class VsockDevice(Protocol):
    """What the loop needs of its device (devices/vsock.py: VsockDevice)."""

    name: str
    lock: threading.Lock
    handovers: Handovers
    guests: dict[int, VsockSession]

    def guest(self, target: str) -> VsockSession | None: ...
    def serve_guest(self, sock: socket.socket, pid: int, label: str) -> None: ...
    def count(self, name: str, amount: int = 1) -> None: ...
    def record_error(self, reason: str) -> None: ...


@dataclass(eq=False)
class Client:
    """A host socket that has not said what it wants yet."""

    sock: socket.socket
    pid: int
    deadline: float
    line: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class Stream:
    """A host socket joined to one guest connection."""

    sock: socket.socket
    guest: VsockSession
    key: Key
    deadline: float = 0.0  # while the guest has not answered a CONNECT
    connected: bool = False
    early: bytes = b""  # sent with the CONNECT line, for the guest once it answers
    write_shut: bool = False
    mask: int = 0


@dataclass(eq=False)
class Listener:
    sock: socket.socket
    guest: VsockSession
    port: int


def format_err(why: str) -> bytes:
    return ("ERR " + why.replace("\n", " ")[:200] + "\n").encode()


class HostLoop:
    def __init__(self, device: VsockDevice) -> None:
        self.device = device
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.clients: set[Client] = set()
        self.streams: dict[tuple[int, Key], Stream] = {}  # by (CID, key)
        self.listeners: dict[tuple[int, int], Listener] = {}  # by (CID, port)
        self.thread: threading.Thread | None = None
        self.start_lock = threading.Lock()
        self.stopping = False

    def start(self) -> None:
        with self.start_lock:
            if self.thread is None and not self.stopping:
                self.thread = threading.Thread(target=self._loop, name=f"vsock {self.device.name}",
                                               daemon=True)
                self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"x")

    def count(self) -> int:
        return len(self.clients) + len(self.streams) + len(self.listeners)

    # -- the loop
    def _loop(self) -> None:
        while not self.stopping:
            for key, mask in self.selector.select(self._timeout()):
                item = key.data
                if item is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    continue
                try:
                    if isinstance(item, Client):
                        self._on_client(item)
                    elif isinstance(item, Stream):
                        self._on_stream(item, mask)
                    else:
                        self._on_listener(item)
                except Exception as exc:  # one bad socket must never stop the loop
                    log.exception("vsock %s: unexpected error", self.device.name)
                    self.device.record_error(f"unexpected error: {exc!r}")
                    self._drop(item)
            try:
                self._take_handovers()
                self._sync()
            except Exception as exc:  # a bug must cost a connection, never the loop
                log.exception("vsock %s: unexpected error", self.device.name)
                self.device.record_error(f"unexpected error: {exc!r}")
        for item in [*self.clients, *self.streams.values(), *self.listeners.values()]:
            self._drop(item)

    def _timeout(self) -> float:
        deadlines = [c.deadline for c in self.clients]
        deadlines += [s.deadline for s in self.streams.values() if not s.connected]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0

    def _take_handovers(self) -> None:
        while True:
            try:
                item = self.device.handovers.queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                return
            sock, pid, _label = item
            if self.count() >= MAX_HOST_SOCKETS:
                self._refuse(sock, f"{MAX_HOST_SOCKETS} host sockets are open")
                continue
            sock.setblocking(False)
            client = Client(sock, pid, time.monotonic() + HELLO_S)
            self.clients.add(client)
            self.selector.register(sock, selectors.EVENT_READ, client)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        with contextlib.suppress(OSError):
            sock.send(format_err(why), socket.MSG_DONTWAIT)
        sock.close()
        self.device.count("refused")

    def _drop(self, item: object) -> None:
        if isinstance(item, Client):
            self.clients.discard(item)
        elif isinstance(item, Stream):
            if self.streams.pop((item.guest.cid, item.key), None) is not None:
                with item.guest.lock:
                    item.guest.sockets.host_close(item.key)
                item.guest.ring(0)
                self.device.count("streams", -1)
        elif isinstance(item, Listener) and self.listeners.pop((item.guest.cid, item.port), None):
            with item.guest.lock:
                item.guest.sockets.unlisten(item.port)
        sock = item.sock  # type: ignore[attr-defined]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        sock.close()

    # -- clients: the first bytes, then one line
    def _on_client(self, client: Client) -> None:
        if not client.line:
            try:
                first = client.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                first = b""
            if first and not 0x20 <= first[0] < 0x7F:  # binary: a vhost-user frontend
                self.clients.discard(client)
                self.selector.unregister(client.sock)
                self.device.serve_guest(client.sock, client.pid, f"{self.device.name}[pid {client.pid}]")
                return
        try:
            data = client.sock.recv(MAX_LINE + 1 - len(client.line))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(client)
        end = data.find(b"\n")
        if end < 0:
            client.line += data
            if len(client.line) > MAX_LINE:
                self._drop(client)
            return None
        client.line += data[:end]
        # Bytes after the line are the stream's first (at most MAX_LINE): they wait for OK.
        return self._request(client, client.line.decode(errors="replace").strip(), bytes(data[end + 1 :]))

    def _fail(self, client: Client, why: str) -> None:
        self.clients.discard(client)
        self.selector.unregister(client.sock)
        self._refuse(client.sock, why)

    def _request(self, client: Client, line: str, early: bytes) -> None:
        match = _LINE.fullmatch(line)
        if match is None:
            return self._fail(client, "expected CONNECT PORT [VM] or LISTEN PORT [VM]")
        verb, port, target = match.group(1), int(match.group(2)), match.group(3) or ""
        if port > 0xFFFFFFFF:
            return self._fail(client, f"port {port} is not a 32-bit number")
        guest = self.device.guest(target)
        if guest is None:
            return self._fail(client, f"no guest {target!r} on vsock {self.device.name}" if target else
                              f"vsock {self.device.name} has no guest, or several: name one (CID or VM name)")
        self.clients.discard(client)
        self.selector.unregister(client.sock)
        if verb == "LISTEN":
            if early:
                return self._refuse(client.sock, "a listener sends nothing after its line")
            return self._listen(client, guest, port)
        try:
            with guest.lock:
                key = guest.sockets.host_connect(port)
        except Refused as exc:
            return self._refuse(client.sock, str(exc))
        stream = Stream(client.sock, guest, key, deadline=time.monotonic() + HELLO_S, early=early)
        self.streams[(guest.cid, key)] = stream
        self.device.count("streams")
        guest.ring(0)
        return None

    def _listen(self, client: Client, guest: VsockSession, port: int) -> None:
        if (guest.cid, port) in self.listeners:
            return self._refuse(client.sock, f"port {port} of {guest.name} has a listener already")
        listener = Listener(client.sock, guest, port)
        self.listeners[(guest.cid, port)] = listener
        with guest.lock:
            guest.sockets.listen(port)
        with contextlib.suppress(OSError):
            client.sock.send(b"OK\n", socket.MSG_DONTWAIT)
        self.selector.register(client.sock, selectors.EVENT_READ, listener)
        return None

    def _on_listener(self, listener: Listener) -> None:
        """A listener says nothing more: any byte or a hang-up ends it."""
        self._drop(listener)

    # -- streams
    def _on_stream(self, stream: Stream, mask: int) -> None:
        sockets = stream.guest.sockets
        if mask & selectors.EVENT_WRITE:
            with stream.guest.lock:
                pending = sockets.to_host(stream.key)
            if pending:
                try:
                    sent = stream.sock.send(pending)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return self._drop(stream)
                with stream.guest.lock:
                    sockets.host_sent(stream.key, sent)
                stream.guest.ring(0)  # credit, or the end of a closed connection
        if mask & selectors.EVENT_READ:
            with stream.guest.lock:
                room = sockets.host_room(stream.key)
            if room:
                try:
                    data = stream.sock.recv(min(room, READ_CHUNK))
                except BlockingIOError:
                    return None
                except OSError:
                    return self._drop(stream)
                with stream.guest.lock:
                    if data:
                        sockets.host_send(stream.key, data)
                    else:
                        sockets.host_shutdown(stream.key)
                stream.guest.ring(0)
        return None

    def _sync(self) -> None:
        """Apply the guests' events, and watch each stream for what it can do now."""
        now = time.monotonic()
        for client in [c for c in self.clients if c.deadline <= now]:
            self._drop(client)
        with self.device.lock:
            guests = list(self.device.guests.values())
        live = {g.cid for g in guests}
        for item in [s for s in self.streams.values() if s.guest.cid not in live or s.guest.closed]:
            self._drop(item)
        for item in [x for x in self.listeners.values() if x.guest.cid not in live or x.guest.closed]:
            self._drop(item)
        for guest in guests:
            with guest.lock:
                events = list(guest.sockets.events)
                guest.sockets.events.clear()
            for kind, key, why in events:
                self._event(guest, kind, key, why)
        for stream in list(self.streams.values()):
            if not stream.connected and stream.deadline <= now:
                self._refuse_stream(stream, "the guest did not answer")
                continue
            self._watch(stream)

    def _event(self, guest: VsockSession, kind: str, key: Key, why: str) -> None:
        stream = self.streams.get((guest.cid, key))
        if kind == "accept":
            return self._accept(guest, key)
        if stream is None:
            return None
        if kind == "connected" and not stream.connected:
            stream.connected = True
            with contextlib.suppress(OSError):
                stream.sock.send(f"OK {key[1]}\n".encode(), socket.MSG_DONTWAIT)  # fits: nothing sent yet
            if stream.early:
                with guest.lock:
                    guest.sockets.host_send(key, stream.early)  # within host_room: a fresh stream
                stream.early = b""
                guest.ring(0)
        elif kind == "closed":
            if not stream.connected:
                return self._refuse_stream(stream, f"connection {why}")
            self._finish(stream)
        return None

    def _refuse_stream(self, stream: Stream, why: str) -> None:
        self.streams.pop((stream.guest.cid, stream.key), None)
        self.device.count("streams", -1)
        with stream.guest.lock:
            stream.guest.sockets.host_close(stream.key)
        stream.guest.ring(0)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(stream.sock)
        self._refuse(stream.sock, why)

    def _finish(self, stream: Stream) -> None:
        """The guest closed: what it sent before is already in the socket (to_host is sent
        before events are looked at), so close."""
        self.streams.pop((stream.guest.cid, stream.key), None)
        self.device.count("streams", -1)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(stream.sock)
        with contextlib.suppress(OSError):
            stream.sock.shutdown(socket.SHUT_RDWR)
        stream.sock.close()

    def _accept(self, guest: VsockSession, key: Key) -> None:
        listener = self.listeners.get((guest.cid, key[1]))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if listener is None or self.count() >= MAX_HOST_SOCKETS:
                raise OSError(errno.ECONNREFUSED, "no listener")
            socket.send_fds(listener.sock, [f"ACCEPT {key[0]}\n".encode()], [theirs.fileno()],
                            socket.MSG_DONTWAIT)
        except OSError:
            ours.close()
            with guest.lock:
                guest.sockets.host_close(key)
            guest.ring(0)
            if listener is not None:
                self._drop(listener)  # a listener that does not read its accepts is dropped
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.streams[(guest.cid, key)] = Stream(ours, guest, key, connected=True)
        self.device.count("streams")

    def _watch(self, stream: Stream) -> None:
        sockets = stream.guest.sockets
        with stream.guest.lock:
            conn = sockets.conns.get(stream.key)
            if conn is None:
                gone = True
            else:
                gone = False
                to_host = bool(conn.to_host)
                eof = conn.guest_eof and not conn.to_host
                readable = stream.connected and sockets.host_room(stream.key) > 0
        if gone:
            if stream.connected:
                return self._finish(stream)
            mask = 0
        else:
            if eof and not stream.write_shut:
                stream.write_shut = True
                with contextlib.suppress(OSError):
                    stream.sock.shutdown(socket.SHUT_WR)
            mask = (selectors.EVENT_WRITE if to_host else 0) | (selectors.EVENT_READ if readable else 0)
        if mask == stream.mask:
            return None
        if stream.mask and mask:
            self.selector.modify(stream.sock, mask, stream)
        elif mask:
            self.selector.register(stream.sock, mask, stream)
        else:
            self.selector.unregister(stream.sock)
        stream.mask = mask
        return None
