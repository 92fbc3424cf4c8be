"""One pass of the host-side block benchmark, run by bench/blk.py in a child process.

The same code drives any vhost-user-blk backend: `--device NAME` asks alacrityd's gate
(run it under `alacrity bus exec BUS --`), `--socket PATH` connects straight to a
socket (e.g. qemu-storage-daemon's). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

from alacrity.client.blk import BlkClient, Op
from alacrity.virtio import blk as vb

MIB = 1 << 20
KIB4 = 4096
TESTS = ("seq_write", "seq_read", "rand_read", "rand_write")


def open_client(args: argparse.Namespace, depth: int, max_request: int) -> BlkClient:
    if args.device:
        from alacrity import client

        return client.connect().open(args.device, depth=depth, max_request=max_request)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    return BlkClient(sock, depth=depth, max_request=max_request)


def counters(dev: BlkClient) -> tuple[int, int, int]:
    return dev.kicks, dev.interrupts, dev.requests


def notes(dev: BlkClient, before: tuple[int, int, int]) -> dict[str, float]:
    kicks, irqs, reqs = (a - b for a, b in zip(counters(dev), before, strict=True))
    return {"kicks": kicks, "interrupts": irqs, "requests": reqs,
            "notify_per_req": (kicks + irqs) / reqs if reqs else float("nan")}


def seq(dev: BlkClient, kind: int, total: int, data: bytes) -> dict[str, float]:
    span = min(total, dev.capacity - dev.capacity % MIB)
    before = counters(dev)
    ops = (Op(kind, (i * MIB) % span, MIB, data if kind == vb.T_OUT else None)
           for i in range(total // MIB))
    start = time.perf_counter()
    for _ in dev.run(ops):
        pass
    elapsed = time.perf_counter() - start
    out = {"mb_s": total / elapsed / 1e6, "seconds": elapsed, **notes(dev, before)}
    if kind == vb.T_OUT:
        start = time.perf_counter()
        dev.flush()
        out["flush_s"] = time.perf_counter() - start
    return out


def rand(dev: BlkClient, kind: int, seconds: float, data: bytes, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    blocks = dev.capacity // KIB4
    before = counters(dev)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    def ops():
        nonlocal count
        while True:
            # Checking the clock every 64 requests keeps it out of the measurement.
            if count % 64 == 0 and time.perf_counter() >= deadline:
                return
            count += 1
            yield Op(kind, rng.randrange(blocks) * KIB4, KIB4, data if kind == vb.T_OUT else None)

    for _ in dev.run(ops()):
        pass
    elapsed = time.perf_counter() - start
    return {"iops": count / elapsed, "seconds": elapsed, **notes(dev, before)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="device name on our bus (ask the gate)")
    where.add_argument("--socket", help="vhost-user-blk socket path to connect to directly")
    p.add_argument("--seq-mib", type=int, default=256)
    p.add_argument("--seq-depth", type=int, default=8)
    p.add_argument("--rand-depth", type=int, default=32)
    p.add_argument("--rand-seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test", choices=TESTS, required=True)
    args = p.parse_args()
    data = os.urandom(MIB)
    if args.test.startswith("seq"):
        dev = open_client(args, args.seq_depth, MIB)
    else:
        dev = open_client(args, args.rand_depth, KIB4)
    try:
        kind = vb.T_OUT if args.test.endswith("write") else vb.T_IN
        if args.test.startswith("seq"):
            result = seq(dev, kind, args.seq_mib * MIB, data)
        else:
            result = rand(dev, kind, args.rand_seconds, data[:KIB4], args.seed)
            if kind == vb.T_OUT:
                dev.flush()
    finally:
        dev.close()
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
