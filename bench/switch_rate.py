"""Forwarding rate between two NetClient processes through a switch process.

    python bench/switch_rate.py [--seconds 3] [--sizes 64,1500] [--engine native|python] [--inprocess [--log]]

Prints, per frame size, the receiver's packets/s and Gbit/s and the notifications
(kicks + interrupts, counted by the switch) per forwarded packet. The NetClients are
Python too: at small frames they, not the switch, may set the rate.

With --inprocess, no processes: the engine alone, over in-memory rings (one sender, one
receiver, unicast, 256-entry rings refilled between timed runs of `poll_once`), reported
as microseconds per forwarded frame and the rate that makes. --log adds a dirty log to every
ring, as during a live migration, cleared before each timed run as QEMU clears it."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from alacrity.switch.process import Control

PEER = r"""
import json, os, socket, sys, time
from alacrity.client.net import NetClient
fd, role, size, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
nic = NetClient(socket.socket(fileno=fd), timeout=10)
print(json.dumps({"mac": nic.mac.hex()}), flush=True)
dst = bytes.fromhex(sys.stdin.readline().strip())
frame = dst + nic.mac + b"\x88\xb5" + bytes(size - 14)
count = 0
start = time.monotonic()
end = start + seconds
if role == "send":
    batch = [frame] * 32
    while time.monotonic() < end:
        count += nic.send_batch(batch)
else:
    nic.send(frame)  # let the switch learn our address
    while time.monotonic() < end + 1.0:
        got = nic.recv_batch(timeout=0.2)
        if got and count == 0:
            start = time.monotonic()
        count += len(got)
        if not got and count and time.monotonic() > end:
            break
print(json.dumps({"count": count, "elapsed": time.monotonic() - start,
                  "kicks": nic.kicks, "interrupts": nic.interrupts}), flush=True)
"""


def peer(ctl: Control, role: str, size: int, seconds: float) -> subprocess.Popen:
    ours, theirs = socket.socketpair()
    ctl.add_port(ours.fileno(), label=role)
    ours.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER, str(theirs.fileno()), role, str(size), str(seconds)],
        pass_fds=[theirs.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    theirs.close()
    return proc


def run(size: int, seconds: float, workdir: str, engine: str | None = None) -> dict:
    path = os.path.join(workdir, f"bench{size}.ctl")
    with open(os.path.join(workdir, "switch.log"), "ab") as log:
        switch = subprocess.Popen([sys.executable, "-m", "alacrity.switch", "--control", path,
                                   "--log-level", "WARNING", *(["--engine", engine] if engine else [])],
                                  stdout=log, stderr=log)
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.02)
        ctl = Control(path)
        rx = peer(ctl, "recv", size, seconds)
        tx = peer(ctl, "send", size, seconds)
        rx_mac = json.loads(rx.stdout.readline())["mac"]
        tx_mac = json.loads(tx.stdout.readline())["mac"]
        rx.stdin.write(tx_mac + "\n")
        rx.stdin.flush()
        time.sleep(0.3)  # the receiver's hello teaches the switch its address
        tx.stdin.write(rx_mac + "\n")
        tx.stdin.flush()
        sent = json.loads(tx.stdout.readline())
        got = json.loads(rx.stdout.readline())
        stats = ctl.stats()
        for proc in (tx, rx):
            proc.wait(10)
        ports = stats["ports"]
        kicks = sum(p["kicks"] for p in ports)
        interrupts = sum(p["interrupts"] for p in ports)
        notes = kicks + interrupts
        pps = got["count"] / got["elapsed"]
        return {"engine": stats["stats"].get("engine", "python"), "size": size, "sent": sent["count"],
                "received": got["count"], "pps": round(pps),
                "gbit_s": round(pps * size * 8 / 1e9, 3),
                "notifications_per_packet": round(notes / max(got["count"], 1), 4),
                "kicks_per_packet": round(kicks / max(got["count"], 1), 4),
                "interrupts_per_packet": round(interrupts / max(got["count"], 1), 4),
                "dropped": sum(p["rx_dropped"] for p in ports)}
    finally:
        switch.kill()
        switch.wait(10)


class _Memory:
    """Guest memory at guest-physical 0, for the in-process run."""

    def __init__(self, size: int) -> None:
        from alacrity.vhost_user.memory import Region

        self.view = memoryview(bytearray(size))
        self.regions = [Region(0, size, 0, self.view)]

    def gpa(self, addr: int, length: int) -> memoryview:
        from alacrity.virtio.ring import AddressError

        if addr + length > len(self.view):
            raise AddressError(f"{addr:#x}+{length:#x} outside the memory")
        return self.view[addr : addr + length]


def inprocess(size: int, seconds: float, engine: str | None = None, queue: int = 256,
              log: bool = False) -> dict:
    """The engine's own cost per frame: `poll_once` timed alone, the driver side not."""
    from alacrity.client.net import NetDriver
    from alacrity.switch.engines import make_engine
    from alacrity.switch.fdb import Fdb
    from alacrity.switch.port import Port
    from alacrity.vhost_user.dirty_log import DirtyLog
    from alacrity.virtio.device_queue import DeviceQueue
    from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit
    from alacrity.virtio.net import F_MRG_RXBUF
    from alacrity.virtio.ring import avail_ring_size, desc_table_size, used_ring_size

    eng = make_engine(Fdb(), kind=engine, strict=engine == "native")
    features = bit(F_VERSION_1) | bit(F_MRG_RXBUF) | bit(RING_F_EVENT_IDX)
    ends, logs = [], []
    for port_id in (1, 2):
        mem = _Memory(NetDriver.area_size(queue, 2048, 2048))
        logs.append(DirtyLog(memoryview(bytearray((len(mem.view) >> 15) + 1))))
        driver = NetDriver(mem.view, queue_size=queue, rx_buffer=2048, tx_slot=2048)
        port = Port(port_id, mac=bytes([2, 0, 0, 0, 0, port_id]), features=features)
        v = mem.view
        for name, lay in (("rx", driver.rx_layout), ("tx", driver.tx_layout)):
            rings = (v[lay.desc : lay.desc + desc_table_size(lay.size)],
                     v[lay.avail : lay.avail + avail_ring_size(lay.size)],
                     v[lay.used : lay.used + used_ring_size(lay.size)])
            ring = DeviceQueue(mem, lay.size, *rings, event_idx=True)
            if log:
                ring.set_log(logs[-1], lay.used)
            setattr(port, name, ring)
        eng.add_port(port)
        driver.stock_rx()
        ends.append((port, driver))
    (a, tx), (b, rx) = ends
    rx.add_tx(b.mac + b.mac + b"\x88\xb5" + bytes(50))  # b's address, learned
    rx.publish_tx()
    eng.poll_once()
    frame = b.mac + a.mac + b"\x88\xb5" + bytes(size - 14)
    frames = 0
    busy = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tx.reap_tx()
        while tx.add_tx(frame):
            pass
        tx.publish_tx()
        rx.reap_rx()
        rx.stock_rx()
        for dirty in logs:
            dirty.view[:] = bytes(len(dirty.view))
        start = time.perf_counter()
        while eng.poll_once():
            pass
        busy += time.perf_counter() - start
        frames = b.rx_packets
    assert a.tx_packets == frames and b.rx_dropped == 0, (a.counters(), b.counters())
    us = busy / frames * 1e6
    return {"engine": eng.kind, "inprocess": True, "log": log, "size": size, "frames": frames,
            "us_per_frame": round(us, 3), "pps": round(1e6 / us), "gbit_s": round(size * 8 / us / 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--engine", choices=("native", "python"), default=None,
                        help="the switch's engine (default: its own default, native when it builds)")
    parser.add_argument("--inprocess", action="store_true", help="time the engine alone, in this process")
    parser.add_argument("--log", action="store_true", help="with --inprocess: a dirty log on every ring")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for size in (int(s) for s in args.sizes.split(",")):
            if args.inprocess:
                print(json.dumps(inprocess(size, args.seconds, args.engine, log=args.log)), flush=True)
            else:
                print(json.dumps(run(size, args.seconds, workdir, args.engine)), flush=True)


if __name__ == "__main__":
    main()
