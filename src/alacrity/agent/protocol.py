"""The guest agent's wire format, sans-I/O: frames in, events out; requests in, bytes out.

A session is one stream (a vsock connection to the agent, `agent.c`): the host sends one
EXEC, then STDIN (an empty one is end of input), SIGNAL and RESIZE frames; the agent
answers STARTED, then STDOUT and STDERR, and ends with EXITED or ERROR. A frame is a
little-endian u32 payload length and u32 type, then the payload.

    EXEC     u32 flags (1: a terminal), u16 rows, u16 cols, u32 argc, u32 envc,
             then the working directory, argv and "K=V" strings, each NUL-terminated
    STDIN    bytes (none: end of input)       SIGNAL  u32 signal number
    RESIZE   u16 rows, u16 cols
    STARTED  u32 pid                          STDOUT, STDERR  bytes
    EXITED   u32 how (0 exited, 1 killed by a signal), u32 status or signal
    ERROR    text: the command could not be started (or the request was refused)

`Decoder` checks everything the agent sends (it is inside the guest, so it is not
trusted): a frame past MAX_FRAME, an unknown type or a short payload is an AgentError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

EXEC, STDIN, SIGNAL, RESIZE = 1, 2, 3, 4
STARTED, STDOUT, STDERR, EXITED, ERROR = 16, 17, 18, 19, 20
MAX_FRAME = 1 << 20
#: Bytes of stdin the host sends in one frame; the agent buffers at most 1 MiB.
STDIN_CHUNK = 1 << 16
MAX_ARGS = 4096
#: The vsock port the agent of the default image listens on.
AGENT_PORT = 1024

_HEAD = struct.Struct("<II")


class AgentError(Exception):
    """The agent broke the protocol (or the stream ended mid-frame)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a frame holds at most {MAX_FRAME} bytes")
    return _HEAD.pack(len(payload), kind) + payload


def _text(value: str, what: str) -> bytes:
    data = value.encode()
    if b"\0" in data:
        raise ValueError(f"{what} {value!r} contains a NUL byte")
    return data + b"\0"


def exec_request(argv: Sequence[str], env: dict[str, str] | None = None, cwd: str = "/",
                 tty: bool = False, rows: int = 24, cols: int = 80) -> bytes:
    """The EXEC frame. ValueError for what the agent would refuse."""
    if not argv:
        raise ValueError("give a command to run")
    env = dict(env or {})
    if len(argv) > MAX_ARGS or len(env) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} arguments and {MAX_ARGS} variables")
    for key in env:
        if not key or "=" in key:
            raise ValueError(f"bad environment variable name {key!r}")
    body = _text(cwd, "working directory")
    body += b"".join(_text(a, "argument") for a in argv)
    body += b"".join(_text(f"{k}={v}", "variable") for k, v in env.items())
    head = struct.pack("<IHHII", 1 if tty else 0, rows & 0xFFFF, cols & 0xFFFF, len(argv), len(env))
    return frame(EXEC, head + body)


def stdin(data: bytes) -> Iterator[bytes]:
    """STDIN frames for `data` (none for b""; end of input is `stdin_end()`)."""
    for start in range(0, len(data), STDIN_CHUNK):
        yield frame(STDIN, data[start:start + STDIN_CHUNK])


def stdin_end() -> bytes:
    return frame(STDIN)


def signal(number: int) -> bytes:
    if not 1 <= number < 65:
        raise ValueError(f"no signal {number}")
    return frame(SIGNAL, struct.pack("<I", number))


def resize(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack("<HH", rows & 0xFFFF, cols & 0xFFFF))


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Output:
    stream: int  # 1 stdout, 2 stderr
    data: bytes


@dataclass(frozen=True)
class Exited:
    signal: int  # 0 if it exited
    status: int  # its exit status, or 128 + the signal (as a shell reports it)


@dataclass(frozen=True)
class Failed:
    reason: str


Event = Started | Output | Exited | Failed


class Decoder:
    """Feed bytes from the agent; take events. After Exited or Failed the session is over,
    and anything more is an AgentError."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.started = False
        self.over = False

    def feed(self, data: bytes) -> list[Event]:
        self.buffer += data
        events: list[Event] = []
        while len(self.buffer) >= _HEAD.size:
            length, kind = _HEAD.unpack_from(self.buffer)
            if length > MAX_FRAME:
                raise AgentError(f"the agent sent a frame of {length} bytes")
            if len(self.buffer) < _HEAD.size + length:
                break
            payload = bytes(self.buffer[_HEAD.size:_HEAD.size + length])
            del self.buffer[:_HEAD.size + length]
            events.append(self._event(kind, payload))
        return events

    def _event(self, kind: int, payload: bytes) -> Event:
        if self.over:
            raise AgentError("the agent sent more after the session ended")
        if kind == ERROR:
            self.over = True
            return Failed(payload.decode(errors="replace"))
        if kind == STARTED and len(payload) == 4 and not self.started:
            self.started = True
            return Started(struct.unpack("<I", payload)[0])
        if not self.started:
            raise AgentError(f"the agent sent frame type {kind} before STARTED")
        if kind in (STDOUT, STDERR):
            return Output(1 if kind == STDOUT else 2, payload)
        if kind == EXITED and len(payload) == 8:
            how, value = struct.unpack("<II", payload)
            if how not in (0, 1) or value > (255 if how == 0 else 64):
                raise AgentError(f"the agent sent a bad exit ({how}, {value})")
            self.over = True
            return Exited(value, 128 + value) if how == 1 else Exited(0, value)
        raise AgentError(f"the agent sent frame type {kind} with {len(payload)} bytes")

    def end(self) -> None:
        """The stream ended: an AgentError unless the session was over."""
        if self.buffer or not self.over:
            raise AgentError("the agent's connection ended before the command did")
