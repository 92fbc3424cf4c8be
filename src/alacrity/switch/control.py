"""The daemon's (and tests') side of a switch process's control socket; see `process.py`
for the requests. Kept apart from the engine so the daemon imports no data path."""

from __future__ import annotations

import json
import socket
import threading

DEFAULT_PREFIX = "02:a1:ac"


class Control:
    """The daemon's (and the tests') side of the control socket."""

    def __init__(self, path: str | socket.socket, timeout: float = 10.0) -> None:
        if isinstance(path, socket.socket):
            self.sock = path
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.connect(path)
        self.timeout = timeout
        self.lock = threading.Lock()  # one request in flight at a time
        self.seq = 0

    def request(self, request: dict, fds: tuple[int, ...] = (), timeout: float | None = None) -> dict:
        """Send `request` and wait for its reply: at most `timeout` seconds for an earlier
        request to finish, and as long again for the reply. Raises TimeoutError, OSError,
        RuntimeError."""
        timeout = self.timeout if timeout is None else timeout
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError(f"the switch is still busy with an earlier request after {timeout} s")
        try:
            self.sock.settimeout(timeout)
            self.seq += 1
            data = json.dumps({**request, "seq": self.seq}).encode()
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
            while True:  # skip replies to requests that timed out earlier
                answer = self.sock.recv(1 << 22)
                if not answer:
                    raise ConnectionError("the switch process closed its control socket")
                reply = json.loads(answer)
                if reply.get("seq") == self.seq:
                    break
        finally:
            self.lock.release()
        if not reply.get("ok"):
            raise RuntimeError(f"switch refused {request.get('op')}: {reply.get('error')}")
        return reply

    def add_port(self, fd: int, *, mac: str | None = None, label: str = "", peer_pid: int = 0) -> dict:
        return self.request({"op": "add_port", "mac": mac, "label": label, "peer_pid": peer_pid}, (fd,))

    def stats(self, timeout: float | None = None) -> dict:
        return self.request({"op": "stats"}, timeout=timeout)

    def close(self) -> None:
        self.sock.close()
