"""Linux process identity from /proc.

A pid alone does not name a process: pids are reused. A `Task` pairs the pid with
its start time (clock ticks after boot), which a reused pid cannot share.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple


class Task(NamedTuple):
    pid: int
    start_time: int


class _Stat(NamedTuple):
    state: str
    ppid: int
    start_time: int


#: How far up the process tree a peer's bus is looked for: a task more than this many
#: generations below its bus's member is not on the bus. Bounds what one connection
#: can cost the gate (a deep fork chain would otherwise make every accept slow).
MAX_DEPTH = 64


def _stat(pid: int) -> _Stat | None:
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses; it ends at the last ')'.
    end = data.rfind(b")")
    fields = data[end + 2 :].split()
    if end < 0 or len(fields) < 20:
        return None
    try:
        # fields[0] is field 3 (state): field N is fields[N - 3].
        return _Stat(fields[0].decode(), int(fields[1]), int(fields[19]))
    except ValueError:
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such process."""
    stat = _stat(pid)
    return None if stat is None else stat.start_time


def parent(pid: int) -> int | None:
    """Field 4 of /proc/PID/stat (0 for pid 1), or None if there is no such process."""
    stat = _stat(pid)
    return None if stat is None else stat.ppid


def task(pid: int) -> Task | None:
    """The live task now running as `pid`, or None."""
    stat = _stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return None
    return Task(pid, stat.start_time)


def is_process(pid: int) -> bool:
    """True if `pid` is a process (a thread group leader), not another thread's id."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError, IndexError):
        return False
    return False


def ident(pid: int) -> int | None:
    """The pidfs inode of `pid` (Linux 6.9+): unique per process for the whole boot,
    unlike start times, which two processes started within one clock tick share."""
    if not _pidfs():
        return None
    try:
        return pidfd_ident(os.pidfd_open(pid))
    except OSError:
        return None


def pidfd_ident(pidfd: int) -> int:
    """The pidfs inode a pidfd refers to; closes the pidfd."""
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


@functools.cache
def _pidfs() -> bool:
    # Before pidfs, every pidfd shared one anonymous inode: the numbers mean nothing.
    try:
        fds = [os.pidfd_open(os.getpid()), os.pidfd_open(1)]
    except (OSError, AttributeError):
        return False
    try:
        return os.getpid() != 1 and os.fstat(fds[0]).st_ino != os.fstat(fds[1]).st_ino
    finally:
        for fd in fds:
            os.close(fd)


def pidfd_pid(pidfd: int) -> int | None:
    """The pid, in our pid namespace, of the process a pidfd refers to; None once it has
    exited (or when it is outside our namespace). A pidfd names one process for good,
    so a pid read from it and re-read after use cannot be a reused one. Raises OSError
    if fdinfo cannot be read (e.g. EMFILE)."""
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                try:
                    pid = int(line.split()[1])
                except (ValueError, IndexError):
                    return None
                return pid if pid > 0 else None
    return None


def inode_of(pidfd: int) -> int | None:
    """The pidfs inode of a pidfd (kept open), where the kernel has pidfs."""
    return os.fstat(pidfd).st_ino if _pidfs() else None


def alive(pid: int, started: int, known_ident: int | None = None) -> bool:
    """True if `pid` still runs the process that started at `started` (not a zombie)
    and, when its pidfs inode was recorded, has that inode."""
    current = task(pid)
    if current is None or current.start_time != started:
        return False
    return known_ident is None or ident(pid) in (None, known_ident)


def ancestry(pid: int, depth: int = MAX_DEPTH) -> list[Task]:
    """(pid, start_time) from `pid` up towards pid 1, at most `depth` tasks; shorter if a
    process vanishes meanwhile. A parent starts before its child: a "parent" that started
    later is a reused pid (the real parent exited while we walked), and the walk stops."""
    chain: list[Task] = []
    seen: set[int] = set()
    while pid > 0 and pid not in seen and len(chain) < depth:
        stat = _stat(pid)
        if stat is None or (chain and stat.start_time > chain[-1].start_time):
            break
        chain.append(Task(pid, stat.start_time))
        seen.add(pid)
        pid = stat.ppid
    return chain


def boot_id() -> str:
    """Identifies this boot: start times from another boot mean nothing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
