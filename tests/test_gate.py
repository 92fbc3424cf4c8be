"""The gate: members see and open their bus's devices; nobody else gets anything."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

PROBE = r"""
import json, socket, sys
from alacrity import client
from alacrity.vhost_user.messages import Framer, Req, encode
result = {"listed": None, "opened": 0, "refused": 0}
try:
    bus = client.connect()
    result["listed"] = {"bus": bus.name, "devices": [d.name for d in bus.devices]}
except client.GateError as exc:
    result["list_error"] = str(exc)
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(sys.argv[1])
        s.sendall(encode(Req.GET_FEATURES))
        data = s.recv(64)
        if data and Framer(expect_reply=True).feed(data):
            result["opened"] += 1
        else:
            result["refused"] += 1
    except OSError:
        result["refused"] += 1
    finally:
        s.close()
print(json.dumps(result))
"""


def probe(daemon, socket_path: str, tries: int, bus: str | None) -> dict:
    argv = [sys.executable, "-c", PROBE, socket_path, str(tries)]
    if bus is not None:
        argv = [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--", *argv]
    out = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_member_lists_and_opens_its_devices(daemon, tmp_path):
    daemon.make_disk("d1", "b1", tmp_path / "d1.img")
    daemon.make_disk("d2", "b2", tmp_path / "d2.img")
    result = probe(daemon, str(daemon.run_dir / "devices" / "d1.sock"), 3, "b1")
    assert result["listed"] == {"bus": "b1", "devices": ["d1"]}
    assert result["opened"] == 3


def test_non_member_and_other_bus_get_nothing(daemon, tmp_path):
    daemon.make_disk("d1", "b1", tmp_path / "d1.img")
    daemon.make_disk("d2", "b2", tmp_path / "d2.img")
    d1 = str(daemon.run_dir / "devices" / "d1.sock")
    outsider = probe(daemon, d1, 50, None)
    assert outsider["listed"] is None and "not a member" in outsider["list_error"]
    assert outsider["opened"] == 0 and outsider["refused"] == 50
    neighbour = probe(daemon, d1, 50, "b2")
    assert neighbour["listed"] == {"bus": "b2", "devices": ["d2"]}  # never learns of d1
    assert neighbour["opened"] == 0 and neighbour["refused"] == 50
    log = daemon.log.read_text()
    # Logged once per peer and reason (a refused QEMU retries thousands of times a second).
    assert "refused device d1" in log and "not a member of any bus" in log
    assert "device is not on bus b2" in log
    assert log.count("refused device d1") <= 4
    assert "refused device list" in log


def _spawn_with_pid(pid: int, argv: list[str], env: dict) -> subprocess.Popen | None:
    """Start a process that the kernel gives `pid` (root: /proc/sys/kernel/ns_last_pid)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_reused_pid_is_refused(daemon, tmp_path):
    daemon.make_disk("d1", "b1", tmp_path / "d1.img")
    member = subprocess.Popen(["sleep", "60"])
    pid = member.pid
    daemon.sh(f"echo {pid} > $A/buses/b1/members")
    assert (daemon.admin / "buses/b1/members").read_text().split() == [str(pid)]
    member.kill()
    member.wait()
    d1 = str(daemon.run_dir / "devices" / "d1.sock")
    impostor = _spawn_with_pid(pid, [sys.executable, "-c", PROBE, d1, "5"], daemon.env)
    if impostor is None:
        import pytest

        pytest.skip("could not make the kernel reuse the pid (busy machine)")
    out, _ = impostor.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["listed"] is None and result["opened"] == 0


def test_child_inherits_membership_and_refusals_do_not_stall_members(daemon, tmp_path):
    daemon.make_disk("d1", "b1", tmp_path / "d1.img")
    code = (
        "import subprocess, sys;"
        "print(subprocess.run([sys.executable, '-c', 'from alacrity import client;"
        " print(client.connect().name)'], capture_output=True, text=True).stdout.strip())"
    )
    out = daemon.in_bus("b1", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "b1"


def test_control_socket_rejects_garbage(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.run_dir / "control.sock"))
        s.sendall(b"this is not json\n")
        reply = json.loads(s.makefile().readline())
    assert "bad request" in reply["error"]
    # and the daemon still answers
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.run_dir / "control.sock"))
        s.sendall(b'{"op": "whoami"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["pid"] == os.getpid() and reply["bus"] is None


def test_control_socket_refuses_an_endless_line(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.run_dir / "control.sock"))
        # No newline: the daemon must not buffer it whole. Closing on us is the refusal.
        with contextlib.suppress(OSError):
            s.sendall(b"x" * (1 << 20))
        try:
            closed = s.recv(4096) == b""
        except ConnectionResetError:
            closed = True
    assert closed
    assert "control request over" in daemon.log.read_text()
