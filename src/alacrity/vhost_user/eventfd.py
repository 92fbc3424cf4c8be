"""Signalling a peer's eventfds without ever waiting on the peer.

A peer hands us its call, err and kick eventfds, and it shares their file flags: it can
clear O_NONBLOCK at any moment, fill the counter, and so make our next write sleep until it
reads, which it never will. A check of the flags before the write leaves a window the peer
can race. So the write itself is bounded: a watchdog thread sends a signal to any thread
that has been inside `notify` for longer than STALL_S, and the write (made through libc,
which, unlike os.write, does not retry after EINTR) fails instead of sleeping on. A write
to an eventfd only sleeps, and only then sees the signal, when its counter is full and the
fd blocking: EINTR is proof of that, never a false alarm from a slow machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import threading
import time
from collections.abc import Callable

#: How long a signal may wait before the watchdog interrupts it.
STALL_S = 0.01
#: Rounds without a write to watch before the watchdog parks (at STALL_S each: a second).
IDLE_ROUNDS = 100
#: A parked watchdog still looks this often (a safety net: a writer wakes it).
PARKED_CHECK_S = 10.0
#: The watchdog's signal: ignored by default, so a stray one harms no process.
WAKE_SIGNAL = signal.SIGURG

_libc = ctypes.CDLL(None, use_errno=True)
_write = _libc.write
_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write.restype = ctypes.c_ssize_t
_ONE = (1).to_bytes(8, "little")


class _Watchdog:
    """Interrupts threads stuck in `notify`. The signal is sent under the lock that `leave`
    takes, so a thread is never signalled after it has left (it may have exited by then).

    It ticks every STALL_S only while there are writes to watch: after IDLE_ROUNDS with none
    it parks (`parked` set, asleep on `wake_fd`), and the next writer wakes it: `enter`, or
    C code through `parking()`. A writer sets its mark before it reads `parked`, and the
    watchdog reads the marks again after it sets `parked` (a lock taken in between: an atomic
    exchange, so the flag is visible before the marks are read), so one of them sees the
    other. A parked watchdog also looks once every PARKED_CHECK_S whatever happens, as a
    safety net. Each wake-up costs this host a few milliseconds of CPU (measured: an idle
    switch took 0.5-0.9 % of a core with two wake-ups a second), hence the parking."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: dict[int, float] = {}
        self.thread: threading.Thread | None = None
        # threads that write eventfds from C: ident -> [reader of their count, last seen]
        self.native: dict[int, list] = {}
        self.parked = ctypes.c_int32(0)  # read by C writers too (`parking`)
        self.fence = threading.Lock()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def enter(self) -> None:
        self.since[threading.get_ident()] = time.monotonic()
        if self.thread is None:
            self._start()
        elif self.parked.value:
            self._wake()

    def leave(self) -> None:
        with self.lock:
            del self.since[threading.get_ident()]

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.wake_fd, 1)

    def watch(self, read_count: Callable[[], int]) -> Callable[[], None]:
        """Watch the calling thread's eventfd writes made from C: `read_count()` (read from the
        watchdog's thread) is odd while that thread is inside a write. Seen odd and unchanged
        on two rounds in a row, the write has slept for STALL_S at least: it gets the signal.
        The C code wakes a parked watchdog itself (`parking`). Returns the function that stops
        the watch."""
        ident = threading.get_ident()
        with self.lock:
            self.native[ident] = [read_count, read_count()]
        if self.thread is None:
            self._start(parked=True)  # until the first write: an idle switch never ticks
        else:
            self._wake()

        def unwatch() -> None:
            with self.lock:
                self.native.pop(ident, None)

        return unwatch

    def parking(self) -> tuple[int, int]:
        """For C writers: the address of the int32 that is non-zero while the watchdog is
        parked, and the eventfd to write (8 bytes, a 1) to wake it. A writer marks its write
        (odd count, seq_cst), then reads the flag (seq_cst), and if set wakes the watchdog."""
        return ctypes.addressof(self.parked), self.wake_fd

    def _start(self, *, parked: bool = False) -> None:
        with self.lock:
            if self.thread is None:
                install_handler()
                self.parked.value = parked
                self.thread = threading.Thread(target=self._run, name="eventfd-watchdog", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        idle = 0
        while True:
            if self.parked.value:
                select.select([self.wake_fd], [], [], PARKED_CHECK_S)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.wake_fd)
            else:
                time.sleep(STALL_S)
            with self.lock:
                busy = self._round()
                if busy:
                    idle = 0
                    self.parked.value = 0
                elif not self.parked.value:
                    idle += 1
                    if idle >= IDLE_ROUNDS:
                        self.parked.value = 1
                        with self.fence:  # an atomic exchange: the flag is out before we look
                            pass
                        if self._marked():  # a writer that read the flag before it was set
                            self.parked.value = 0
                            idle = 0

    def _round(self) -> bool:
        """Signal the writers stuck since the last round; True if any write was watched."""
        busy = bool(self.since)
        late = time.monotonic() - STALL_S
        for ident, since in list(self.since.items()):  # enter() adds without the lock
            if since < late:
                with contextlib.suppress(OSError):
                    signal.pthread_kill(ident, WAKE_SIGNAL)
        for ident, seen in self.native.items():
            count = seen[0]()
            if count & 1 and count == seen[1]:
                with contextlib.suppress(OSError):
                    signal.pthread_kill(ident, WAKE_SIGNAL)
            busy = busy or _moved(count, seen[1])
            seen[1] = count
        return busy

    def _marked(self) -> bool:
        return bool(self.since) or any(_moved(read(), last) for read, last in self.native.values())


def _moved(count: int, last: int) -> bool:
    """A C writer's count: has it written since `last`, or is it writing now?"""
    return count != last or bool(count & 1)


_watchdog = _Watchdog()
#: See `_Watchdog.watch` and `_Watchdog.parking`: for the switch's wake-up loop in C
#: (switch/native/wakeup.c).
watch_native = _watchdog.watch
watchdog_parking = _watchdog.parking


def install_handler() -> None:
    """Give WAKE_SIGNAL a handler, so that it interrupts a sleeping write (an ignored signal
    is discarded before it wakes anyone). Python installs handlers only from the main thread:
    the daemon and the switch call this at start; elsewhere the first notify tries."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(WAKE_SIGNAL) in (
        signal.SIG_DFL,
        signal.SIG_IGN,
        None,
    ):
        signal.signal(WAKE_SIGNAL, _ignore)


def _ignore(signum: int, frame: object) -> None:
    """The interruption is the point; there is nothing to do."""


# Modules are imported from the main thread as a rule, and the first notify may come from
# any thread: take the handler now, while we can.
install_handler()


def notify(eventfd: int) -> None:
    """Add one to a peer's eventfd, never waiting for the peer.

    A full counter on a non-blocking fd (EAGAIN) means the peer has a signal pending anyway:
    the write is dropped. A full counter on an fd the peer made blocking again is that peer's
    fault: OSError(EPERM), which must break its connection. Other errors are raised as they are."""
    _watchdog.enter()
    try:
        written = _write(eventfd, _ONE, 8)
    finally:
        _watchdog.leave()
    if written == 8:
        return
    err = ctypes.get_errno()
    if err == errno.EAGAIN:
        return
    raise write_error(errno.EPERM if err == errno.EINTR else err)


def write_error(err: int) -> OSError:
    """The error a failed signal raises: EPERM is the watchdog's (a write that slept on a full
    counter of a fd the peer made blocking again); the C loop's writes report the same."""
    if err == errno.EPERM:
        return OSError(err, "the peer made its eventfd blocking and filled it")
    return OSError(err, os.strerror(err))


def drain(eventfd: int) -> bool:
    """Take the kicks pending on a peer's eventfd; False if there were none. Afterwards the fd
    is not readable until the next kick. The peer shares the file's flags (it may clear
    O_NONBLOCK) and may read the counter first, so the read asks for RWF_NOWAIT itself
    (kernels before 5.12 refuse that for eventfds: there O_NONBLOCK is all we have)."""
    try:
        os.preadv(eventfd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(eventfd)
            return True
        return False
    return True
