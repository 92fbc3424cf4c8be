"""Guest memory truncated under us: a peer that shrinks the file behind its memory table.

We map a peer's memory MAP_SHARED; an access to a page its file no longer covers raises
SIGBUS, whose default action kills the whole process (alacrityd, or a switch that serves
ports of several buses). Two defences (vhost_user/memory.py, vhost_user/sigbus.c):
1. a memfd that allows sealing is sealed against shrinking at SET_MEM_TABLE: the peer's
   ftruncate fails with EPERM;
2. memory that cannot be sealed (a memfd made without MFD_ALLOW_SEALING, as DPDK's; a
   file on tmpfs or disk) is registered with a SIGBUS guard, which replaces a vanished
   page with a zero page, so the access completes, and records the fault: the queue over
   that memory then breaks its connection ("guest memory was truncated under us").

The attacks go to a real alacrityd (blk) and a real switch process; the neighbours must
keep working. Run as `python -m tests.test_memory_truncation DEVICE DIR` (inside a bus),
this file is the peer process of the blk tests (see `_peer_main`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity import native_build
from alacrity.client.area import SharedArea
from alacrity.switch.engines import ENGINE_ENV
from alacrity.switch.port import RX, TX, NetSession
from alacrity.vhost_user import sigbus
from alacrity.vhost_user.backend import Backend
from alacrity.vhost_user.frontend import Frontend
from alacrity.vhost_user.memory import MemoryTable
from alacrity.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    MEM_HEADER,
    MEM_REGION,
    Message,
    ProtocolError,
    ProtocolFeature,
    Req,
)
from alacrity.virtio import blk as vb
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.driver_queue import DriverQueue, RingLayout
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit
from alacrity.virtio.ring import QueueError
from tests.conftest import Daemon, fuse_available, need
from tests.test_peer_fds import RING_SIZE, Peer, assert_neighbours_move, neighbours, set_up_ring
from tests.test_peer_fds import blk_io as _blk_io
from tests.test_switch_process import BROADCAST, Rig, drain, frame

PAGE = mmap.PAGESIZE
#: How a peer's memory is made: sealable (we seal it), or not (the guard covers it).
KINDS = ("sealable_memfd", "unsealable_memfd", "tmpfs_file", "disk_file")
SEALED = {"sealable_memfd"}


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class TruncatableArea:
    """`client.area.SharedArea`'s interface over memory of `kind`, which the peer may truncate."""

    def __init__(self, kind: str, size: int, tmp: Path | str, name: str = "truncating") -> None:
        assert size % PAGE == 0
        self.kind, self.size = kind, size
        if kind == "sealable_memfd":
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        elif kind == "unsealable_memfd":
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:
            directory = "/dev/shm" if kind == "tmpfs_file" else str(tmp)
            self.fd, path = tempfile.mkstemp(prefix="truncating-", dir=directory)
            os.unlink(path)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.uva = address_of(self.view)

    def region(self) -> tuple[int, int, int, int]:
        return (0, self.size, self.uva, 0)

    def seals(self) -> int:
        try:
            return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        except OSError:
            return 0

    def truncate(self, size: int) -> int:
        """Shrink the file to `size`: 0, or the errno it failed with."""
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            return exc.errno
        return 0

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)


# --------------------------------------------------------------------------------------
# 1. In this process: the seal, the guard, and what is refused without it
# --------------------------------------------------------------------------------------

UVA = 0x7F00_0000_0000
UNIT = 4 * PAGE


def _table(area: TruncatableArea) -> MemoryTable:
    return MemoryTable.map([(0, area.size, UVA, 0)], [area.fd])


@pytest.fixture
def guard():
    try:
        sigbus.load()
    except sigbus.GuardUnavailable as exc:
        pytest.skip(f"the SIGBUS guard cannot be built here: {exc}")
    return sigbus


@pytest.mark.parametrize("kind", sorted(set(KINDS) - SEALED))
def test_guard_repairs_memory_truncated_under_us(guard, tmp_path: Path, kind: str) -> None:
    registered = guard.registrations()
    _truncate_under_a_table(guard, TruncatableArea(kind, UNIT, tmp_path))
    gc.collect()
    assert guard.registrations() == registered  # forgotten when unmapped


def _truncate_under_a_table(guard, area: TruncatableArea) -> None:
    registered = guard.registrations()
    table = _table(area)
    try:
        assert guard.registrations() == registered + 1
        table.gpa(0, UNIT)[:] = b"\xab" * UNIT
        assert not table.damaged()
        before = guard.total_faults()
        assert area.truncate(PAGE) == 0
        # read by CPython's memcpy, by struct, and written: each access faults once and goes on
        assert bytes(table.gpa(2 * PAGE, 16)) == bytes(16)
        assert struct.unpack_from("<Q", table.gpa(3 * PAGE + 8, 8)) == (0,)
        table.gpa(3 * PAGE, 4)[:] = b"mine"
        assert bytes(table.gpa(3 * PAGE, 4)) == b"mine"  # a private page now: the peer sees nothing
        assert guard.total_faults() == before + 2
        assert guard.last_fault_address() == address_of(table.gpa(3 * PAGE + 8, 1))
        assert bytes(table.gpa(0, 4)) == b"\xab" * 4  # what the file still holds is still shared
        table.gpa(0, 4)[:] = b"live"
        assert os.pread(area.fd, 4, 0) == b"live"
        assert table.damaged()
        queue = DeviceQueue(table, 16, table.gpa(0, 256), table.gpa(256, 64), table.gpa(512, 256),
                            event_idx=True)
        try:
            queue.pending()
        except QueueError as exc:
            assert str(exc) == "guest memory was truncated under us"
        else:
            raise AssertionError("a queue over damaged memory carried on")
    finally:
        table.release()
        area.close()


def test_guard_repairs_faults_in_c_and_in_threads(guard, tmp_path: Path) -> None:
    area = TruncatableArea("unsealable_memfd", UNIT, tmp_path)
    table = _table(area)
    try:
        area.truncate(0)
        ctypes.memmove(address_of(table.gpa(PAGE, 8)), b"from C..", 8)  # libc's memmove
        assert bytes(table.gpa(PAGE, 8)) == b"from C.."
        seen: list[bytes] = []
        worker = threading.Thread(target=lambda: seen.append(bytes(table.gpa(2 * PAGE, 4))))
        worker.start()
        worker.join()
        assert seen == [bytes(4)] and table.damaged()
    finally:
        table.release()
        area.close()


def test_sealable_memfd_is_sealed_and_needs_no_guard(tmp_path: Path) -> None:
    area = TruncatableArea("sealable_memfd", UNIT, tmp_path)
    registered = sigbus.registrations()
    table = _table(area)
    try:
        assert area.seals() & fcntl.F_SEAL_SHRINK and not area.seals() & fcntl.F_SEAL_GROW
        assert area.truncate(PAGE) == errno.EPERM
        assert sigbus.registrations() == registered
        table.gpa(3 * PAGE, 4)[:] = b"kept"
        assert os.pread(area.fd, 4, 3 * PAGE) == b"kept" and not table.damaged()
    finally:
        table.release()
        area.close()


def test_memfd_sealed_by_its_maker_is_taken_as_it_is(tmp_path: Path) -> None:
    """QEMU's memory-backend-memfd (seal=on) seals grow, shrink and further sealing."""
    area = TruncatableArea("sealable_memfd", UNIT, tmp_path)
    fcntl.fcntl(area.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    registered = sigbus.registrations()
    table = _table(area)
    assert sigbus.registrations() == registered and not table.damaged()
    table.release()
    area.close()


def test_client_memory_is_sealed_by_the_client() -> None:
    area = SharedArea(UNIT)
    try:
        assert fcntl.fcntl(area.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(area.fd, 0)
    finally:
        area.close()


def test_without_the_guard_unsealable_memory_is_refused(monkeypatch, tmp_path: Path) -> None:
    never = native_build.Once(sigbus._load)
    never.failed = sigbus.GuardUnavailable("build failed: gcc: not found")
    monkeypatch.setattr(sigbus, "_guard", never)
    with contextlib.ExitStack() as stack:
        for kind in KINDS:
            area = TruncatableArea(kind, UNIT, tmp_path)
            stack.callback(area.close)
            if kind in SEALED:
                _table(area).release()
                continue
            with pytest.raises(ValueError) as refused:
                _table(area)
            reason = str(refused.value)
            assert "could be truncated under us" in reason and "\n" not in reason
            assert reason.endswith("the SIGBUS guard is unavailable: build failed: gcc: not found")
            backend = Backend(NetSession(b"\x02\0\0\0\0\x01", 1500))
            payload = MEM_HEADER.pack(1, 0) + MEM_REGION.pack(0, UNIT, UVA, 0)
            with pytest.raises(ProtocolError, match="SIGBUS guard is unavailable"):
                backend.handle(Message(Req.SET_MEM_TABLE, payload=payload, fds=[os.dup(area.fd)]))
            assert backend.memory is None


def test_guard_holds_while_mappings_come_and_go(guard, tmp_path: Path) -> None:
    """Threads map, truncate, touch and drop guest memory at once: every fault is repaired
    and charged to its own table, and no registration outlives its mapping."""
    registered = guard.registrations()
    failures: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            for i in range(40):
                area = TruncatableArea("unsealable_memfd" if (seed + i) % 2 else "tmpfs_file", UNIT, tmp_path)
                other = TruncatableArea("unsealable_memfd", UNIT, tmp_path)
                table, intact = _table(area), _table(other)
                area.truncate(PAGE * (i % 4))
                assert bytes(table.gpa(3 * PAGE, 2)) == bytes(2)
                assert bytes(intact.gpa(3 * PAGE, 2)) == bytes(2)
                assert table.damaged() and not intact.damaged()
                for done in (table, intact, area, other):
                    done.release() if isinstance(done, MemoryTable) else done.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    gc.collect()
    assert guard.registrations() == registered


def _free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("sealable", [False, True])
def test_guard_covers_hugetlbfs_memory(guard, sealable: bool) -> None:
    """A hugetlbfs memfd is guarded even when sealed (a punched hole faults when the pool is
    empty); a truncated one is repaired a whole huge page at a time."""
    need(_free_huge_pages() >= 4, "fewer than 4 free huge pages (/proc/sys/vm/nr_hugepages)")
    huge = 2 << 20
    fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | (os.MFD_ALLOW_SEALING if sealable else 0))
    try:
        os.ftruncate(fd, 4 * huge)
        registered = guard.registrations()
        table = MemoryTable.map([(0, 4 * huge, UVA, 0)], [fd])
        assert guard.registrations() == registered + 1
        table.gpa(0, 4 * huge)[:] = b"\x01" * (4 * huge)
        if sealable:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, huge)
            assert not table.damaged()
        else:
            os.ftruncate(fd, huge)
            before = guard.total_faults()
            assert bytes(table.gpa(2 * huge + 5, 3)) == bytes(3)
            assert bytes(table.gpa(3 * huge - 1, 1)) == bytes(1)  # the same huge page: no second fault
            assert bytes(table.gpa(huge - 3, 3)) == b"\x01" * 3
            assert guard.total_faults() == before + 1 and table.damaged()
        table.release()
    finally:
        os.close(fd)


NO_COMPILER = """
import logging, os
from alacrity.vhost_user import sigbus
from alacrity.vhost_user.memory import MemoryTable
logging.basicConfig(level=logging.INFO, format="%(message)s")
assert not sigbus.install()
sealable = os.memfd_create("ok", os.MFD_ALLOW_SEALING)
unsealable = os.memfd_create("refused")
for fd in (sealable, unsealable):
    os.ftruncate(fd, 65536)
MemoryTable.map([(0, 65536, 0x7F0000000000, 0)], [sealable]).release()
try:
    MemoryTable.map([(0, 65536, 0x7F0000000000, 0)], [unsealable])
except ValueError as exc:
    print("refused:", exc)
"""


def test_without_a_compiler_the_guard_says_why_once_and_memory_is_refused(tmp_path: Path) -> None:
    """A real failed build (CC is /bin/false, an empty cache): one logged line at install,
    and unsealable memory refused with the reason; sealable memory is still taken."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CC": "/bin/false"}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "SIGBUS guard unavailable" in line]
    assert len(warnings) == 1 and "build failed: " in warnings[0], done.stderr
    (refused,) = done.stdout.splitlines()
    assert refused.startswith("refused: region at 0x0: its memory could be truncated under us")
    assert "the SIGBUS guard is unavailable: build failed: " in refused


CHILD = """
import faulthandler, mmap, os, sys, tempfile
from alacrity.vhost_user import sigbus
if sys.argv[1] == "faulthandler":
    faulthandler.enable()
assert sigbus.install()
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 7)
fd, path = tempfile.mkstemp(dir="/dev/shm")
os.unlink(path)
os.ftruncate(fd, 8192)
m = mmap.mmap(fd, 8192)  # not guest memory: not registered
os.ftruncate(fd, 0)
print("survived", m[4096], flush=True)
"""


@pytest.mark.parametrize("how", ["fault", "faulthandler", "kill"])
def test_other_sigbus_still_kill(guard, how: str) -> None:
    """A SIGBUS outside guest memory is a real bug (or a real signal): it goes to the handler
    the guard replaced (faulthandler's traceback), else to the default action."""
    done = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGBUS, done
    assert "survived" not in done.stdout
    if how == "faulthandler":
        assert "Fatal Python error: Bus error" in done.stderr


# --------------------------------------------------------------------------------------
# 2. blk in alacrityd: the peer truncates the page that holds its next request
# --------------------------------------------------------------------------------------

AREA = 4 * PAGE  # rings in the first pages, requests in the last one
REQUEST = AREA - PAGE  # header at +0, status at +16, 512 bytes of data at +512


def _closed(sock: socket.socket) -> bool:
    """Has the backend closed the connection? (It sends nothing unasked.)"""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def _wait(queue: DriverQueue, sock: socket.socket, timeout: float = 5.0) -> tuple[bool, bool]:
    """(completed, closed): wait for the request's completion or the connection's end."""
    deadline = time.monotonic() + timeout
    completed = False
    while time.monotonic() < deadline:
        completed = completed or bool(queue.completed())
        if _closed(sock):
            return completed, True
        if completed:
            return True, False
        time.sleep(0.002)
    return completed, False


def truncate_blk(path: str, kind: str, tmp: Path) -> dict:
    """Connect to blk at `path` with memory of `kind`, read a sector honestly, then shrink the
    file under the request page and submit the same read: what became of it?"""
    with contextlib.ExitStack() as stack:
        area = TruncatableArea(kind, AREA, tmp, "blk-truncating")
        stack.callback(area.close)
        fds = {"mem": area.fd}
        for role in ("kick", "call", "err"):
            fds[role] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            stack.callback(os.close, fds[role])
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.settimeout(10)
        sock.connect(path)
        set_up_ring(Frontend(sock), area, fds)
        queue = DriverQueue(area.view, RingLayout.at(0, RING_SIZE), event_idx=True)
        chain = [(REQUEST, 16, False), (REQUEST + 512, 512, True), (REQUEST + 16, 1, True)]

        def submit(token: int) -> None:
            queue.add(chain, token)
            queue.publish()
            os.eventfd_write(fds["kick"], 1)

        vb.REQUEST_HEADER.pack_into(area.view, REQUEST, vb.T_IN, 0, 0)
        area.view[REQUEST + 16] = 0xFF
        submit(1)
        honest, _ = _wait(queue, sock)
        status = area.view[REQUEST + 16]
        failed = area.truncate(REQUEST)  # the request page is gone, unless sealed
        submit(2)  # we must not touch that page again: only the rings
        completed, closed = _wait(queue, sock)
        if not closed and not failed:
            closed = _wait(queue, sock, 2.0)[1]
        return {"honest": [honest, status], "seals": area.seals(), "truncate_errno": failed,
                "completed": completed, "closed": closed}


def _peer_main(device: str, tmp: str) -> int:
    """Commands, one per line: `truncate KIND` (answers truncate_blk's dict), `io`, `quit`."""
    from alacrity import client

    path = client.connect().device(device).socket
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "truncate":
            print(json.dumps(truncate_blk(path, words[1], Path(tmp))), flush=True)
        else:
            print(json.dumps(_blk_io(device)), flush=True)
    return 0


class BlkRig:
    """alacrityd with two disks on two buses: an attacker on one, a neighbour on the other."""

    def __init__(self, daemon: Daemon, root: Path) -> None:
        self.daemon, self.pid = daemon, daemon.proc.pid
        daemon.make_disk("d0", "b1", root / "d0.img", size="4M")
        daemon.make_disk("d1", "b2", root / "d1.img", size="4M")
        self.attacker = Peer(daemon, "b1", "d0", root, module="tests.test_memory_truncation")
        self.member = Peer(daemon, "b2", "d1", root, module="tests.test_memory_truncation")

    def wait_logged(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.daemon.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"alacrityd did not log {text!r}"
            time.sleep(0.05)

    def close(self) -> None:
        for peer in ("attacker", "member"):
            if hasattr(self, peer):
                getattr(self, peer).close()


@pytest.fixture(scope="module")
def blk_rig(tmp_path_factory) -> Iterator[BlkRig]:
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root (FUSE allow_other, membership as root)")
    root = tmp_path_factory.mktemp("alacrityd")
    daemon = Daemon(root)
    daemon.start()
    rig = BlkRig.__new__(BlkRig)
    try:
        rig.__init__(daemon, root)
        yield rig
    finally:
        rig.close()
        daemon.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_blk_survives_a_peer_that_truncates_its_memory(blk_rig: BlkRig, kind: str) -> None:
    result = blk_rig.attacker.ask(f"truncate {kind}")
    assert blk_rig.daemon.proc.poll() is None, (
        f"alacrityd died ({blk_rig.daemon.proc.returncode}): {result}\n"
        f"{blk_rig.daemon.log.read_text(errors='replace')[-2000:]}")
    assert result["honest"] == [True, vb.S_OK], result
    if kind in SEALED:
        assert result["seals"] & fcntl.F_SEAL_SHRINK, "alacrityd did not seal the memfd"
        assert result["truncate_errno"] == errno.EPERM
        assert result["completed"] and not result["closed"], result
    else:
        assert result["truncate_errno"] == 0
        assert result["closed"], f"the connection outlived its truncated memory: {result}"
        blk_rig.wait_logged("guest memory was truncated under us")
    assert blk_rig.daemon.proc.pid == blk_rig.pid
    io = blk_rig.member.ask("io")
    assert io["ok"], io
    assert io["s"] < 2.0, f"a neighbour's open and I/O took {io['s']:.2f} s after the attack"
    assert blk_rig.attacker.ask("io")["ok"], "the attacker's next connection is served"


# --------------------------------------------------------------------------------------
# 3. A switch port: a real switch process, whose other ports must keep moving frames
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["native", "python"])
def switch_rig(request, monkeypatch, tmp_path: Path) -> Iterator[Rig]:
    monkeypatch.setenv(ENGINE_ENV, request.param)
    rig = Rig(tmp_path)
    rig.engine = request.param  # type: ignore[attr-defined]
    try:
        yield rig
    finally:
        rig.close()


class HandPort:
    """A switch port driven by hand over memory of `kind`: the frontend's messages, an RX ring
    stocked with buffers and a TX ring, the rings in the first pages, buffers after them
    (from `buffers`), so that truncating the file at `buffers` leaves the rings alone.
    Independent of the client library: only the vhost-user frontend and the rings."""

    QUEUE = 64
    BUFFER = 2048

    def __init__(self, rig: Rig, kind: str, tmp: Path, label: str) -> None:
        self.rx_layout = RingLayout.at(0, self.QUEUE)
        self.tx_layout = RingLayout.at(self.rx_layout.end, self.QUEUE)
        self.buffers = (self.tx_layout.end + PAGE - 1) & ~(PAGE - 1)
        self.tx_base = self.buffers + self.QUEUE * self.BUFFER
        self.area = TruncatableArea(kind, self.tx_base + self.QUEUE * self.BUFFER, tmp, label)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.rx_kick, self.rx_call, self.tx_kick, self.tx_call = self.eventfds
        ours, theirs = socket.socketpair()
        self.mac = bytes.fromhex(rig.ctl.add_port(ours.fileno(), label=label)["mac"].replace(":", ""))
        ours.close()
        self.sock = theirs
        fe = self.frontend = Frontend(theirs)
        offered = fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & bit(ProtocolFeature.REPLY_ACK))
        fe.reply_ack = True
        fe.set_owner()
        fe.set_features(offered & (bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES)
                                   | bit(vn.F_MRG_RXBUF)))
        fe.set_mem_table([self.area.region()], [self.area.fd])
        self.rxq = DriverQueue(self.area.view, self.rx_layout, event_idx=True)
        self.txq = DriverQueue(self.area.view, self.tx_layout, event_idx=True)
        uva = self.area.uva
        for index, lay, kick, call in ((RX, self.rx_layout, self.rx_kick, self.rx_call),
                                       (TX, self.tx_layout, self.tx_kick, self.tx_call)):
            fe.set_vring_num(index, self.QUEUE)
            fe.set_vring_base(index, 0)
            fe.set_vring_addr(index, uva + lay.desc, uva + lay.used, uva + lay.avail)
            fe.set_vring_fd(Req.SET_VRING_KICK, index, kick)
            fe.set_vring_fd(Req.SET_VRING_CALL, index, call)
        for slot in range(self.QUEUE):
            self.rxq.add([(self.buffers + slot * self.BUFFER, self.BUFFER, True)], slot)
        self.rxq.publish()
        for index in (RX, TX):
            fe.set_vring_enable(index, True)
        self.tx_slots = list(range(self.QUEUE))

    def send(self, data: bytes | None, length: int = 60) -> None:
        """Queue a frame (written first, unless `data` is None: the slot may be gone) and kick."""
        slot = self.tx_slots.pop()
        base = self.tx_base + slot * self.BUFFER
        if data is not None:
            self.area.view[base : base + vn.HEADER_SIZE + len(data)] = bytes(vn.HEADER_SIZE) + data
            length = len(data)
        self.txq.add([(base, vn.HEADER_SIZE + length, False)], slot)
        self.txq.publish()
        os.eventfd_write(self.tx_kick, 1)

    def close(self) -> None:
        self.sock.close()
        for fd in self.eventfds:
            os.close(fd)
        self.area.close()


def _labels(rig: Rig) -> set[str]:
    return {p["label"] for p in rig.ctl.stats(timeout=2)["ports"]}


@pytest.mark.parametrize("direction", ["rx", "tx"])
@pytest.mark.parametrize("kind", KINDS)
def test_switch_survives_a_port_that_truncates_its_memory(switch_rig: Rig, tmp_path: Path, kind: str,
                                                          direction: str) -> None:
    """The port keeps its rings and drops the pages of its buffers; then the switch writes a
    frame into one of its RX buffers (a broadcast from a neighbour), or reads one from its
    TX ring (a frame the port queues with the ring alone)."""
    rig = switch_rig
    a, b = neighbours(rig)
    pid = rig.proc.pid
    port = HandPort(rig, kind, tmp_path, "truncating")
    try:
        failed = port.area.truncate(port.buffers)
        if kind in SEALED:
            assert port.area.seals() & fcntl.F_SEAL_SHRINK and failed == errno.EPERM
        else:
            assert failed == 0
        if direction == "rx":
            a.send(frame(BROADCAST, a.mac, b"to everyone"))
            assert b.recv(timeout=1) == frame(BROADCAST, a.mac, b"to everyone")
        else:
            port.send(None)  # we must not touch the vanished slot: only the ring
        time.sleep(0.2)
        assert rig.proc.poll() is None, f"the switch died ({rig.proc.returncode}):\n{rig.log.read_text()}"
        drain(a)
        drain(b)  # a TX frame of zeros may have been flooded to them
        assert_neighbours_move(a, b)
        if kind in SEALED:
            assert "truncating" in _labels(rig)
            port.send(frame(a.mac, port.mac, b"intact"))
            assert a.recv(timeout=1) == frame(a.mac, port.mac, b"intact")
        else:
            rig.wait_for(lambda: "truncating" not in _labels(rig), timeout=5)
            removed = rig.ctl.stats(timeout=2)["removed"]
            assert removed[-1]["label"] == "truncating"
            assert "guest memory was truncated under us" in removed[-1]["reason"]
            assert _closed(port.sock)
        assert rig.proc.pid == pid and rig.proc.poll() is None
        assert_neighbours_move(a, b)
        assert rig.ctl.stats(timeout=2)["stats"]["engine"] == rig.engine
    finally:
        port.close()


def test_a_port_that_flips_its_avail_index_never_kills_the_switch(tmp_path: Path) -> None:
    """Before it sleeps, the switch asks each TX ring for a kick and reads its avail index
    once more (DeviceQueue.enable_notify): a QueueError there (an index jump, or memory
    truncated under us) used to escape the switch's loop and end the process. A port that
    flips its index between sane and absurd hits that window now and then (else the engine
    breaks its port first): ports flip and kick, one after the other, for a few seconds."""
    rig = Rig(tmp_path)
    try:
        a, b = neighbours(rig)
        broken = 0
        deadline = time.monotonic() + 4
        with contextlib.suppress(OSError):  # the control socket of a dead switch: reported below
            while time.monotonic() < deadline and rig.proc.poll() is None:
                port = HandPort(rig, "sealable_memfd", tmp_path, "flipper")
                avail = port.txq.avail_ring
                while time.monotonic() < deadline and not _closed(port.sock):
                    for _ in range(1000):
                        avail.idx = 0x8000
                        avail.idx = 0
                    os.eventfd_write(port.tx_kick, 1)  # wake the switch: it polls, then re-arms
                port.close()
                if rig.proc.poll() is None and time.monotonic() < deadline:
                    broken += 1
                    removed = rig.ctl.stats(timeout=2)["removed"]
                    assert removed[-1]["label"] == "flipper" and "avail index jumped" in removed[-1]["reason"]
        time.sleep(0.1)
        assert rig.proc.poll() is None, f"the switch died:\n{rig.log.read_text()[-2000:]}"
        assert broken >= 1
        assert_neighbours_move(a, b)
    finally:
        rig.close()

if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1], sys.argv[2]))
