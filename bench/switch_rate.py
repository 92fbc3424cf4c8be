"""Forwarding rate between two NetClient processes through a switch process.

    python bench/switch_rate.py [--seconds 3] [--sizes 64,1500]

Prints, per frame size, the receiver's packets/s and Gbit/s and the notifications
(kicks + interrupts, counted by the switch) per forwarded packet."""

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


def run(size: int, seconds: float, workdir: str) -> dict:
    path = os.path.join(workdir, f"bench{size}.ctl")
    with open(os.path.join(workdir, "switch.log"), "ab") as log:
        switch = subprocess.Popen([sys.executable, "-m", "alacrity.switch", "--control", path,
                                   "--log-level", "WARNING"], stdout=log, stderr=log)
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
        return {"size": size, "sent": sent["count"], "received": got["count"], "pps": round(pps),
                "gbit_s": round(pps * size * 8 / 1e9, 3),
                "notifications_per_packet": round(notes / max(got["count"], 1), 4),
                "kicks_per_packet": round(kicks / max(got["count"], 1), 4),
                "interrupts_per_packet": round(interrupts / max(got["count"], 1), 4),
                "dropped": sum(p["rx_dropped"] for p in ports)}
    finally:
        switch.kill()
        switch.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="64,1500")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for size in (int(s) for s in args.sizes.split(",")):
            print(json.dumps(run(size, args.seconds, workdir)), flush=True)


if __name__ == "__main__":
    main()
