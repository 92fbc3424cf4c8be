"""Connections that outlive a crashed daemon: a keeper process holds a copy of each.

QEMU 7.2's vhost-user-vsock never reconnects: when the daemon's end of its socket closes,
the guest's vsock is gone until the VM restarts. So the daemon hands the keeper, a small
process in a session of its own, a copy of each such socket and of every message the
frontend sends on it, with the fds they carry. When the daemon is killed its copies close,
but the keeper's keep the connections open; the next daemon takes them back (`Keeper.take`),
replays the messages into a fresh backend (the protocol logic is deterministic and sans-I/O:
backend.py) and serves on. A daemon that stops cleanly says BYE, and the keeper closes
everything and exits; so does a keeper whose connections all hung up, or that no daemon
claimed within KEEP_S.

This file is also the keeper program, run as `python -I -S keeper.py SOCKET`: standard
library only. Its socket is the daemon's run directory's `keeper.sock`, mode 0600, and it
answers only its own uid. Datagrams (SOCK_SEQPACKET): one op byte, a u32 entry id, a body.

    A id meta          a connection to keep (meta: JSON from the device); fd: the socket
    M id message       a message the frontend sent, as received; fds: those it carried
    D id               every message recorded so far was answered
    X id               the connection ended: forget it
    T                  send every entry back (A, M..., D count), then E
    B                  the daemon stops: close everything and exit
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("alacrity.vhost_user")

HEAD = struct.Struct("<cI")
#: A kept connection whose log grows past this stops being kept (a frontend that resets
#: its device over and over); the connection itself goes on.
MAX_MESSAGES = 512
MAX_FDS = 256
MAX_ENTRIES = 1024
#: How long a keeper whose daemon died waits for the next one.
KEEP_S = 600.0
#: How long the daemon waits for the keeper: a stuck keeper costs resumability, never a hang.
SEND_TIMEOUT_S = 2.0
DATAGRAM = 1 << 16


def _send(sock: socket.socket, op: bytes, ident: int = 0, body: bytes = b"", fds: list[int] = ()) -> None:
    sock.sendmsg([HEAD.pack(op, ident) + body],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def _recv(sock: socket.socket) -> tuple[bytes, int, bytes, list[int]] | None:
    """One datagram: (op, id, body, fds); None at EOF. Malformed ones come back as op b"?"."""
    data, fds, _flags, _addr = socket.recv_fds(sock, DATAGRAM, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    if len(data) < HEAD.size:
        return b"?", 0, b"", fds
    op, ident = HEAD.unpack_from(data)
    return op, ident, data[HEAD.size:], fds


# -- the keeper program

@dataclass
class _Entry:
    meta: bytes
    sock: int
    messages: list[tuple[bytes, list[int]]] = field(default_factory=list)
    answered: int = 0
    fd_count: int = 1

    def close(self) -> None:
        for fd in [self.sock, *(fd for _, fds in self.messages for fd in fds)]:
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve(path: str, keep_s: float) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(4)
    entries: dict[int, _Entry] = {}
    link: socket.socket | None = None
    alone_since = time.monotonic()  # no daemon linked since then
    linked = False  # a daemon has linked (the one that started us has 10 s to)
    try:
        while True:
            alone_for = time.monotonic() - alone_since
            if link is None and (alone_for > keep_s or (not entries and (linked or alone_for > 10))):
                return
            poller = select.poll()
            poller.register(listener, select.POLLIN)
            if link is not None:
                poller.register(link, select.POLLIN)
            for entry in entries.values():  # hang-ups only: never read the frontend's bytes
                poller.register(entry.sock, select.POLLRDHUP)
            by_fd = {entry.sock: ident for ident, entry in entries.items()}
            for fd, events in poller.poll(1000):
                if fd == listener.fileno():
                    conn, _ = listener.accept()
                    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                    if uid != os.geteuid():
                        conn.close()
                        continue
                    if link is not None:  # a new daemon: what the old one sent counts first
                        if not _drain(link, entries):
                            return
                        link.close()
                    link, linked = conn, True
                elif link is not None and fd == link.fileno():
                    got = _recv(link)
                    if got is None:
                        link.close()
                        link, alone_since = None, time.monotonic()
                        continue
                    if not _on_datagram(link, entries, *got):
                        return
                elif fd in by_fd and events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    entries.pop(by_fd[fd]).close()
    finally:
        for entry in entries.values():
            entry.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _drain(link: socket.socket, entries: dict[int, _Entry]) -> bool:
    """Apply what `link` has queued, without waiting; False on BYE."""
    link.setblocking(False)
    while True:
        try:
            got = _recv(link)
        except (BlockingIOError, OSError):
            return True
        if got is None:
            return True
        if not _on_datagram(link, entries, *got):
            return False


def _on_datagram(link: socket.socket, entries: dict[int, _Entry], op: bytes, ident: int, body: bytes,
                 fds: list[int]) -> bool:
    """Apply one of the daemon's datagrams; False on BYE."""
    entry = entries.get(ident)
    if op == b"A" and len(fds) == 1 and entry is None and len(entries) < MAX_ENTRIES:
        entries[ident] = _Entry(body, fds.pop())
    elif op == b"M" and entry is not None:
        entry.messages.append((body, fds))
        entry.fd_count += len(fds)
        fds = []
        if len(entry.messages) > MAX_MESSAGES or entry.fd_count > MAX_FDS:
            print(f"alacrity keeper: connection {ident} sent too much to keep; no longer kept",
                  file=sys.stderr, flush=True)
            entries.pop(ident).close()
    elif op == b"D" and entry is not None:
        entry.answered = len(entry.messages)
    elif op == b"X" and entry is not None:
        entries.pop(ident).close()
    elif op == b"T":
        for key, kept in entries.items():
            _send(link, b"A", key, kept.meta, [kept.sock])
            for message, message_fds in kept.messages:
                _send(link, b"M", key, message, message_fds)
            _send(link, b"D", key, struct.pack("<I", kept.answered))
        _send(link, b"E")
    elif op == b"B":
        return False
    for fd in fds:  # what no entry took
        os.close(fd)
    return True


# -- the daemon's side

@dataclass
class Kept:
    """A connection an earlier daemon served, as the keeper gives it back."""

    ident: int
    meta: dict
    sock: socket.socket
    messages: list[tuple[bytes, list[int]]]
    answered: int


class Recording:
    """What one connection reports to the keeper (vhost_user/connection.py calls it)."""

    def __init__(self, keeper: Keeper, ident: int) -> None:
        self.keeper, self.ident = keeper, ident

    def message(self, raw: bytes, fds: list[int]) -> None:
        self.keeper._tell(b"M", self.ident, raw, fds)

    def answered(self) -> None:
        self.keeper._tell(b"D", self.ident)

    def closed(self) -> None:
        self.keeper._tell(b"X", self.ident)


class Keeper:
    """The daemon's link to its keeper, started at the first connection it must keep."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = str(Path(run_dir) / "keeper.sock")
        self.link: socket.socket | None = None
        self.lock = threading.Lock()
        self.next_id = 1
        self.failed = False

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return None
        return sock

    def take(self) -> list[Kept]:
        """The connections a keeper left by an earlier daemon still holds (none if there
        is no such keeper); this daemon then records to that keeper."""
        with self.lock:
            sock = self._connect()
            if sock is None:
                return []
            taken: dict[int, Kept] = {}
            try:
                _send(sock, b"T")
                while (got := _recv(sock)) is not None and got[0] != b"E":
                    op, ident, body, fds = got
                    if op == b"A" and len(fds) == 1:
                        taken[ident] = Kept(ident, json.loads(body), socket.socket(fileno=fds[0]), [], 0)
                    elif op == b"M" and ident in taken:
                        taken[ident].messages.append((body, fds))
                    elif op == b"D" and ident in taken and len(body) == 4:
                        taken[ident].answered = struct.unpack("<I", body)[0]
                    else:
                        for fd in fds:
                            os.close(fd)
            except (OSError, ValueError) as exc:
                log.warning("keeper: could not take its connections back: %s", exc)
                for kept in taken.values():
                    kept.sock.close()
                    for _, fds in kept.messages:
                        for fd in fds:
                            os.close(fd)
                sock.close()
                return []
            self.link = sock
            self.next_id = max(taken, default=0) + 1
            return list(taken.values())

    def keep(self, sock: socket.socket, meta: dict) -> Recording | None:
        """Give the keeper a copy of `sock`; None if it cannot be kept (no keeper)."""
        with self.lock:
            if self.link is None and not self._start():
                return None
            ident, self.next_id = self.next_id, self.next_id + 1
        if not self._tell(b"A", ident, json.dumps(meta).encode(), [sock.fileno()]):
            return None
        return Recording(self, ident)

    def resumed(self, kept: Kept) -> Recording:
        return Recording(self, kept.ident)

    def _start(self) -> bool:
        if self.failed:
            return False
        self.link = self._connect()
        if self.link is not None:
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # A session of its own: whatever kills the daemon's process group spares it.
        subprocess.Popen([sys.executable, "-I", "-S", __file__, self.path], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        deadline = time.monotonic() + 5
        while self.link is None and time.monotonic() < deadline:
            time.sleep(0.02)
            self.link = self._connect()
        if self.link is None:
            log.warning("keeper: did not start; vsock guests will not survive a daemon crash")
            self.failed = True
            return False
        return True

    def _tell(self, op: bytes, ident: int, body: bytes = b"", fds: list[int] = ()) -> bool:
        with self.lock:
            if self.link is None:
                return False
            try:
                _send(self.link, op, ident, body, fds)
                return True
            except OSError as exc:
                log.warning("keeper: lost (%s); connections are no longer kept", exc)
                self.link.close()
                self.link = None
                return False

    def bye(self) -> None:
        """The daemon stops cleanly: the keeper lets every connection go and exits."""
        self._tell(b"B", 0)
        with self.lock:
            if self.link is not None:
                self.link.close()
                self.link = None


_keeper: Keeper | None = None


def configure(run_dir: str | os.PathLike[str]) -> list[Kept]:
    """The daemon's keeper, in `run_dir`; returns what an earlier daemon's keeper held."""
    global _keeper
    _keeper = Keeper(run_dir)
    return _keeper.take()


def current() -> Keeper | None:
    return _keeper


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: keeper.py SOCKET")
    _serve(sys.argv[1], KEEP_S)
