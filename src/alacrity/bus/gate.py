"""The gate: every connection to the daemon is checked when it is accepted.

The peer is identified by SO_PEERCRED (pid, uid) and the pid's start time, and
its bus is found through membership (bus/model.py). The control socket answers
only about the peer's own bus; each device's vhost-user socket closes at once
on a peer outside that device's buses. Every refusal is logged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from alacrity.bus import peers
from alacrity.bus.model import Model
from alacrity.errors import AdminError
from alacrity.vhost_user.connection import Connection

log = logging.getLogger("alacrity.gate")

CONTROL_SOCKET = "control.sock"
MAX_REQUEST = 4096
REFUSAL_LOG_S = 10.0


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    start_time: int | None
    ident: int | None  # pidfs inode of the connecting process itself, where the kernel has it


SO_PEERPIDFD = 77  # Linux 6.5+; not yet named by Python 3.11's socket module


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Peer(pid, uid, peers.start_time(pid), _peer_ident(sock))


def _peer_ident(sock: socket.socket) -> int | None:
    """The pidfs inode of the process that connected, taken from the socket itself, so a
    pid reused after connect() cannot pass for the peer."""
    try:
        return peers.pidfd_ident(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return None


class Gate:
    """Listens on the control socket and one socket per typed device, in one thread."""

    def __init__(self, model: Model, run_dir: str | os.PathLike[str]) -> None:
        self.model = model
        self.run_dir = Path(run_dir)
        self.device_dir = self.run_dir / "devices"
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}  # device name -> listening socket
        self.connections: set[Connection] = set()
        self.lock = threading.Lock()
        self.refusals = 0
        self.refusal_log: dict[tuple[int, str, str], tuple[float, int]] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._loop, name="gate", daemon=True)
        self.stopping = False

    # -- life cycle
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device_dir.mkdir(exist_ok=True)
        # Members learn socket paths from the control socket; nobody lists them.
        os.chmod(self.device_dir, 0o711)
        self.control = self._listen(self.run_dir / CONTROL_SOCKET)
        self.selector.register(self.control, selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        for name in self.model.device_names():
            if self.model.device(name).instance is not None:
                self.add_device(name)
        self.model.listeners.append(self.on_model_event)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        os.write(self.wake_w, b"x")
        self.thread.join(timeout=5)
        for conn in list(self.connections):
            conn.shutdown()
        for name in list(self.listeners):
            self.remove_device(name)
        self.control.close()

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)  # a socket left by a daemon that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o666)  # anyone may knock; the gate decides
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def socket_path(self, device: str) -> Path:
        return self.device_dir / f"{device}.sock"

    # -- model events: device sockets follow the typed devices
    def on_model_event(self, event: str, name: str) -> None:
        if event == "device_typed":
            self.add_device(name)
        elif event == "device_removed":
            self.remove_device(name)

    def add_device(self, name: str) -> None:
        with self.lock:
            if name in self.listeners:
                return
            sock = self._listen(self.socket_path(name))
            self.listeners[name] = sock
            self.selector.register(sock, selectors.EVENT_READ, name)
        os.write(self.wake_w, b"x")

    def remove_device(self, name: str) -> None:
        with self.lock:
            sock = self.listeners.pop(name, None)
            if sock is None:
                return
            self.selector.unregister(sock)
            sock.close()
            self.socket_path(name).unlink(missing_ok=True)

    # -- accepting
    def _loop(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select():
                if key.data == "wake":
                    os.read(self.wake_r, 4096)
                    continue
                try:
                    sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except (BlockingIOError, OSError):
                    continue
                sock.setblocking(True)
                if key.data is None:
                    threading.Thread(target=self._control, args=(sock,), daemon=True).start()
                else:
                    self._admit(sock, key.data)

    def refuse(self, sock: socket.socket, what: str, peer: Peer | None, why: str) -> None:
        self.refusals += 1
        sock.close()
        who = f"pid {peer.pid} (uid {peer.uid})" if peer else "unknown peer"
        # A refused QEMU retries thousands of times a second: log each (peer, what, why)
        # once per REFUSAL_LOG_S, with how many were not logged meanwhile.
        key = (peer.pid if peer else 0, what, why)
        now = time.monotonic()
        last, quiet = self.refusal_log.get(key, (0.0, 0))
        if now - last < REFUSAL_LOG_S:
            self.refusal_log[key] = (last, quiet + 1)
            return
        if len(self.refusal_log) > 1024:
            self.refusal_log.clear()
        self.refusal_log[key] = (now, 0)
        more = f" ({quiet} more like it not logged)" if quiet else ""
        log.warning("refused %s to %s: %s%s", what, who, why, more)

    def _member_bus(self, peer: Peer) -> str | None:
        if peer.start_time is None:
            return None
        bus = self.model.bus_of(peer.pid)
        # The pid must still be the process that connected.
        if bus is not None and not peers.alive(peer.pid, peer.start_time, peer.ident):
            return None
        return bus

    def _admit(self, sock: socket.socket, device: str) -> None:
        peer = peer_of(sock)
        bus = self._member_bus(peer)
        if bus is None:
            return self.refuse(sock, f"device {device}", peer, "not a member of any bus")
        try:
            if bus not in self.model.buses_of_device(device):
                return self.refuse(sock, f"device {device}", peer, f"device is not on bus {bus}")
            instance = self.model.device(device).instance
            if instance is None:
                raise AdminError(errno.ENOENT, "device has no type")
            if instance.adopts_connections:
                instance.adopt(sock, peer.pid, f"{device}[pid {peer.pid}]")
                log.info("pid %d on bus %s connected to %s", peer.pid, bus, device)
                return None
            session = instance.open(peer.pid)
        except AdminError as exc:
            return self.refuse(sock, f"device {device}", peer, exc.message)
        conn = Connection(sock, session, f"{device}[pid {peer.pid}]", on_error=instance.record_error)
        log.info("pid %d on bus %s connected to %s", peer.pid, bus, device)
        with self.lock:
            self.connections.add(conn)
        threading.Thread(target=self._serve, args=(conn,), name=conn.label, daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            conn.serve()
        finally:
            with self.lock:
                self.connections.discard(conn)

    # -- the control socket: one JSON request per line, one JSON reply per line
    def _control(self, sock: socket.socket) -> None:
        peer = peer_of(sock)
        bus = self._member_bus(peer)
        with sock, sock.makefile("rwb") as stream:
            # Bounded read: a line is checked before it can grow without limit.
            while line := stream.readline(MAX_REQUEST + 1):
                if len(line) > MAX_REQUEST:
                    log.warning("control request over %d bytes from pid %d: closed", MAX_REQUEST, peer.pid)
                    return
                try:
                    request = json.loads(line)
                    op = request["op"]
                except (ValueError, KeyError, TypeError):
                    reply = {"error": 'bad request: send {"op": "devices"} or {"op": "whoami"}'}
                else:
                    reply = self._answer(op, peer, bus)
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    def _answer(self, op: str, peer: Peer, bus: str | None) -> dict:
        if op == "whoami":
            return {"pid": peer.pid, "uid": peer.uid, "bus": bus}
        if op != "devices":
            return {"error": f"unknown op {op!r}: use devices or whoami"}
        if bus is None:
            self.refusals += 1
            log.warning("refused device list to pid %d (uid %d): not a member", peer.pid, peer.uid)
            return {
                "error": f"pid {peer.pid} is not a member of any bus; root can admit it with "
                f"'echo {peer.pid} > /run/alacrity/buses/BUS/members'"
            }
        devices = [
            {
                "name": link,
                "device": instance.name,
                "class": instance.class_name,
                "socket": str(self.socket_path(instance.name)),
                "attributes": dict(instance.texts),
            }
            for link, instance in self.model.devices_of_bus(bus)
        ]
        return {"bus": bus, "devices": devices}
