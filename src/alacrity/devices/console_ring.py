"""The sans-I/O half of the console class: the ring that keeps a VM's console, the lines
of the client protocol, and console names. No sockets, no threads: `devices/console.py`
does the I/O, and tests feed these directly (hypothesis, in tests/test_console.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The most a client is sent in one go from a ring.
CHUNK = 64 << 10


# ---- the log: a ring of the last `size` bytes, with absolute positions (sans-I/O)

class Ring:
    """The last `size` bytes of a stream. Positions count bytes since the stream began,
    so a reader keeps an integer and learns what it missed. The buffer grows as bytes
    arrive, up to `size`: a console that says little costs little."""

    def __init__(self, size: int, head: int = 0) -> None:
        self.size = size
        self.buf = bytearray()
        self.head = head  # bytes ever written
        self.start = head  # the oldest position still held

    def __len__(self) -> int:
        return self.head - self.start

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append `data`; returns how many bytes the ring lost to make room."""
        n = len(data)
        view = memoryview(data)
        if n > self.size:
            view = view[n - self.size :]
        pos = self.head + n - len(view)  # where view[0] goes
        new_head = self.head + n
        need = min(self.size, new_head)
        if len(self.buf) < need:
            self.buf.extend(bytes(need - len(self.buf)))
        off = pos % self.size
        first = min(len(view), self.size - off)
        self.buf[off : off + first] = view[:first]
        self.buf[: len(view) - first] = view[first:]
        self.head = new_head
        old_start, self.start = self.start, max(self.start, new_head - self.size)
        return self.start - old_start

    def read(self, pos: int, limit: int = CHUNK) -> bytes:
        """Up to `limit` bytes from `pos` (clamped to what is held), in one piece."""
        pos = max(pos, self.start)
        if pos >= self.head:
            return b""
        off = pos % self.size
        length = min(self.head - pos, self.size - off, limit)
        return bytes(self.buf[off : off + length])

    def snapshot(self) -> bytes:
        """Everything held, oldest first."""
        parts, pos = [], self.start
        while pos < self.head:
            part = self.read(pos, self.head - pos)
            parts.append(part)
            pos += len(part)
        return b"".join(parts)

    def resized(self, size: int) -> Ring:
        """A ring of `size` holding the newest bytes of this one, at the same positions."""
        kept = self.snapshot()[-size:] if size else b""
        ring = Ring(size, self.head - len(kept))
        ring.write(kept)
        return ring


# ---- the client protocol (sans-I/O)
#
# A member process that is not a QEMU sends one line, then the stream begins:
#   ATTACH VM [BACKLOG]\n   watch and type (one writer per console at a time)
#   FOLLOW VM [BACKLOG]\n   watch only (any number)
# BACKLOG is how much of the log to replay first: a byte count, or `all` (default 0).
# The device answers one line:
#   OK SESSION START live|ended\n   SESSION names this log (a new one after a daemon
#                                   restart); START is the position of the first byte sent
#   ERR reason\n                    and closes.
# Then the device sends the guest's output; a writer's bytes go to the guest. The device
# closes a client after the last byte once the VM's stream has ended.

VERBS = ("ATTACH", "FOLLOW")
MAX_HELLO = 256
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class HelloError(ValueError):
    """A malformed request or reply line."""


class ConsoleRefused(Exception):
    """The device answered ERR."""


@dataclass(frozen=True)
class Hello:
    verb: str  # ATTACH or FOLLOW
    name: str  # the console (the VM's name, made safe)
    backlog: int | None = 0  # bytes of the log to replay first; None: all of it


def parse_hello(line: bytes) -> Hello:
    """The request line, without its newline. Raises HelloError."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise HelloError("the request line is not ASCII") from None
    parts = text.split(" ")
    if not 2 <= len(parts) <= 3 or parts[0] not in VERBS:
        raise HelloError("send 'ATTACH VM' or 'FOLLOW VM', optionally with a backlog in bytes or 'all'")
    if not NAME_RE.fullmatch(parts[1]):
        raise HelloError("a console name is 1-64 of A-Z a-z 0-9 _ . -, not starting with . or -")
    backlog: int | None = 0
    if len(parts) == 3:
        word = parts[2]
        if word == "all":
            backlog = None
        elif word.isdigit() and len(word) <= 12:
            backlog = int(word)
        else:
            raise HelloError("the backlog is a number of bytes or 'all'")
    return Hello(parts[0], parts[1], backlog)


def format_hello(hello: Hello) -> bytes:
    backlog = "all" if hello.backlog is None else str(hello.backlog)
    line = f"{hello.verb} {hello.name} {backlog}\n".encode("ascii")
    parse_hello(line[:-1])  # never send what the device would refuse
    return line


class HelloReader:
    """Collects a client's first line: feed(bytes) -> (Hello, bytes after it), or None
    while the line is incomplete. Raises HelloError past MAX_HELLO bytes without one."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> tuple[Hello, bytes] | None:
        self.buf += data
        end = self.buf.find(b"\n", 0, MAX_HELLO + 1)
        if end < 0:
            if len(self.buf) > MAX_HELLO:
                raise HelloError(f"no request line in the first {MAX_HELLO} bytes")
            return None
        line = bytes(self.buf[:end])
        rest = bytes(self.buf[end + 1 :])
        self.buf.clear()
        return parse_hello(line.removesuffix(b"\r")), rest


@dataclass(frozen=True)
class Reply:
    session: str
    start: int
    live: bool


def format_ok(session: str, start: int, live: bool) -> bytes:
    return f"OK {session} {start} {'live' if live else 'ended'}\n".encode("ascii")


def format_err(reason: str) -> bytes:
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in reason)[:200]
    return f"ERR {text}\n".encode("ascii")


def parse_reply(line: bytes) -> Reply:
    """The device's answer, without its newline. Raises ConsoleRefused or HelloError."""
    text = line.decode("ascii", errors="replace")
    if text.startswith("ERR "):
        raise ConsoleRefused(text[4:])
    parts = text.split(" ")
    if (len(parts) != 4 or parts[0] != "OK" or not re.fullmatch(r"[0-9a-f]{1,32}", parts[1])
            or not parts[2].isdigit() or parts[3] not in ("live", "ended")):
        raise HelloError(f"not a console reply: {text[:80]!r}")
    return Reply(parts[1], int(parts[2]), parts[3] == "live")


# ---- console names

def safe_name(text: str) -> str | None:
    """A VM's name as a console name (a file in consoles/): characters outside
    A-Z a-z 0-9 _ . - become _, so do a leading . or -; at most 64. None if empty."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]
    if name[:1] in (".", "-"):
        name = "_" + name[1:]
    return name or None


def qemu_name(argv: list[str]) -> str | None:
    """The guest name of a QEMU command line (`-name NAME` or `-name guest=NAME,...`;
    the last -name counts, as in QEMU), or None."""
    value = None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1]
    if value is None:
        return None
    # QEMU's option syntax: key=value pairs split at single commas, ",," is a comma.
    parts = [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]
    for n, part in enumerate(parts):
        key, eq, rest = part.partition("=")
        if n == 0 and not eq:
            return part or None
        if key == "guest":
            return rest or None
    return None
