"""The gate: every connection to the daemon is checked when it is accepted.

The peer is identified from the socket itself (identity.py) and its bus is found
through membership (bus/model.py). The control socket answers only about the peer's
own bus; each device's vhost-user socket closes at once on a peer outside that
device's buses. Every refusal is logged.

One thread runs the gate, on non-blocking sockets, and nothing in it waits on a peer
or a device without a bound: control connections are served by this event loop (capped
per uid and in total, closed when idle), devices that adopt connections take them
through a bounded queue of their own, and accept errors such as EMFILE pause
accepting for a moment instead of spinning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from alacrity import ids
from alacrity.bus.identity import IdentityError, Peer, identify, peer_uid
from alacrity.bus.model import Model
from alacrity.bus.status import Status
from alacrity.devices.base import Device
from alacrity.errors import AdminError
from alacrity.vhost_user.connection import Connection

log = logging.getLogger("alacrity.gate")

CONTROL_SOCKET = "control.sock"
MAX_REQUEST = 4096
MAX_REPLY_BACKLOG = 1 << 20  # a peer that does not read its replies is dropped past this
REFUSAL_LOG_S = 10.0
#: Control connections: at most this many at once from one uid, and in all.
MAX_CONTROL_PER_UID = 32
MAX_CONTROL_TOTAL = 512
#: A control connection with no request for this long is closed.
CONTROL_IDLE_S = 30.0
#: Connections accepted from one listening socket per turn of the loop, so a flood on
#: one socket leaves the others their turn.
ACCEPT_BATCH = 8
#: Connections a non-root uid may make per second (sustained, and in a burst): each costs
#: the gate an identity check, so a flood from one user is refused before it, cheaply.
CONNECT_RATE = 200.0
CONNECT_BURST = 400.0
#: ... and each such check costs a /proc read per generation of the peer's ancestry: a
#: connection from deeper than this many generations is charged one more token for each.
FREE_GENERATIONS = 16
#: Refusals remembered for `{"op": "refusals"}`.
RECENT_REFUSALS = 256
#: After accept() fails for lack of fds or memory, accepting pauses this long.
ACCEPT_PAUSE_S = 0.1
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(eq=False)
class ControlConn:
    """One control connection: one JSON request per line in, one JSON reply per line out."""

    sock: socket.socket
    peer: Peer
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    last_active: float = field(default_factory=time.monotonic)
    waiting: bool = False  # a reply is being made off the gate's thread (status): later lines wait


class Gate:
    """Listens on the control socket and one socket per typed device, in one thread."""

    def __init__(self, model: Model, run_dir: str | os.PathLike[str]) -> None:
        self.model = model
        self.run_dir = Path(run_dir)
        self.device_dir = self.run_dir / "devices"
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}  # device name -> listening socket
        self.connections: set[Connection] = set()
        self.controls: dict[int, ControlConn] = {}  # by fd
        self.controls_per_uid: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.refusals = 0
        self.refusal_log: dict[tuple[int, str, str], tuple[float, int]] = {}
        # The latest refusals of identified peers, for their ancestors to ask about
        # (`alacrity vm run` tells its user why QEMU was turned away): (pids up the
        # peer's chain, start times, what, why, when).
        self.recent_refusals: deque[tuple[frozenset[tuple[int, int]], str, str, float]] = deque(
            maxlen=RECENT_REFUSALS)
        self.connect_budget: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)
        self.accept_paused_until = 0.0
        self.accept_errors_logged = 0.0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._loop, name="gate", daemon=True)
        self.stopping = False
        # Root's `status` (alacrity top): made in a thread of its own, never in the gate's.
        self.status = Status(model, self)
        self.status_done: deque[tuple[ControlConn, bytes]] = deque()
        self.status_making = 0

    # -- life cycle
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device_dir.mkdir(exist_ok=True)
        # Members learn socket paths from the control socket; nobody lists them.
        os.chmod(self.device_dir, 0o711)
        self.control = self._listen(self.run_dir / CONTROL_SOCKET)
        self.selector.register(self.control, selectors.EVENT_READ, ("listen", None))
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        for name in self.model.device_names():
            if self.model.device(name).instance is not None:
                self.add_device(name)
        self.model.listeners.append(self.on_model_event)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self._wake()
        self.thread.join(timeout=5)
        for conn in list(self.connections):
            conn.shutdown()
        for control in list(self.controls.values()):
            self._close_control(control)
        for name in list(self.listeners):
            self.remove_device(name, forget=False)  # jailed QEMUs keep its directory bound
        self.control.close()
        self.status.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: already awake
            os.write(self.wake_w, b"x")

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)  # a socket left by a daemon that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o666)  # anyone may knock; the gate decides
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def socket_path(self, device: str) -> Path:
        """Where clients connect: DEVICE.sock, a link to the socket in the device's own
        directory, .DEVICE/sock (no device name starts with a dot). A jailed QEMU has that
        directory bound into its jail: when the daemon restarts and makes a new socket
        there, the jail sees it and QEMU reconnects."""
        return self.device_dir / f"{device}.sock"

    def _socket_dir(self, device: str) -> Path:
        return self.device_dir / f".{device}"

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
            folder, link = self._socket_dir(name), self.socket_path(name)
            folder.mkdir(mode=0o711, exist_ok=True)
            sock = self._listen(folder / "sock")
            if not link.is_symlink():
                link.unlink(missing_ok=True)  # a socket from before sockets had directories
                link.symlink_to(f"{folder.name}/sock")
            self.listeners[name] = sock
            if not self._accept_paused():
                self.selector.register(sock, selectors.EVENT_READ, ("listen", name))
        self._wake()

    def remove_device(self, name: str, forget: bool = True) -> None:
        """Close the device's socket; with `forget` (the device is gone, not the daemon
        stopping) its link and directory go too."""
        with self.lock:
            sock = self.listeners.pop(name, None)
            if sock is None:
                return
            if sock.fileno() in self.selector.get_map():
                self.selector.unregister(sock)
            sock.close()
            folder = self._socket_dir(name)
            (folder / "sock").unlink(missing_ok=True)
            if forget:
                self.socket_path(name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()

    # -- the loop
    def _loop(self) -> None:
        while not self.stopping:
            timeout = self._next_deadline()
            for key, events in self.selector.select(timeout):
                kind, data = key.data
                try:
                    if kind == "wake":
                        os.read(self.wake_r, 4096)
                        self._deliver_status()
                    elif kind == "listen":
                        self._accept(key.fileobj, data)  # type: ignore[arg-type]
                    elif kind == "control":
                        self._service_control(data, events)
                except Exception:  # one bad connection must never stop the gate
                    log.exception("gate: unexpected error on %s %s", kind, data)
                    if kind == "control":
                        self._close_control(data)
            self._expire(time.monotonic())

    def _next_deadline(self) -> float:
        now = time.monotonic()
        deadlines = [c.last_active + CONTROL_IDLE_S for c in self.controls.values()]
        if self.accept_paused_until:
            deadlines.append(self.accept_paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else CONTROL_IDLE_S

    def _expire(self, now: float) -> None:
        if self.accept_paused_until and now >= self.accept_paused_until:
            self._resume_accepting()
        for control in list(self.controls.values()):
            if now - control.last_active > CONTROL_IDLE_S:
                log.info("control connection of pid %d idle for %.0f s: closed", control.peer.pid,
                         CONTROL_IDLE_S)
                self._close_control(control)

    # -- accepting
    def _accept(self, listener: socket.socket, device: str | None) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                return
            what = f"device {device}" if device else "control socket"
            uid = peer_uid(sock)
            if not self._within_rate(uid):
                self.refuse(sock, what, None, f"uid {uid} connects faster than {CONNECT_RATE:.0f} a second")
                continue
            try:
                peer = identify(sock)
            except IdentityError as exc:
                self.refuse(sock, what, None, str(exc))
                continue
            self._charge(uid, len(peer.chain) // FREE_GENERATIONS)
            if device is None:
                self._open_control(sock, peer)
            else:
                self._admit(sock, device, peer)

    def _within_rate(self, uid: int | None) -> bool:
        """Token bucket per uid; root's connections (QEMU, bus exec) are not limited."""
        if uid == 0:
            return True
        now = time.monotonic()
        tokens, when = self.connect_budget.get(uid, (CONNECT_BURST, now))
        tokens = min(CONNECT_BURST, tokens + (now - when) * CONNECT_RATE)
        if len(self.connect_budget) > 4096:
            self.connect_budget.clear()
        if tokens < 1:
            self.connect_budget[uid] = (tokens, now)
            return False
        self.connect_budget[uid] = (tokens - 1, now)
        return True

    def _charge(self, uid: int | None, tokens: int) -> None:
        """Take what an identity check cost beyond its token: deep ancestries cost more."""
        if uid == 0 or not tokens or uid not in self.connect_budget:
            return
        left, when = self.connect_budget[uid]
        self.connect_budget[uid] = (left - tokens, when)

    def _accept_paused(self) -> bool:
        return self.accept_paused_until > 0

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds or memory: listening sockets stay readable, so stop watching them
        for a moment rather than spin; the backlog waits in the kernel."""
        now = time.monotonic()
        if now - self.accept_errors_logged > REFUSAL_LOG_S:
            self.accept_errors_logged = now
            log.error("accept failed (%s): pausing for %.0f ms; raise the daemon's fd limit if this "
                      "recurs", exc.strerror, ACCEPT_PAUSE_S * 1000)
        self.accept_paused_until = now + ACCEPT_PAUSE_S
        with self.lock:
            for sock in [self.control, *self.listeners.values()]:
                if sock.fileno() in self.selector.get_map():
                    self.selector.unregister(sock)

    def _resume_accepting(self) -> None:
        self.accept_paused_until = 0.0
        with self.lock:
            listening = [(self.control, None), *((s, n) for n, s in self.listeners.items())]
            for sock, name in listening:
                if sock.fileno() not in self.selector.get_map():
                    self.selector.register(sock, selectors.EVENT_READ, ("listen", name))

    def refuse(self, sock: socket.socket, what: str, peer: Peer | None, why: str) -> None:
        with self.lock:  # recorded before the peer sees the close, so it can ask why at once
            self._log_refusal(what, peer, why)
        sock.close()

    def _log_refusal(self, what: str, peer: Peer | None, why: str) -> None:
        self.refusals += 1
        if peer is not None:
            chain = frozenset((task.pid, task.start_time) for task in peer.chain)
            self.recent_refusals.append((chain, what, why, time.monotonic()))
        who = f"pid {peer.pid} (uid {peer.uid})" if peer else "unidentified peer"
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

    def _admit(self, sock: socket.socket, device: str, peer: Peer) -> None:
        bus = self.model.bus_of_chain(peer.chain)
        if bus is None:
            return self.refuse(sock, f"device {device}", peer, "not a member of any bus")
        try:
            if bus not in self.model.buses_of_device(device):
                return self.refuse(sock, f"device {device}", peer, f"device is not on bus {bus}")
            instance = self.model.device(device).instance
            if instance is None:
                raise AdminError(errno.ENOENT, "device has no type")
            if instance.adopts_connections:
                # The device takes it over through its own bounded queue: never waits here.
                instance.adopt(sock, peer.pid, f"{device}[pid {peer.pid}]")
                log.info("pid %d on bus %s connected to %s", peer.pid, bus, device)
                return None
        except AdminError as exc:
            return self.refuse(sock, f"device {device}", peer, exc.message)
        # Opening the session touches the device's files (an image on a slow filesystem):
        # that happens in the connection's own thread, never in the gate's.
        label = f"{device}[pid {peer.pid}]"
        threading.Thread(target=self._serve, args=(sock, instance, peer, bus, label), name=label,
                         daemon=True).start()
        return None

    def _serve(self, sock: socket.socket, instance: Device, peer: Peer, bus: str, label: str) -> None:
        try:
            session = instance.open(peer.pid, peer.uid)
        except AdminError as exc:
            return self.refuse(sock, f"device {instance.name}", peer, exc.message)
        sock.setblocking(True)
        conn = Connection(sock, session, label, on_error=instance.record_error)
        log.info("pid %d on bus %s connected to %s", peer.pid, bus, instance.name)
        with self.lock:
            self.connections.add(conn)
        try:
            conn.serve()
        finally:
            with self.lock:
                self.connections.discard(conn)
        return None

    # -- the control socket
    def _open_control(self, sock: socket.socket, peer: Peer) -> None:
        if peer.uid != 0 and self.controls_per_uid[peer.uid] >= MAX_CONTROL_PER_UID:
            return self.refuse(sock, "control socket", peer,
                               f"uid {peer.uid} already has {MAX_CONTROL_PER_UID} control connections")
        if len(self.controls) >= MAX_CONTROL_TOTAL:
            return self.refuse(sock, "control socket", peer,
                               f"{MAX_CONTROL_TOTAL} control connections are open")
        sock.setblocking(False)
        control = ControlConn(sock, peer)
        self.controls[sock.fileno()] = control
        self.controls_per_uid[peer.uid] += 1
        self.selector.register(sock, selectors.EVENT_READ, ("control", control))
        return None

    def _close_control(self, control: ControlConn) -> None:
        fd = control.sock.fileno()
        if self.controls.pop(fd, None) is None:
            return
        self.controls_per_uid[control.peer.uid] -= 1
        if self.controls_per_uid[control.peer.uid] <= 0:
            del self.controls_per_uid[control.peer.uid]
        if fd in self.selector.get_map():
            self.selector.unregister(fd)
        control.sock.close()

    def _service_control(self, control: ControlConn, events: int) -> None:
        if events & selectors.EVENT_WRITE and not self._flush(control):
            return
        if not events & selectors.EVENT_READ:
            return
        try:
            data = control.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._close_control(control)
        control.last_active = time.monotonic()
        control.inbox += data
        self._answer_lines(control)
        if len(control.inbox) > MAX_REQUEST:
            log.warning("control request over %d bytes from pid %d: closed", MAX_REQUEST, control.peer.pid)
            return self._close_control(control)
        self._flush(control)
        return None

    def _answer_lines(self, control: ControlConn) -> None:
        while not control.waiting and (end := control.inbox.find(b"\n")) >= 0:
            line, control.inbox = bytes(control.inbox[:end]), control.inbox[end + 1 :]
            reply = self._reply(line, control.peer)
            if reply is _STATUS:
                self._make_status(control)
            else:
                control.outbox += json.dumps(reply).encode() + b"\n"

    def _flush(self, control: ControlConn) -> bool:
        """Send what we can without blocking; False if the connection was closed."""
        try:
            while control.outbox:
                sent = control.sock.send(control.outbox)
                del control.outbox[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._close_control(control)
            return False
        if len(control.outbox) > MAX_REPLY_BACKLOG:
            log.warning("pid %d does not read its control replies: closed", control.peer.pid)
            self._close_control(control)
            return False
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if control.outbox else 0)
        self.selector.modify(control.sock, events, ("control", control))
        return True

    def _reply(self, line: bytes, peer: Peer) -> dict:
        try:
            request = json.loads(line)
            op = request["op"]
            if not isinstance(op, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            return {"error": 'bad request: send {"op": "devices"} or {"op": "whoami"}'}
        bus = self.model.bus_of_chain(peer.chain)
        if op == "join":
            return self._join_op(peer, bus, request.get("bus"), request.get("own") is True)
        return self._answer(op, peer, bus)

    def _join_op(self, peer: Peer, current: str | None, bus: object, own: bool) -> dict:
        """Admit the asker to `bus` if root or the bus's `users` list it (by uid or group).
        With `own`, a process already on the bus through an ancestor becomes a member
        itself (so it stays one when the ancestor exits)."""
        if not isinstance(bus, str):
            return {"error": 'bad request: send {"op": "join", "bus": "BUS"}'}
        if current == bus and not own:
            return {"bus": bus}
        if current is not None and current != bus:
            return {"error": f"this process is already in bus {current!r}; a task belongs to one bus"}
        try:
            # A missing bus is refused like a closed one, so users cannot probe bus names.
            allowed = peer.uid == 0 or (bus in self.model.bus_names()
                                        and self.model.may_join(bus, peer.uid, peer.gids))
            if not allowed:
                why = (f"uid {peer.uid} may not join bus {bus!r}: root lists the users and groups who "
                       f"may in buses/{bus}/users")
                with self.lock:
                    self._log_refusal(f"join {bus}", peer, why)
                return {"error": why}
            self.model.admit(bus, peer.pid, own=own)
        except AdminError as exc:
            if exc.errno == errno.ENOENT:
                return {"error": f"no bus {bus!r}: root creates it with 'mkdir /run/alacrity/buses/{bus}'"}
            return {"error": f"cannot join bus {bus!r}: {exc.message}"}
        log.info("pid %d (uid %d) joined bus %s", peer.pid, peer.uid, bus)
        return {"bus": bus}

    def _answer(self, op: str, peer: Peer, bus: str | None) -> dict:
        if op == "whoami":
            return {"pid": peer.pid, "uid": peer.uid, "bus": bus}
        if op == "refusals":
            return {"refusals": self._refusals_below(peer)}
        if op == "status":
            return self._status_op(peer)
        if op == "lease":
            return self._lease_op(peer, bus)
        if op not in ("devices", "check"):
            return {"error": f"unknown op {op!r}: use devices, check, join, lease, refusals, status or "
                    "whoami"}
        if bus is None:
            with self.lock:  # connection threads count refusals too
                self.refusals += 1
            log.warning("refused device list to pid %d (uid %d): not a member", peer.pid, peer.uid)
            return {
                "error": f"pid {peer.pid} is not a member of any bus; root can admit it with "
                f"'echo {peer.pid} > /run/alacrity/buses/BUS/members'"
            }
        on_bus = self.model.devices_of_bus(bus)
        devices: list[dict] = [
            {
                "name": link,
                "device": instance.name,
                "class": instance.class_name,
                "socket": str(self.socket_path(instance.name)),
                "attributes": dict(instance.texts),
            }
            for link, instance in on_bus
        ]
        if op == "check":
            # Would each device take the asker (or a child of it, e.g. its QEMU) now? Device
            # state (and /proc) only: `refusal()` never touches the device's files or waits.
            for entry, (_link, instance) in zip(devices, on_bus, strict=True):
                entry["refusal"] = instance.refusal(peer.pid, peer.uid)
        return {"bus": bus, "devices": devices}

    def _lease_op(self, peer: Peer, bus: str | None) -> dict:
        """A uid of the unprivileged range for a guest's jail, reserved for ids.RESERVE_S:
        root's, for a member of a bus (`alacrity vm run` asks once it has joined)."""
        why = ("only root starts jailed guests" if peer.uid != 0 else
               "join a bus first: ids are for the jails of its guests" if bus is None else "")
        if why:
            with self.lock:
                self._log_refusal("lease", peer, why)
            return {"error": why}
        try:
            uid = ids.unprivileged.lease(reserve_s=ids.RESERVE_S)
        except ids.IdsExhausted as exc:
            return {"error": str(exc)}
        log.info("uid %d reserved for a guest of bus %s (pid %d)", uid, bus, peer.pid)
        return {"uid": uid, "reserved_s": ids.RESERVE_S}

    def _refusals_below(self, peer: Peer) -> list[dict[str, str | float]]:
        """Refusals of the asker and its descendants, newest last: a process learns only
        why its own children were turned away."""
        me = (peer.pid, peer.start_time)
        now = time.monotonic()
        with self.lock:
            return [{"what": what, "why": why, "age_s": round(now - when, 3)}
                    for chain, what, why, when in self.recent_refusals if me in chain]

    # -- root's status (alacrity top): the snapshot is made off the gate's thread, as a
    # switch may take up to a second to answer; the connection's later lines wait for it.
    def _status_op(self, peer: Peer) -> dict:
        if peer.uid != 0:
            why = "the status of every bus is root's: run 'alacrity top' as root"
            with self.lock:
                self._log_refusal("status", peer, why)
            return {"error": why}
        if self.status_making >= MAX_STATUS_MAKING:
            return {"error": f"{MAX_STATUS_MAKING} status requests are being answered; try again"}
        return _STATUS

    def _make_status(self, control: ControlConn) -> None:
        control.waiting = True
        self.status_making += 1
        self.status.make_reply(lambda line: self._status_made(control, line))

    def _status_made(self, control: ControlConn, line: bytes) -> None:  # in a status thread
        self.status_done.append((control, line))
        self._wake()

    def _deliver_status(self) -> None:
        while self.status_done:
            control, line = self.status_done.popleft()
            self.status_making -= 1
            if self.controls.get(control.sock.fileno()) is not control:
                continue  # closed meanwhile
            control.waiting = False
            control.outbox += line
            self._answer_lines(control)
            self._flush(control)


#: `_answer` says so for a status request: the reply comes later, from `_make_status`.
_STATUS: dict = {}
#: Status requests being answered at once (by bus/status.py's threads); more are refused.
MAX_STATUS_MAKING = 4
