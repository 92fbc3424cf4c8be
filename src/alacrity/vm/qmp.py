"""A minimal QMP client: one JSON object per line over a unix socket."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """QEMU answered a command with an error."""


class QmpClient:
    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        greeting = self._read()
        while "event" in greeting:  # a QEMU with migration events on may send one first
            self.events.append(greeting)
            greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")
        return self

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                fds: list[int] | None = None) -> Any:
        """Send one command and return its "return" value; async events are kept aside.
        `fds` go with it (SCM_RIGHTS), as `getfd` wants."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg, fds or [])
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            if "return" in reply:
                return reply["return"]

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next asynchronous event QEMU sent, or None if none comes in `timeout` s."""
        if self.events:
            return self.events.pop(0)
        while True:
            try:
                msg = self._read(time.monotonic() + timeout)
            except TimeoutError:
                return None
            if "event" in msg:
                return msg

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg: dict[str, Any], fds: list[int]) -> None:
        if self._sock is None:
            raise QmpError("not connected")
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            sent = socket.send_fds(self._sock, [data], fds)
            data = data[sent:]
        self._sock.sendall(data)

    def _read(self, deadline: float | None = None) -> dict[str, Any]:
        if self._sock is None:
            raise QmpError("not connected")
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QMP {self.path}: no reply in {self.timeout}s")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"QMP {self.path}: connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)
