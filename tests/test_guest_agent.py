"""`alacrity vm exec` and `vm cp`, and alacrity.client.vm(): a real guest started with
`vm run --detach` on a bus with a vsock device, its agent reached through the device."""

from __future__ import annotations

import filecmp
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, fuse_available, need

pytestmark = pytest.mark.vm
CLI = [sys.executable, "-m", "alacrity.cli"]


class Lab:
    def __init__(self, root: Path, image) -> None:
        self.root, self.image = root, image
        self.daemon = Daemon(root)

    def cli(self, *args: str, input: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=self.daemon.env, input=input, capture_output=True,
                              timeout=timeout)

    def start_vm(self, name: str, bus: str) -> None:
        out = self.cli("vm", "run", "--bus", bus, "--name", name, "--detach", "--kernel",
                       str(self.image.kernel), "--initrd", str(self.image.initrd))
        assert out.returncode == 0 and out.stdout == f"{name}\n".encode(), out.stderr.decode()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, guest_image):
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root")
    lab = Lab(tmp_path_factory.mktemp("agent"), guest_image)
    lab.daemon.start()
    try:
        lab.daemon.sh("mkdir $A/buses/g $A/buses/plain $A/devices/vs0\necho vsock > $A/devices/vs0/type\n"
                      "ln -s ../../devices/vs0 $A/buses/g/vs0")
        lab.start_vm("srv", "g")
        yield lab
    finally:
        for name in ("srv", "plain"):
            lab.cli("vm", "stop", name, timeout=60)
        lab.daemon.stop()


def test_exec_gives_output_apart_and_the_status(lab):
    out = lab.cli("vm", "exec", "srv", "-e", "GREETING=hello there", "-w", "/tmp", "--", "sh", "-c",
                  'echo "$GREETING"; pwd; echo oops >&2; exit 7')
    assert out.returncode == 7
    assert out.stdout == b"hello there\n/tmp\n" and out.stderr == b"oops\n"
    killed = lab.cli("vm", "exec", "srv", "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9


def test_exec_passes_stdin_through(lab):
    data = os.urandom(1 << 20)
    out = lab.cli("vm", "exec", "srv", "--", "sha256sum", input=data)
    assert out.returncode == 0 and out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_with_a_terminal(lab):
    out = lab.cli("vm", "exec", "-t", "srv", "--", "sh", "-c", "tty; test -t 1 && echo on-a-terminal",
                  input=b"")
    lines = out.stdout.decode().replace("\r", "").splitlines()
    assert out.returncode == 0 and lines[0].startswith("/dev/pts/") and lines[1] == "on-a-terminal", lines


#: Run on the VM's bus (through `alacrity bus exec`): the Python API, as a user's script uses it.
API = """
import sys, threading, time
from alacrity import client
from alacrity.agent.session import CommandFailed
guest = client.vm("srv")
results, begun = [], time.monotonic()
def one(n):
    results.append(guest.exec(["sh", "-c", f"sleep 2; echo {n}"]).stdout)
threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert sorted(results) == [b"0\\n", b"1\\n", b"2\\n"], results
assert time.monotonic() - begun < 5.5, "three 2 s sessions ran one after another"
assert guest.exec(["uname", "-s"]).stdout == b"Linux\\n"
guest.put("/tmp/api.txt", b"from the host\\n", mode=0o600)
assert guest.get("/tmp/api.txt") == b"from the host\\n"
assert guest.exec(["stat", "-c", "%a", "/tmp/api.txt"]).stdout == b"600\\n"
try:
    guest.exec(["no-such-program"])
    raise AssertionError("no-such-program ran")
except CommandFailed as exc:
    assert "no-such-program" in str(exc)
print("api ok")
"""


def test_the_python_api_and_sessions_at_once(lab):
    out = lab.cli("bus", "exec", "g", "--", sys.executable, "-c", API)
    assert out.returncode == 0 and out.stdout == b"api ok\n", out.stderr.decode()


def test_cp_files_and_directories_both_ways(lab, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))
    assert lab.cli("vm", "cp", str(blob), "srv:/tmp/").returncode == 0
    back = tmp_path / "back.bin"
    out = lab.cli("vm", "cp", "srv:/tmp/blob.bin", str(back))
    assert out.returncode == 0, out.stderr
    assert back.read_bytes() == blob.read_bytes()

    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("a\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(70000))
    (tree / "sub" / "deeper" / "c").write_text("")
    assert lab.cli("vm", "exec", "srv", "--", "mkdir", "-p", "/root/in").returncode == 0
    out = lab.cli("vm", "cp", str(tree), "srv:/root/in")
    assert out.returncode == 0, out.stderr
    listed = lab.cli("vm", "exec", "srv", "--", "find", "/root/in/tree", "-type", "f").stdout.decode()
    files = ("a.txt", "sub/b.bin", "sub/deeper/c")
    assert sorted(listed.split()) == sorted(f"/root/in/tree/{p}" for p in files)
    out = lab.cli("vm", "cp", "srv:/root/in/tree", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    same = filecmp.dircmp(tree, tmp_path / "out" / "tree")
    assert not (same.diff_files or same.left_only or same.right_only)
    assert (tmp_path / "out/tree/sub/b.bin").read_bytes() == (tree / "sub/b.bin").read_bytes()


def test_a_failed_copy_out_leaves_nothing_behind(lab, tmp_path):
    out = lab.cli("vm", "cp", "srv:/no/such/file", str(tmp_path / "x"))
    assert out.returncode == 2 and b"cannot read /no/such/file" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


BIG = 200 << 20


def test_a_200_mb_stream_each_way_with_checksums(lab, tmp_path):
    """exec's output stream, and cp both ways, 200 MB each with their checksums."""
    made = lab.cli("vm", "exec", "srv", "--", "sh", "-c",
                   f"head -c {BIG} /dev/urandom > /tmp/big && sha256sum /tmp/big", timeout=600)
    assert made.returncode == 0, made.stderr
    guest_sum = made.stdout.split()[0].decode()
    streamed = lab.cli("vm", "exec", "srv", "--", "cat", "/tmp/big", timeout=600)
    assert streamed.returncode == 0 and len(streamed.stdout) == BIG
    assert hashlib.sha256(streamed.stdout).hexdigest() == guest_sum
    out = lab.cli("vm", "cp", "srv:/tmp/big", str(tmp_path / "big"), timeout=600)
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256((tmp_path / "big").read_bytes()).hexdigest() == guest_sum
    lab.cli("vm", "exec", "srv", "--", "rm", "/tmp/big")  # the guest's /tmp is its RAM
    local = tmp_path / "up"
    local.write_bytes(os.urandom(BIG))
    out = lab.cli("vm", "cp", str(local), "srv:/tmp/up", timeout=600)
    assert out.returncode == 0, out.stderr
    summed = lab.cli("vm", "exec", "srv", "--", "sha256sum", "/tmp/up", timeout=600)
    assert summed.stdout.split()[0].decode() == hashlib.sha256(local.read_bytes()).hexdigest()
    lab.cli("vm", "exec", "srv", "--", "rm", "-f", "/tmp/up")


MANY = """
import threading
from alacrity import client
guest, results = client.vm("srv"), {}
def one(n):
    results[n] = guest.exec(["sh", "-c", f"echo {n}; exit $(({n} % 7))"], timeout=300)
threads = [threading.Thread(target=one, args=(n,)) for n in range(100)]
for t in threads:
    t.start()
for t in threads:
    t.join()
bad = [n for n in range(100) if n not in results or results[n].stdout != f"{n}\\n".encode()
       or results[n].status != n % 7]
print("bad", bad)
"""


def test_100_execs_at_once(lab):
    out = lab.cli("bus", "exec", "g", "--", sys.executable, "-c", MANY, timeout=600)
    assert out.returncode == 0 and out.stdout == b"bad []\n", out.stdout + out.stderr[-3000:]


def test_the_guest_keeps_its_vsock_through_a_daemon_crash(lab):
    """kill -9 of the daemon: the VM runs on, and once a new daemon has started, execs work
    again with the guest's CID unchanged (QEMU 7.2's vhost-user-vsock never reconnects: the
    keeper held the connection, and the new daemon resumed it)."""
    guests = lab.daemon.admin / "devices" / "vs0" / "guests"
    before = (guests / "srv").read_text()
    qemu_pid = int(before.split("pid ")[1].split()[0])
    loop = "while :; do echo x; sleep 0.05; done"
    streaming = subprocess.Popen([*CLI, "vm", "exec", "srv", "--", "sh", "-c", loop], env=lab.daemon.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert streaming.stdout.readline() == b"x\n"
        lab.daemon.kill9()
        assert streaming.wait(30) != 0  # its stream was the dead daemon's: it ends
    finally:
        streaming.kill()
        streaming.wait()
    os.kill(qemu_pid, 0)  # the VM runs on
    lab.daemon.start()
    out = lab.cli("vm", "exec", "srv", "--wait", "30", "--", "sh", "-c", "echo back; cat /proc/uptime")
    assert out.returncode == 0 and out.stdout.startswith(b"back\n"), out.stderr
    after = (guests / "srv").read_text()
    assert after.split()[:4] == before.split()[:4], (before, after)  # cid and pid
    assert "resumed srv as CID 3" in lab.daemon.log.read_text()
    data = os.urandom(1 << 20)
    out = lab.cli("vm", "exec", "srv", "--", "sha256sum", input=data)
    assert out.returncode == 0 and out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


# Last: it stops the agent of srv.
def test_errors_say_what_to_do(lab, tmp_path):
    out = lab.cli("vm", "exec", "nosuchvm", "--", "true")
    assert out.returncode == 2 and b"no running VM named 'nosuchvm'" in out.stderr
    lab.start_vm("plain", "plain")  # a bus without a vsock device
    out = lab.cli("vm", "exec", "plain", "--", "true")
    assert out.returncode == 2 and b"has no vsock device" in out.stderr and b"echo vsock" in out.stderr
    missing = lab.cli("vm", "exec", "srv", "--", "no-such-program")
    assert missing.returncode == 127 and b"cannot run no-such-program" in missing.stderr
    # An agent that does not answer (its listener, the oldest agent process, is killed;
    # this session's own process goes on): the wait is bounded, and the message says so.
    oldest = "kill $(pidof alacrity-agent | tr ' ' '\\n' | sort -n | head -1)"
    stopped = lab.cli("vm", "exec", "srv", "--", "sh", "-c", oldest)
    assert stopped.returncode == 0, stopped.stderr
    begun = time.monotonic()
    out = lab.cli("vm", "exec", "srv", "--wait", "2", "--", "true")
    assert out.returncode == 2 and b"did not answer in 2 s" in out.stderr, out.stderr
    assert time.monotonic() - begun < 15
    code = ("from alacrity.client.vm import vm\ntry:\n    vm('srv', wait=1).exec(['true'])\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = lab.cli("bus", "exec", "g", "--", sys.executable, "-c", code)
    assert out.stdout.startswith(b"VmError the agent of VM srv did not answer in 1 s"), out.stderr
