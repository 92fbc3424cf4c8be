"""The keeper (vhost_user/keeper.py) as a real process: it holds connections and the
messages sent on them through the death of the daemon that gave them, hands them to the
next one, and goes away when it has nothing left to keep."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from alacrity.vhost_user.keeper import Keeper


def keeper_pid(daemon: Keeper) -> int:
    """The keeper's pid, from the daemon's link to it (a second link would replace it)."""
    creds = daemon.link.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little")


def gone(pid: int, within: float) -> bool:
    """Exited (a zombie counts: the keeper is this test process's child)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_connection_and_its_messages_survive_the_daemon(tmp_path):
    frontend, ours = socket.socketpair()
    first = Keeper(tmp_path)
    assert first.take() == []  # no keeper yet
    recording = first.keep(ours, {"device": "vs0", "cid": 3})
    assert recording is not None
    carried = os.eventfd(0)
    recording.message(b"one", [])
    recording.answered()
    recording.message(b"two", [carried])
    # The daemon dies: its link and its own copies close, without a BYE.
    first.link.close()
    ours.close()
    os.eventfd_write(carried, 5)
    os.close(carried)

    second = Keeper(tmp_path)
    [kept] = second.take()
    assert kept.meta == {"device": "vs0", "cid": 3}
    assert [raw for raw, _ in kept.messages] == [b"one", b"two"]
    assert kept.answered == 1  # "two" was never answered: the next daemon answers it
    [[], [fd]] = [fds for _, fds in kept.messages]
    assert os.eventfd_read(fd) == 5  # the very eventfd the frontend sent
    os.close(fd)
    # The connection is still the frontend's, both ways.
    frontend.sendall(b"ping")
    assert kept.sock.recv(4) == b"ping"
    kept.sock.sendall(b"pong")
    assert frontend.recv(4) == b"pong"
    pid = keeper_pid(second)
    second.bye()
    assert gone(pid, 10), "the keeper did not exit on BYE"
    kept.sock.close()
    frontend.close()


def test_a_keeper_whose_connections_hang_up_exits(tmp_path):
    frontend, ours = socket.socketpair()
    daemon = Keeper(tmp_path)
    daemon.take()
    assert daemon.keep(ours, {"device": "vs0"}) is not None
    pid = keeper_pid(daemon)
    daemon.link.close()  # the daemon dies
    ours.close()
    assert not gone(pid, 1), "the keeper left while it held a live connection"
    frontend.close()  # the VM goes away
    assert gone(pid, 20), "the keeper outlived everything it kept"
    assert not (tmp_path / "keeper.sock").exists()


def test_only_the_keepers_own_uid_is_answered(tmp_path):
    daemon = Keeper(tmp_path)
    daemon.take()
    frontend, ours = socket.socketpair()
    assert daemon.keep(ours, {}) is not None
    assert oct((tmp_path / "keeper.sock").stat().st_mode & 0o777) == "0o600"
    pid = os.fork()
    if pid == 0:  # another uid cannot connect
        os.setuid(65534)
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(str(tmp_path / "keeper.sock"))
            os._exit(1)
        except PermissionError:
            os._exit(0)
        except OSError:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    daemon.bye()
    ours.close()
    frontend.close()
