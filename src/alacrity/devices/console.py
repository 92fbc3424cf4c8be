"""The console device: each VM's serial console as a stream the bus keeps (kvm-xen's
console ring, on the bus).

QEMU's serial port is a chardev socket (`reconnect=1`) to this device's socket. The gate
admits QEMU like any member and hands the raw stream to `adopt()`. The device keeps it in
a selector loop of its own (one thread per device): the guest's output goes into a ring
of `log_size` bytes per VM, shown as `devices/NAME/consoles/VM` and kept after the VM
exits, until the device is removed. Any other member process that connects speaks a
one-line protocol first (`ATTACH VM` to type, `FOLLOW VM` to watch): its lines and the
ring are the sans-I/O half, in console_ring.py; docs/devices.md has the whole story.

Nothing slows the guest: QEMU's stream is read whenever it is readable, whoever follows.
A follower is a position in the ring, not a buffer: one that does not keep up is moved
forward past what the ring overwrote, and those bytes are counted in `dropped`. So a
client that never reads costs a socket and a few integers.

The device may touch: the sockets the gate hands it, /proc/PID/{exe,cmdline} of the peer
it was given, and its own rings and counters.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alacrity.devices.base import MAX_CMDLINE, Attribute, Device, Handovers, Slot, chardev_socket, parse_size
from alacrity.devices.console_ring import (
    CHUNK,
    MAX_HELLO,
    Hello,
    HelloError,
    HelloReader,
    Ring,
    format_err,
    format_ok,
    qemu_name,
    safe_name,
)

log = logging.getLogger("alacrity.devices.console")

MIN_LOG = 4096
MAX_LOG = 64 << 20
#: Consoles one device holds; when full, the oldest one without a VM makes room.
MAX_CONSOLES = 64
#: Client connections (watchers, writers, and those yet to say which) per device, and per uid.
MAX_CLIENTS = 64
MAX_CLIENTS_PER_UID = 16
#: A client must send its request line within this long, and one that the device is
#: closing (its VM ended) gets this long to take what is left.
HELLO_TIMEOUT_S = 10.0
LINGER_S = 10.0
#: Keystrokes waiting for QEMU: beyond this the writer is not read until QEMU takes them.
TO_GUEST_MAX = 64 << 10
#: After reading a QEMU stream whose send buffer was widened, leave it this long: the
#: guest's bytes gather in it (it holds ~15 ms of a flooding guest), and we read them in
#: one go instead of waking for every few bytes, which on a small host took CPU from QEMU.
COALESCE_S = 0.003
REFUSAL_LOG_S = 10.0
SO_PEERPIDFD = 77  # Linux 6.5+; not yet named by Python 3.11's socket module


# ---- who connected: a QEMU (its name) or a client

QEMU_EXE = re.compile(r"qemu-system-[A-Za-z0-9_]+|qemu-kvm")
#: QEMU's serial model sends each byte of the guest's output in a sendmsg of its own,
#: and each is an skb charged ~768 bytes against the sender's buffer: with the default
#: buffer (208 KiB) only ~280 bytes may wait for us. A guest writing faster than we
#: drain sees EAGAIN, and QEMU stalls its UART until the socket is writable again (about
#: 2 ms each time under TCG), so the guest would run at the speed of our reading. So the
#: daemon widens QEMU's end to this (the kernel doubles it: ~11000 bytes, or 15 ms of a
#: flooding TCG guest, may wait).
QEMU_SNDBUF = 4 << 20
SO_SNDBUFFORCE = 32
_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class PeerKind:
    uid: int
    vm: str | None  # a QEMU's console name; None for a client
    widened: str = ""  # for a QEMU: why its send buffer could not be widened ("" if it was)


class PeerRefused(Exception):
    pass


def identify_peer(sock: socket.socket, pid: int) -> PeerKind:
    """Is the peer (`pid`, from the gate) a QEMU, and which VM? Read from /proc while a
    pidfd holds the process, so a pid reused meanwhile is caught. Raises PeerRefused."""
    try:
        peer_pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError as exc:
        raise PeerRefused(f"no peer credentials: {exc.strerror}") from None
    if peer_pid != pid:
        raise PeerRefused(f"the socket's peer is pid {peer_pid}, not {pid}")
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        # As in bus/identity.py: only "no SO_PEERPIDFD here" falls back to the pid; other
        # errors (EINVAL for a reaped peer on 6.5 to 6.14) mean the peer is gone.
        if exc.errno != errno.ENOPROTOOPT:
            raise PeerRefused(f"no pidfd for the peer: {exc.strerror}") from None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise PeerRefused(f"pid {pid} is not a live process: {exc.strerror}") from None
    try:
        if _pidfd_pid(pidfd) != pid:
            raise PeerRefused(f"pid {pid} has exited")
        try:
            exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        except OSError as exc:
            raise PeerRefused(f"cannot read /proc/{pid}/exe: {exc.strerror}") from None
        vm = None
        if QEMU_EXE.fullmatch(os.path.basename(exe)):
            argv = _cmdline(pid)
            name = qemu_name(argv)
            if name is None:
                raise PeerRefused(f"QEMU pid {pid} has no -name: its console cannot be named")
            vm = safe_name(name)
            if vm is None:
                raise PeerRefused(f"QEMU pid {pid}: -name {name!r} gives no usable console name")
        if _pidfd_pid(pidfd) != pid:  # /proc described `pid` only if the pidfd still does
            raise PeerRefused(f"pid {pid} exited while it was identified")
        return PeerKind(uid, vm, "" if vm is None else widen_send_buffer(sock, pid, pidfd))
    finally:
        os.close(pidfd)


def widen_send_buffer(sock: socket.socket, pid: int, pidfd: int) -> str:
    """Set QEMU_SNDBUF on QEMU's end of `sock` (see QEMU_SNDBUF): a copy of each of its
    Unix sockets connected to our listening path is taken with pidfd_getfd (root may),
    widened and closed. Only the socket's buffer changes. Returns "" or why not."""
    try:
        ours = sock.getsockname()
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        return exc.strerror or str(exc)
    widened = 0
    for entry in entries:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:["):
                continue
        except OSError:
            continue
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(entry), 0)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EBADF, errno.ENOENT):
                continue  # closed meanwhile
            return f"pidfd_getfd: {os.strerror(err)}"
        with socket.socket(fileno=fd) as theirs:
            try:
                if theirs.family != socket.AF_UNIX or theirs.getpeername() != ours:
                    continue  # not connected to us (a listening socket gives ENOTCONN)
            except OSError:
                continue
            try:
                theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, QEMU_SNDBUF)
            except OSError as exc:
                return f"SO_SNDBUFFORCE: {exc.strerror}"
            widened += 1
    return "" if widened else "its end of the connection was not found"


def _pidfd_pid(pidfd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read(MAX_CMDLINE)
    except OSError as exc:
        raise PeerRefused(f"cannot read /proc/{pid}/cmdline: {exc.strerror}") from None
    return [arg.decode(errors="replace") for arg in data.rstrip(b"\0").split(b"\0")]


# ---- the device

def _parse_log_size(text: str) -> int:
    value = parse_size(text)
    if not MIN_LOG <= value <= MAX_LOG:
        raise ValueError(f"log_size {value} out of range (4K to 64M bytes)")
    return value


@dataclass(eq=False)
class Stream:
    """QEMU's end of one console."""

    sock: socket.socket
    pid: int
    console: Console
    wide: bool = False  # its send buffer was widened: its reads may be coalesced
    resume_at: float = 0.0  # resting (not read) until then


@dataclass(eq=False)
class Client:
    sock: socket.socket
    pid: int
    uid: int
    hello: HelloReader | None = field(default_factory=HelloReader)  # None once it has spoken
    verb: str = ""
    console: Console | None = None
    pos: int = 0
    header: bytes = b""
    closing: bool = False  # its VM ended: close once it has the rest
    deadline: float = field(default_factory=lambda: time.monotonic() + HELLO_TIMEOUT_S)


@dataclass(eq=False)
class Console:
    name: str
    owner: int  # the uid of the QEMU whose console it is
    ring: Ring
    session: str = field(default_factory=lambda: secrets.token_hex(4))
    stream: Stream | None = None
    clients: set[Client] = field(default_factory=set)
    writer: Client | None = None
    to_guest: bytearray = field(default_factory=bytearray)
    ended: float = 0.0  # when its stream last ended (0: never had one end)


class ConsoleDevice(Device):
    class_name = "console"
    summary = (
        "serial consoles: each VM's console is kept in a ring log (consoles/VM); "
        "'alacrity vm console VM' types into it or follows it"
    )
    adopts_connections = True
    client_driver = "alacrity.client.console:ConsoleClient"
    attributes = (
        Attribute("log_size", _parse_log_size, "1M",
                  "bytes of each VM's console kept (4K to 64M); a change resizes the logs, newest kept",
                  live=True),
    )

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        """The VM's serial port (ttyS0) as a chardev socket to the gate. A VM has one
        console: the bus's first console device takes it."""
        if slot.index > 0:
            return []
        return [*chardev_socket(slot.id, slot.socket), "-serial", f"chardev:{slot.id}"]

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.counters.update({"bytes_in": 0, "bytes_out": 0, "typed": 0, "dropped": 0, "console_count": 0,
                              "refused": 0})
        self.consoles: dict[str, Console] = {}
        self.handovers = Handovers(f"console {name}")
        self.inbox: collections.deque[tuple[socket.socket, int, str, PeerKind]] = collections.deque()
        self.clients: set[Client] = set()
        self.resting: set[Stream] = set()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.threads: list[threading.Thread] = []
        self.threads_lock = threading.Lock()
        self.destroyed = False
        self.refusal_log: dict[tuple[int, str], float] = {}
        self.identify: Callable[[socket.socket, int], PeerKind] = identify_peer

    # -- admin
    def set_attribute(self, name: str, text: str) -> None:
        super().set_attribute(name, text)
        with self.lock:
            size = self.values["log_size"]
            for console in self.consoles.values():
                if console.ring.size != size:
                    console.ring = console.ring.resized(size)

    def views(self) -> dict[str, str | dict[str, str]]:
        with self.lock:
            names = sorted(self.consoles)
        return {"consoles": {name: _Log(self, name) for name in names}}  # type: ignore[dict-item]

    def log_of(self, vm: str) -> bytes:
        """What console `vm` holds (b"" if there is no such console)."""
        with self.lock:
            console = self.consoles.get(vm)
            return console.ring.snapshot() if console else b""

    # -- connections from the gate
    def adopt(self, sock: socket.socket, peer_pid: int, label: str) -> None:
        """Queue the connection to be identified; never waits."""
        self.handovers.put(sock, peer_pid, label)
        with self.threads_lock:
            if not self.threads and not self.destroyed:
                for target, what in ((self._identify_loop, "identify"), (self._loop, "loop")):
                    thread = threading.Thread(target=target, name=f"console {self.name} {what}", daemon=True)
                    thread.start()
                    self.threads.append(thread)

    def _identify_loop(self) -> None:
        """Off the loop's thread: reading /proc/PID/cmdline may wait on the peer's memory."""
        while (item := self.handovers.get()) is not None:
            sock, pid, label = item
            try:
                kind = self.identify(sock, pid)
            except (PeerRefused, OSError) as exc:
                self._refuse(sock, pid, str(exc))
                continue
            except Exception as exc:  # a bug here costs one connection, never the thread
                log.exception("console %s: identifying pid %d failed", self.name, pid)
                self._refuse(sock, pid, f"cannot identify it: {exc}")
                continue
            if self.destroyed:
                sock.close()
                continue
            self.inbox.append((sock, pid, label, kind))
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"x")

    def _refuse(self, sock: socket.socket, pid: int, why: str, reply: bool = False) -> None:
        if reply:
            with contextlib.suppress(OSError):
                sock.send(format_err(why), socket.MSG_DONTWAIT)
        sock.close()
        with self.lock:
            self.counters["refused"] += 1
            now = time.monotonic()
            last = self.refusal_log.get((pid, why))
            if last is not None and now - last < REFUSAL_LOG_S:
                return
            if len(self.refusal_log) > 1024:
                self.refusal_log.clear()
            self.refusal_log[(pid, why)] = now
        log.warning("console %s: refused pid %d: %s", self.name, pid, why)

    # -- the loop: every socket of this device, non-blocking, in one thread
    def _loop(self) -> None:
        while not self.destroyed:
            events = self.selector.select(self._timeout())
            for key, mask in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    continue
                try:
                    if isinstance(key.data, Stream):
                        self._on_stream(key.data, mask)
                    else:
                        self._on_client(key.data, mask)
                except Exception as exc:  # one bad connection must never stop the loop
                    log.exception("console %s: unexpected error", self.name)
                    self.record_error(f"unexpected error: {exc!r}")
                    if isinstance(key.data, Stream):
                        self._end_stream(key.data)
                    else:
                        self._close_client(key.data)
            while self.inbox and not self.destroyed:
                self._take(*self.inbox.popleft())
            self._expire(time.monotonic())
        self._close_all()

    def _timeout(self) -> float | None:
        deadlines = [c.deadline for c in self.clients if c.hello is not None or c.closing]
        deadlines += [s.resume_at for s in self.resting]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self, now: float) -> None:
        for stream in [s for s in self.resting if s.resume_at <= now]:
            self.resting.discard(stream)
            self._watch_stream(stream)
        for client in [c for c in self.clients if (c.hello is not None or c.closing) and c.deadline <= now]:
            self._close_client(client)

    def _take(self, sock: socket.socket, pid: int, label: str, kind: PeerKind) -> None:
        sock.setblocking(False)
        if kind.vm is not None:
            return self._add_stream(sock, pid, kind)
        if len(self.clients) >= MAX_CLIENTS:
            return self._refuse(sock, pid, f"{MAX_CLIENTS} clients are connected", reply=True)
        if kind.uid != 0 and sum(c.uid == kind.uid for c in self.clients) >= MAX_CLIENTS_PER_UID:
            return self._refuse(sock, pid, f"uid {kind.uid} has {MAX_CLIENTS_PER_UID} clients", reply=True)
        client = Client(sock, pid, kind.uid)
        self.clients.add(client)
        self.selector.register(sock, selectors.EVENT_READ, client)
        self.count("connections")
        return None

    # -- QEMU's streams
    def _add_stream(self, sock: socket.socket, pid: int, kind: PeerKind) -> None:
        name = kind.vm
        assert name is not None
        console = self.consoles.get(name)
        if console is not None and console.stream is not None:
            if console.stream.pid != pid and not _hung_up(console.stream.sock):
                return self._refuse(sock, pid, f"console {name} is in use by QEMU pid {console.stream.pid}")
            self._end_stream(console.stream)  # the same QEMU reconnected, or the old one is gone
        if console is not None and console.owner != kind.uid:
            self._drop_console(console)  # another user's VM of that name: not its log
            console = None
        if console is None:
            if len(self.consoles) >= MAX_CONSOLES and not self._make_room():
                return self._refuse(sock, pid, f"{MAX_CONSOLES} consoles are live on this device")
            console = Console(name, kind.uid, Ring(self.values["log_size"]))
            with self.lock:
                self.consoles[name] = console
                self.counters["console_count"] = len(self.consoles)
        console.stream = Stream(sock, pid, console, wide=not kind.widened)
        self.selector.register(sock, selectors.EVENT_READ, console.stream)
        self.count("connections")
        slow = f" (its send buffer stays narrow: {kind.widened}; a fast guest may wait for us)" \
            if kind.widened else ""
        log.info("console %s: QEMU pid %d is VM %s%s", self.name, pid, name, slow)
        return None

    def _make_room(self) -> bool:
        idle = [c for c in self.consoles.values() if c.stream is None and not c.clients]
        if not idle:
            return False
        self._drop_console(min(idle, key=lambda c: c.ended))
        return True

    def _drop_console(self, console: Console) -> None:
        for client in list(console.clients):
            self._close_client(client)
        with self.lock:
            self.consoles.pop(console.name, None)
            self.counters["console_count"] = len(self.consoles)

    def _on_stream(self, stream: Stream, mask: int) -> None:
        console = stream.console
        if mask & selectors.EVENT_WRITE:
            self._flush_to_guest(console)
        if not mask & selectors.EVENT_READ or console.stream is not stream:
            return
        for _ in range(4):  # bounded per turn: the other sockets get theirs
            try:
                data = stream.sock.recv(CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                return self._end_stream(stream)
            self._record(console, data)
            if len(data) < CHUNK:
                break
        if stream.wide:
            stream.resume_at = time.monotonic() + COALESCE_S
            self.resting.add(stream)
            self._watch_stream(stream)
        for client in list(console.clients):
            self._send(client)
        return None

    def _watch_stream(self, stream: Stream) -> None:
        """Read it unless it rests; write to it while keystrokes wait."""
        reading = 0 if stream in self.resting else selectors.EVENT_READ
        self._modify(stream.sock, reading | (selectors.EVENT_WRITE if stream.console.to_guest else 0), stream)

    def _record(self, console: Console, data: bytes) -> None:
        with self.lock:
            lost = console.ring.write(data)
            self.counters["bytes_in"] += len(data)
            start = console.ring.start
            readers = [c for c in console.clients if c.hello is None]
            if not readers:
                self.counters["dropped"] += lost  # overwritten, and nobody had it
            for client in readers:
                if client.pos < start:
                    self.counters["dropped"] += start - client.pos
                    client.pos = start

    def _end_stream(self, stream: Stream) -> None:
        console = stream.console
        if console.stream is stream:
            console.stream = None
            console.ended = time.monotonic()
            if console.to_guest:
                self.count("dropped", len(console.to_guest))
                console.to_guest.clear()
        self.resting.discard(stream)
        self._unregister(stream.sock)
        stream.sock.close()
        self.count("connections", -1)
        for client in list(console.clients):
            client.closing, client.deadline = True, time.monotonic() + LINGER_S
            self._send(client)
        log.info("console %s: VM %s's stream ended", self.name, console.name)

    def _flush_to_guest(self, console: Console) -> None:
        stream = console.stream
        if stream is None:
            return
        try:
            while console.to_guest:
                sent = stream.sock.send(console.to_guest)
                del console.to_guest[:sent]
                self.count("typed", sent)
        except BlockingIOError:
            pass
        except OSError:
            return self._end_stream(stream)
        self._watch_stream(stream)
        if console.writer is not None and len(console.to_guest) < TO_GUEST_MAX:
            self._update(console.writer)
        return None

    # -- clients
    def _on_client(self, client: Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._send(client)
        if client not in self.clients or not mask & selectors.EVENT_READ:
            return
        try:
            data = client.sock.recv(4096 if client.hello is None else MAX_HELLO)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._close_client(client)
        if client.hello is not None:
            try:
                done = client.hello.feed(data)
            except HelloError as exc:
                return self._refuse_client(client, str(exc))
            if done is not None:
                self._bind(client, *done)
            return None
        if client.verb == "ATTACH" and client.console is not None and client.console.writer is client:
            console = client.console
            if console.stream is None:
                self.count("dropped", len(data))  # no VM to take it
            else:
                console.to_guest += data
                self._flush_to_guest(console)
                self._update(client)
        return None  # a follower's bytes are read and dropped: it only watches

    def _refuse_client(self, client: Client, why: str) -> None:
        self._forget(client)
        self._refuse(client.sock, client.pid, why, reply=True)

    def _bind(self, client: Client, hello: Hello, rest: bytes) -> None:
        console = self.consoles.get(hello.name)
        if console is None:
            return self._refuse_client(client, f"no console {hello.name} on {self.name}")
        if client.uid not in (0, console.owner):
            return self._refuse_client(client, f"console {hello.name} is not yours: only uid "
                                       f"{console.owner} (its QEMU's) and root may open it")
        if hello.verb == "ATTACH":
            if console.writer is not None and _hung_up(console.writer.sock):
                self._close_client(console.writer)  # gone; its end was not read yet
            if console.writer is not None:
                return self._refuse_client(client, f"console {hello.name} already has a writer "
                                           f"(pid {console.writer.pid}); FOLLOW watches it")
            console.writer = client
        with self.lock:
            ring = console.ring
            back = len(ring) if hello.backlog is None else min(hello.backlog, len(ring))
            client.pos = ring.head - back
        client.hello, client.verb, client.console = None, hello.verb, console
        client.header = format_ok(console.session, client.pos, console.stream is not None)
        if console.stream is None:
            client.closing, client.deadline = True, time.monotonic() + LINGER_S
        console.clients.add(client)
        if rest and hello.verb == "ATTACH" and console.stream is not None:
            console.to_guest += rest
            self._flush_to_guest(console)
        self._send(client)
        return None

    def _send(self, client: Client) -> None:
        """Give the client what it can take now, without waiting."""
        if client not in self.clients:
            return
        console = client.console
        try:
            while client.header:
                sent = client.sock.send(client.header)
                client.header = client.header[sent:]
            while console is not None:
                with self.lock:
                    chunk = console.ring.read(client.pos)
                    client.pos = max(client.pos, console.ring.start)
                if not chunk:
                    break
                sent = client.sock.send(chunk)
                client.pos += sent
                self.count("bytes_out", sent)
                if sent < len(chunk):
                    break
        except BlockingIOError:
            pass
        except OSError:
            return self._close_client(client)
        if client.closing and not client.header and console is not None and client.pos >= console.ring.head:
            return self._close_client(client)
        self._update(client)
        return None

    def _update(self, client: Client) -> None:
        """Watch for what the client needs: its bytes (unless its keystrokes wait for the
        guest), and room to send when it is behind."""
        console = client.console
        behind = bool(client.header) or (console is not None and client.pos < console.ring.head)
        paused = console is not None and console.writer is client and len(console.to_guest) >= TO_GUEST_MAX
        events = (0 if paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if behind else 0)
        self._modify(client.sock, events, client)

    def _close_client(self, client: Client) -> None:
        if client not in self.clients:
            return
        self._forget(client)
        client.sock.close()

    def _forget(self, client: Client) -> None:
        self.clients.discard(client)
        console = client.console
        if console is not None:
            console.clients.discard(client)
            if console.writer is client:
                console.writer = None
        self._unregister(client.sock)
        self.count("connections", -1)

    # -- selector plumbing
    def _modify(self, sock: socket.socket, events: int, data: object) -> None:
        try:
            if events:
                self.selector.modify(sock, events, data)
            else:
                self.selector.unregister(sock)
        except KeyError:
            if events:
                self.selector.register(sock, events, data)

    def _unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _close_all(self) -> None:
        for client in list(self.clients):
            self._close_client(client)
        for console in list(self.consoles.values()):
            if console.stream is not None:
                console.stream.sock.close()
                console.stream = None
        while self.inbox:
            self.inbox.popleft()[0].close()
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def destroy(self) -> None:
        self.destroyed = True
        with self.threads_lock:
            threads = list(self.threads)
        self.handovers.close(wake=bool(threads))
        if threads:
            self._wake()
            for thread in threads:
                thread.join(timeout=5)
        else:
            self.selector.close()
            os.close(self.wake_r)
            os.close(self.wake_w)


class _Log:
    """A console's log as a view file: read when the file is opened, not listed."""

    def __init__(self, device: ConsoleDevice, vm: str) -> None:
        self.device, self.vm = device, vm

    def __call__(self) -> bytes:
        return self.device.log_of(self.vm)


def _hung_up(sock: socket.socket) -> bool:
    """The peer has closed its end (its process may be gone), whatever is still unread."""
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, mask in poll.poll(0))
