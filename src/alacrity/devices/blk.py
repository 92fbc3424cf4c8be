"""virtio-blk over a raw image file.

The device may touch: its image file, the buffers of the chains it is given
(already bounds-checked views), and its own counters. Every sector range from
the guest is checked against the capacity before the file is touched.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from typing import Any

from alacrity.devices import image
from alacrity.devices.base import (
    Attribute,
    Device,
    Slot,
    chardev_socket,
    holder,
    parse_bool,
    parse_size,
    parse_text,
    qemu_device,
)
from alacrity.errors import AdminError, busy, invalid
from alacrity.vhost_user.messages import ProtocolError
from alacrity.vhost_user.session import Session
from alacrity.virtio import blk as vb
from alacrity.virtio.device_queue import Chain, DeviceQueue
from alacrity.virtio.features import bit
from alacrity.virtio.ring import QueueError

log = logging.getLogger("alacrity.devices.blk")

# Segments per request: a guest without indirect descriptors must fit a request in
# QEMU's default 128-entry ring, with the header and the status.
SEG_MAX = 126
IOV_MAX = 1024
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _parse_path(text: str) -> str:
    path = parse_text(4096)(text)
    problem = path and image.path_problem(path)
    if problem:
        raise ValueError(f"{path!r} {problem}")
    return path


def split(views: list[memoryview], nbytes: int) -> tuple[list[memoryview], list[memoryview]]:
    """Cut a buffer list after `nbytes`: (the first nbytes, the rest)."""
    head: list[memoryview] = []
    for i, view in enumerate(views):
        if nbytes <= 0:
            return head, views[i:]
        if len(view) <= nbytes:
            head.append(view)
            nbytes -= len(view)
        else:
            head.append(view[:nbytes])
            return head, [view[nbytes:], *views[i + 1 :]]
    return head, []


def _transfer(op: Any, fd: int, views: list[memoryview], offset: int) -> int:
    """preadv/pwritev the whole buffer list, resuming after short transfers."""
    total = 0
    views = [v for v in views if len(v)]
    while views:
        batch = views[:IOV_MAX]
        done = op(fd, batch, offset)
        if done <= 0:
            raise OSError(errno.EIO, "short transfer at end of image")
        total += done
        offset += done
        _, views = split(views, done)
    return total


class BlkDevice(Device):
    class_name = "blk"
    summary = "virtio-blk disk backed by a raw image file (created sparse at `size` if absent)"
    attributes = (
        Attribute("path", _parse_path, "", "absolute path of the raw image file"),
        Attribute("size", parse_size, "1G", "size used when the image is created (K/M/G/T)"),
        Attribute("readonly", parse_bool, "0", "1: the guest's writes fail with IOERR"),
        Attribute("shared", parse_bool, "0", "1: several clients may write at once"),
        Attribute("serial", parse_text(20), "", "ID string returned by GET_ID (default: name)"),
    )
    virtio_id = 2
    client_driver = "alacrity.client.blk:BlkClient"

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        return [*chardev_socket(slot.id, slot.socket),
                *qemu_device("vhost-user-blk", slot.transport, chardev=slot.id, num_queues=1)]

    def __init__(self, name: str) -> None:
        super().__init__(name)
        for counter in ("reads", "writes", "flushes", "discards", "bytes_read", "bytes_written"):
            self.counters[counter] = 0
        self.counters["io_errors"] = 0
        self.sessions: set[BlkSession] = set()

    def precheck(self, name: str, text: str) -> None:
        if name not in ("path", "size"):
            return
        value = self.parse(name, text)
        # The size matters only for an image still to be created, at the path.
        path = value if name == "path" else self.values["path"]
        size = value if name == "size" else self.values["size"]
        if path and size > 0:
            image.inspect(path, size)

    def check(self, name: str, value: Any) -> None:
        if name == "size" and value <= 0:
            raise invalid(f"{self.name}/size must be positive")

    def refusal(self, peer_pid: int, peer_uid: int | None = None) -> str | None:
        with self.lock:
            return self._refusal(peer_pid, peer_uid)

    def _one_writer(self) -> bool:
        return not self.values["readonly"] and not self.values["shared"]

    def _refusal(self, peer_pid: int, peer_uid: int | None) -> str | None:
        if not self.values["path"]:
            return f"disk {self.name} has no path: echo /path/to/disk.img > devices/{self.name}/path"
        if self._one_writer():
            others = [s for s in self.sessions if s.peer_pid != peer_pid]
            if others and not self._moving_in(others, peer_uid):
                return (f"disk {self.name} is in use by {holder(others[0].peer_pid)}: give each VM its own "
                        f"disk on its own bus, or set devices/{self.name}/shared to 1")
        return None

    def _moving_in(self, others: list[BlkSession], peer_uid: int | None) -> bool:
        """Is the peer the holder's VM moving (a migration's destination QEMU)? Each jailed
        QEMU runs as a uid of its own, and a VM's destination runs as its source's: so one
        more connection from the holder's uid, if not root, is the VM and not another."""
        return (len(self.sessions) == 1 and peer_uid is not None and peer_uid != 0
                and others[0].peer_uid == peer_uid)

    def open(self, peer_pid: int, peer_uid: int | None = None) -> Session:
        with self.lock:
            why = self._refusal(peer_pid, peer_uid)
            if why is not None:
                raise (invalid if not self.values["path"] else busy)(why)
            writable = not self.values["readonly"]
            session = BlkSession(self, self._open_image(writable), peer_pid, peer_uid)
            self.sessions.add(session)
            self.counters["connections"] = len(self.sessions)
        return session

    def ring_started(self, session: BlkSession, index: int) -> None:
        """One writer at a time: a VM moving in starts its rings only once its source has
        stopped all of theirs (GET_VRING_BASE), and the source restarts them (a failed
        migration) only while the destination's are stopped. ProtocolError breaks the
        connection that tried."""
        with self.lock:
            # A process's own connections never competed (as at open): only another's rings count.
            rival = next((s for s in self.sessions if s.running and s.peer_pid != session.peer_pid), None)
            if rival is None or not self._one_writer():
                session.running.add(index)
                return
        raise ProtocolError(f"disk {self.name}: ring {index} started while {holder(rival.peer_pid)} runs "
                            "its rings; a VM moving in may start its rings only once its source has "
                            "stopped them")

    def ring_stopped(self, session: BlkSession, index: int) -> None:
        with self.lock:
            session.running.discard(index)

    def _open_image(self, writable: bool) -> int:
        try:
            return image.open_image(self.values["path"], self.values["size"], writable)
        except AdminError as exc:
            raise AdminError(exc.errno, f"{self.name}: {exc.message}") from None

    def release(self, session: Session) -> None:
        with self.lock:
            self.sessions.discard(session)  # type: ignore[arg-type]
            self.counters["connections"] = len(self.sessions)


class BlkSession(Session):
    num_queues = 1
    max_queue_size = 1024

    def __init__(self, device: BlkDevice, fd: int, peer_pid: int, peer_uid: int | None) -> None:
        self.device = device
        self.fd = fd
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.running: set[int] = set()  # rings started and not stopped: under the device's lock
        self.readonly = device.values["readonly"]
        self.serial = (device.values["serial"] or device.name).encode()[: vb.ID_BYTES]
        self.capacity = os.fstat(fd).st_size // vb.SECTOR
        self.device_features = (
            bit(vb.F_SEG_MAX)
            | bit(vb.F_BLK_SIZE)
            | bit(vb.F_FLUSH)
            | (bit(vb.F_RO) if self.readonly else bit(vb.F_DISCARD) | bit(vb.F_WRITE_ZEROES))
        )
        self.closed = threading.Event()

    def __hash__(self) -> int:
        return id(self)

    # -- control: set_features needs nothing; set_config (the writeback byte) is not offered.
    def get_config(self, offset: int, size: int) -> bytes:
        return self._config()[offset : offset + size]

    def _config(self) -> bytes:
        limit = 1 << 22  # sectors per discard / write-zeroes request (2 GiB)
        return vb.CONFIG.pack(
            self.capacity,
            0,
            SEG_MAX,
            0,
            0,
            0,
            vb.SECTOR,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            limit,
            1,
            8,
            limit,
            1,
            0,
        )

    # -- rings
    def start(self, index: int, queue: DeviceQueue) -> None:
        self.device.ring_started(self, index)

    def stop(self, index: int) -> None:
        self.device.ring_stopped(self, index)

    def process(self, index: int, queue: DeviceQueue) -> int:
        done = 0
        while done < queue.size:
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain.head, self._execute(chain))
            done += 1
        return done

    def _execute(self, chain: Chain) -> int:
        """Run one request; returns the used length: all of the chain's writable bytes, up to
        the status byte at its end (as QEMU's virtio-blk reports it), so that the dirty log
        marks every byte we may have written, a short read's included."""
        header, data_out = split(chain.readable, vb.REQUEST_HEADER.size)
        raw = b"".join(bytes(v) for v in header)
        if len(raw) < vb.REQUEST_HEADER.size:
            raise QueueError("virtio-blk request header shorter than 16 bytes")
        if not chain.writable or not len(chain.writable[-1]):
            raise QueueError("virtio-blk request without a status byte")
        kind, _, sector = vb.REQUEST_HEADER.unpack(raw)
        data_in, _status = split(chain.writable, chain.writable_len() - 1)
        try:
            status = self._dispatch(kind, sector, data_out, data_in)
        except OSError as exc:
            log.warning("%s: I/O error: %s", self.device.name, exc)
            self.device.count("io_errors")
            status = vb.S_IOERR
        chain.writable[-1][-1] = status  # the status is the chain's last byte
        return chain.writable_len()

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % vb.SECTOR == 0 and sector + nbytes // vb.SECTOR <= self.capacity

    def _dispatch(
        self, kind: int, sector: int, data_out: list[memoryview], data_in: list[memoryview]
    ) -> int:
        """The request's status."""
        device = self.device
        if kind == vb.T_IN:
            nbytes = sum(len(v) for v in data_in)
            if not self._range_ok(sector, nbytes):
                return vb.S_IOERR
            _transfer(os.preadv, self.fd, data_in, sector * vb.SECTOR)
            device.count("reads")
            device.count("bytes_read", nbytes)
            return vb.S_OK
        if kind == vb.T_OUT:
            nbytes = sum(len(v) for v in data_out)
            if self.readonly or not self._range_ok(sector, nbytes):
                return vb.S_IOERR
            _transfer(os.pwritev, self.fd, data_out, sector * vb.SECTOR)
            device.count("writes")
            device.count("bytes_written", nbytes)
            return vb.S_OK
        if kind == vb.T_FLUSH:
            if not self.readonly:
                os.fdatasync(self.fd)
            device.count("flushes")
            return vb.S_OK
        if kind == vb.T_GET_ID:
            ident = self.serial.ljust(vb.ID_BYTES, b"\0")
            written = 0
            for view in data_in:
                chunk = ident[written : written + len(view)]
                view[: len(chunk)] = chunk
                written += len(chunk)
            return vb.S_OK
        if kind in (vb.T_DISCARD, vb.T_WRITE_ZEROES):
            return self._zero(kind, b"".join(bytes(v) for v in data_out))
        return vb.S_UNSUPP

    def _zero(self, kind: int, segments: bytes) -> int:
        if self.readonly or not segments or len(segments) % vb.SEGMENT.size:
            return vb.S_IOERR
        for offset in range(0, len(segments), vb.SEGMENT.size):
            sector, count, _flags = vb.SEGMENT.unpack_from(segments, offset)
            if not self._range_ok(sector, count * vb.SECTOR):
                return vb.S_IOERR
            mode = _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE if kind == vb.T_DISCARD else _FALLOC_ZERO_RANGE
            _fallocate(self.fd, mode, sector * vb.SECTOR, count * vb.SECTOR)
        self.device.count("discards")
        return vb.S_OK

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            os.close(self.fd)
            self.device.release(self)
