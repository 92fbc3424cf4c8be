"""The vsock class through a real alacrityd: a process on the bus plays a guest over real
vhost-user shared-memory rings (alacrity.client.vsock.VsockGuest) and host processes reach
it through the device's gate socket (tests/vsock_play.py does both and reports)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alacrity.devices.base import Slot
from alacrity.devices.vsock import VsockDevice
from tests.test_guest_io import vm_run


def make_vsock(daemon, name: str, bus: str, extra: str = "") -> None:
    daemon.sh(f"""
        mkdir $A/devices/{name}
        echo vsock > $A/devices/{name}/type
        {extra}
        [ -d $A/buses/{bus} ] || mkdir $A/buses/{bus}
        ln -s ../../devices/{name} $A/buses/{bus}/{name}
    """)


def play(daemon, bus: str, scenario: str, timeout: float = 120.0) -> dict:
    root = str(Path(__file__).resolve().parent.parent)  # `tests` is importable from there
    code = (f"import sys; sys.argv = ['x', {scenario!r}]; sys.path.insert(0, {root!r})\n"
            "from tests.vsock_play import main\nmain()")
    out = daemon.in_bus(bus, code, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr + daemon.log.read_text()[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def state(daemon, name: str, counter: str) -> int:
    return int((daemon.admin / "devices" / name / counter).read_text())


def test_connect_and_echo_both_ways(daemon):
    make_vsock(daemon, "v0", "b1", "echo 40 > $A/devices/v0/cid_base")
    result = play(daemon, "b1", "echo")
    assert result["cid"] == 40
    assert result["echo"] == {"back": "HELLO FROM THE HOST", "heard": "guest says hi",
                              "answer": "host answers", "guest_port": 3000, "early": "early",
                              "early_reply": f"OK {1 << 30 | 1}\n"}
    [(name, view)] = result["tree"].items()  # the guest's entry, while it was connected
    assert name.startswith("pid") and view.startswith("cid 40\n")
    assert state(daemon, "v0", "guest_count") == 0  # the guest left: its CID is free again


def test_credit_stalls_both_ways_with_bounded_memory(daemon):
    make_vsock(daemon, "v0", "b1")
    result = play(daemon, "b1", "stall")
    waits = result["host_waits"]
    # The guest took 8 KiB and stopped: the host's writes stopped too, after what the
    # kernel's socket buffers and our 64 KiB hold, far below the 64 MiB it tried.
    assert waits["accepted_while_stalled"] < 4 << 20, waits
    assert waits["received"] == waits["accepted_while_stalled"] and waits["intact"]
    guest = result["guest_waits"]
    # The host did not read: the guest stalled after its credit (256 KiB) plus what the
    # socket took, then sent everything once the host read.
    assert 256 << 10 <= guest["stalled"] < 4 << 20, guest
    assert guest["intact"], guest


def test_hostile_guest_gets_rst_and_a_liar_loses_its_device(daemon):
    make_vsock(daemon, "v0", "b1")
    result = play(daemon, "b1", "hostile")
    assert result["hostile"] == {"unknown": 4000, "other_cid": 3, "spoofed": 3, "refused": 3}
    assert result["second_cid"] == result["cid"] + 1
    assert "closed" in result["liar"]
    assert result["after_liar"] == 4000
    assert state(daemon, "v0", "no_connection") >= 2
    assert state(daemon, "v0", "bad_cid") == 2 * 2
    assert state(daemon, "v0", "errors") == 1
    assert "claims" in (daemon.admin / "devices/v0/last_error").read_text()


def test_a_guest_never_reaches_another_guests_cid(daemon):
    make_vsock(daemon, "v0", "b1")
    result = play(daemon, "b1", "cross", timeout=300)
    assert result["cross"] == {"tries": 10_000, "rst": 10_000, "reached_other": 0}
    assert state(daemon, "v0", "bad_cid") == 10_000


def test_non_members_and_other_buses_are_refused(daemon):
    """The guest is connected on b1; a process in no bus and one on bus b2 ask for its
    port: the gate closes both connections before the device sees a byte."""
    make_vsock(daemon, "v0", "b1")
    make_vsock(daemon, "v1", "b2")
    path = daemon.run_dir / "devices" / "v0.sock"
    code = f"""
import socket
s = socket.socket(socket.AF_UNIX)
s.connect({str(path)!r})
try:
    s.sendall(b"CONNECT 52\\n")
    s.settimeout(10)
    print("answer", repr(s.recv(100)))
except OSError as exc:
    print("answer", type(exc).__name__)
"""
    hold = ("from alacrity import client; import time\n"
            "g = client.connect().open('v0'); print(g.cid, flush=True); time.sleep(30)")
    argv = [sys.executable, "-m", "alacrity.cli", "bus", "exec", "b1", "--", sys.executable, "-c", hold]
    guest = subprocess.Popen(argv, env=daemon.env, stdout=subprocess.PIPE, text=True)
    try:
        assert guest.stdout.readline().strip() == "3"
        alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        other = daemon.in_bus("b2", code)
    finally:
        guest.kill()
        guest.wait()
    for out in (alone, other):
        # Closed before or after our line went out: either way, not a byte of an answer.
        answers = ("answer b''", "answer ConnectionResetError", "answer BrokenPipeError")
        assert out.stdout.strip() in answers, out.stdout + out.stderr
    log = daemon.log.read_text()
    assert "refused device v0" in log and "not a member of any bus" in log
    assert "device is not on bus b2" in log


def test_cid_base_is_checked_at_the_write(daemon):
    make_vsock(daemon, "v0", "b1")
    for bad in ("-1", "0", "2", "x", str(1 << 32), "4294967295"):
        assert daemon.sh(f"echo {bad} > $A/devices/v0/cid_base", check=False).returncode != 0, bad
    daemon.sh("echo 100 > $A/devices/v0/cid_base")
    assert (daemon.admin / "devices/v0/cid_base").read_text().strip() == "100"


def test_qemu_arguments():
    mmio = VsockDevice.qemu_args(Slot("v0", "/run/x/v0.sock", "mmio", "vm1", "d3", 0))
    assert mmio == ["-chardev", "socket,id=d3,path=/run/x/v0.sock",
                    "-device", "vhost-user-vsock-device,chardev=d3"]
    pci = VsockDevice.qemu_args(Slot("v0", "/run/x/v0.sock", "pci", "vm1", "d3", 0))
    assert pci[-1] == "vhost-user-vsock-pci,chardev=d3"


def test_a_client_that_says_nothing_useful_is_told_why(daemon):
    make_vsock(daemon, "v0", "b1")
    code = """
from alacrity import client
from alacrity.client.vsock import connect, VsockError
info = client.connect().device("v0")
for line in ("52",):
    try:
        connect(info.socket, 52)
    except VsockError as exc:
        print(exc)
"""
    out = daemon.in_bus("b1", code)
    assert "has no guest" in out.stdout, out.stdout + out.stderr


@pytest.mark.vm
def test_a_qemu_guest_gets_a_vsock_device_and_a_cid(daemon, guest_image):
    """QEMU 7.2 attaches vhost-user-vsock through the gate and reads the CID from our config
    space (GET_CONFIG); the guest sees a virtio device 0x13. The default image has no vsock
    module or tool, so the stream itself is tested with the process guest above."""
    make_vsock(daemon, "v0", "g1", "echo 21 > $A/devices/v0/cid_base")
    status, out = vm_run(daemon, "g1", "cat /sys/bus/virtio/devices/*/device", guest_image)
    assert status == 0, out
    assert "0x0013" in out, out
    assert re.search(r"vsock v0: \S+ is CID 21", daemon.log.read_text())
