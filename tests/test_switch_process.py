"""A real switch process, with NetClients over real sockets handed over the control
socket (in this process, and in child processes that we kill)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity.client.net import NetClient, NetError
from alacrity.switch.process import LOOP_ENV, Control
from alacrity.virtio import net as vn

BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, payload: bytes = b"hi") -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Rig:
    def __init__(self, root: Path, *extra: str) -> None:
        self.path = str(root / "switch.ctl")
        self.log = root / "switch.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "alacrity.switch", "--control", self.path,
                                          *extra], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.02)
        self.ctl = Control(self.path)
        self.clients: list[NetClient] = []

    def client(self) -> NetClient:
        ours, theirs = socket.socketpair()
        self.ctl.add_port(ours.fileno(), peer_pid=os.getpid())
        ours.close()
        nic = NetClient(theirs, timeout=5)
        self.clients.append(nic)
        return nic

    def ports(self) -> dict[str, dict]:
        return {p["mac"]: p for p in self.ctl.stats()["ports"]}

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def close(self) -> None:
        for nic in self.clients:
            nic.close()
        self.ctl.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def rig_with_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str) -> Iterator[Rig]:
    """A switch whose loop is wakeup.c's ("native") or the Python reference ("python")."""
    monkeypatch.setenv(LOOP_ENV, loop)
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def exchange(a: NetClient, b: NetClient, n: int = 200) -> None:
    """a and b trade n frames each, in batches; every one must arrive, in order."""
    for start in range(0, n, 50):
        a.send_batch(frame(b.mac, a.mac, i.to_bytes(4, "big")) for i in range(start, start + 50))
        b.send_batch(frame(a.mac, b.mac, i.to_bytes(4, "big")) for i in range(start, start + 50))
        for nic, peer in ((a, b), (b, a)):
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < 50 and time.monotonic() < deadline:
                got += nic.recv_batch(timeout=1.0)
            assert got == [frame(nic.mac, peer.mac, i.to_bytes(4, "big")) for i in range(start, start + 50)]


def drain(nic: NetClient) -> None:
    while nic.recv_batch(timeout=0.2):
        pass


def test_learning_unicast_and_flooding(rig: Rig):
    a, b, c = rig.client(), rig.client(), rig.client()
    assert len({a.mac, b.mac, c.mac}) == 3 and a.mtu == 1500
    a.send(frame(BROADCAST, a.mac, b"who"))
    for nic in (b, c):
        assert nic.recv(5) == frame(BROADCAST, a.mac, b"who")
    b.send(frame(a.mac, b.mac, b"me"))
    assert a.recv(5) == frame(a.mac, b.mac, b"me")
    a.send(frame(b.mac, a.mac, b"you"))
    assert b.recv(5) == frame(b.mac, a.mac, b"you")
    assert c.recv(0.3) is None  # b is known: not flooded
    fdb = {e["mac"]: e["port"] for e in rig.ctl.stats()["fdb"]}
    assert set(fdb) == {vn.mac_text(a.mac), vn.mac_text(b.mac)}
    exchange(a, b)


def test_stalled_port_counts_drops_while_others_flow(rig: Rig):
    check_a_stalled_port_costs_the_others_nothing(rig)


def check_a_stalled_port_costs_the_others_nothing(rig: Rig) -> None:
    """Two clients trade 1000 frames while a third never reads its RX ring."""
    a, b, stalled = rig.client(), rig.client(), rig.client()
    for _ in range(10):  # floods reach the stalled port, which never reads
        a.send_batch([frame(BROADCAST, a.mac)] * 64)
        drain(b)
    start = time.monotonic()
    exchange(a, b, 1000)
    assert time.monotonic() - start < 20
    port = rig.ports()[vn.mac_text(stalled.mac)]
    assert port["rx_dropped"] >= 640 - 256 and port["rx_packets"] <= 256


@pytest.mark.parametrize("header", [
    vn.HEADER.pack(0, 0, 5000, 0, 0, 0, 0),  # hdr_len beyond the frame
    vn.HEADER.pack(1, vn.GSO_TCPV4, 54, 60000, 34, 16, 0),  # GSO that was never negotiated
    vn.HEADER.pack(0, 0, 0, 1448, 0, 0, 0),  # gso_size without GSO
])
def test_absurd_header_breaks_only_its_port(rig: Rig, header: bytes):
    a, b, liar = rig.client(), rig.client(), rig.client()
    liar.send(frame(BROADCAST, liar.mac, bytes(100)), header=header)
    rig.wait_for(lambda: vn.mac_text(liar.mac) not in rig.ports())
    with pytest.raises(NetError):
        liar.recv(5)
    removed = rig.ctl.stats()["removed"]
    assert removed and "TX" in removed[-1]["reason"]
    exchange(a, b)


def test_protocol_garbage_breaks_only_its_port(rig: Rig):
    a, b = rig.client(), rig.client()
    ours, theirs = socket.socketpair()
    rig.ctl.add_port(ours.fileno())
    ours.close()
    theirs.sendall(b"\xff" * 64)
    rig.wait_for(lambda: len(rig.ports()) == 2)
    theirs.close()
    exchange(a, b)


CHILD = r"""
import socket, sys
from alacrity.client.net import NetClient
nic = NetClient(socket.socket(fileno=int(sys.argv[1])), timeout=5)
print("ready", flush=True)
frame = b"\xff" * 6 + nic.mac + b"\x88\xb5" + bytes(1000)
while True:
    nic.send_batch([frame] * 16)
    nic.recv_batch()
"""


def test_killed_client_port_disappears(rig: Rig):
    a, b = rig.client(), rig.client()
    ours, theirs = socket.socketpair()
    rig.ctl.add_port(ours.fileno(), label="child")
    ours.close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())],
                             pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True)
    theirs.close()
    try:
        assert child.stdout.readline().strip() == "ready"
        rig.wait_for(lambda: any(p["tx_packets"] > 100 for p in rig.ctl.stats()["ports"]
                                 if p["label"] == "child"))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        rig.wait_for(lambda: all(p["label"] != "child" for p in rig.ctl.stats()["ports"]))
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
    for nic in (a, b):
        drain(nic)  # floods from the child
    exchange(a, b)


def test_adaptive_poll_follows_how_soon_peers_come_back(tmp_path: Path):
    """The spin grows (from nothing, doubling, up to the budget) while wake-ups come within
    the budget, and halves down to nothing while they come later."""
    from alacrity.switch.process import POLL_MIN_S, Switch

    switch = Switch(str(tmp_path / "ctl"), poll_budget_s=200e-6, engine="python")
    try:
        assert switch.poll_s == 200e-6
        spins = []
        for gap in [1e-3] * 6 + [50e-6] * 7:
            switch._adapt_poll(gap)
            spins.append(round(switch.poll_s * 1e6, 3))
        assert spins == [100, 50, 25, 12.5, 0, 0, POLL_MIN_S * 1e6, 20, 40, 80, 160, 200, 200]
    finally:
        switch.close()


def test_slow_peers_get_no_spin(rig: Rig):
    """Frames 5 ms apart (a peer far slower than the 200 us budget): the switch stops spinning
    and sleeps between frames, and every frame still arrives."""
    a, b = rig.client(), rig.client()
    b.send(frame(BROADCAST, b.mac, b"hello"))
    assert a.recv(5) is not None
    for i in range(30):
        a.send(frame(b.mac, a.mac, i.to_bytes(4, "big")))
        assert b.recv(5) == frame(b.mac, a.mac, i.to_bytes(4, "big"))
        time.sleep(0.005)
    stats = rig.ctl.stats()["stats"]
    assert stats["poll_us"] == 0 and stats["sleeps"] >= 30


def test_switch_runs_at_the_priority_it_is_given(tmp_path):
    """`--nice N` is set before privileges are dropped (only root may raise a priority); by
    default the switch keeps its parent's."""
    if os.geteuid() != 0:
        pytest.skip("only root may raise a priority")
    (tmp_path / "raised").mkdir()
    (tmp_path / "plain").mkdir()
    raised = Rig(tmp_path / "raised", "--nice", "-5")
    try:
        assert os.getpriority(os.PRIO_PROCESS, raised.proc.pid) == -5
    finally:
        raised.close()
    plain = Rig(tmp_path / "plain")
    try:
        assert os.getpriority(os.PRIO_PROCESS, plain.proc.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        plain.close()
