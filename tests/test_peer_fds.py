"""Fds from a peer are checked for their kind before use (issue 12, findings 2 and 3).

A ring's kick, call and err fds must be plain eventfds and a memory region's fd a regular
file; anything else breaks that one connection at SET_VRING_* / SET_MEM_TABLE time, with a
logged reason. Writes to a peer's eventfd never block, and an eventfd that fails breaks its
port, never the switch. The attacks go over real sockets to a real alacrityd (blk) and a
real switch process, and the neighbours are timed afterwards.

Run as `python -m tests.test_peer_fds DEVICE DIR` (inside a bus), this file is the peer
process of the blk tests: it answers one JSON line per command on stdin (see `_peer_main`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.client.area import SharedArea
from alacrity.client.net import NetClient
from alacrity.switch.engine import Engine
from alacrity.switch.engines import make_engine
from alacrity.switch.fdb import Fdb
from alacrity.switch.port import RX, TX, NetSession
from alacrity.vhost_user import eventfd
from alacrity.vhost_user.backend import Backend, eventfd_problem, fd_kind
from alacrity.vhost_user.eventfd import notify
from alacrity.vhost_user.frontend import Frontend
from alacrity.vhost_user.memory import MemoryTable
from alacrity.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    MEM_HEADER,
    MEM_REGION,
    U64,
    Message,
    ProtocolError,
    ProtocolFeature,
    Req,
)
from alacrity.virtio import net as vn
from alacrity.virtio.driver_queue import RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit
from tests.conftest import Daemon, fuse_available, need
from tests.test_switch_engine import Clock, Host, frame
from tests.test_switch_process import Rig, rig_with_loop

ROOT = Path(__file__).parent.parent
ROLES = ("kick", "call", "err")
#: What a hostile peer sends instead of an eventfd.
BAD_KINDS = ("pipe_write", "pipe_read", "dev_zero", "regular_file", "semaphore_eventfd")
#: ... and instead of a memfd (a regular file is shareable memory, so it is not among them).
BAD_MEMORY = ("pipe_write", "dev_zero")
ATTACKS = [(role, kind) for role in ROLES for kind in BAD_KINDS] + [("mem", kind) for kind in BAD_MEMORY]
MEMORY_TYPE = {"pipe_write": "a pipe", "pipe_read": "a pipe", "dev_zero": "a character device",
               "socket": "a socket", "eventfd": "an anonymous inode"}
NEIGHBOUR_S = 0.1  # how soon after an attack other ports must move frames again
U64_FULL = 0xFFFF_FFFF_FFFF_FFFE  # the most an eventfd counter takes from a write


def open_fd(kind: str, tmp: Path, stack: contextlib.ExitStack) -> int:
    """An fd of `kind`, closed with `stack`. A pipe's other end stays open: nobody reads it."""
    if kind in ("pipe_write", "pipe_read"):
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        return w if kind == "pipe_write" else r
    if kind in ("socket", "epoll"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if kind == "socket" else select.epoll()
        stack.callback(sock.close)
        return sock.fileno()
    if kind == "dev_zero":
        fd = os.open("/dev/zero", os.O_RDWR)
    elif kind == "regular_file":
        fd = os.open(tmp / "not-an-eventfd", os.O_RDWR | os.O_CREAT, 0o600)
    elif kind == "memfd":
        fd = os.memfd_create("peer-fds")
        os.ftruncate(fd, 1 << 16)
    elif kind == "semaphore_eventfd":
        fd = os.eventfd(0, os.EFD_SEMAPHORE)
    elif kind == "eventfd":
        fd = os.eventfd(0)
    else:
        assert kind == "eventfd_nonblock", kind
        fd = os.eventfd(0, os.EFD_NONBLOCK)
    stack.callback(os.close, fd)
    return fd


def refusal(role: str, kind: str, name: str, ring: int) -> str:
    """The reason the backend gives for `kind` (named `name` by /proc) as ring `ring`'s `role` fd."""
    if role == "mem":
        return f"its fd is {MEMORY_TYPE[kind]}, not a regular file"
    if kind == "semaphore_eventfd":
        return f"ring {ring} {role} fd is an eventfd in semaphore mode"
    return f"ring {ring} {role} fd is {name}, not an eventfd"


# --------------------------------------------------------------------------------------
# 1. The check itself, sans-I/O: eventfd_problem, Backend, MemoryTable, the engine
# --------------------------------------------------------------------------------------

ALL_KINDS = (*BAD_KINDS, "eventfd", "eventfd_nonblock", "memfd", "socket", "epoll")


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(ALL_KINDS))
def test_only_a_plain_eventfd_passes(tmp_path_factory, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        fd = open_fd(kind, tmp_path_factory.mktemp("fds"), stack)
        problem = eventfd_problem(fd)
        if kind in ("eventfd", "eventfd_nonblock"):
            assert problem is None
        elif kind == "semaphore_eventfd":
            assert problem is not None and "semaphore" in problem
        else:  # an epoll fd is an anonymous inode too: only its name tells it from an eventfd
            assert problem == f"{fd_kind(fd)}, not an eventfd"


def protocol_backend(**kw) -> Backend:
    """A net port's backend with protocol features negotiated (so a kick alone starts nothing)."""
    backend = Backend(NetSession(b"\x02\0\0\0\0\x01", 1500), **kw)
    backend.handle(Message(Req.SET_FEATURES, payload=U64.pack(bit(F_VERSION_1) | bit(F_PROTOCOL_FEATURES))))
    return backend


RING_FD_REQUESTS = {"kick": Req.SET_VRING_KICK, "call": Req.SET_VRING_CALL, "err": Req.SET_VRING_ERR}


@settings(max_examples=150, deadline=None)
@given(role=st.sampled_from(ROLES), ring=st.sampled_from([RX, TX]), kind=st.sampled_from(ALL_KINDS),
       replaced=st.booleans())
def test_backend_takes_only_plain_eventfds(tmp_path_factory, role: str, ring: int, kind: str,
                                           replaced: bool) -> None:
    backend = protocol_backend()
    before = None
    with contextlib.ExitStack() as stack:
        if replaced:  # a good fd first: a bad one must not replace it either
            backend.handle(Message(RING_FD_REQUESTS[role], payload=U64.pack(ring), fds=[os.eventfd(0)]))
            before = getattr(backend.vrings[ring], role)
        fd = open_fd(kind, tmp_path_factory.mktemp("fds"), stack)
        name = fd_kind(fd)
        msg = Message(RING_FD_REQUESTS[role], payload=U64.pack(ring), fds=[os.dup(fd)])
        stack.callback(lambda: [os.close(f) for f in msg.fds])  # what the edge closes
        if kind in ("eventfd", "eventfd_nonblock"):
            backend.handle(msg)
            taken = getattr(backend.vrings[ring], role)
            assert msg.fds == [] and fd_kind(taken) == name
            assert not os.get_blocking(taken)  # shared with `fd`: O_NONBLOCK is the file's
        else:
            with pytest.raises(ProtocolError) as refused:
                backend.handle(msg)
            assert refusal(role, kind, name, ring) in str(refused.value)
            assert len(msg.fds) == 1, "a refused fd is left for the edge to close"
            assert getattr(backend.vrings[ring], role) == before
    for fd in backend.close() + [a.closing[0] for a in backend.actions if a.closing]:
        os.close(fd)


def test_the_check_is_injectable() -> None:
    """The kind check is one function: a stricter one refuses what it refuses, with its reason."""
    seen: list[int] = []

    def refuse(fd: int) -> str:
        seen.append(fd)
        return "refused by the test"

    backend = protocol_backend(eventfd_problem=refuse)
    fd = os.eventfd(0)
    try:
        with pytest.raises(ProtocolError, match="ring 1 call fd is refused by the test"):
            backend.handle(Message(Req.SET_VRING_CALL, payload=U64.pack(1), fds=[fd]))
        assert seen == [fd] and backend.vrings[1].call is None
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(MEMORY_TYPE)), size=st.sampled_from([4096, 1 << 16, 1 << 20]))
def test_memory_must_be_a_regular_file(tmp_path_factory, kind: str, size: int) -> None:
    """A pipe, /dev/zero (which maps, and reads as zeros), a socket or an eventfd is no shared memory."""
    with contextlib.ExitStack() as stack:
        fd = open_fd(kind, tmp_path_factory.mktemp("fds"), stack)
        with pytest.raises(ValueError, match=f"its fd is {MEMORY_TYPE[kind]}, not a regular file"):
            MemoryTable.map([(0, size, 0x7F00_0000_0000, 0)], [fd])
        backend = protocol_backend()
        payload = MEM_HEADER.pack(1, 0) + MEM_REGION.pack(0, size, 0x7F00_0000_0000, 0)
        with pytest.raises(ProtocolError, match="not a regular file"):
            backend.handle(Message(Req.SET_MEM_TABLE, payload=payload, fds=[os.dup(fd)]))
        assert backend.memory is None


def test_memory_from_a_memfd_or_a_file_maps(tmp_path) -> None:
    with contextlib.ExitStack() as stack:
        for kind in ("memfd", "regular_file"):
            fd = open_fd(kind, tmp_path, stack)
            os.ftruncate(fd, 1 << 16)
            table = MemoryTable.map([(0, 1 << 16, 0x7F00_0000_0000, 0)], [fd])
            table.gpa(0, 8)[:] = b"mappable"
            assert os.pread(fd, 8, 0) == b"mappable"
            table.release()


def native_or_python(kind: str, clock: Clock) -> Engine:
    if kind == "native":
        from alacrity.switch.native import NativeUnavailable

        try:
            return make_engine(Fdb(), clock=clock, kind="native", strict=True)
        except NativeUnavailable as exc:
            pytest.skip(f"native engine unavailable: {exc}")
    return Engine(Fdb(), clock=clock)


@pytest.mark.parametrize("engine_kind", ["python", "native"])
def test_a_call_fd_that_fails_breaks_its_port_only(engine_kind: str) -> None:
    """An OSError from one port's eventfd (EBADF, say) breaks that port; the batch goes on."""
    engine = native_or_python(engine_kind, Clock())
    a, b, bad = (Host(i + 1) for i in range(3))
    for host in (a, b, bad):
        engine.add_port(host.port)

    def fail(index: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    bad.port.signal = fail  # type: ignore[method-assign]
    a.send(b"\xff" * 6, b"to all")  # delivered to b and bad: both RX rings are signalled
    assert engine.poll_once() == 1
    assert engine.take_broken() == [bad.port]
    assert "RX call fd" in bad.port.broken and "Bad file descriptor" in bad.port.broken
    assert b.received() == [frame(b"\xff" * 6, a.mac, b"to all")] and RX in b.signals
    b.send(a.mac, b"still here")
    engine.poll_once()
    assert a.received() == [frame(a.mac, b.mac, b"still here")]


# --------------------------------------------------------------------------------------
# 2. blk in alacrityd: the peer is a real process on the bus, the daemon a real one
# --------------------------------------------------------------------------------------

BLK_RING = 0
RING_SIZE = 64


def set_up_ring(fe: Frontend, area: SharedArea, fds: dict[str, int]) -> None:
    """What a vhost-user-blk driver does to start its ring, with REPLY_ACK so each refusal shows."""
    features = fe.get_features()
    protocol = fe.get_protocol_features()
    fe.set_protocol_features(protocol & (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)))
    fe.reply_ack = True
    fe.set_owner()
    fe.set_features(features & (bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES)))
    fe.set_mem_table([area.region()], [fds["mem"]])
    lay = RingLayout.at(0, RING_SIZE)
    fe.set_vring_num(BLK_RING, RING_SIZE)
    fe.set_vring_base(BLK_RING, 0)
    fe.set_vring_addr(BLK_RING, area.uva + lay.desc, area.uva + lay.used, area.uva + lay.avail)
    fe.set_vring_fd(Req.SET_VRING_ERR, BLK_RING, fds["err"])
    fe.set_vring_fd(Req.SET_VRING_CALL, BLK_RING, fds["call"])
    fe.set_vring_fd(Req.SET_VRING_KICK, BLK_RING, fds["kick"])
    fe.set_vring_enable(BLK_RING, True)


def attack_blk(path: str, role: str, kind: str, tmp: Path) -> dict:
    """Open a connection to `path` and hand it a `kind` fd as `role`: was the connection closed?"""
    with contextlib.ExitStack() as stack:
        bad = open_fd(kind, tmp, stack)
        area = SharedArea(1 << 16, "peer-fds")
        stack.callback(area.close)
        fds = {"mem": area.fd, **{r: open_fd("eventfd_nonblock", tmp, stack) for r in ROLES}, role: bad}
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.settimeout(10)
        sock.connect(path)
        try:
            set_up_ring(Frontend(sock), area, fds)
            error = ""
        except ProtocolError as exc:
            error = str(exc)
        with contextlib.suppress(TimeoutError, ConnectionError):
            sock.settimeout(2)
            return {"closed": sock.recv(1) == b"", "error": error, "name": fd_kind(bad)}
        return {"closed": False, "error": error, "name": fd_kind(bad)}


def blk_io(device: str) -> dict:
    from alacrity import client

    start = time.monotonic()
    with client.connect().open(device, timeout=5.0) as disk:
        data = os.urandom(8192)
        disk.write(4096, data)
        disk.flush()
        ok = disk.read(4096, len(data)) == data
    return {"ok": ok, "s": time.monotonic() - start}


def _peer_main(device: str, tmp: str) -> int:
    """Commands, one per line: `attack ROLE KIND` (answers attack_blk's dict), `io`, `quit`."""
    from alacrity import client

    path = client.connect().device(device).socket
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "attack":
            print(json.dumps(attack_blk(path, words[1], words[2], Path(tmp))), flush=True)
        else:
            print(json.dumps(blk_io(device)), flush=True)
    return 0


class Peer:
    """This file (or `module`, with a `_peer_main` of its own) run as a process admitted to `bus`."""

    def __init__(self, daemon: Daemon, bus: str, device: str, tmp: Path,
                 module: str = "tests.test_peer_fds") -> None:
        argv = [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--",
                sys.executable, "-m", module, device, str(tmp)]
        self.proc = subprocess.Popen(argv, env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        assert json.loads(self.proc.stdout.readline() or "{}").get("ready"), "the peer did not start"

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the peer process died"
        return json.loads(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class BlkRig:
    def __init__(self, daemon: Daemon, tmp: Path) -> None:
        self.daemon = daemon
        self.pid = daemon.proc.pid
        self.attacker = Peer(daemon, "b1", "d0", tmp)
        self.member = Peer(daemon, "b1", "d0", tmp)

    def wait_logged(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.daemon.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"alacrityd did not log {text!r}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def blk_rig(tmp_path_factory) -> Iterator[BlkRig]:
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root (FUSE allow_other, membership as root)")
    root = tmp_path_factory.mktemp("alacrityd")
    daemon = Daemon(root)
    daemon.start()
    rig = None
    try:
        # shared: the attacker's next connection must not wait for the member's last one to go
        daemon.make_disk("d0", "b1", root / "d0.img", size="4M", extra="echo 1 > $A/devices/d0/shared")
        rig = BlkRig(daemon, root)
        yield rig
    finally:
        if rig is not None:
            rig.attacker.close()
            rig.member.close()
        daemon.stop()


@pytest.mark.parametrize(("role", "kind"), ATTACKS)
def test_blk_connection_refuses_a_bad_fd(blk_rig: BlkRig, role: str, kind: str) -> None:
    result = blk_rig.attacker.ask(f"attack {role} {kind}")
    assert result["closed"], f"alacrityd kept the connection: {result}"
    blk_rig.wait_logged(refusal(role, kind, result["name"], BLK_RING))
    assert blk_rig.daemon.proc.poll() is None and blk_rig.daemon.proc.pid == blk_rig.pid
    io = blk_rig.member.ask("io")
    assert io["ok"], io
    assert io["s"] < 2.0, f"a member's open and I/O took {io['s']:.2f} s after the attack"


# --------------------------------------------------------------------------------------
# 3. A switch port: a real switch process, whose other ports must keep moving frames
# --------------------------------------------------------------------------------------


class HostileNic(NetClient):
    """A port that hands the switch `fd` as its TX ring's `role` fd, or as its memory."""

    def __init__(self, sock: socket.socket, role: str, fd: int) -> None:
        self.role, self.fd = role, fd
        super().__init__(sock, timeout=2.0)

    def shm(self, index: int, size: int, queue=None):
        if self.role == "mem" and not self.rings:
            self.frontend.set_mem_table([self.area.region()], [self.fd])
        ring = super().shm(index, size, queue)
        if index == TX and self.role != "mem":
            request = {"kick": Req.SET_VRING_KICK, "call": Req.SET_VRING_CALL, "err": Req.SET_VRING_ERR}
            self.frontend.set_vring_fd(request[self.role], TX, self.fd)
        return ring


@pytest.fixture(params=["native", "python"], ids=["native-loop", "python-loop"])
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Either loop writes the call fds itself, each under the eventfd watchdog."""
    yield from rig_with_loop(tmp_path, monkeypatch, request.param)


def hostile_port(rig: Rig, role: str, fd: int) -> HostileNic:
    ours, theirs = socket.socketpair()
    rig.ctl.add_port(ours.fileno(), label="hostile")
    ours.close()
    return HostileNic(theirs, role, fd)


def assert_neighbours_move(a: NetClient, b: NetClient) -> None:
    """Each way, a frame arrives within NEIGHBOUR_S."""
    for src, dst in ((a, b), (b, a)):
        start = time.monotonic()
        src.send(frame(dst.mac, src.mac, b"still moving"))
        got = dst.recv(timeout=NEIGHBOUR_S)
        took = time.monotonic() - start
        assert got == frame(dst.mac, src.mac, b"still moving"), f"nothing arrived in {took * 1e3:.0f} ms"
        assert took < NEIGHBOUR_S, f"a frame took {took * 1e3:.0f} ms"


def neighbours(rig: Rig) -> tuple[NetClient, NetClient]:
    a, b = rig.client(), rig.client()
    for _ in range(3):  # learned and warm: what is timed afterwards is the switch, not start-up
        assert_neighbours_move(a, b)
    return a, b


@pytest.mark.parametrize(("role", "kind"), ATTACKS)
def test_switch_port_refuses_a_bad_fd(rig: Rig, tmp_path: Path, role: str, kind: str) -> None:
    a, b = neighbours(rig)
    pid = rig.proc.pid
    with contextlib.ExitStack() as stack:
        bad = open_fd(kind, tmp_path, stack)
        with pytest.raises(ProtocolError):
            hostile_port(rig, role, bad)
        assert_neighbours_move(a, b)
        name = fd_kind(bad)
    assert rig.proc.poll() is None and rig.proc.pid == pid
    removed = rig.ctl.stats(timeout=2)["removed"]
    assert removed and removed[-1]["label"] == "hostile"
    assert refusal(role, kind, name, TX) in removed[-1]["reason"]
    assert refusal(role, kind, name, TX) in rig.log.read_text()
    assert len(rig.ports()) == 2


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_a_full_call_counter_never_stops_the_switch(rig: Rig, blocking: bool) -> None:
    """A port's own call eventfd with its counter at the maximum: the switch's signal would
    block (a blocking fd) or fail with EAGAIN. Either way the interrupt is already pending,
    so the switch drops the write, and the port and every other port carry on."""
    a, b = neighbours(rig)
    call = os.eventfd(0, 0 if blocking else os.EFD_NONBLOCK)
    try:
        nic = hostile_port(rig, "call", call)
        os.eventfd_write(call, U64_FULL)
        nic.driver.txq.enable_interrupts()
        for _ in range(3):  # to itself, the frame goes nowhere
            nic.send(frame(nic.mac, nic.mac, b"ring my bell"))
        # The completions stay uncollected, so the (deferred) decision signals them.
        rig.wait_for(lambda: rig.ports()[vn.mac_text(nic.mac)]["interrupts"] >= 1, timeout=2)
        assert_neighbours_move(a, b)
        assert rig.proc.poll() is None and len(rig.ports()) == 3
        assert os.eventfd_read(call) == U64_FULL  # nothing was added: the writes were dropped
        nic.close()
    finally:
        os.close(call)


def test_a_call_fd_made_blocking_again_breaks_only_its_port(rig: Rig) -> None:
    """The peer shares the call fd's flags: it clears O_NONBLOCK after the hand-over and
    fills the counter, so a signal would block the switch. The watchdog interrupts that
    write: that port goes, every other port carries on."""
    a, b = neighbours(rig)
    stall_a_call(rig, a, b)
    assert rig.proc.poll() is None and len(rig.ports()) == 2


def stall_a_call(rig: Rig, a: NetClient, b: NetClient) -> float:
    """A port whose peer made its call fd blocking and filled it sends a frame: seconds until
    that port is gone; `a` and `b` still trade frames afterwards."""
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        nic = hostile_port(rig, "call", call)
        os.set_blocking(call, True)
        os.eventfd_write(call, U64_FULL)
        nic.driver.txq.enable_interrupts()
        started = time.monotonic()
        nic.send(frame(nic.mac, nic.mac, b"ring my bell"))
        rig.wait_for(lambda: vn.mac_text(nic.mac) not in rig.ports(), timeout=5)
        took = time.monotonic() - started
        assert_neighbours_move(a, b)
        nic.close()
        return took
    finally:
        os.close(call)


def test_a_call_fd_toggled_between_blocking_and_not_never_stalls_the_switch(rig: Rig) -> None:
    """The race a check of the flags before the write would leave open: the peer fills the
    counter and flips O_NONBLOCK as fast as it can while frames arrive. Each signal is then
    either dropped (EAGAIN) or interrupted by the watchdog and the port broken; the other
    ports never wait more than a moment, and the switch lives."""
    a, b = neighbours(rig)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.set_blocking(call, True)
            os.set_blocking(call, False)

    flipper = threading.Thread(target=flip)
    try:
        nic = hostile_port(rig, "call", call)
        os.eventfd_write(call, U64_FULL)
        flipper.start()
        mac = vn.mac_text(nic.mac)
        deadline = time.monotonic() + 10
        while mac in rig.ports() and time.monotonic() < deadline:
            nic.driver.txq.enable_interrupts()
            nic.send(frame(nic.mac, nic.mac, b"ring my bell"))
            time.sleep(0.003)  # past the TX interrupt deferral: the switch signals before we collect
            nic.driver.reap_tx()
            assert_neighbours_move(a, b)
        assert rig.proc.poll() is None
        ports = rig.ports()
        assert mac not in ports or ports[mac]["interrupts"] > 0, "the switch never signalled the port"
        assert len(ports) in (2, 3)
        nic.close()
    finally:
        stop.set()
        if flipper.is_alive():
            flipper.join()
        os.close(call)


def test_notify_is_interrupted_rather_than_blocking_on_a_full_blocking_eventfd() -> None:
    """The sans-peer core of the guard: a blocking eventfd with a full counter makes notify()
    fail with EPERM after about STALL_S, in the main thread and in any other."""
    call = os.eventfd(0)  # blocking
    os.eventfd_write(call, U64_FULL)
    outcome: list[BaseException] = []

    def signal_once() -> None:
        started = time.monotonic()
        try:
            notify(call)
        except OSError as exc:
            outcome.append(exc)
        assert time.monotonic() - started < 1

    try:
        signal_once()
        worker = threading.Thread(target=signal_once)
        worker.start()
        worker.join(5)
        assert not worker.is_alive()
        assert [exc.errno for exc in outcome] == [errno.EPERM, errno.EPERM]
        assert os.eventfd_read(call) == U64_FULL
        os.eventfd_write(call, U64_FULL - 1)
        notify(call)  # room for one more: written, even on a blocking fd
        os.set_blocking(call, False)
        notify(call)  # full and non-blocking: dropped quietly
        assert os.eventfd_read(call) == U64_FULL
    finally:
        os.close(call)


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1], sys.argv[2]))


def _wait_parked(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not eventfd._watchdog.parked.value:
        assert time.monotonic() < deadline, "the watchdog never parked"
        time.sleep(0.05)


def test_a_parked_watchdog_wakes_for_the_next_write_that_stalls() -> None:
    """With nothing to watch the watchdog parks (no more 100 wake-ups a second in an idle
    daemon or switch); a write that then stalls wakes it, and is interrupted as soon as
    ever, not at the parked watchdog's once-a-second look."""
    call = os.eventfd(0)  # blocking
    os.eventfd_write(call, U64_FULL)
    try:
        notify(os.eventfd(0, os.EFD_NONBLOCK))  # the watchdog exists
        _wait_parked()
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            notify(call)
        assert raised.value.errno == errno.EPERM
        assert time.monotonic() - started < 0.5
        assert not eventfd._watchdog.parked.value
    finally:
        os.close(call)


def test_an_idle_switch_lets_its_watchdog_sleep_and_still_catches_a_stalled_call(rig: Rig) -> None:
    """After traffic the switch goes idle: within a few seconds its watchdog thread stops
    waking (a handful of context switches a second at most, against 100 while it ticks).
    A port that then stalls a call write is still broken at once, the others untouched."""
    a, b = neighbours(rig)
    deadline = time.monotonic() + 5
    while True:
        # the switch's only thread besides its main one is the watchdog
        watchdog = [t for t in os.listdir(f"/proc/{rig.proc.pid}/task") if int(t) != rig.proc.pid]
        if watchdog:
            status = Path(f"/proc/{rig.proc.pid}/task/{watchdog[0]}/status")
            before = _switches(status)
            time.sleep(1.0)
            if _switches(status) - before <= 5:
                break
        assert time.monotonic() < deadline, "the switch's watchdog kept ticking while idle"
        time.sleep(0.5)
    assert stall_a_call(rig, a, b) < 0.5


def _switches(status: Path) -> int:
    fields = dict(line.split(":\t") for line in status.read_text().splitlines() if ":\t" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
