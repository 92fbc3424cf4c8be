"""Networking follows a migrated VM: a port's peer sends SEND_RARP (as the destination QEMU
does once a guest has moved), and a real switch process broadcasts QEMU's RARP from the
guest's MAC as if that port had sent it, to every other port and through a real tap."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity.client.net import NetClient, NetError
from alacrity.switch.port import rarp_frame
from alacrity.switch.tap import open_tap
from alacrity.vhost_user.messages import ProtocolFeature, Req, encode
from alacrity.virtio import net as vn
from alacrity.virtio.features import bit
from alacrity.vm.qmp import QmpClient
from alacrity.vm.runtime import find_vm
from tests.test_switch_process import BROADCAST, Rig, exchange, frame

GUEST = bytes.fromhex("525400a1b2c3")  # the migrating guest's MAC, set by its QEMU
_names = itertools.count()

#: A port on the bus: print the first RARP frame it gets, in hex.
LISTEN = r"""
import time
from alacrity import client
nic = client.connect().open("sw0", timeout=5)
print("ready", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    got = nic.recv(1)
    if got and got[12:14] == b"\x80\x35":
        print(got.hex(), flush=True)
        break
"""

#: Run in the tap's namespace: print the first RARP frame the kernel gets on the tap, in hex.
CAPTURE = r"""
import select, socket, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
sock.bind((sys.argv[1], 0x8035))
print("ready", flush=True)
if select.select([sock], [], [], 10)[0]:
    print(sock.recv(2048).hex(), flush=True)
"""


@pytest.fixture(params=["python", "native"])
def rig(request, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, "--engine", request.param)
    try:
        if r.ctl.stats()["stats"]["engine"] != request.param:
            pytest.skip(f"the {request.param} engine is not available here")
        yield r
    finally:
        r.close()


def announcer(rig: Rig) -> NetClient:
    """A port whose driver negotiated RARP, as QEMU does when the switch offers it."""
    nic = rig.client()
    offered = nic.frontend.get_protocol_features()
    assert offered & bit(ProtocolFeature.RARP)
    nic.frontend.set_protocol_features(nic.protocol_features | bit(ProtocolFeature.RARP))
    return nic


def send_rarp(nic: NetClient, payload: bytes) -> None:
    """SEND_RARP as QEMU 7.2 sends it (vhost_user_migration_done: no reply asked)."""
    nic.frontend.sock.sendall(encode(Req.SEND_RARP, payload))


def next_of(nic: NetClient, ethertype: bytes, timeout: float = 5.0) -> bytes | None:
    """The next frame of `ethertype` `nic` gets (others, e.g. the host's IPv6, are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = nic.recv(left)
        if got is not None and got[12:14] == ethertype:
            return got
    return None


def port_of(rig: Rig, nic: NetClient) -> int:
    return next(p["port"] for p in rig.ctl.stats()["ports"] if p["assigned_mac"] == vn.mac_text(nic.mac))


def fdb(rig: Rig) -> dict[str, int]:
    return {e["mac"]: e["port"] for e in rig.ctl.stats()["fdb"]}


@pytest.fixture
def tap_in_netns(rig: Rig) -> Iterator[tuple[str, str]]:
    """A real tap as the switch's uplink, moved into a network namespace of its own (IPv6
    off, so the kernel stays quiet): (namespace, tap name)."""
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("a tap and a network namespace need root and /dev/net/tun")
    netns, tap = f"alac-rarp-{os.getpid()}-{next(_names)}", f"alr{os.getpid() % 100000}x{next(_names)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for key in ("all", "default"):
            sysctl = ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"]
            subprocess.run(["ip", "netns", "exec", netns, *sysctl], check=True)
        fd = open_tap(tap)
        try:
            rig.ctl.request({"op": "add_uplink", "label": "uplink"}, (fd,))
        finally:
            os.close(fd)  # the switch holds the tap now
        subprocess.run(["ip", "link", "set", tap, "netns", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", tap, "up"], check=True)
        yield netns, tap
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_send_rarp_moves_the_guest_to_its_new_port(rig: Rig, tap_in_netns):
    netns, tap = tap_in_netns
    old, new, other = rig.client(), announcer(rig), rig.client()
    old.send(frame(BROADCAST, GUEST, b"guest on the source"))  # the guest, before it moved
    old.send(frame(BROADCAST, old.mac, b"the source port itself"))
    for nic in (new, other):
        assert next_of(nic, b"\x88\xb5") == frame(BROADCAST, GUEST, b"guest on the source")
    assert fdb(rig)[vn.mac_text(GUEST)] == port_of(rig, old)
    for nic in (old, new, other):
        while nic.recv(0.2):
            pass

    capture = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", CAPTURE, tap],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout.readline().strip() == "ready"
        send_rarp(new, GUEST + b"\0\0")
        rarp = rarp_frame(GUEST)
        assert len(rarp) == 60 and rarp[12:14] == b"\x80\x35"
        for nic in (old, other):  # every other port, the source's too
            assert next_of(nic, b"\x80\x35") == rarp
        assert capture.stdout.readline().strip() == rarp.hex()  # and the host, through the tap
    finally:
        capture.kill()
        capture.wait()
    assert next_of(new, b"\x80\x35", 0.3) is None  # not back to the sender
    assert fdb(rig)[vn.mac_text(GUEST)] == port_of(rig, new)

    other.send(frame(GUEST, other.mac, b"to the guest"))  # unicast now goes to the new port
    assert next_of(new, b"\x88\xb5") == frame(GUEST, other.mac, b"to the guest")
    assert next_of(old, b"\x88\xb5", 0.3) is None

    source = port_of(rig, old)
    assert source in fdb(rig).values()
    rig.clients.remove(old)
    old.close()  # the source QEMU quits: its port and what was learned on it go
    rig.wait_for(lambda: source not in fdb(rig).values() and len(rig.ctl.stats()["ports"]) == 3)
    exchange(new, other)


@pytest.mark.parametrize("payload, negotiate, why", [
    (GUEST[:4], True, "payload of 4 bytes, need 8"),
    (GUEST + bytes(10), True, "payload of 16 bytes, need 8"),
    (b"", True, "payload of 0 bytes, need 8"),
    (GUEST + b"\0\0", False, "without the RARP protocol feature"),
    (BROADCAST + b"\0\0", True, "not a guest's address"),
    (bytes(8), True, "not a guest's address"),
])
def test_hostile_send_rarp_breaks_only_its_port(rig: Rig, payload: bytes, negotiate: bool, why: str):
    a, b = rig.client(), rig.client()
    liar = announcer(rig) if negotiate else rig.client()
    send_rarp(liar, payload)
    rig.wait_for(lambda: len(rig.ctl.stats()["ports"]) == 2)
    removed = rig.ctl.stats()["removed"]
    assert why in removed[-1]["reason"], removed
    with pytest.raises(NetError):
        liar.recv(5)
    assert next_of(a, b"\x80\x35", 0.3) is None  # nothing was announced
    assert vn.mac_text(GUEST) not in fdb(rig)
    exchange(a, b)


@pytest.mark.vm
def test_qemus_own_announcement_comes_through_send_rarp(daemon, guest_image):
    """QEMU 7.2 announces a guest (after a migration, or on QMP announce-self) through
    SEND_RARP to a vhost-user NIC: the switch offers RARP, and the bus sees the frame."""
    daemon.make_switch("sw0", ["b1"])
    alacrity = [sys.executable, "-m", "alacrity.cli"]
    run = [*alacrity, "vm", "run", "--bus", "b1", "--name", "v1", "--detach", "--mac", vn.mac_text(GUEST),
           "--kernel", str(guest_image.kernel), "--initrd", str(guest_image.initrd)]
    started = subprocess.run(run, env=daemon.env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    listener = subprocess.Popen([*alacrity, "bus", "exec", "b1", "--", sys.executable, "-c", LISTEN],
                                env=daemon.env, stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        vm = find_vm("v1", Path(daemon.env["ALACRITY_VM_DIR"]))
        assert vm is not None
        with QmpClient(vm.qmp, timeout=10) as qmp:
            qmp.execute("announce-self", {"initial": 50, "max": 550, "rounds": 2, "step": 100})
        assert listener.stdout.readline().strip() == rarp_frame(GUEST).hex()
    finally:
        listener.kill()
        listener.wait()
        subprocess.run([*alacrity, "vm", "stop", "v1"], env=daemon.env, capture_output=True, timeout=60)
