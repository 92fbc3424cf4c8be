"""The edge of a vhost-user backend connection: the socket, and one worker thread per ring.

The protocol logic is in backend.py; here we read messages, apply the backend's
actions, and service rings: busy-poll for a short budget after work, then
re-enable notifications, re-check, and sleep on the kick eventfd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from alacrity.vhost_user.backend import Action, Backend
from alacrity.vhost_user.eventfd import drain, notify
from alacrity.vhost_user.messages import HEADER, MAX_FDS, Message, ProtocolError
from alacrity.vhost_user.session import Session
from alacrity.virtio.ring import QueueError

log = logging.getLogger("alacrity.vhost_user")

#: How long a ring worker keeps polling after its last request before it sleeps.
POLL_BUDGET_S = 50e-6


class Recorder(Protocol):
    """Where a connection that must outlive the daemon reports (vhost_user/keeper.py)."""

    def message(self, raw: bytes, fds: list[int]) -> None: ...
    def answered(self) -> None: ...
    def closed(self) -> None: ...


def signal_error(backend: Backend) -> None:
    """Tell the driver, through each ring's err eventfd, that its device broke."""
    for vring in backend.vrings:
        if vring.err is not None:
            with contextlib.suppress(OSError):
                notify(vring.err)


class Connection:
    """Serves one vhost-user connection until the peer leaves or breaks the rules."""

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        label: str,
        on_error: Callable[[str], None] = lambda reason: None,
        poll_budget_s: float = POLL_BUDGET_S,
    ) -> None:
        self.sock = sock
        self.session = session
        self.label = label
        self.on_error = on_error
        self.poll_budget_s = poll_budget_s
        self.backend = Backend(session)
        self.lock = threading.Lock()
        self.workers: dict[int, RingWorker] = {}
        self.leaving: list[RingWorker] = []  # told to stop, joined later (`_reap`)
        self.closed = threading.Event()
        self.kicks = 0
        self.calls = 0
        self.recorder: Recorder | None = None

    def resume(self, messages: list[tuple[bytes, list[int]]], answered: int) -> None:
        """Take over a connection an earlier daemon served (vhost_user/keeper.py): replay
        what the frontend sent it, go on from each ring's used index, answer the one message
        that daemon may have died before answering; then `serve()`."""
        actions: list[Action] = []
        reply = None
        for raw, fds in messages:
            for msg in self.backend.feed(raw, fds):
                with self.lock:
                    reply, more = self.backend.step(msg)
                actions += more
        with self.lock:
            self.backend.resume_rings()
        self._apply(actions)
        if answered < len(messages) and reply is not None:
            self.sock.sendall(reply)
            if self.recorder is not None:
                self.recorder.answered()

    def serve(self) -> None:
        backend = self.backend
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, backend.framer.pending(), MAX_FDS)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    log.info("%s: peer closed the connection", self.label)
                    return
                for msg in backend.feed(data, fds):
                    if self.recorder is not None:  # before step: it closes the fds
                        self.recorder.message(_raw(msg), msg.fds)
                    with self.lock:
                        reply, actions = backend.step(msg)
                    # The reply first: a ring that `step` stopped is already out of its worker's
                    # reach (it looks under the lock), and the frontend waits for this reply
                    # (GET_VRING_BASE while a VM stops for a migration) while we join the thread.
                    if reply is not None:
                        self.sock.sendall(reply)
                    self._apply(actions)
                    if self.recorder is not None:
                        self.recorder.answered()
        except ProtocolError as exc:
            self.fail(f"protocol error: {exc}")
        except OSError as exc:
            if not self.closed.is_set():
                log.info("%s: connection lost: %s", self.label, exc)
        finally:
            self.close()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if action.kind == "start":
                self._stop_worker(action.index)
                self._reap()
                worker = RingWorker(self, action.index)
                self.workers[action.index] = worker
                worker.start()
            elif action.kind == "stop":
                self._stop_worker(action.index)
            for fd in action.closing:
                os.close(fd)

    def _stop_worker(self, index: int) -> None:
        """Tell ring `index`'s worker to go. Not joined here: the ring is already out of its
        reach (`step` took it, under the lock), and the frontend may be waiting for our next
        reply (a VM stopping for a migration sends SET_VRING_ENABLE, then GET_VRING_BASE)."""
        worker = self.workers.pop(index, None)
        if worker is not None:
            worker.tell_stop()
            self.leaving.append(worker)

    def _reap(self) -> None:
        """Join the workers told to stop (before a ring starts again, and at close)."""
        leaving, self.leaving = self.leaving, []
        for worker in leaving:
            worker.join_stopped()

    def fail(self, reason: str) -> None:
        """Break this connection (and only it), with a logged reason."""
        log.warning("%s: closing connection: %s", self.label, reason)
        self.on_error(reason)
        signal_error(self.backend)
        self.shutdown()

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for index in list(self.workers):
            self._stop_worker(index)
        self._reap()
        with self.lock:
            fds = self.backend.close()
        for fd in fds:
            os.close(fd)
        if self.recorder is not None:
            self.recorder.closed()
        self.session.close()
        self.sock.close()


def _raw(msg: Message) -> bytes:
    """A message as the frontend sent it."""
    return HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload


class RingWorker(threading.Thread):
    """Services one ring: adaptive polling, then sleep on the kick eventfd."""

    def __init__(self, conn: Connection, index: int) -> None:
        super().__init__(name=f"{conn.label}/ring{index}", daemon=True)
        self.conn = conn
        self.index = index
        self.wake = os.eventfd(0, os.EFD_NONBLOCK)
        self.stopping = False

    def tell_stop(self) -> None:
        self.stopping = True
        os.eventfd_write(self.wake, 1)

    def join_stopped(self) -> None:
        """After `tell_stop`: wait for the thread, then close its wake-up fd."""
        if threading.current_thread() is not self:
            self.join()
        os.close(self.wake)

    def run(self) -> None:
        try:
            self._loop()
        except QueueError as exc:
            self.conn.fail(f"ring {self.index}: {exc}")
        except OSError as exc:
            self.conn.fail(f"ring {self.index}: I/O error servicing the ring: {exc}")
        except Exception as exc:  # a device bug must cost one connection, not a silent hang
            log.exception("%s: ring %d: unexpected error", self.conn.label, self.index)
            self.conn.fail(f"ring {self.index}: internal error: {exc!r}")

    def _loop(self) -> None:
        conn, index = self.conn, self.index
        vring = conn.backend.vrings[index]
        session = conn.session
        budget = conn.poll_budget_s
        poll_until = 0.0
        while not self.stopping:
            with conn.lock:
                queue = vring.queue
                if queue is None:
                    return
                done = session.process(index, queue)
                if queue.needs_notify() and vring.call is not None:
                    notify(vring.call)
                    conn.calls += 1
            if done:
                poll_until = time.monotonic() + budget
                continue
            if time.monotonic() < poll_until:
                continue
            with conn.lock:
                if vring.queue is not queue:
                    continue
                if queue.enable_notify() and session.buffers_are_work(index):
                    continue
                kick = vring.kick
            if kick is None:
                return
            poller = select.poll()  # not select(): fds may be above 1024
            poller.register(kick, select.POLLIN)
            poller.register(self.wake, select.POLLIN)
            bell = session.doorbell(index)
            if bell is not None:
                poller.register(bell, select.POLLIN)
            ready = [fd for fd, _ in poller.poll()]
            if self.wake in ready:
                return
            if bell is not None and bell in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(bell)  # ours, non-blocking: the device's own signal
            if drain(kick):
                conn.kicks += 1
            with conn.lock:
                if vring.queue is queue:
                    queue.disable_notify()
