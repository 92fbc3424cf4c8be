"""The tap uplink (switch/tap.py) with a real tap device in a network namespace of its own.

The engine runs in this process with a TapPort and an in-memory port (a NetDriver over a
bytearray, as in test_switch_engine); the test answers for that port by hand (ARP, ICMP
echo, a minimal TCP receiver at 10.77.0.2) while the namespace's kernel talks to it
through the tap at 10.77.0.1."""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from alacrity.switch.engine import Engine
from alacrity.switch.fdb import Fdb
from alacrity.switch.tap import TapPort, open_tap
from alacrity.virtio import net as vn
from tests.test_switch_engine import BASE_FEATURES, Host
from tests.test_switch_offload import TSO_RX, TSO_TX, build_tcp, pseudo_header, ref_checksum

TAP_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
ACK, SYN, FIN, RST, PSH = 0x10, 0x02, 0x01, 0x04, 0x08
PORT = 5000
_names = itertools.count()


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def tap_name() -> str:
    return f"alt{os.getpid() % 100000}x{next(_names)}"  # at most 15 characters


@pytest.fixture
def netns() -> Iterator[str]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing (no tun module)")
    if os.geteuid() != 0:
        pytest.skip("tap devices and network namespaces need root")
    name = f"alac-test-{os.getpid()}-{next(_names)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


# -- the in-memory port's side, by hand
def ipv4(src: str, dst: str, proto: int, body: bytes, ident: int = 1) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, 0x4000, 64, proto, 0,
                       ip4(src), ip4(dst))
    return head[:10] + struct.pack("!H", ref_checksum(head)) + head[12:] + body


def tcp(src_mac: bytes, dst_mac: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        options: bytes = b"", payload: bytes = b"", src: str = GUEST_IP, dst: str = TAP_IP) -> bytes:
    head = struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, ack % 2**32, (20 + len(options)) // 4 << 4,
                       flags, 65535, 0, 0) + options
    seg = head + payload
    check = ref_checksum(pseudo_header(False, ip4(src), ip4(dst), 6, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", check) + seg[18:]
    return dst_mac + src_mac + b"\x08\x00" + ipv4(src, dst, 6, seg)


class Guest:
    """10.77.0.2 behind the in-memory port: answers ARP and pings, and receives one TCP stream."""

    def __init__(self, mac: bytes) -> None:
        self.mac = mac
        self.frames: list[tuple[vn.NetHeader, bytes]] = []
        self.pings = 0
        self.stream = bytearray()
        self.rcv_nxt: int | None = None
        self.iss = 7000
        self.rst: tuple[int, int] | None = None  # (seq, ack) of a reset from the host

    def handle(self, header: vn.NetHeader, frame: bytes) -> list[bytes]:
        self.frames.append((header, frame))
        kind = frame[12:14]
        if kind == b"\x08\x06" and len(frame) >= 42:
            op, sha, spa, _tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
            if op == 1 and tpa == ip4(GUEST_IP):
                body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, self.mac, tpa, sha, spa)
                return [sha + self.mac + b"\x08\x06" + body]
            return []
        if kind != b"\x08\x00" or frame[14 + 16 : 14 + 20] != ip4(GUEST_IP):
            return []
        ihl = (frame[14] & 15) * 4
        proto, src = frame[14 + 9], socket.inet_ntoa(frame[14 + 12 : 14 + 16])
        body = frame[14 + ihl : 14 + struct.unpack_from("!H", frame, 16)[0]]
        if proto == 1 and body[0] == 8:  # echo request
            self.pings += 1
            reply = b"\x00\x00\x00\x00" + body[4:]
            reply = reply[:2] + struct.pack("!H", ref_checksum(reply)) + reply[4:]
            return [frame[6:12] + self.mac + b"\x08\x00" + ipv4(GUEST_IP, src, 1, reply)]
        if proto != 6:
            return []
        sport, dport, seq, ack_seq, doff, flags = struct.unpack_from("!HHIIBB", body)
        data = body[(doff >> 4) * 4 :]
        if flags & RST:
            self.rst = (seq, ack_seq)
            return []
        if dport != PORT:
            return []
        if flags & SYN:
            self.rcv_nxt = seq + 1
            return self._reply(frame, sport, src, SYN | ACK, b"\x02\x04\x05\xb4")  # MSS 1460
        if self.rcv_nxt is None:
            return []
        behind = (self.rcv_nxt - seq) % 2**32
        if behind < len(data):  # new bytes, in order
            self.stream += data[behind:]
            self.rcv_nxt = (self.rcv_nxt + len(data) - behind) % 2**32
            if flags & FIN:
                self.rcv_nxt = (self.rcv_nxt + 1) % 2**32
        return self._reply(frame, sport, src, ACK)

    def _reply(self, frame: bytes, sport: int, src: str, flags: int, options: bytes = b"") -> list[bytes]:
        seq = self.iss if flags & SYN else self.iss + 1
        return [tcp(self.mac, frame[6:12], PORT, sport, seq, self.rcv_nxt or 0, flags, options, dst=src)]


class Rig:
    """An engine with a TapPort (its tap moved into `netns` as 10.77.0.1/24) and an in-memory port."""

    def __init__(self, netns: str, features: int = BASE_FEATURES, tx_slot: int = 2048) -> None:
        self.netns = netns
        self.name = tap_name()
        self.children: list[subprocess.Popen] = []
        self.tap = TapPort(1, open_tap(self.name, mtu=1500), mtu=1500, label=self.name)
        try:
            self.engine = Engine(Fdb(), batch=8)  # 8 TSO frames of up to 64 KiB fit the RX ring
            self.host = Host(2, features=features, queue_size=1024, tx_slot=tx_slot)
            self.guest = Guest(self.host.mac)
            self.engine.add_port(self.tap)
            self.engine.add_port(self.host.port)
            sh("ip", "link", "set", self.name, "netns", netns)
            sh("ip", "-n", netns, "addr", "add", f"{TAP_IP}/24", "dev", self.name)
            sh("ip", "-n", netns, "link", "set", self.name, "up")
        except BaseException:
            self.close()
            raise

    def pump(self, done: Callable[[], bool], timeout: float = 15.0) -> None:
        """Run the engine, and the guest's answers, until `done()`."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; tap {self.tap.counters()}"
            work = self.engine.poll_once()
            for header, frame in self.host.received_with_headers():
                for reply in self.guest.handle(header, frame):
                    self.host.send_raw(reply)
            if not work:
                select.select([self.tap.fileno()], [], [], 0.005)
            assert self.engine.broken == [], self.engine.broken[0].broken

    def in_netns(self, code: str, *args: str) -> subprocess.Popen:
        child = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, "-c", code, *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.communicate()
        self.tap.close()  # the tap is not persistent: it goes with its last fd
        sh("ip", "-n", self.netns, "link", "del", self.name, check=False)


@pytest.fixture
def rig_factory(netns: str) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(features: int = BASE_FEATURES, **kw) -> Rig:
        rigs.append(Rig(netns, features, **kw))
        return rigs[-1]

    try:
        yield make
    finally:
        for rig in rigs:
            rig.close()


PING = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(10)
def csum(b):
    b += b"\0" * (len(b) & 1)
    t = sum(struct.unpack(f"!{len(b)//2}H", b))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
for seq in range(3):
    req = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + b"alacrity"
    req = req[:2] + struct.pack("!H", csum(req)) + req[4:]
    s.sendto(req, ("10.77.0.2", 0))
    while True:
        data = s.recv(2000)
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack_from("!HH", icmp, 4) == (0x4242, seq):
            assert icmp[8:] == b"alacrity" and csum(icmp) == 0
            break
print("pong", seq + 1)
"""


def test_arp_and_ping_from_the_host(rig_factory):
    rig = rig_factory()
    child = rig.in_netns(PING)
    rig.pump(lambda: child.poll() is not None)
    out, err = child.communicate()
    assert child.returncode == 0 and out.strip() == "pong 3", err
    assert rig.guest.pings == 3
    arps = [f for _, f in rig.guest.frames if f[12:14] == b"\x08\x06"]
    assert arps and arps[0][:6] == b"\xff" * 6  # the host asked who has 10.77.0.2, by broadcast
    tap, port = rig.tap.counters(), rig.host.port.counters()
    assert tap["tx_packets"] >= 4 and tap["rx_packets"] >= 4 and tap["tx_errors"] == 0
    assert port["rx_packets"] == tap["tx_packets"] - tap["tx_dropped"]
    # the switch learned the host's tap MAC on the tap port, and the guest's on its own
    assert {e.port for e in rig.engine.fdb.entries(time.monotonic())} == {1, 2}


SEND = r"""
import socket, sys
n = int(sys.argv[1])
data = bytes(i % 251 for i in range(n))
s = socket.create_connection(("10.77.0.2", 5000), timeout=20)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
s.sendall(data)
s.close()
print("sent", n)
"""


def stream(rig: Rig, size: int) -> None:
    child = rig.in_netns(SEND, str(size))
    rig.pump(lambda: len(rig.guest.stream) >= size, timeout=30)
    _out, err = child.communicate(timeout=20)
    assert child.returncode == 0, err
    assert bytes(rig.guest.stream) == bytes(i % 251 for i in range(size))


def tcp_frames(rig: Rig) -> list[tuple[vn.NetHeader, bytes]]:
    return [(h, f) for h, f in rig.guest.frames if f[12:14] == b"\x08\x00" and f[23] == 6]


def test_big_tcp_send_reaches_a_tso_receiver_as_gso_frames(rig_factory):
    rig = rig_factory(TSO_RX)
    stream(rig, 400_000)
    frames = tcp_frames(rig)
    gso = [(h, f) for h, f in frames if h.gso_type != vn.GSO_NONE]
    assert gso, "the host's TCP never sent a TSO frame through the tap"
    for header, frame in gso:
        assert header.gso_type == vn.GSO_TCPV4 and header.flags & vn.HDR_F_NEEDS_CSUM
        assert header.csum_start == 34 and header.csum_offset == 16 and 0 < header.gso_size <= 1460
        assert len(frame) > 1514
    assert rig.engine.segmented == 0 and rig.host.port.rx_dropped_offload == 0


def test_big_tcp_send_is_segmented_for_a_receiver_without_tso(rig_factory):
    rig = rig_factory(BASE_FEATURES)
    stream(rig, 400_000)
    assert rig.engine.segmented > 0, "the host's TCP never sent a TSO frame through the tap"
    for header, frame in tcp_frames(rig):
        assert header.flags == 0 and header.gso_type == vn.GSO_NONE and len(frame) <= 1514
        ihl = (frame[14] & 15) * 4
        assert ref_checksum(frame[14 : 14 + ihl]) == 0
        seg = frame[14 + ihl :]
        assert ref_checksum(pseudo_header(False, frame[26:30], frame[30:34], 6, len(seg)) + seg) == 0
    assert rig.host.port.rx_dropped_offload == 0


def test_gso_frame_from_a_guest_reaches_the_host_whole(rig_factory):
    rig = rig_factory(TSO_TX | TSO_RX, tx_slot=8192)
    child = rig.in_netns(PING)  # learn each other's addresses first
    rig.pump(lambda: child.poll() is not None)
    child.communicate()
    tap_mac = next(f for _, f in rig.guest.frames if f[12:14] == b"\x08\x06")[6:12]  # from its ARP
    # 6000 bytes (no ACK flag) to a closed port in one TSO frame: the host answers with one reset
    # that acknowledges all of it, so it took the frame whole
    payload = bytes(range(256)) * 23 + bytes(112)
    frame = tcp(rig.host.mac, tap_mac, 40000, 9, 1000, 0, PSH, payload=payload)
    # NEEDS_CSUM: the checksum field holds the pseudo-header sum, not the checksum
    partial = ~ref_checksum(pseudo_header(False, ip4(GUEST_IP), ip4(TAP_IP), 6, 20 + len(payload))) & 0xFFFF
    frame = frame[:50] + struct.pack("!H", partial) + frame[52:]
    before = rig.tap.rx_packets
    rig.host.send_raw(frame, vn.HEADER.pack(vn.HDR_F_NEEDS_CSUM, vn.GSO_TCPV4, 54, 1448, 34, 16, 0))
    rig.pump(lambda: rig.guest.rst is not None)
    assert rig.guest.rst == (0, 1000 + len(payload))
    assert rig.tap.rx_packets == before + 1 and rig.engine.segmented == 0


def test_link_down_is_a_counted_drop_not_a_fault(rig_factory, netns):
    rig = rig_factory()
    sh("ip", "-n", netns, "link", "set", rig.name, "down")
    rig.host.send(b"\xff" * 6, b"anyone?")
    rig.engine.poll_once()
    assert rig.engine.broken == [] and rig.tap.broken is None
    assert rig.tap.rx_dropped == 1 and rig.tap.rx_packets == 0 and rig.tap.write_errors == 1


# -- a TapPort over a datagram socketpair: one datagram per read, as a tap gives (no root needed)
@pytest.fixture
def fake_tap() -> Iterator[tuple[Engine, TapPort, socket.socket, Host]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    kernel.setblocking(False)
    tap = TapPort(1, os.dup(ours.fileno()), mtu=1500, label="fake")
    ours.close()
    engine = Engine(Fdb(), batch=8)
    host = Host(2, queue_size=256)
    engine.add_port(tap)
    engine.add_port(host.port)
    try:
        yield engine, tap, kernel, host
    finally:
        tap.close()
        kernel.close()


def test_frames_from_the_tap_are_checked_and_bad_ones_dropped(fake_tap):
    engine, tap, kernel, host = fake_tap
    ok = b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(50)
    for bad in (vn.HEADER.pack(0, 0, 9000, 0, 0, 0, 0) + ok,  # hdr_len beyond the frame
                vn.HEADER.pack(1, 1, 54, 1448, 34, 16, 0) + ok,  # TSO, but not a TCP frame
                vn.HEADER.pack(4, 0, 0, 0, 0, 0, 0) + ok,  # unknown flag
                vn.HEADER.pack(0, 0, 0, 0, 0, 0, 0) + ok + bytes(2000),  # over the MTU
                b"short"):
        kernel.send(bad)
    kernel.send(bytes(12) + ok)
    assert engine.poll_once() == 6
    assert tap.tx_errors == 5 and tap.broken is None and engine.broken == []
    assert host.received() == [ok] and tap.tx_packets == 1
    assert engine.poll_once() == 0


def test_tso_frames_from_the_tap_are_cut_for_a_plain_port(fake_tap):
    engine, tap, kernel, host = fake_tap
    built = build_tcp(bytes(range(256)) * 16, dst=host.mac)
    kernel.send(built.packed(1448) + built.frame)
    engine.poll_once()
    got = host.received()
    assert len(got) == 3 and b"".join(f[built.payload_at :] for f in got) == bytes(range(256)) * 16
    assert engine.segmented == 1 and tap.tx_packets == 1 and host.port.rx_packets == 3


def test_frames_to_the_tap_keep_their_offloads(fake_tap):
    engine, tap, kernel, host = fake_tap
    host.port.set_features(TSO_TX)
    built = build_tcp(bytes(1000), src=host.mac, dst=bytes.fromhex("02aaaaaaaaaa"))
    host.send_raw(built.frame, built.packed(500))
    engine.poll_once()
    got = kernel.recv(70000)
    assert got[:10] == built.packed(500)[:10] and got[12:] == built.frame  # whole, with its header
    assert engine.segmented == 0 and tap.rx_packets == 1


def test_full_tap_queue_is_a_counted_drop(fake_tap):
    engine, tap, kernel, host = fake_tap
    sent = 0
    while tap.rx_dropped == 0:
        host.send(b"\xff" * 6, bytes(1000))
        engine.poll_once()
        host.received()
        sent += 1
        assert sent < 100_000
    assert tap.broken is None and tap.rx_packets == sent - 1 and tap.write_errors == 0
    while True:  # the "kernel" catches up: frames flow again
        try:
            kernel.recv(70000)
        except BlockingIOError:
            break
    host.send(b"\xff" * 6, b"again")
    engine.poll_once()
    got = kernel.recv(70000)
    assert got[:12] == bytes(12) and got[12:] == b"\xff" * 6 + host.mac + b"\x88\xb5again"


def test_a_broken_tap_fd_breaks_the_port(fake_tap):
    engine, tap, kernel, host = fake_tap
    os.close(tap.fd)
    tap.fd = os.open("/dev/null", os.O_WRONLY)  # reads now fail (EBADF); closed by the fixture
    engine.poll_once()
    assert [p.id for p in engine.take_broken()] == [1] and "read" in tap.broken
    assert 1 not in engine.taps
    host.send(b"\xff" * 6)
    engine.poll_once()
    assert host.port.tx_dropped == 1  # nobody left to hear it


def test_open_tap_attaches_to_an_existing_tap_and_names_it_in_errors():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing (no tun module)")
    if os.geteuid() != 0:
        pytest.skip("tap devices need root")
    name = tap_name()
    sh("ip", "tuntap", "add", "mode", "tap", "name", name)  # persistent, without a vnet header
    try:
        fd = open_tap(name, mtu=1400)
        try:
            flags = os.get_blocking(fd), os.get_inheritable(fd)
            assert flags == (False, False)
            link = sh("ip", "-d", "link", "show", name).stdout
            assert "mtu 1400" in link and "vnet_hdr on" in link and ",UP" in link
            with pytest.raises(OSError, match=f"tap '{name}'.*in use") as exc:
                open_tap(name)
            assert exc.value.errno == errno.EBUSY
        finally:
            os.close(fd)
        assert name in sh("ip", "link", "show", name).stdout  # persistent: still there
    finally:
        sh("ip", "tuntap", "del", "mode", "tap", "name", name, check=False)
    with pytest.raises(OSError, match="tap 'lo'.*TUNSETIFF.*not a tap"):
        open_tap("lo")
    with pytest.raises(OSError, match="not an interface name"):
        open_tap("x" * 16)
    with pytest.raises(OSError, match="MTU"):
        open_tap(name, mtu=10)


def test_a_made_tap_lives_while_its_fd_is_open():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing (no tun module)")
    if os.geteuid() != 0:
        pytest.skip("tap devices need root")
    name = tap_name()
    fd = open_tap(name)
    try:
        assert "persist off" in sh("ip", "-d", "link", "show", name).stdout
        port = TapPort(5, fd, mtu=1500)
        assert port.fileno() == fd and port.read() is None and port.counters()["rx_packets"] == 0
    finally:
        os.close(fd)
    assert sh("ip", "link", "show", name, check=False).returncode != 0
