"""Run inside a bus by tests/test_vsock.py: this process plays a guest of a vsock device
(VsockGuest, over real vhost-user rings) and the host processes that talk to it (through
the device's gate socket), and prints what it saw as JSON on its last line."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from alacrity import client
from alacrity.client.vsock import Listener, VsockError, VsockGuest, connect
from alacrity.virtio import vsock as vs

GUEST_PORT = 52


class Peer:
    """Our guest's side of one stream: credit bookkeeping as a guest kernel does it."""

    def __init__(self, g: VsockGuest, port: int, host_port: int, buf_alloc: int) -> None:
        self.g, self.port, self.host_port, self.buf_alloc = g, port, host_port, buf_alloc
        self.fwd_cnt = 0  # what our "application" consumed
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0

    def hdr(self, op: int, **kw) -> vs.Header:
        return self.g.header(op, self.port, self.host_port, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt,
                             **kw)

    def credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)

    def note(self, h: vs.Header) -> None:
        self.peer_buf_alloc, self.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt

    def write(self, data: bytes) -> None:
        self.g.send(self.hdr(vs.OP_RW), data)
        self.tx_cnt += len(data)


def expect(g: VsockGuest, op: int, timeout: float = 5.0) -> tuple[vs.Header, bytes]:
    got = g.recv(timeout)
    assert got is not None, f"no packet within {timeout} s, expected op {op}"
    assert got[0].op == op, f"expected op {op}, got {got[0].describe()}"
    return got


def host_connect_to(g: VsockGuest, path: str, buf_alloc: int) -> tuple[socket.socket, Peer]:
    """A host process connects to our port 52; we (the guest) accept."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(conn=connect(path, GUEST_PORT, str(g.cid))))
    thread.start()
    request, _ = expect(g, vs.OP_REQUEST)
    assert request.dst_port == GUEST_PORT and request.dst_cid == g.cid and request.src_cid == vs.CID_HOST
    peer = Peer(g, GUEST_PORT, request.src_port, buf_alloc)
    peer.note(request)
    g.send(peer.hdr(vs.OP_RESPONSE))
    thread.join(10)
    sock, host_port = result["conn"]
    assert host_port == request.src_port
    return sock, peer


def echo(g: VsockGuest, path: str) -> dict:
    sock, peer = host_connect_to(g, path, 1 << 16)
    sock.sendall(b"hello from the host")
    h, data = expect(g, vs.OP_RW)
    # Bytes sent with the CONNECT line wait for the guest's answer, then go first.
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(path)
    raw.sendall(f"CONNECT {GUEST_PORT} {g.cid}\nearly".encode())
    request, _ = expect(g, vs.OP_REQUEST)
    g.send(g.header(vs.OP_RESPONSE, GUEST_PORT, request.src_port))
    early = expect(g, vs.OP_RW)[1]
    g.send(g.header(vs.OP_RST, GUEST_PORT, request.src_port))
    raw.settimeout(5)
    early_reply = raw.recv(100)
    peer.note(h)
    peer.fwd_cnt += len(data)
    peer.write(data.upper())
    back = sock.recv(100)
    # The guest connects to a host listener, both ways.
    listener = Listener(path, 7000, str(g.cid))
    g.send(g.header(vs.OP_REQUEST, 3000, 7000))
    response, _ = expect(g, vs.OP_RESPONSE)
    stream, guest_port = listener.accept(5)
    guest = Peer(g, 3000, 7000, 1 << 16)
    guest.note(response)
    guest.write(b"guest says hi")
    heard = stream.recv(100)
    stream.sendall(b"host answers")
    h, answer = expect(g, vs.OP_RW)
    # The host closes: the guest hears SHUTDOWN, then RST after it shuts down too.
    stream.close()
    h, _ = expect(g, vs.OP_SHUTDOWN)
    g.send(guest.hdr(vs.OP_SHUTDOWN, flags=vs.SHUTDOWN_BOTH))
    expect(g, vs.OP_RST)
    listener.close()
    sock.close()
    expect(g, vs.OP_SHUTDOWN)  # the host's EOF; the guest closes too, and hears RST
    g.send(peer.hdr(vs.OP_SHUTDOWN, flags=vs.SHUTDOWN_BOTH))
    expect(g, vs.OP_RST)
    return {"back": back.decode(), "heard": heard.decode(), "answer": answer.decode(),
            "guest_port": guest_port, "early": early.decode(), "early_reply": early_reply.decode()}


def host_waits_for_a_guest_that_stops_reading(g: VsockGuest, path: str) -> dict:
    """We advertise 8 KiB and never consume: the host's writes stop with bounded memory."""
    sock, peer = host_connect_to(g, path, 8192)
    sock.setblocking(False)
    accepted, chunk = 0, b"h" * 65536
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and accepted < (64 << 20):
        try:
            accepted += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    received = b""
    while (got := g.recv(0.5)) is not None:
        assert got[0].op == vs.OP_RW, got[0].describe()
        received += got[1]
    # Now read: tell the device we consumed it all, repeatedly, until everything came.
    while len(received) < accepted:
        peer.fwd_cnt = len(received) & 0xFFFFFFFF
        g.send(peer.hdr(vs.OP_CREDIT_UPDATE))
        while (got := g.recv(0.2)) is not None:
            if got[0].op == vs.OP_RW:
                received += got[1]
    sock.close()
    while expect(g, vs.OP_RW if len(received) < accepted else vs.OP_SHUTDOWN)[0].op == vs.OP_RW:
        pass
    g.send(peer.hdr(vs.OP_SHUTDOWN, flags=vs.SHUTDOWN_BOTH))
    expect(g, vs.OP_RST)
    return {"accepted_while_stalled": accepted, "received": len(received),
            "intact": received == b"h" * len(received)}


def guest_waits_for_a_host_that_stops_reading(g: VsockGuest, path: str) -> dict:
    listener = Listener(path, 7001, str(g.cid))
    g.send(g.header(vs.OP_REQUEST, 3001, 7001))
    response, _ = expect(g, vs.OP_RESPONSE)
    stream, _port = listener.accept(5)
    peer = Peer(g, 3001, 7001, 1 << 16)
    peer.note(response)
    pattern = bytes(range(256)) * 16  # 4 KiB
    sent = 0
    # Write while there is credit; collect credit updates as they come.
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        while (got := g.recv(0.05)) is not None:
            peer.note(got[0])
            idle_since = time.monotonic()
        if peer.credit() >= len(pattern):
            peer.write(pattern)
            sent += len(pattern)
            idle_since = time.monotonic()
    stalled = sent
    # The host reads it all: credit comes back and the guest goes on.
    received = bytearray()
    stream.settimeout(5)
    target = stalled + (1 << 20)
    while len(received) < target:
        while (got := g.recv(0.001)) is not None:
            peer.note(got[0])
        if sent < target and peer.credit() >= len(pattern):
            peer.write(pattern)
            sent += len(pattern)
        try:
            stream.settimeout(0.001)
            received += stream.recv(1 << 20)
        except TimeoutError:
            pass
    stream.close()
    listener.close()
    intact = bytes(received) == pattern * (target // len(pattern))
    return {"stalled": stalled, "received": len(received), "intact": intact}


def hostile(g: VsockGuest) -> dict:
    seen = {}
    g.send(g.header(vs.OP_RW, 4000, 4001), b"nobody")  # no such connection
    seen["unknown"] = expect(g, vs.OP_RST)[0].dst_port
    g.send(g.header(vs.OP_REQUEST, 4002, 7000, dst_cid=g.cid + 1))  # another guest's CID
    seen["other_cid"] = expect(g, vs.OP_RST)[0].op
    g.send(g.header(vs.OP_REQUEST, 4003, 7000, src_cid=g.cid + 5))  # a spoofed source
    seen["spoofed"] = expect(g, vs.OP_RST)[0].op
    g.send(g.header(vs.OP_REQUEST, 4004, 7999))  # nobody listens
    seen["refused"] = expect(g, vs.OP_RST)[0].op
    return seen


def crossing(g: VsockGuest, other: VsockGuest, tries: int, batch: int = 16) -> dict:
    """`tries` connection requests and data packets from g to the other guest's CID, sent
    `batch` at a time (fewer than the rings' slots): each must get RST, and the other guest
    must see none of them."""
    rst = reached = 0
    for start in range(0, tries, batch):
        count = min(batch, tries - start)
        for n in range(start, start + count):
            op = vs.OP_REQUEST if n % 2 else vs.OP_RW
            g.send(g.header(op, 10000 + n % 50000, 5000, dst_cid=other.cid), b"" if n % 2 else b"x")
        for _ in range(count):
            got = g.recv(5)
            rst += got is not None and got[0].op == vs.OP_RST
    while other.recv(0.5) is not None:
        reached += 1
    return {"tries": tries, "rst": rst, "reached_other": reached}


def main() -> None:
    scenario = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SCENARIO", "all")
    bus = client.connect()
    info = bus.device("v0")
    out: dict = {}
    with bus.open("v0") as g:
        out["cid"] = g.cid
        guests = os.path.join(os.environ["ALACRITY_ADMIN"], "devices/v0/guests")
        out["tree"] = {}
        for name in os.listdir(guests):
            with open(os.path.join(guests, name)) as f:
                out["tree"][name] = f.read()
        if scenario in ("all", "echo"):
            out["echo"] = echo(g, info.socket)
        if scenario in ("all", "stall"):
            out["host_waits"] = host_waits_for_a_guest_that_stops_reading(g, info.socket)
            out["guest_waits"] = guest_waits_for_a_host_that_stops_reading(g, info.socket)
        if scenario == "cross":
            with bus.open("v0") as other:
                out["cross"] = crossing(g, other, 10_000)
        if scenario in ("all", "hostile"):
            out["hostile"] = hostile(g)
            with bus.open("v0") as liar:
                out["second_cid"] = liar.cid
                liar.send(liar.header(vs.OP_RW, 1, 2), b"abc", claim=1 << 20)
                try:
                    liar.recv(5)
                    out["liar"] = "still served"
                except VsockError as exc:
                    out["liar"] = str(exc)
            out["after_liar"] = hostile(g)["unknown"]  # the first guest is unaffected
    print(json.dumps(out))


if __name__ == "__main__":
    main()
