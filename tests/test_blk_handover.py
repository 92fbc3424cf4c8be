"""Disks follow a migrating VM: a writable disk lets in a second connection from its holder's
own uid (not root), as a migration's destination QEMU runs as its source's jail uid, and lets
only one of the two run rings at a time. Real alacrityd, real processes as that uid, each
driving the disk from its own memory as QEMU would (alacrity.client)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity.devices import blk
from tests.test_gate_attacks import PLAIN_PYTHON, searchable_by_others, wait_for

BLOCK = 4096

#: One side of the migration, driven line by line on stdin: "start" (an incoming side's
#: rings, which it set up without starting, as QEMU -incoming does), "stop" (GET_VRING_BASE,
#: as a source QEMU stops), "restart" (a source resuming after a failed migration),
#: "write OFFSET BYTE", "read OFFSET". Answers "ok [...]" or "error ...".
DRIVER = r"""
import socket, sys
from alacrity import client
from alacrity.client.blk import BlkClient
from alacrity.client.driver import Driver
from alacrity.vhost_user.messages import Req


class Side(BlkClient):
    started = sys.argv[1] == "holder"

    def enable(self, *indexes):
        if self.started:
            Driver.enable(self, *indexes)


sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(client.connect().device("d1").socket)
    dev = Side(sock, timeout=10)
except Exception as exc:
    print("error", client.refusal(client.DEFAULT_RUN_DIR, "d1") or exc, flush=True)
    sys.exit(1)
print("ok open", flush=True)
base = 0
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "start":
            dev.started = True
            dev.enable(0)
        elif cmd == "stop":
            base = dev.frontend.get_vring_base(0)
        elif cmd == "restart":
            dev.frontend.set_vring_base(0, base)
            dev.frontend.set_vring_fd(Req.SET_VRING_KICK, 0, dev.ring.kick)
        elif cmd == "write":
            dev.write(int(args[0]), bytes([int(args[1])]) * 4096)
            dev.flush()
        elif cmd == "read":
            print("ok", dev.read(int(args[0]), 4096)[0], flush=True)
            continue
        print("ok", flush=True)
    except Exception as exc:
        print("error", exc, flush=True)
"""


class Side:
    """A driver process on bus b1, running as `uid`."""

    def __init__(self, lab: Lab, uid: int, role: str) -> None:
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alacrity.cli", "bus", "exec", "b1", "--", *setpriv, PLAIN_PYTHON, "-c",
             DRIVER, role],
            env=lab.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.opened = self.proc.stdout.readline().strip()

    def do(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Lab:
    def __init__(self, daemon, tmp_path: Path) -> None:
        self.daemon = daemon
        self.image = tmp_path / "disk.img"
        daemon.make_disk("d1", "b1", self.image, size="1M")
        pkg = tmp_path / "pkg"  # the package, where another uid can read it
        shutil.copytree(Path(blk.__file__).parents[1], pkg / "alacrity",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
        searchable_by_others(tmp_path)
        searchable_by_others(daemon.run_dir)
        self.env = {**daemon.env, "PYTHONPATH": str(pkg)}
        self.sides: list[Side] = []

    def lease(self) -> int:
        """A uid of the daemon's range, as `vm run` leases one for a guest's jail."""
        out = self.daemon.in_bus("b1", "from alacrity import client; print(client.connect().lease_uid())")
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    def side(self, uid: int, role: str) -> Side:
        side = Side(self, uid, role)
        self.sides.append(side)
        return side

    def state(self, name: str) -> str:
        return (self.daemon.admin / "devices/d1" / name).read_text().strip()

    def block(self, index: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(index * BLOCK)
            return f.read(BLOCK)


@pytest.fixture
def lab(daemon, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(daemon, tmp_path)
    try:
        yield lab
    finally:
        for side in lab.sides:
            side.close()


def test_the_writer_role_passes_only_once_the_source_has_stopped(lab: Lab):
    uid = lab.lease()
    source = lab.side(uid, "holder")
    assert source.opened == "ok open"
    assert source.do(f"write {0 * BLOCK} 1") == "ok"

    early = lab.side(uid, "incoming")  # the destination QEMU connects at once...
    assert early.opened == "ok open" and lab.state("connections") == "2"
    assert early.do("start").startswith("error")  # ...but may not start while the source runs
    assert "ring 0 started while pid" in lab.state("last_error")
    assert "runs its rings" in lab.daemon.log.read_text()
    assert lab.state("errors") == "1"
    assert source.do(f"write {1 * BLOCK} 2") == "ok"  # the source carries on

    dest = lab.side(uid, "incoming")
    assert dest.opened == "ok open"
    assert source.do("stop") == "ok"  # the end of migration: the source stops its rings
    assert dest.do("start") == "ok"
    assert dest.do(f"read {1 * BLOCK}") == "ok 2"  # what the source wrote
    assert dest.do(f"write {2 * BLOCK} 3") == "ok"
    assert source.do("restart").startswith("error")  # the source may not take it back now
    wait_for(lambda: lab.state("connections") == "1", what="the source's connection to close")
    assert dest.do(f"write {3 * BLOCK} 4") == "ok"  # the destination holds the disk
    assert [lab.block(i) for i in range(4)] == [bytes([n]) * BLOCK for n in (1, 2, 3, 4)]


def test_a_failed_migration_leaves_the_source_writing(lab: Lab):
    uid = lab.lease()
    source = lab.side(uid, "holder")
    dest = lab.side(uid, "incoming")
    assert source.opened == dest.opened == "ok open"
    assert source.do("stop") == "ok"
    assert source.do("restart") == "ok"  # the destination's rings are stopped: the source resumes
    assert source.do(f"write {0 * BLOCK} 5") == "ok"
    assert source.do("stop") == "ok"
    dest.close()  # the destination is killed
    wait_for(lambda: lab.state("connections") == "1", what="the destination's connection to close")
    assert source.do("restart") == "ok"
    assert source.do(f"write {1 * BLOCK} 6") == "ok"
    assert [lab.block(i) for i in range(2)] == [bytes([5]) * BLOCK, bytes([6]) * BLOCK]
    assert lab.state("errors") == "0"


def test_only_the_holders_own_uid_and_not_root_may_move_in(lab: Lab):
    uid, other = lab.lease(), lab.lease()
    holder = lab.side(uid, "holder")
    assert holder.opened == "ok open"
    for stranger in (other, 0):
        refused = lab.side(stranger, "incoming")
        assert refused.opened.startswith("error disk d1 is in use by pid"), refused.opened
        assert "give each VM its own disk on its own bus" in refused.opened
    second = lab.side(uid, "incoming")
    assert second.opened == "ok open"
    third = lab.side(uid, "incoming")  # at most two: the holder and one moving in
    assert third.opened.startswith("error disk d1 is in use by pid"), third.opened
    holder.close()
    wait_for(lambda: lab.state("connections") == "1", what="the holder's connection to close")
    assert second.do("start") == "ok"  # the one that moved in is the holder now
    assert second.do(f"write {0 * BLOCK} 7") == "ok"
    assert lab.block(0) == bytes([7]) * BLOCK


def test_two_root_peers_never_share_a_disk(lab: Lab):
    holder = lab.side(0, "holder")
    assert holder.opened == "ok open"
    refused = lab.side(0, "incoming")
    assert refused.opened.startswith("error disk d1 is in use by pid"), refused.opened
