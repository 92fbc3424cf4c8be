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
import signal
import threading
import time
from collections.abc import Callable

#: How long a signal may wait before the watchdog interrupts it.
STALL_S = 0.01
#: The watchdog's signal: ignored by default, so a stray one harms no process.
WAKE_SIGNAL = signal.SIGURG

_libc = ctypes.CDLL(None, use_errno=True)
_write = _libc.write
_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write.restype = ctypes.c_ssize_t
_ONE = (1).to_bytes(8, "little")


class _Watchdog:
    """Interrupts threads stuck in `notify`. The signal is sent under the lock that `leave`
    takes, so a thread is never signalled after it has left (it may have exited by then)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: dict[int, float] = {}
        self.thread: threading.Thread | None = None
        # threads that write eventfds from C: ident -> [reader of their count, last seen]
        self.native: dict[int, list] = {}

    def enter(self) -> None:
        self.since[threading.get_ident()] = time.monotonic()
        if self.thread is None:
            self._start()

    def leave(self) -> None:
        with self.lock:
            del self.since[threading.get_ident()]

    def watch(self, read_count: Callable[[], int]) -> Callable[[], None]:
        """Watch the calling thread's eventfd writes made from C: `read_count()` (read from the
        watchdog's thread) is odd while that thread is inside a write. Seen odd and unchanged
        on two rounds in a row, the write has slept for STALL_S at least: it gets the signal.
        Returns the function that stops the watch."""
        ident = threading.get_ident()
        with self.lock:
            self.native[ident] = [read_count, 0]
        if self.thread is None:
            self._start()

        def unwatch() -> None:
            with self.lock:
                self.native.pop(ident, None)

        return unwatch

    def _start(self) -> None:
        with self.lock:
            if self.thread is None:
                install_handler()
                self.thread = threading.Thread(target=self._run, name="eventfd-watchdog", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(STALL_S)
            late = time.monotonic() - STALL_S
            with self.lock:
                for ident, since in list(self.since.items()):  # enter() adds without the lock
                    if since < late:
                        with contextlib.suppress(OSError):
                            signal.pthread_kill(ident, WAKE_SIGNAL)
                for ident, seen in self.native.items():
                    count = seen[0]()
                    if count & 1 and count == seen[1]:
                        with contextlib.suppress(OSError):
                            signal.pthread_kill(ident, WAKE_SIGNAL)
                    seen[1] = count


_watchdog = _Watchdog()
#: See `_Watchdog.watch`: for the switch's wake-up loop in C (switch/native/wakeup.c).
watch_native = _watchdog.watch


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
    if err == errno.EINTR:
        raise OSError(errno.EPERM, "the peer made its eventfd blocking and filled it")
    raise OSError(err, os.strerror(err))


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
