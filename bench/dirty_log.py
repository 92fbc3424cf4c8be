"""The cost of dirty logging (issue 10, benchmark 2): blk IOPS and switch frames per second
with logging on, against off, side by side in one run, through the real paths.

    python bench/dirty_log.py [--runs 5] [--only blk,switch] [--clear-ms 100] [--json]

"on" is what QEMU 7.2 does to a running device when a migration starts: the driver has
negotiated LOG_SHMFD; it sends SET_LOG_BASE (a sealed memfd with a bit per 4 KiB page of its
memory, QEMU's size: one 64-bit word per 64 pages), SET_FEATURES with LOG_ALL, then
SET_VRING_ADDR again for each ring with VRING_F_LOG and the used ring's guest-physical
address. While the rings run, the log is read and cleared every --clear-ms (100 ms by
default; QEMU reads and clears it once per pass of its RAM loop, `vhost_log_sync`): the
bits set since the last clear are counted and zeroed. "off" is the same set-up with
LOG_SHMFD negotiated and nothing else.

blk: a private alacrityd with a blk device on a raw image full of random data (no holes);
a host process on its bus (`alacrity bus exec`) drives it with `alacrity.client.BlkClient`
(the client of bench/blk.py), 4 KiB requests at random offsets, --depth in flight, for
--seconds, reads and writes, a fresh process per sample. Its memory is guest-physical 0
for the log. Two buffer patterns:
  fixed   BlkClient's own: one buffer per in-flight request, reused, so after each clear
          the same few pages are marked again and then stay set (the cheap case);
  spread  each request's buffer at the next page of a --spread-mib pool, walked in a
          shuffled order, as a guest's reads land in page-cache pages all over its memory:
          nearly every page written is one whose bit is clear (the costly case).
The clear runs in the driver's loop (checked every 64 requests), so "on" pays for it.

switch: `python -m alacrity.switch` (its native engine, on CPU 0) forwards between two
ports, driven by dpdk-testpmd in an io loop on CPU 1 through virtio-user (the source of
bench/switch_peers.py, whose classes this uses: `start tx_first 8`, 256 frames in flight
each way, frames/s counted by the source over --switch-seconds). A Python NetClient would
set the rate itself (~0.13 Mpps). testpmd's virtio-user has no dirty logging, so the
bench sits in the vhost-user control channel of each port (a proxy thread between
testpmd and the switch: the data path is the shared memory and eventfds, untouched): it
adds LOG_SHMFD to the protocol features and, for "on", injects QEMU's messages above once
the ports run, one log for both ports (one VM with two NICs), both receiving. testpmd's
memory (--no-huge, IOVA = VA) is at its EAL base address, 4 GiB up, so the log is about
144 KiB. Skipped with a reason without dpdk-testpmd (bench/install-peers).

Runs rotate the order of off/on (and the tests within a run); tables show the median
[min-max] over --runs and the ratio of the medians, on/off. Goal: >= 0.8x.
Needs root (FUSE, alacrityd, DPDK).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from common import MIB, Cleanup, Daemon, dump_json, fmt, make_image, median, print_table, progress, ratio

BUS = "logbench"
DISK = "disk0"
KIB4 = 4096
MODES = ("off", "on")
BLK_TESTS = ("rand_read", "rand_write")
GOAL = 0.8
PAGE_SHIFT = 12
LOG_CHUNK = 64 << PAGE_SHIFT  # QEMU sizes the log in 64-bit words, each covering 64 pages


# -- the log, as QEMU makes it
def make_log(size: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes sealed as QEMU seals its log (qemu_memfd_alloc), and its mapping."""
    fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd, mmap.mmap(fd, size)


def log_size(end: int) -> int:
    """QEMU's vhost_get_log_size for guest memory ending at `end`: bytes, a whole number of words."""
    return ((end - 1) // LOG_CHUNK + 1) * 8


class LogReader:
    """Reads and clears a log (as QEMU's vhost_log_sync does, though not word by word with
    atomic exchanges: a bit set between the count and the clear may be lost, which costs
    the writer one more atomic OR, no more); remembers how many bits each clear found."""

    def __init__(self, log: mmap.mmap) -> None:
        self.log = log
        self.zeros = bytes(len(log))
        self.found: list[int] = []

    def clear(self) -> None:
        self.found.append(int.from_bytes(self.log, "little").bit_count())
        self.log[:] = self.zeros

    def summary(self) -> dict:
        return {"clears": len(self.found), "pages_per_clear": median(self.found) if self.found else 0,
                "pages_marked": sum(self.found)}


# -- blk: the host process on the bus (run as a child: `dirty_log.py blk-child ...`)
def blk_child(args: argparse.Namespace) -> int:
    from alacrity import client
    from alacrity.client.blk import BlkClient, Op
    from alacrity.vhost_user.messages import (
        F_LOG_ALL,
        F_PROTOCOL_FEATURES,
        VRING_ADDR,
        VRING_F_LOG,
        ProtocolFeature,
        Req,
    )
    from alacrity.virtio import blk as vb
    from alacrity.virtio.features import F_VERSION_1, RING_F_EVENT_IDX, bit, has

    class LoggedBlk(BlkClient):
        """BlkClient, negotiating LOG_SHMFD too; `start_logging()` does what QEMU does at a
        migration's start. With `spread`, each request's buffer moves to the next page of
        its slot's share of the pool (a shuffled walk): a fresh page nearly every time."""

        def __init__(self, sock: socket.socket, *, depth: int, spread: int) -> None:
            per_slot = max(spread // depth, KIB4) if spread else KIB4
            super().__init__(sock, depth=depth, max_request=per_slot)
            self.stride = 64 + per_slot  # BlkClient's slot: 64 bytes of header and status, then data
            self.walk = None
            if spread:
                rng = random.Random(7)
                self.walk = {}
                for slot in range(self.depth):
                    pages = list(range((per_slot - KIB4) // KIB4 + 1))
                    rng.shuffle(pages)
                    self.walk[slot] = (pages, 0)
                self.offset = dict.fromkeys(range(self.depth), 0)

        def negotiate(self, config_size: int = 0, *, need_config: bool = True) -> bytes:
            fe = self.frontend
            offered = fe.get_features()
            wanted = (bit(F_VERSION_1) | bit(RING_F_EVENT_IDX) | bit(F_PROTOCOL_FEATURES)
                      | self.device_features)
            self.features = offered & wanted
            if not has(offered, F_LOG_ALL) or not has(offered, F_PROTOCOL_FEATURES):
                raise self.error("the device does not offer LOG_ALL")
            protocol = fe.get_protocol_features()
            want = (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
                    | bit(ProtocolFeature.LOG_SHMFD))
            if not has(protocol, ProtocolFeature.LOG_SHMFD):
                raise self.error("the device does not offer LOG_SHMFD")
            self.protocol_features = protocol & want
            fe.set_protocol_features(self.protocol_features)
            fe.reply_ack = has(protocol, ProtocolFeature.REPLY_ACK)
            fe.set_owner()
            config = fe.get_config(config_size) if config_size else b""
            fe.set_features(self.features)
            return config

        def start_logging(self) -> LogReader:
            size = log_size(self.area.size)  # the area is guest-physical [0, size)
            fd, log = make_log(size)
            fe = self.frontend
            fe.set_log_base(fd, size, 0)
            os.close(fd)
            fe.set_features(self.features | bit(F_LOG_ALL))
            lay, uva = self.ring.queue.layout, self.area.uva
            fe.send(Req.SET_VRING_ADDR, VRING_ADDR.pack(self.ring.index, VRING_F_LOG, uva + lay.desc,
                                                         uva + lay.used, uva + lay.avail, lay.used))
            return LogReader(log)

        def _add(self, rid, op, inflight) -> None:
            if self.walk is not None:
                slot = self.free_slots[-1]
                pages, at = self.walk[slot]
                self.offset[slot] = pages[at] * KIB4
                self.walk[slot] = (pages, (at + 1) % len(pages))
            super()._add(rid, op, inflight)

        def _slot(self, slot: int) -> int:
            base = self.buffers[0] + slot * self.stride
            return base + self.offset[slot] if self.walk is not None else base

    info = client.connect().device(args.device)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(info.socket)
    dev = LoggedBlk(sock, depth=args.depth, spread=args.spread_mib * MIB)
    start_buf, length = dev.buffers
    dev.area.view[start_buf:] = bytes(length)  # our pages exist before the clock starts
    reader = dev.start_logging() if args.log else None
    kind = vb.T_OUT if args.test == "rand_write" else vb.T_IN
    data = os.urandom(KIB4)
    rng = random.Random(args.seed)
    blocks = dev.capacity // KIB4
    clear_s = args.clear_ms / 1e3
    count = 0
    try:
        for _ in dev.run(Op(kind, rng.randrange(blocks) * KIB4, KIB4, data if kind == vb.T_OUT else None)
                         for _ in range(4 * args.depth)):
            pass  # warm: the device's first touches of our memory are not timed
        if reader is not None:
            reader.clear()
            reader.found.clear()
        before = dev.kicks, dev.interrupts, dev.requests
        start = time.perf_counter()
        deadline = start + args.seconds
        next_clear = start + clear_s

        def ops():
            nonlocal count, next_clear
            while True:
                if count % 64 == 0:  # the clock, checked every 64 requests, stays out of the figure
                    now = time.perf_counter()
                    if now >= deadline:
                        return
                    if reader is not None and now >= next_clear:
                        reader.clear()
                        next_clear = now + clear_s
                count += 1
                yield Op(kind, rng.randrange(blocks) * KIB4, KIB4, data if kind == vb.T_OUT else None)

        for _ in dev.run(ops()):
            pass
        elapsed = time.perf_counter() - start
        if kind == vb.T_OUT:
            dev.flush()
        kicks, irqs, reqs = (a - b for a, b in zip((dev.kicks, dev.interrupts, dev.requests), before,
                                                    strict=True))
    finally:
        dev.close()
    out = {"iops": count / elapsed, "seconds": elapsed, "requests": count,
           "notify_per_req": (kicks + irqs) / reqs if reqs else None}
    if reader is not None:
        out.update(reader.summary())
    print(json.dumps(out), flush=True)
    return 0


def blk_sample(args, daemon: Daemon, test: str, pattern: str, mode: str, seed: int) -> dict:
    argv = daemon.bus_exec(BUS, [sys.executable, str(Path(__file__).resolve()), "blk-child",
                                 "--device", DISK, "--test", test, "--depth", str(args.depth),
                                 "--seconds", str(args.seconds), "--clear-ms", str(args.clear_ms),
                                 "--spread-mib", str(args.spread_mib if pattern == "spread" else 0),
                                 "--seed", str(seed), *(["--log"] if mode == "on" else [])])
    proc = daemon.cleanup.popen(argv, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        out, err = proc.communicate(timeout=60 + 2 * args.seconds)
    except subprocess.TimeoutExpired:
        daemon.cleanup.kill(proc)
        raise RuntimeError("timed out") from None
    daemon.cleanup.procs.remove(proc)
    if proc.returncode:
        raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def run_blk(args, cleanup: Cleanup, results: dict) -> None:
    image = cleanup.root / "disk.img"
    progress(f"writing {args.image_mib} MiB of random data to {image}")
    make_image(image, args.image_mib * MIB)
    daemon = Daemon(cleanup).start()
    daemon.make_disk(DISK, BUS, image)
    cases = [(t, p) for p in args.patterns for t in BLK_TESTS]
    samples = results["samples"]
    for run in range(args.runs):
        order = MODES if run % 2 == 0 else MODES[::-1]
        turn = run % len(cases)
        for test, pattern in cases[turn:] + cases[:turn]:
            for mode in order:
                key = f"blk {test} {pattern}"
                try:
                    res = blk_sample(args, daemon, test, pattern, mode, seed=run + 1)
                except RuntimeError as exc:
                    progress(f"run {run + 1}/{args.runs} {key} {mode}: FAILED: {exc}")
                    results["errors"].append(f"{key} {mode}: {exc}")
                    continue
                samples.setdefault(key, {}).setdefault(mode, []).append(res)
                extra = (f"  {res['pages_per_clear']:.0f} pages marked per clear ({res['clears']} clears)"
                         if mode == "on" else "")
                progress(f"run {run + 1}/{args.runs} {key:26} {mode:3} {res['iops']:9.0f} IOPS{extra}")
    results["alacrityd_counters"] = daemon.counters(DISK)


# -- switch: testpmd through a proxy that can turn logging on
def _vhost():
    from alacrity.vhost_user import messages

    return messages


class LogProxy:
    """The vhost-user control channel of one port, relayed between the source (`front`, the
    frontend) and the switch (`back`), message by message with their fds, in a thread of
    its own. It adds LOG_SHMFD to the protocol features, notes the memory table, features
    and ring addresses, and on `start_logging` sends the backend what QEMU sends at a
    migration's start; from then on it also keeps LOG_ALL and VRING_F_LOG in the source's
    own SET_FEATURES and SET_VRING_ADDR. Replies to its own requests stay with it."""

    def __init__(self, front: socket.socket, back: socket.socket, name: str) -> None:
        self.m = _vhost()
        self.front, self.back, self.name = front, back, name
        self.regions: list[tuple[int, int, int]] = []  # (gpa, size, uva)
        self.rings: dict[int, tuple[int, int, int]] = {}  # index -> (desc, used, avail) addresses
        self.features: int | None = None
        self.logging = False
        self.mine: deque[int] = deque()  # the requests of ours whose replies are due
        self.commands: deque = deque()
        self.wake_r, self.wake_w = os.pipe()
        self.logged = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"proxy-{name}")
        self.thread.start()

    # -- the source's view
    def ready(self) -> bool:
        return bool(self.regions) and self.features is not None and len(self.rings) >= 2

    def memory_end(self) -> int:
        return max(gpa + size for gpa, size, _ in self.regions)

    def gpa(self, uva: int) -> int:
        for gpa, size, start in self.regions:
            if start <= uva < start + size:
                return gpa + uva - start
        raise RuntimeError(f"{self.name}: user address {uva:#x} is in no region")

    def start_logging(self, fd: int, size: int, timeout: float = 5.0) -> None:
        self.commands.append((fd, size))
        os.write(self.wake_w, b"!")
        if not self.logged.wait(timeout):
            raise RuntimeError(f"{self.name}: the switch did not answer the logging messages "
                               f"({self.error or 'no reply'})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"q")
        self.thread.join(2)
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the relay
    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.front, self.back, self.wake_r], [], [])
                if self.wake_r in ready:
                    if b"q" in os.read(self.wake_r, 64):
                        return
                    while self.commands:
                        self._inject(*self.commands.popleft())
                if self.front in ready and not self._relay(self.front, self.back, self._from_front):
                    return
                if self.back in ready and not self._relay(self.back, self.front, self._from_back):
                    return
        except Exception as exc:  # reported by start_logging, or seen as a port that went away
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.front.close()
            self.back.close()

    def _read(self, sock: socket.socket) -> tuple[bytes, list[int]] | None:
        header, fds, _, _ = socket.recv_fds(sock, self.m.HEADER.size, self.m.MAX_FDS)
        if not header:
            return None
        while len(header) < self.m.HEADER.size:
            more = sock.recv(self.m.HEADER.size - len(header))
            if not more:
                return None
            header += more
        size = self.m.HEADER.unpack(header)[2]
        payload = b""
        while len(payload) < size:
            more = sock.recv(size - len(payload))
            if not more:
                return None
            payload += more
        return header + payload, fds

    def _relay(self, src: socket.socket, dst: socket.socket, edit) -> bool:
        got = self._read(src)
        if got is None:
            return False
        data, fds = got
        data = edit(data)
        try:
            if data is not None:
                self._send(dst, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return True

    @staticmethod
    def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.sendall(data)

    def _from_front(self, data: bytes) -> bytes:
        m = self.m
        request, flags, _ = m.HEADER.unpack_from(data)
        body = data[m.HEADER.size :]
        if request == m.Req.SET_PROTOCOL_FEATURES:
            body = m.U64.pack(m.U64.unpack(body)[0] | 1 << m.ProtocolFeature.LOG_SHMFD)
        elif request == m.Req.SET_FEATURES:
            self.features = m.U64.unpack(body)[0]
            if self.logging:
                body = m.U64.pack(self.features | 1 << m.F_LOG_ALL)
        elif request == m.Req.SET_MEM_TABLE:
            count = m.MEM_HEADER.unpack_from(body)[0]
            self.regions = []
            for i in range(count):
                gpa, size, uva, _ = m.MEM_REGION.unpack_from(body, m.MEM_HEADER.size + i * m.MEM_REGION.size)
                self.regions.append((gpa, size, uva))
        elif request == m.Req.SET_VRING_ADDR:
            index, ring_flags, desc, used, avail, log_addr = m.VRING_ADDR.unpack_from(body)
            self.rings[index] = (desc, used, avail)
            if self.logging:
                body = m.VRING_ADDR.pack(index, ring_flags | m.VRING_F_LOG, desc, used, avail, self.gpa(used))
        return m.HEADER.pack(request, flags, len(body)) + body

    def _from_back(self, data: bytes) -> bytes | None:
        request = self.m.HEADER.unpack_from(data)[0]
        if self.mine and request == self.mine[0]:
            self.mine.popleft()
            if not self.mine:
                self.logged.set()
            return None
        return data

    def _inject(self, fd: int, size: int) -> None:
        """QEMU's order (vhost_migration_log): the log base, LOG_ALL, the rings' log flags;
        then GET_FEATURES, whose reply says the switch has taken them all."""
        m = self.m
        self.logging = True
        self.mine.extend([m.Req.SET_LOG_BASE, m.Req.GET_FEATURES])
        self._send(self.back, m.encode(m.Req.SET_LOG_BASE, m.LOG.pack(size, 0)), [fd])
        self._send(self.back, m.encode(m.Req.SET_FEATURES, m.U64.pack(self.features | 1 << m.F_LOG_ALL)), [])
        for index, (desc, used, avail) in sorted(self.rings.items()):
            self._send(self.back, m.encode(m.Req.SET_VRING_ADDR, m.VRING_ADDR.pack(
                index, m.VRING_F_LOG, desc, used, avail, self.gpa(used))), [])
        self._send(self.back, m.encode(m.Req.GET_FEATURES), [])


def switch_classes():
    """bench/switch_peers.py's `Ours` contender, its connections relayed through LogProxy."""
    import switch_peers as sp

    class LoggedOurs(sp.Ours):
        name = "ours"

        def start(self) -> None:
            self.proxies: dict[int, LogProxy] = {}
            self.all_proxies: list[LogProxy] = []
            super().start()

        def _add_port(self, i: int, conn: socket.socket, pid: int) -> None:
            """The switch gets the far end of a proxy between it and the source (LogProxy)."""
            near, far = socket.socketpair()
            with far:
                self.ctl.add_port(far.fileno(), mac=sp.MACS[i], label=f"gen{i}", peer_pid=pid)
            proxy = LogProxy(conn, near, f"port{i}")
            self.proxies[i] = proxy
            self.all_proxies.append(proxy)

        def stop(self) -> None:
            super().stop()
            for proxy in getattr(self, "all_proxies", []):
                proxy.close()
            self.all_proxies = []

    return sp, LoggedOurs


def switch_sample(args, cleanup: Cleanup, sp, cont, size: int, mode: str) -> dict:
    cont.proxies.clear()
    gen = sp.gen_for(cleanup, cont, size)
    clearer = None
    try:
        deadline = time.monotonic() + 10
        while not (len(cont.proxies) == 2 and all(p.ready() for p in cont.proxies.values())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the source's ports did not come up ({cont.errors[-1:]})")
            time.sleep(0.05)
        reader = None
        if mode == "on":
            size_log = log_size(max(p.memory_end() for p in cont.proxies.values()))
            fd, log = make_log(size_log)
            try:
                for proxy in cont.proxies.values():
                    proxy.start_logging(fd, size_log)
            finally:
                os.close(fd)
            reader = LogReader(log)
            stop = threading.Event()

            def clear_loop() -> None:
                while not stop.wait(args.clear_ms / 1e3):
                    reader.clear()

            clearer = threading.Thread(target=clear_loop, daemon=True)
            clearer.start()
        gen.cmd(f"start tx_first {args.bursts}")
        time.sleep(args.warmup)
        s0, t0 = gen.port_stats(), time.monotonic()
        found0 = len(reader.found) if reader else 0
        time.sleep(args.switch_seconds)
        s1, t1 = gen.port_stats(), time.monotonic()
        found = reader.found[found0:] if reader else []
        gen.cmd("stop")
    finally:
        if clearer is not None:
            stop.set()
            clearer.join(2)
        gen.quit()
    rx = [s1[p][0] - s0[p][0] for p in (0, 1)]
    if min(rx) <= 0:
        raise RuntimeError(f"a direction carried nothing (rx per port {rx})")
    pps = sum(rx) / (t1 - t0)
    out = {"pps": pps, "mpps": pps / 1e6, "rx_per_port": rx, "seconds": t1 - t0}
    if reader is not None:
        if not any(found):
            raise RuntimeError("logging on, yet the switch marked no page")
        out.update({"clears": len(found), "pages_per_clear": median(found), "log_bytes": len(reader.log)})
    return out


def run_switch(args, cleanup: Cleanup, results: dict) -> None:
    sp, LoggedOurs = switch_classes()
    if not sp.find_testpmd():
        results["skipped"]["switch"] = "no dpdk-testpmd (run bench/install-peers)"
        progress(f"switch: skipped: {results['skipped']['switch']}")
        return
    cleanup.callbacks.append(lambda: os.path.isdir("/var/run/dpdk") and not os.listdir("/var/run/dpdk")
                             and os.rmdir("/var/run/dpdk"))
    cont = LoggedOurs(cleanup, None)
    cont.start()
    samples = results["samples"]
    try:
        for run in range(args.runs):
            order = MODES if run % 2 == 0 else MODES[::-1]
            sizes = args.sizes if run % 2 == 0 else args.sizes[::-1]
            for size in sizes:
                key = f"switch {size} B"
                for mode in order:
                    for attempt in range(3):
                        try:
                            res = switch_sample(args, cleanup, sp, cont, size, mode)
                            break
                        except RuntimeError as exc:
                            progress(f"run {run + 1}/{args.runs} {key} {mode}: attempt {attempt + 1} "
                                     f"failed: {exc}")
                            results["errors"].append(f"{key} {mode}: {exc}")
                    else:
                        continue
                    samples.setdefault(key, {}).setdefault(mode, []).append(res)
                    extra = (f"  {res['pages_per_clear']:.0f} pages marked per clear"
                             if mode == "on" else "")
                    progress(f"run {run + 1}/{args.runs} {key:26} {mode:3} {res['mpps']:9.3f} Mpps{extra}")
    finally:
        errors = [p.error for p in cont.all_proxies if p.error]
        cont.stop()
    results["proxy_errors"] = errors


# -- the report
def summarize(results: dict) -> list[dict]:
    rows = []
    for key, per_mode in results["samples"].items():
        metric = "iops" if key.startswith("blk") else "mpps"
        row: dict = {"measure": key, "unit": "IOPS" if metric == "iops" else "Mpps"}
        for mode in MODES:
            values = [s[metric] for s in per_mode.get(mode, [])]
            row[mode] = median(values) if values else None
            row[f"{mode}_range"] = [min(values), max(values)] if values else None
            row[f"{mode}_n"] = len(values)
        on = per_mode.get("on", [])
        row["pages_per_clear"] = median([s["pages_per_clear"] for s in on]) if on else None
        row["ratio"] = ratio(row["on"], row["off"])
        row["goal_met"] = row["ratio"] is not None and row["ratio"] >= GOAL
        rows.append(row)
    return rows


def report(results: dict, args) -> None:
    digits = {"IOPS": 0, "Mpps": 3}

    def cell(row: dict, mode: str) -> str:
        d = digits[row["unit"]]
        if row[mode] is None:
            return "-"
        low, high = row[f"{mode}_range"]
        return f"{fmt(row[mode], d)} [{fmt(low, d)}-{fmt(high, d)}]"

    rows = [[r["measure"], r["unit"], cell(r, "off"), cell(r, "on"), fmt(r["ratio"], 2),
             f">={GOAL} {'met' if r['goal_met'] else 'MISSED'}", fmt(r["pages_per_clear"], 0)]
            for r in results["summary"]]
    print_table(f"dirty logging off against on, median [min-max] of {args.runs} runs, log cleared every "
                f"{args.clear_ms:g} ms", ["measure", "unit", "off", "on", "on/off", "goal",
                                         "pages marked per clear"], rows)
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    for err in results["errors"]:
        print(f"error: {err}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "blk-child":
        p = argparse.ArgumentParser(prog="dirty_log.py blk-child")
        p.add_argument("--device", required=True)
        p.add_argument("--test", choices=BLK_TESTS, required=True)
        p.add_argument("--depth", type=int, default=32)
        p.add_argument("--seconds", type=float, default=3.0)
        p.add_argument("--clear-ms", type=float, default=100.0)
        p.add_argument("--spread-mib", type=int, default=0)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--log", action="store_true")
        return blk_child(p.parse_args(sys.argv[2:]))

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs, each with off and on in rotating order (5)")
    p.add_argument("--only", default="blk,switch", help="blk, switch or both (default)")
    p.add_argument("--clear-ms", type=float, default=100.0,
                   help="the log is read and cleared this often (100)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per blk sample (3)")
    p.add_argument("--depth", type=int, default=32, help="blk: 4 KiB requests in flight (32)")
    p.add_argument("--patterns", default="fixed,spread", help="blk buffer patterns (fixed,spread)")
    p.add_argument("--spread-mib", type=int, default=64, help="blk: the spread pattern's pool (64 MiB)")
    p.add_argument("--image-mib", type=int, default=256, help="blk: image size (256)")
    p.add_argument("--sizes", default="64,1500", help="switch: frame sizes in bytes (64,1500)")
    p.add_argument("--switch-seconds", type=float, default=2.0,
                   help="switch: measured seconds per sample (2)")
    p.add_argument("--warmup", type=float, default=0.5, help="switch: seconds before measuring (0.5)")
    p.add_argument("--bursts", type=int, default=8, help="switch: tx_first bursts of 32 frames per port (8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()
    args.patterns = [x for x in args.patterns.split(",") if x]
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    only = {x for x in args.only.split(",") if x}
    if only - {"blk", "switch"} or set(args.patterns) - {"fixed", "spread"}:
        p.error("--only takes blk,switch; --patterns takes fixed,spread")
    if os.geteuid() != 0:
        p.error("needs root (alacrityd's FUSE tree, DPDK)")

    started = time.monotonic()
    results: dict = {"config": vars(args) | {"only": sorted(only)}, "samples": {}, "errors": [],
                     "skipped": {}, "goal": GOAL, "date": time.strftime("%Y-%m-%d"),
                     "cores": os.cpu_count(), "kernel": os.uname().release}
    with Cleanup(prefix="alacrity-dirtylog-", keep=args.keep) as cleanup:
        if "blk" in only:
            run_blk(args, cleanup, results)
        if "switch" in only:
            run_switch(args, cleanup, results)
    results["summary"] = summarize(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        dump_json(results)
    else:
        report(results, args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted (everything started was stopped)", file=sys.stderr)
        sys.exit(130)
