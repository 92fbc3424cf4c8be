"""The vhost-user backend protocol for one connection, as a state machine.

Bytes and fds in, replies and actions out: an edge (a daemon connection, or a switch
port) feeds what it received to `Backend.feed`, and passes each whole message to
`Backend.step`, which validates it, updates the state and returns the reply bytes (or
None) and the ring starts and stops for the edge, which owns the threads and sockets.
Device behaviour comes from the `Session` (session.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from alacrity.vhost_user.dirty_log import DirtyLog
from alacrity.vhost_user.memory import MemoryTable
from alacrity.vhost_user.messages import (
    CONFIG_HEADER,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    LOG,
    MAX_REGIONS,
    MEM_HEADER,
    MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    Framer,
    Message,
    ProtocolError,
    ProtocolFeature,
    Req,
    encode,
    unpack_exact,
)
from alacrity.vhost_user.session import Session
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, RING_F_INDIRECT_DESC, bit, has
from alacrity.virtio.ring import (
    QueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    valid_size,
)

log = logging.getLogger("alacrity.vhost_user")

# Dirty logging (LOG_ALL, LOG_SHMFD) for every session: devices write guest memory only
# through their DeviceQueue or a switch engine, and both log.
TRANSPORT_FEATURES = (
    bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(RING_F_INDIRECT_DESC) | bit(F_PROTOCOL_FEATURES)
    | bit(F_LOG_ALL)
)
PROTOCOL_FEATURES = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
                     | bit(ProtocolFeature.LOG_SHMFD))
MAX_CONFIG = 256

#: What /proc/self/fd shows for an eventfd. fstat cannot tell one from a timerfd, signalfd or
#: epoll fd: they all share the one anonymous inode.
EVENTFD = "anon_inode:[eventfd]"


def fd_kind(fd: int) -> str:
    """What `fd` is, as the kernel names it: "anon_inode:[eventfd]", "pipe:[1234]", "/dev/zero"..."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"an fd that cannot be named ({exc.strerror})"


def _semaphore_mode(fd: int) -> bool:
    """Is eventfd `fd` in EFD_SEMAPHORE mode? (Older kernels do not show it: then we cannot tell.)"""
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key == "eventfd-semaphore":
                return value.strip() == "1"
    return False


def eventfd_problem(fd: int) -> str | None:
    """Why `fd`, from a peer, cannot be a ring's kick, call or err fd; None if it can.

    Anything but a plain eventfd could stall or spin whoever services the ring: a pipe fills
    up and blocks its writer, /dev/zero is always readable, and a semaphore eventfd gives
    one kick per read, so reading never drains it."""
    kind = fd_kind(fd)
    if kind != EVENTFD:
        return f"{kind}, not an eventfd"
    if _semaphore_mode(fd):
        return "an eventfd in semaphore mode, which a read never drains"
    return None


@dataclass
class Vring:
    index: int
    num: int = 0
    addrs: tuple[int, int, int] | None = None  # desc, used, avail (user addresses)
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    queue: DeviceQueue | None = None
    log_used: int | None = None  # where the log has its used ring (VRING_F_LOG); None: not logged


@dataclass
class Action:
    """Work for the edge: "start" or "stop" ring `index`; `closing` are fds it may close
    once that ring's worker has gone."""

    kind: str
    index: int
    closing: tuple[int, ...] = ()


class Backend:
    """`eventfd_problem` judges each kick, call and err fd the peer sends (injectable for tests)."""

    def __init__(self, session: Session,
                 eventfd_problem: Callable[[int], str | None] = eventfd_problem) -> None:
        self.session = session
        self.eventfd_problem = eventfd_problem
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        self.memory: MemoryTable | None = None
        self.log: DirtyLog | None = None
        self.vrings = [Vring(i) for i in range(session.num_queues)]
        self.actions: list[Action] = []
        self.framer = Framer()

    # -- the receive step, shared by every edge
    def feed(self, data: bytes, fds: list[int]) -> list[Message]:
        """Bytes and fds as received; the whole messages they complete."""
        return self.framer.feed(data, fds)

    def step(self, msg: Message) -> tuple[bytes | None, list[Action]]:
        """Handle one message: (reply to send, actions to apply before sending it). Fds the
        message carried but did not need are closed. ProtocolError: break the connection."""
        try:
            reply = self.handle(msg)
        finally:
            for fd in msg.fds:
                os.close(fd)
            msg.fds = []
        actions, self.actions = self.actions, []
        return reply, actions

    # -- helpers
    @property
    def offered_features(self) -> int:
        return self.session.device_features | TRANSPORT_FEATURES

    @property
    def offered_protocol_features(self) -> int:
        announces = type(self.session).send_rarp is not Session.send_rarp
        return PROTOCOL_FEATURES | (bit(ProtocolFeature.RARP) if announces else 0)

    def _stopped_vring(self, index: int) -> Vring:
        """A ring whose size, addresses or base may change: not while it runs."""
        vring = self._vring(index)
        if vring.queue is not None:
            raise ProtocolError(f"ring {index} is running: stop it (GET_VRING_BASE) before changing it")
        return vring

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise ProtocolError(f"ring {index} does not exist (device has {len(self.vrings)})")
        return self.vrings[index]

    def _protocol(self, feature: ProtocolFeature) -> bool:
        return has(self.protocol_features, feature)

    def _take_eventfd(self, msg: Message, role: str) -> tuple[int, int | None]:
        """Ring index and eventfd of a KICK/CALL/ERR message (`role`: kick, call or err).

        The fd is ours from now on, and non-blocking: a peer can fill an eventfd's counter
        (write 0xfffffffffffffffe), and a blocked write must never stall whoever signals."""
        word = msg.u64()
        index = word & VRING_INDEX_MASK
        self._vring(index)  # refuse a missing ring before we own its fd
        if word & VRING_NOFD_MASK:
            if msg.fds:
                raise ProtocolError("ring fd message says 'no fd' but carries one")
            return index, None
        if len(msg.fds) != 1:
            raise ProtocolError(f"ring fd message carries {len(msg.fds)} fds, expected 1")
        problem = self.eventfd_problem(msg.fds[0])
        if problem is not None:  # the fd stays in msg.fds, for the edge to close
            raise ProtocolError(f"ring {index} {role} fd is {problem}")
        fd = msg.fds.pop()
        os.set_blocking(fd, False)
        return index, fd

    # -- the state machine
    def handle(self, msg: Message) -> bytes | None:
        try:
            request = Req(msg.request)
        except ValueError:
            request = None
        handler = _HANDLERS.get(request) if request is not None else None
        if handler is None:
            if msg.need_reply and self._protocol(ProtocolFeature.REPLY_ACK):
                log.warning("unsupported vhost-user request %s: answered failure", msg.request)
                return encode(msg.request, U64.pack(1), reply=True)
            raise ProtocolError(f"unsupported vhost-user request {msg.request}")
        reply = handler(self, msg)
        if reply is not None:
            return encode(msg.request, reply, reply=True)
        if msg.need_reply and self._protocol(ProtocolFeature.REPLY_ACK):
            return encode(msg.request, U64.pack(0), reply=True)
        return None

    def _get_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        features = msg.u64()
        if features & ~self.offered_features:
            raise ProtocolError(f"features {features & ~self.offered_features:#x} were not offered")
        self.features = features
        self.session.set_features(features)
        self._log_rings()  # logging follows LOG_ALL, while the rings run

    def _get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        unknown = features & ~self.offered_protocol_features
        if unknown:
            raise ProtocolError(f"protocol features {unknown:#x} not offered")
        self.protocol_features = features

    def _get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(len(self.vrings))

    def _set_owner(self, msg: Message) -> None:
        self.owned = True

    def _reset_owner(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop(vring)
        self.owned = False

    def _set_mem_table(self, msg: Message) -> None:
        nregions, _ = unpack_exact(MEM_HEADER, msg.payload, msg.request)
        if not 0 < nregions <= MAX_REGIONS:
            raise ProtocolError(f"memory table with {nregions} regions (1 to {MAX_REGIONS})")
        need = MEM_HEADER.size + nregions * MEM_REGION.size
        if len(msg.payload) < need:
            raise ProtocolError(f"memory table payload of {len(msg.payload)} bytes, need {need}")
        layout = [
            MEM_REGION.unpack_from(msg.payload, MEM_HEADER.size + i * MEM_REGION.size)
            for i in range(nregions)
        ]
        fds, msg.fds = msg.fds, []
        try:
            table = MemoryTable.map(layout, fds)
        except (ValueError, OSError) as exc:
            raise ProtocolError(f"bad memory table: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)  # the mappings keep the memory
        old, self.memory = self.memory, table
        # Running rings follow the new table (memory hot-plug, or a re-sent table).
        for vring in self.vrings:
            if vring.queue is not None:
                vring.queue = self._make_queue(vring, vring.queue.last_avail)
        if old is not None:
            old.release()

    def _set_log_base(self, msg: Message) -> bytes:
        if not self._protocol(ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without the LOG_SHMFD protocol feature")
        size, offset = unpack_exact(LOG, msg.payload, msg.request)
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_LOG_BASE carries {len(msg.fds)} fds, expected the log's")
        try:
            log = DirtyLog.map(msg.fds[0], size, offset)  # step() closes the fd: the mapping stays
        except (ValueError, OSError) as exc:
            raise ProtocolError(f"bad dirty log: {exc}") from None
        self.log = log  # the old one is unmapped when the last ring lets go of it
        self._log_rings()
        return b""  # with LOG_SHMFD, QEMU waits for a reply: an empty one

    def _set_vring_num(self, msg: Message) -> None:
        index, num = unpack_exact(VRING_STATE, msg.payload, msg.request)
        vring = self._stopped_vring(index)
        if not valid_size(num) or num > self.session.max_queue_size:
            raise ProtocolError(
                f"ring {index}: size {num} (power of two up to {self.session.max_queue_size})"
            )
        vring.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        index, flags, desc, used, avail, log_addr = unpack_exact(VRING_ADDR, msg.payload, msg.request)
        vring = self._vring(index)
        # QEMU sends the addresses again, with VRING_F_LOG set or cleared, to running rings
        # when logging starts and stops: only that may change while a ring runs.
        if vring.queue is not None and (desc, used, avail) != vring.addrs:
            raise ProtocolError(f"ring {index} is running: stop it (GET_VRING_BASE) before moving it")
        if desc % 16 or used % 4 or avail % 2:
            raise ProtocolError(f"ring {index}: misaligned ring addresses")
        vring.addrs = (desc, used, avail)
        vring.log_used = log_addr if flags & VRING_F_LOG else None
        if vring.queue is not None:
            self._log_ring(vring, vring.queue)

    def _set_vring_base(self, msg: Message) -> None:
        index, num = unpack_exact(VRING_STATE, msg.payload, msg.request)
        vring = self._stopped_vring(index)
        if num > 0xFFFF:
            raise ProtocolError(f"ring {index}: base {num} beyond 16 bits")
        vring.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = unpack_exact(VRING_STATE, msg.payload, msg.request)
        vring = self._vring(index)
        base = vring.queue.last_avail if vring.queue is not None else vring.base
        self._stop(vring)
        vring.base = base
        return VRING_STATE.pack(index, base)

    def _set_vring_kick(self, msg: Message) -> None:
        index, fd = self._take_eventfd(msg, "kick")
        vring = self._vring(index)
        if fd is None:
            raise ProtocolError(f"ring {index}: polling mode (no kick fd) is not supported")
        if vring.queue is not None:
            self._stop(vring)
        if vring.kick is not None:
            self.actions.append(Action("close", index, (vring.kick,)))
        vring.kick = fd
        if not self._protocol_negotiated():
            vring.enabled = True
        self._start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        index, fd = self._take_eventfd(msg, "call")
        vring = self._vring(index)
        # The worker reads `call` at each signal, so swapping it is safe under the edge's lock.
        old, vring.call = vring.call, fd
        if old is not None:
            self.actions.append(Action("close", index, (old,)))

    def _set_vring_err(self, msg: Message) -> None:
        index, fd = self._take_eventfd(msg, "err")
        vring = self._vring(index)
        old, vring.err = vring.err, fd
        if old is not None:
            self.actions.append(Action("close", index, (old,)))

    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = unpack_exact(VRING_STATE, msg.payload, msg.request)
        vring = self._vring(index)
        vring.enabled = bool(enable)
        if vring.enabled:
            self._start(vring)
        else:
            base = vring.queue.last_avail if vring.queue is not None else vring.base
            self._stop(vring)
            vring.base = base

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = unpack_exact(CONFIG_HEADER, msg.payload, msg.request)
        if size > MAX_CONFIG or offset > MAX_CONFIG:
            raise ProtocolError(f"config read of {size} bytes at {offset}")
        data = self.session.get_config(offset, size)
        return CONFIG_HEADER.pack(offset, size, flags) + data[:size].ljust(size, b"\0")

    def _set_config(self, msg: Message) -> None:
        offset, size, _flags = unpack_exact(CONFIG_HEADER, msg.payload, msg.request)
        data = msg.payload[CONFIG_HEADER.size : CONFIG_HEADER.size + size]
        if size > MAX_CONFIG or len(data) != size:
            raise ProtocolError(f"config write of {size} bytes with {len(data)} given")
        self.session.set_config(offset, data)

    def _send_rarp(self, msg: Message) -> None:
        # QEMU's vhost_user_migration_done: the MAC in the first 6 bytes of a u64.
        if not self._protocol(ProtocolFeature.RARP):
            raise ProtocolError("SEND_RARP without the RARP protocol feature")
        if len(msg.payload) != U64.size:
            raise ProtocolError(f"SEND_RARP: payload of {len(msg.payload)} bytes, need {U64.size}")
        self.session.send_rarp(msg.payload[:6])

    # -- ring life cycle
    def _protocol_negotiated(self) -> bool:
        return has(self.features, F_PROTOCOL_FEATURES)

    def _make_queue(self, vring: Vring, last_avail: int) -> DeviceQueue:
        assert self.memory is not None and vring.addrs is not None
        desc, used, avail = vring.addrs
        num = vring.num
        try:
            queue = DeviceQueue(
                self.memory,
                num,
                self.memory.uva(desc, desc_table_size(num)),
                self.memory.uva(avail, avail_ring_size(num)),
                self.memory.uva(used, used_ring_size(num)),
                event_idx=has(self.features, RING_F_EVENT_IDX),
                indirect=has(self.features, RING_F_INDIRECT_DESC),
                last_avail=last_avail,
            )
        except QueueError as exc:
            raise ProtocolError(f"ring {vring.index}: {exc}") from None
        self._log_ring(vring, queue)
        return queue

    def _log_rings(self) -> None:
        for vring in self.vrings:
            if vring.queue is not None:
                self._log_ring(vring, vring.queue)

    def _log_ring(self, vring: Vring, queue: DeviceQueue) -> None:
        """Give `queue` (ring `vring`'s) the logging asked for now: with LOG_ALL and a log
        base, its writes to buffers, and to the used ring too with VRING_F_LOG."""
        log = self.log if has(self.features, F_LOG_ALL) else None
        try:
            queue.set_log(log, vring.log_used)
        except QueueError as exc:
            raise ProtocolError(f"ring {vring.index}: {exc}") from None

    def _start(self, vring: Vring) -> None:
        if vring.queue is not None or not vring.enabled or vring.kick is None:
            return
        if self.memory is None or vring.addrs is None or not vring.num:
            raise ProtocolError(f"ring {vring.index} started before memory, size and addresses")
        vring.queue = self._make_queue(vring, vring.base)
        self.session.start(vring.index, vring.queue)
        self.actions.append(Action("start", vring.index))

    def _stop(self, vring: Vring) -> None:
        if vring.queue is not None:
            vring.queue = None
            self.actions.append(Action("stop", vring.index))
            self.session.stop(vring.index)

    def resume_rings(self) -> None:
        """After a replay (Connection.resume): each running ring goes on from its used
        index, what the earlier daemon completed (every chain it took it also returned),
        not from the base the frontend gave when the ring started. Sessions must take their
        queue from `process`, as they all do, not keep the one `start` gave them."""
        for vring in self.vrings:
            if vring.queue is not None:
                vring.queue = self._make_queue(vring, vring.queue.used_idx)

    def close(self) -> list[int]:
        """The connection ended: every fd still held, for the edge to close."""
        fds = [fd for action in self.actions for fd in action.closing] + self.framer.fds
        self.actions, self.framer.fds = [], []
        for vring in self.vrings:
            self._stop(vring)
            fds += [fd for fd in (vring.kick, vring.call, vring.err) if fd is not None]
            vring.kick = vring.call = vring.err = None
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        self.log = None
        return fds


_HANDLERS = {
    Req.GET_FEATURES: Backend._get_features,
    Req.SET_FEATURES: Backend._set_features,
    Req.GET_PROTOCOL_FEATURES: Backend._get_protocol_features,
    Req.SET_PROTOCOL_FEATURES: Backend._set_protocol_features,
    Req.GET_QUEUE_NUM: Backend._get_queue_num,
    Req.SET_OWNER: Backend._set_owner,
    Req.RESET_OWNER: Backend._reset_owner,
    Req.SET_MEM_TABLE: Backend._set_mem_table,
    Req.SET_LOG_BASE: Backend._set_log_base,
    Req.SET_VRING_NUM: Backend._set_vring_num,
    Req.SET_VRING_ADDR: Backend._set_vring_addr,
    Req.SET_VRING_BASE: Backend._set_vring_base,
    Req.GET_VRING_BASE: Backend._get_vring_base,
    Req.SET_VRING_KICK: Backend._set_vring_kick,
    Req.SET_VRING_CALL: Backend._set_vring_call,
    Req.SET_VRING_ERR: Backend._set_vring_err,
    Req.SET_VRING_ENABLE: Backend._set_vring_enable,
    Req.GET_CONFIG: Backend._get_config,
    Req.SET_CONFIG: Backend._set_config,
    Req.SEND_RARP: Backend._send_rarp,
}
