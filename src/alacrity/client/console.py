"""A VM's console through the bus's console device: follow it, or attach and type.

    from alacrity import client
    with client.connect().open("con0", vm="vm1", mode="follow", backlog=None) as con:
        while data := con.read(timeout=5):
            ...

The wire protocol (one request line, one reply line, then the raw stream) is defined
next to the device, in alacrity.devices.console_ring.
"""

from __future__ import annotations

import contextlib
import select
import socket

from alacrity.devices.console_ring import (
    MAX_HELLO,
    ConsoleRefused,
    Hello,
    HelloError,
    format_hello,
    parse_reply,
)

__all__ = ["ConsoleClient", "ConsoleError", "ConsoleRefused"]

#: How long the device has to answer the request line.
REPLY_TIMEOUT_S = 10.0


class ConsoleError(ConnectionError):
    """The connection closed before the device answered, or its answer was malformed."""


class ConsoleClient:
    """One console connection. `mode` is "follow" (watch) or "attach" (watch and type);
    `backlog` is how many bytes of the log to replay first (None: all of it).

    `session` names the log (it changes when the daemon restarts); `pos` is the log
    position of the next byte `read()` returns; `live` is False when the VM had already
    ended (then the device sends the backlog and closes)."""

    def __init__(self, sock: socket.socket, vm: str, mode: str = "follow", backlog: int | None = 0) -> None:
        self.sock = sock
        verb = {"follow": "FOLLOW", "attach": "ATTACH"}.get(mode)
        try:
            if verb is None:
                raise ValueError(f"mode is 'follow' or 'attach', not {mode!r}")
            sock.settimeout(REPLY_TIMEOUT_S)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it
                sock.sendall(format_hello(Hello(verb, vm, backlog)))  # read us: its reason may wait
            line, self._pending = self._reply_line()
            reply = parse_reply(line)
            sock.settimeout(None)
        except (OSError, ValueError, ConsoleRefused):
            sock.close()
            raise
        self.vm, self.mode = vm, mode
        self.session, self.pos, self.live = reply.session, reply.start, reply.live

    def _reply_line(self) -> tuple[bytes, bytes]:
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_HELLO:
                raise HelloError("the device's reply line is too long")
            try:
                data = self.sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConsoleError("the console device closed the connection before answering "
                                   "(refused by the gate: is this process on the device's bus?)")
            buf += data
        line, _, rest = buf.partition(b"\n")
        return line, rest

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, size: int = 65536, timeout: float | None = None) -> bytes | None:
        """The next bytes of the guest's output; b"" once the device has closed (the VM
        ended, or the daemon went away); None if `timeout` passed with nothing."""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
        else:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                return None
            try:
                data = self.sock.recv(size)
            except ConnectionResetError:
                data = b""
        self.pos += len(data)
        return data

    def write(self, data: bytes) -> None:
        """Type `data` into the guest (attach mode only)."""
        if self.mode != "attach":
            raise PermissionError("a follower cannot type; open the console with mode='attach'")
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
