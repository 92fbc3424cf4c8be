"""Who is at the other end of a Unix socket, established from the socket itself.

The kernel records the connecting process in the socket at connect() time; with
SO_PEERPIDFD (Linux 6.5+) it hands us a pidfd for exactly that process. A pid from
SO_PEERCRED, looked up later in /proc, may by then name another process, or a thread
of another process: that is how a member of one bus once passed for a member of
another. So the pid is read from the pidfd, the process tree is read by pid, and the
pidfd is asked again afterwards: if the process exited meanwhile, its pid may have
been reused under us, and the peer is refused. Threads resolve to their process,
since the kernel records the thread group. An identity that cannot be established is
refused, never treated as "unknown but fine".
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from alacrity.bus import peers

log = logging.getLogger("alacrity.gate")

SO_PEERPIDFD = 77  # Linux 6.5+; not yet named by Python 3.11's socket module
SO_PEERGROUPS = 59  # Linux 4.13+: the peer's supplementary groups at connect time
#: Groups read per peer: Python's getsockopt buffer is at most 1024 bytes. A peer in more
#: groups is judged by its primary group and these (a refusal at worst, never a wrong yes).
MAX_PEER_GROUPS = 256


class IdentityError(Exception):
    """The peer's identity could not be established; refuse it."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    start_time: int
    ident: int | None  # pidfs inode of the connecting process, where the kernel has pidfs
    chain: tuple[peers.Task, ...]  # the peer and its ancestors, at most peers.MAX_DEPTH
    gids: tuple[int, ...] = ()  # primary and supplementary groups, as at connect time


_warned_no_pidfd = False


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid (fixed at connect time), or None."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    except OSError:
        return None


def identify(sock: socket.socket) -> Peer:
    """The process that connected `sock`. Raises IdentityError."""
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError as exc:
        raise IdentityError(f"no peer credentials: {exc.strerror}") from None
    gids = (gid, *peer_groups(sock))
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        # Only ENOPROTOOPT means "no SO_PEERPIDFD here". Kernels 6.5 to about 6.14 answer
        # EINVAL for a peer that has been reaped: its pid may be reused, so that is a refusal.
        if exc.errno != errno.ENOPROTOOPT:
            raise IdentityError(f"no pidfd for the peer: {exc.strerror}") from None
        pidfd = _pidfd_by_pid(pid)
    try:
        return _resolve(pidfd, uid, gids)
    except OSError as exc:
        raise IdentityError(f"cannot read the peer's identity: {exc.strerror}") from None
    finally:
        os.close(pidfd)


def _pidfd_by_pid(pid: int) -> int:
    """Kernels before 6.5: a pidfd for the SO_PEERCRED pid, which a reuse race can defeat."""
    global _warned_no_pidfd
    if not _warned_no_pidfd:
        _warned_no_pidfd = True
        log.warning("this kernel lacks SO_PEERPIDFD (Linux 6.5+): peers are identified by pid and start "
                    "time, which a pid reused between connect and accept can defeat")
    try:
        return os.pidfd_open(pid)  # fails on a thread id: a thread is not a peer
    except OSError as exc:
        raise IdentityError(f"pid {pid} is not a live process: {exc.strerror}") from None


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (fixed at connect time); () where unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _resolve(pidfd: int, uid: int, gids: tuple[int, ...] = ()) -> Peer:
    pid = peers.pidfd_pid(pidfd)
    if pid is None:
        raise IdentityError("the connecting process has exited")
    me = peers.task(pid)
    chain = peers.ancestry(pid)
    if me is None or not chain or chain[0] != me:
        raise IdentityError(f"the connecting process {pid} has exited")
    # /proc was read by pid: it described the peer only if the pidfd still names that pid.
    if peers.pidfd_pid(pidfd) != pid:
        raise IdentityError(f"the connecting process {pid} exited while it was checked")
    return Peer(pid, uid, me.start_time, peers.inode_of(pidfd), tuple(chain), gids)
