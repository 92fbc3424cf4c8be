"""The switch as its own process: one thread, run-to-completion.

    python -m alacrity.switch --control /tmp/switch0.ctl       # tests, benchmarks
    python -m alacrity.switch --control-fd 3 --user nobody    # started by alacrityd

The control socket (AF_UNIX, SOCK_SEQPACKET) takes one JSON object per packet, and
every reply echoes the request's `seq`:
- `{"op": "add_port", "label": L, "mac": M|null, "peer_pid": P}` with one fd (SCM_RIGHTS):
  an already-accepted vhost-user connection, which becomes a port. Reply
  `{"ok": true, "port": ID, "mac": "..."}`.
- `{"op": "add_uplink", "label": L}` with one fd: a tap opened by the daemon (IFF_VNET_HDR).
- `{"op": "remove_uplink"}`,
  `{"op": "set", "ageing_s": S, "coalesce_us": U, "coalesce_frames": N, "tx_defer_us": D}`,
  `{"op": "remove_port", "port": ID}`,
  `{"op": "stats"}` (ports, fdb, stats), `{"op": "quit"}`.
With `--control-fd`, the daemon's end closing means the daemon is gone: the switch exits.
Errors are answered `{"ok": false, "error": "..."}`.

The loop forwards while there is work, busy-polls for a while after the last frame, then
enables notifications on every TX ring (EVENT_IDX), re-checks, and sleeps in poll() on the
kick eventfds, the vhost-user sockets and the control sockets. The spin adapts (at most
`poll_budget_s`, `_adapt_poll`): it grows while wake-ups come within the budget and shrinks
to nothing while they come later, as with TCG guests on a small host, where every
microsecond we spin is taken from the guests. A port whose peer leaves or breaks the rules
is closed alone, with a logged reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from dataclasses import replace

from alacrity.switch.coalesce import Bounds
from alacrity.switch.control import DEFAULT_PREFIX, Control
from alacrity.switch.engine import BATCH
from alacrity.switch.engines import make_engine
from alacrity.switch.fdb import Fdb
from alacrity.switch.native import load as load_native
from alacrity.switch.native.engine import RUN_ERROR, RUN_FAULTS, RUN_IO, RUN_PUNT, NativeEngine, WakeupLoop
from alacrity.switch.port import VhostPort
from alacrity.switch.tap import TapPort
from alacrity.vhost_user.messages import ProtocolError
from alacrity.virtio import net as vn
from alacrity.virtio.ring import QueueError

log = logging.getLogger("alacrity.switch")

POLL_BUDGET_S = 200e-6
#: The adaptive budget's floor: below it, spinning is not worth a loop iteration.
POLL_MIN_S = 10e-6
#: Set to "python" to keep the loop in Python even with the native engine (for comparisons).
LOOP_ENV = "ALACRITY_SWITCH_LOOP"
IO_CHECK_S = 200e-6  # under load, look at sockets this often (a stopping VM waits on GET_VRING_BASE)
MAX_CONTROL = 65536


class Switch:
    def __init__(self, control: str | socket.socket, *, mtu: int = 1500, mac_prefix: str = DEFAULT_PREFIX,
                 ageing_s: float = 300.0, offloads: bool = True, batch: int = BATCH,
                 poll_budget_s: float = POLL_BUDGET_S, engine: str | None = None,
                 adaptive_poll: bool = True, coalesce: Bounds | None = None,
                 native_loop: bool | None = None) -> None:
        prefix = bytes(int(p, 16) for p in mac_prefix.split(":"))
        if not 1 <= len(prefix) <= 5 or prefix[0] & 1:
            raise ValueError(f"mac_prefix {mac_prefix!r}: 1 to 5 bytes of a unicast address")
        self.prefix = prefix
        self.mtu = mtu
        self.offloads = offloads
        self.poll_budget_s = poll_budget_s  # the most it spins after work
        self.adaptive_poll = adaptive_poll
        self.poll_s = poll_budget_s  # what it spins now (adapted, see `_adapt_poll`)
        # native (C fast path, built and loaded here: before the caller drops privileges) or python
        self.engine = make_engine(Fdb(ageing_s=ageing_s), batch=batch, kind=engine)
        self.set_bounds(coalesce or Bounds())
        self.ports: dict[int, VhostPort] = {}
        self.uplink: TapPort | None = None
        self.next_id = 1
        self.controls: dict[int, socket.socket] = {}
        self.control_path: str | None = None
        self.listener: socket.socket | None = None
        self.owner: socket.socket | None = None
        if isinstance(control, socket.socket):
            # The daemon's end of a socketpair: when it closes, the daemon is gone and so are we.
            self.owner = control
            self.controls[control.fileno()] = control
            _roomy(control)
        else:
            self.control_path = control
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # Listening before the path appears: whoever waits for the path can connect at once.
            staging = control + ".new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            self.listener.bind(staging)
            self.listener.listen(8)
            os.replace(staging, control)
        self.poller: select.poll | None = None
        self.kick_owner: dict[int, VhostPort] = {}
        self.other_fds: list[int] = []  # what the poller watches besides the kick fds
        self.signal_fd = -1  # read end of the signal wake-up pipe, while `run` runs
        self.last_work = self.next_io = 0.0
        if native_loop is None:
            native_loop = os.environ.get(LOOP_ENV, "native") != "python"
        self.native_loop = native_loop
        self.loop: WakeupLoop | None = None
        self.native_runs = 0
        self.stopping = False
        self.sleeps = 0
        self.wakeups = 0
        self.removed: list[dict] = []

    # -- ports
    def add_port(self, sock: socket.socket, mac: bytes | None, label: str, peer_pid: int) -> VhostPort:
        port_id = self.next_id
        self.next_id += 1
        if mac is None:
            mac = self.prefix + port_id.to_bytes(6 - len(self.prefix), "big")
        port = VhostPort(port_id, sock, mac=mac, mtu=self.mtu, offloads=self.offloads,
                         label=label or f"port{port_id}", peer_pid=peer_pid)
        self.ports[port_id] = port
        self.engine.add_port(port)
        self.poller = None
        log.info("%s: port %d added (mac %s, pid %d)", port.label, port_id, vn.mac_text(mac), peer_pid)
        return port

    def remove_port(self, port: VhostPort, reason: str, *, fault: bool = False) -> None:
        if self.ports.pop(port.id, None) is None:
            return
        self.engine.remove_port(port.id)
        if fault:
            port.fail(reason)
            log.warning("%s: port %d removed: %s", port.label, port.id, reason)
        else:
            log.info("%s: port %d removed: %s", port.label, port.id, reason)
        self.removed.append({"port": port.id, "label": port.label, "reason": reason})
        del self.removed[:-32]
        port.close()
        self.poller = None

    def set_uplink(self, fd: int | None, label: str = "uplink") -> None:
        """Make the tap `fd` (opened by the daemon) the uplink port, or drop the uplink."""
        if self.uplink is not None:
            self.engine.remove_port(self.uplink.id)
            log.info("%s: uplink port %d removed", self.uplink.label, self.uplink.id)
            self.uplink.close()
            self.uplink = None
        if fd is not None:
            port_id = self.next_id
            self.next_id += 1
            self.uplink = TapPort(port_id, fd, mtu=self.mtu, label=label)
            self.engine.add_port(self.uplink)
            log.info("%s: uplink port %d added", label, port_id)
        self.poller = None

    # -- the loop
    def run(self) -> None:
        """Serve until stopped: in C (`_step_native`) whenever the engine can, else in Python
        (`_step`, the reference, and what serves a tap, coalescing or a dirty log)."""
        # Signals end any sleep, Python's or C's, through the wake-up fd that CPython's handler
        # writes (a flag alone would wait for the next return to Python).
        wakeup = None
        if threading.current_thread() is threading.main_thread():
            self.signal_fd, wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            previous = signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
            self.poller = None
        if self.native_loop and isinstance(self.engine, NativeEngine):
            self.loop = WakeupLoop(*load_native())  # watched by the eventfd watchdog: this thread
            w = self.loop.c
            w.budget_ns, w.min_ns = int(self.poll_budget_s * 1e9), int(POLL_MIN_S * 1e9)
            w.io_check_ns, w.adaptive = int(IO_CHECK_S * 1e9), self.adaptive_poll
        try:
            while not self.stopping:
                if self.loop is not None and self.engine.loop_ready():  # type: ignore[attr-defined]
                    self._step_native()
                else:
                    self._step()
        finally:
            if self.loop is not None:
                self.loop.close()
                self.loop = None
            if wakeup is not None:
                signal.set_wakeup_fd(previous)
                os.close(wakeup)
                os.close(self.signal_fd)
                self.signal_fd = -1

    def _step(self) -> None:
        engine = self.engine
        work = engine.poll_once()
        self._take_broken()
        now = time.monotonic()
        # Held interrupts (coalesce.py) keep it awake: they are due within their bound,
        # and poll() could not time that finer than a millisecond.
        if work or now - self.last_work < self.poll_s or engine.coalescer.held():
            if work:
                self.last_work = now
            if now >= self.next_io:
                self._service_io(0)
                self.next_io = now + IO_CHECK_S
            return
        if self._arm():
            return
        self.sleeps += 1
        decision = engine.next_decision()  # a deferred TX decision: wake for it
        self._service_io(1000 if decision is None else min(1000, max(1, math.ceil((decision - now) * 1e3))))
        self._disarm()
        now = time.monotonic()
        if self.adaptive_poll:
            self._adapt_poll(now - self.last_work)
        self.last_work = now  # poll a while after every wake-up

    def _step_native(self) -> None:
        """wakeup.c's loop until Python is needed, then what it was needed for."""
        engine: NativeEngine = self.engine  # type: ignore[assignment]
        loop = self.loop
        assert loop is not None
        if self.poller is None or any(p.changed for p in self.ports.values()):
            self.poller = self._build_poller()
        w = loop.c
        w.spin_ns, w.last_work_ns = int(self.poll_s * 1e9), int(self.last_work * 1e9)
        reason = engine.run_loop(loop, list(self.kick_owner.items()), self.other_fds)
        self.poll_s, self.last_work = w.spin_ns / 1e9, w.last_work_ns / 1e9
        self.sleeps += w.sleeps
        self.wakeups += w.wakeups
        w.sleeps = w.wakeups = 0
        self.native_runs += 1
        self._take_broken()
        if reason == RUN_IO:
            self._service_io(0)
            self.next_io = time.monotonic() + IO_CHECK_S
        elif reason in (RUN_PUNT, RUN_FAULTS):
            engine.poll_once()  # the chain C left, or the ports whose memory went
            self._take_broken()
        elif reason == RUN_ERROR:
            raise OSError(w.failed_errno, f"the switch's poll: {os.strerror(w.failed_errno)}")

    def _take_broken(self) -> None:
        if not self.engine.broken:
            return
        for port in self.engine.take_broken():
            if port is self.uplink:
                log.error("%s: uplink broken: %s; the host is cut off", port.label, port.broken)
                self.set_uplink(None)
            else:
                self.remove_port(port, port.broken or "broken", fault=True)  # type: ignore[arg-type]

    def _adapt_poll(self, gap: float) -> None:
        """After a sleep that came `gap` seconds after the last work: grow the spin if a spin
        of at most the budget would have caught the wake-up, else shrink it (to nothing).
        KVM's halt-polling rule: spinning pays only when peers come back within the budget;
        guests slower than that (TCG) would pay for our spin with their own CPU."""
        if gap <= self.poll_budget_s:
            self.poll_s = min(self.poll_budget_s, max(2 * self.poll_s, POLL_MIN_S))
        else:
            self.poll_s = self.poll_s / 2 if self.poll_s / 2 >= POLL_MIN_S else 0.0

    def _arm(self) -> bool:
        """Ask every TX ring for a kick; True if work arrived meanwhile (do not sleep). The
        re-check reads the peer's avail index again: a bad one breaks that port, here too."""
        pending = False
        broken: list[tuple[VhostPort, str]] = []
        for port in self.ports.values():
            try:
                if port.tx is not None and port.tx.enable_notify():
                    pending = True
            except QueueError as exc:
                broken.append((port, f"TX: {exc}"))
        for port, reason in broken:
            self.remove_port(port, reason, fault=True)
        if pending or broken:
            self._disarm()
        return pending or bool(broken)

    def _disarm(self) -> None:
        for port in self.ports.values():
            if port.tx is not None:
                port.tx.disable_notify()

    def _build_poller(self) -> select.poll:
        """The poller, and the same fds for the native loop: `kick_owner` and `other_fds`."""
        poller = select.poll()
        others = []
        if self.listener is not None:
            others.append(self.listener.fileno())
        if self.uplink is not None:
            others.append(self.uplink.fileno())  # a wake-up only: the engine reads it
        others += self.controls
        if self.signal_fd >= 0:
            others.append(self.signal_fd)
        self.kick_owner = {}
        for port in self.ports.values():
            others.append(port.fileno())
            for fd in port.kick_fds():
                poller.register(fd, select.POLLIN)
                self.kick_owner[fd] = port
            port.changed = False
        for fd in others:
            poller.register(fd, select.POLLIN)
        self.other_fds = others
        return poller

    def _service_io(self, timeout_ms: int) -> None:
        if self.poller is None or any(p.changed for p in self.ports.values()):
            self.poller = self._build_poller()
        events = self.poller.poll(timeout_ms)
        if timeout_ms:
            self.wakeups += 1
        socks = {p.fileno(): p for p in self.ports.values()}
        for fd, _event in events:
            kicked = self.kick_owner.get(fd)
            if kicked is not None:
                self._take_kick(kicked, fd)
            elif fd in socks:
                self._service_port(socks[fd])
            elif self.listener is not None and fd == self.listener.fileno():
                conn, _ = self.listener.accept()
                _roomy(conn)
                self.controls[conn.fileno()] = conn
                self.poller = None
            elif fd in self.controls:
                self._service_control(self.controls[fd])
            elif fd == self.signal_fd:
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 512):  # the handlers have run, or run at the next bytecode
                        pass

    def _take_kick(self, port: VhostPort, fd: int) -> None:
        if port.id not in self.ports:
            return  # removed earlier in this round: `fd` may be closed, or someone else's by now
        try:
            port.take_kick(fd)
        except OSError as exc:
            self.remove_port(port, f"TX kick fd: {exc}", fault=True)

    def _service_port(self, port: VhostPort) -> None:
        if port.id not in self.ports:
            return
        try:
            alive = port.service_socket()
        except (ProtocolError, QueueError) as exc:
            self.remove_port(port, f"protocol error: {exc}", fault=True)
            return
        except OSError as exc:
            self.remove_port(port, f"connection lost: {exc}")
            return
        if not alive:
            self.remove_port(port, "peer closed the connection")
            return
        announced, port.session.announced = port.session.announced, []
        for frame in announced:  # SEND_RARP: the port's guest has just migrated here
            log.info("%s: port %d announces %s (RARP)", port.label, port.id, vn.mac_text(frame[6:12]))
            self.engine.announce(port.id, frame)

    # -- control
    def _service_control(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_CONTROL, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            if conn is self.owner:
                log.info("the daemon closed the control socket: stopping")
                self.stopping = True
                return
            self.controls.pop(conn.fileno(), None)
            conn.close()
            self.poller = None
            return
        seq = None
        try:
            request = json.loads(data)
            seq = request.get("seq")
            reply = self._control(request, fds)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            reply = {"ok": False, "error": str(exc)}
        reply["seq"] = seq
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode())

    def _control(self, request: dict, fds: list[int]) -> dict:
        op = request["op"]
        if op == "add_port":
            if len(fds) != 1:
                raise ValueError(f"add_port needs exactly one fd, got {len(fds)}")
            mac = vn.parse_mac(request["mac"]) if request.get("mac") else None
            sock = socket.socket(fileno=fds[0])
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.close()
                raise ValueError("add_port: the fd is not a unix stream socket")
            port = self.add_port(sock, mac, str(request.get("label", "")), int(request.get("peer_pid", 0)))
            return {"ok": True, "port": port.id, "mac": vn.mac_text(port.mac)}
        if op == "add_uplink":
            if len(fds) != 1:
                raise ValueError(f"add_uplink needs exactly one fd, got {len(fds)}")
            self.set_uplink(fds[0], str(request.get("label", "uplink")))
            return {"ok": True, "port": self.uplink.id}  # type: ignore[union-attr]
        for fd in fds:
            os.close(fd)
        if op == "remove_uplink":
            self.set_uplink(None)
            return {"ok": True}
        if op == "set":
            if "ageing_s" in request:
                self.engine.fdb.ageing_s = float(request["ageing_s"])
            if {"coalesce_us", "coalesce_frames", "tx_defer_us"} & request.keys():
                bounds = self.engine.coalescer.bounds
                self.set_bounds(replace(
                    bounds, delay_us=float(request.get("coalesce_us", bounds.delay_us)),
                    frames=int(request.get("coalesce_frames", bounds.frames)),
                    tx_defer_us=float(request.get("tx_defer_us", bounds.tx_defer_us))))
            return {"ok": True}
        if op == "remove_port":
            port = self.ports.get(int(request["port"]))
            if port is None:
                raise ValueError(f"no port {request['port']}")
            self.remove_port(port, "removed by the daemon")
            return {"ok": True}
        if op == "stats":
            return {"ok": True, **self.stats()}
        if op == "quit":
            self.stopping = True
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def set_bounds(self, bounds: Bounds) -> None:
        """Interrupt coalescing and the TX interrupt deferral (coalesce.py Bounds)."""
        self.engine.coalescer.bounds = bounds
        self.engine.tx_defer_s = bounds.tx_defer_us * 1e-6

    def stats(self) -> dict:
        now = time.monotonic()
        learned: dict[int, list[str]] = {}
        fdb = []
        for e in self.engine.fdb.entries(now):
            learned.setdefault(e.port, []).append(e.mac)
            fdb.append({"mac": e.mac, "port": e.port, "age_s": e.age_s})
        ports = []
        for p in self.ports.values():
            macs = learned.get(p.id, [])
            # A VM's MAC is set by its QEMU, which ignores the port's config space: a port
            # whose traffic shows one source address is known by that one.
            assigned = vn.mac_text(p.mac)
            ports.append({"port": p.id, "label": p.label, "mac": macs[0] if len(macs) == 1 else assigned,
                          "assigned_mac": assigned, "peer_pid": p.peer_pid,
                          "running": p.tx is not None and p.rx is not None, "learned": macs, **p.counters()})
        if self.uplink is not None:
            up = self.uplink
            ports.append({"port": up.id, "label": up.label, "mac": "", "peer_pid": 0, "running": True,
                          "uplink": True, "learned": learned.get(up.id, []), **up.counters()})
        deferred, unneeded = self.engine.tx_decisions()
        stats = {"ports": len(self.ports), "fdb_entries": len(fdb), "floods": self.engine.floods,
                 "batches": self.engine.batches, "sleeps": self.sleeps, "wakeups": self.wakeups,
                 "poll_us": round(self.poll_s * 1e6, 1), "native_loop_runs": self.native_runs,
                 "interrupts_held": self.engine.coalescer.held_total,
                 "interrupts_saved": self.engine.coalescer.saved,
                 "interrupts_held_uselessly": self.engine.coalescer.useless,
                 "tx_decisions_deferred": deferred, "tx_interrupts_unneeded": unneeded,
                 "fdb_evictions": self.engine.fdb.evictions, "engine": self.engine.kind}
        return {"ports": ports, "fdb": fdb, "stats": stats, "removed": list(self.removed)}

    def close(self) -> None:
        for port in list(self.ports.values()):
            self.remove_port(port, "switch stopping")
        self.set_uplink(None)
        for conn in self.controls.values():
            conn.close()
        if self.listener is not None:
            self.listener.close()
        if self.control_path is not None:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(self.control_path)


def _roomy(sock: socket.socket) -> None:
    """A stats reply (ports and FDB) is one packet: give it room."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)


__all__ = ["Control", "DEFAULT_PREFIX", "POLL_BUDGET_S", "Switch"]
