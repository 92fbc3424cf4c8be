"""Live migration on one host (issue 10, benchmark 1): total migration time and downtime as
QEMU's query-migrate reports them, a guest on our devices (a blk disk and a switch with a
tap uplink, moved by `alacrity vm migrate`) against the same guest on QEMU's built-in
virtio-blk and virtio-net on a tap, side by side, idle and under disk and network load.

    python bench/migrate.py [--runs 5] [--warmup 3] [--json]

Every sample boots a fresh guest (the default kernel and initramfs, microvm, 512 MiB,
1 vCPU, TCG here), lets it run WARMUP seconds, migrates it once, checks that it runs on in
its new QEMU, and stops it. Kinds rotate within each run; each run does idle, then load.
- ours: a private alacrityd, a bus with a blk device on a 64 MiB image file and a switch
  whose uplink is a tap with a host address; `alacrity vm run --detach --ip ...` (jailed,
  as it runs by default), then `alacrity vm migrate NAME` (the CLI: a new jailed QEMU with
  `-incoming defer -S`, a socket pair handed to both through QMP getfd, `migrate fd:`),
  whose stderr line off a terminal gives QEMU's final figures ("downtime X ms, total Y ms").
- built-in: QEMU started directly (unjailed) with the same command line as `vm run`
  builds (vm/qemu.py build_command: microvm, memory-backend-memfd, the same kernel,
  initrd and kernel command line), with `-drive file=IMG,format=raw,cache=writeback` on
  virtio-blk-device (buffered with a flush on fsync, as our blk device) and `-netdev
  tap` on virtio-net-device (vhost=off: no /dev/vhost-net here). The bench migrates it
  with the steps of vm/migrate.py (its `follow`): a second QEMU with the same arguments
  and `-incoming defer -S`, a socket pair through getfd, `migrate-incoming fd:` and
  `migrate fd:`, the source's query-migrate every 0.25 s and the destination's MIGRATION
  events until both are done, `cont` to the destination, then `quit` to the source; the
  figures are the source's last query-migrate. Both QEMUs open the same image (QEMU
  hands its lock over at the end of the migration). The network is what libvirt does on
  one host: a tap per QEMU (the source's and the destination's) on a Linux bridge that
  holds the host address; the guest's announcement after the migration moves its MAC in
  the bridge. One tap cannot serve both QEMUs: by name the destination's open fails
  (EBUSY) while the source holds it, and one open file handed to both breaks the
  source's traffic from the moment the destination starts (it resets the tap's vnet
  header size to its own until the guest's state arrives).
- load: the guest's boot command starts `iperf3 -s -D` and loops writing 4 KiB blocks with
  `dd conv=notrunc,fsync` to /dev/vda (tests/test_migrate.py's writer), and the host runs
  `iperf3 -c GUEST -b 20M` to it (over our switch's uplink, or over the bridge) from before
  the migration until after. Idle: the same guest with only `iperf3 -s -D`.
- checks: the destination's console shows the writer carrying on (load), the host's pings
  come back, and the host's iperf3 is still running after the migration.

Besides QEMU's figures, two pauses as the guest's users see them. "ping gap": the bench
pings the guest every PING_MS ms (10; `--ping-ms 0` turns it off; a raw ICMP socket of its
own) from the warm-up to after the migration, and this is the longest time between two
replies. "writer gap" (load): the bench reads the source's and the destination's consoles
every 10 ms, and this is the longest time between two new "wrote N" lines (a write takes
about 13 ms here). QEMU's downtime is the source's (from stopping the guest to the last
byte sent); the gaps also cover the destination starting its devices (for ours, the disk's
writer hand-over), the network learning where the guest went, and whatever the guest waits
for across the switch-over. "wall" is the time from starting the destination to the
source's quit (for ours, the CLI's "migrated NAME in S s", to 0.1 s).

A failed sample (the migration refused or failed, the guest not running on, pings not
answered within 30 s) is counted and reported, not measured; for ours, the switch's ports
and FDB, both consoles (the destination's held open, as the CLI removes a failed
destination's files) and the daemon's log go to diagnostics-TAG.txt (`--keep` keeps it),
and the failure line quotes the guest kernel's complaint, if any.

Medians with [min-max] of RUNS samples per kind and load; ratios are ours/built-in. The
goal is downtime <= 1.2x the built-in devices'. Needs root, qemu, iperf3, /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import Cleanup, Daemon, median, print_table, progress

BUS, VM_NAME, DISK, SWITCH = "mig", "migbench", "d0", "lan0"
OURS_HOST, OURS_GUEST = "10.78.0.254", "10.78.0.1"
BUILTIN_HOST, BUILTIN_GUEST = "10.79.0.254", "10.79.0.1"
BUILTIN_MAC = "52:54:00:4d:49:47"
KINDS = ("ours", "builtin")
LOADS = ("idle", "load")
IMAGE_MIB = 64
#: The guest's boot commands. The writer is tests/test_migrate.py's, made endless (it wraps
#: around the first 16000 blocks of the 64 MiB disk).
GUEST_CMD = {
    "idle": "iperf3 -s -D; echo BENCH-UP; while :; do sleep 3600; done",
    "load": ("iperf3 -s -D; echo BENCH-UP; i=0; while :; do i=$((i+1)); yes $i | head -c 4096 > /tmp/b; "
             "dd if=/tmp/b of=/dev/vda bs=4096 seek=$((i % 16000)) count=1 conv=notrunc,fsync 2>/dev/null "
             "&& echo wrote $i || echo DDFAIL $i; done"),
}
WROTE = re.compile(r"^wrote (\d+)", re.M)
#: `alacrity vm migrate`'s last figures off a terminal (cli/migrate_cmd.py).
CLI_DOWNTIME = re.compile(r"(?<!expected )downtime (\d+) ms")
CLI_TOTAL = re.compile(r"\btotal (\d+) ms")
CLI_RAM = re.compile(r"RAM sent (\d+) MiB")
CLI_WALL = re.compile(r"migrated \S+ in ([\d.]+) s")
METRICS = ("downtime_ms", "total_ms", "ping_gap_ms", "writer_gap_ms", "wall_s", "ram_mib")


class SampleError(RuntimeError):
    pass


def run_ok(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SampleError(f"{what} failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    return proc


def qmp(path: Path | str, command: str, arguments: dict | None = None, fds: list[int] | None = None,
        timeout: float = 10.0):
    from alacrity.vm.qmp import QmpClient

    with QmpClient(path, timeout=timeout) as client:
        return client.execute(command, arguments, fds)


def wait_for(what: str, check, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise SampleError(f"timed out ({timeout:g} s) waiting for {what}")
        time.sleep(every)


def read(path: Path | str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


class Pinger:
    """ICMP echo requests to `ip` every `interval` s from a raw socket of our own, and the
    arrival time of each reply. (iputils ping at 10 ms took half a core against a TCG guest,
    on a 2-core machine whose other core the guest needs.)"""

    def __init__(self, ip: str, interval: float) -> None:
        self.ip, self.interval = ip, interval
        self.ident = (os.getpid() + threading.get_ident()) & 0xFFFF
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.replies: list[tuple[float, int]] = []  # (time.time(), seq)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    def run(self) -> None:
        seq, due = 0, time.monotonic()
        while not self.done.is_set():
            now = time.monotonic()
            if now >= due:
                seq = (seq + 1) & 0xFFFF
                body = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"alacrity-migrate"
                packet = body[:2] + struct.pack("!H", self.checksum(body)) + body[4:]
                with contextlib.suppress(OSError):
                    self.sock.sendto(packet, (self.ip, 0))
                due += self.interval
                continue
            ready, _, _ = select.select([self.sock], [], [], due - now)
            if ready:
                data, (source, _) = self.sock.recvfrom(2048)
                header = (data[0] & 0x0F) * 4
                kind, _, _, ident, got = struct.unpack_from("!BBHHH", data, header)
                if kind == 0 and ident == self.ident and source == self.ip:
                    self.replies.append((time.time(), got))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


class Load:
    """What runs on the host around one migration: pings (always), iperf3 and a watch on
    the guest's disk writer (load)."""

    def __init__(self, cleanup: Cleanup, guest_ip: str, load: str, ping_ms: float, tag: str,
                 consoles) -> None:
        self.cleanup, self.guest_ip = cleanup, guest_ip
        self.iperf: subprocess.Popen | None = None
        self.ping = Pinger(guest_ip, ping_ms / 1000) if ping_ms > 0 else None
        self.watch = WriterWatch(consoles) if load == "load" else None
        self.iperf_log = cleanup.root / f"iperf-{tag}.log"
        if load == "load":
            for _ in range(10):  # the guest's iperf3 -s may not listen yet
                with open(self.iperf_log, "wb") as out:
                    self.iperf = cleanup.popen(
                        ["iperf3", "-c", guest_ip, "-b", "20M", "-t", "3600", "-i", "1"],
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                time.sleep(0.5)
                if self.iperf.poll() is None:
                    break
                cleanup.kill(self.iperf)

    def check_running(self) -> None:
        if self.iperf is not None and self.iperf.poll() is not None:
            raise SampleError(f"the host's iperf3 ended ({self.iperf.returncode}): "
                              f"{read(self.iperf_log)[-1500:]}")

    def replies(self) -> list[tuple[float, int]]:
        return list(self.ping.replies) if self.ping is not None else []

    def wait_replies_after(self, t_wall: float, timeout: float = 30.0) -> None:
        if self.ping is not None:
            wait_for("pings answered after the migration",
                     lambda: any(t > t_wall for t, _ in self.replies()), timeout)

    def stop(self) -> dict:
        """Stop all; the longest gap between ping replies, the writer's, and whether iperf3
        survived."""
        out: dict = self.watch.stop() if self.watch is not None else {}
        if self.iperf is not None:
            out["iperf_survived"] = self.iperf.poll() is None
            self.cleanup.kill(self.iperf)
        if self.ping is not None:
            self.ping.stop()
            replies = self.replies()
            times = [t for t, _ in replies]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            out["ping_gap_ms"] = max(gaps) * 1000 if gaps else None
            if replies:
                out["ping_lost"] = replies[-1][1] - replies[0][1] + 1 - len(replies)
        return out


class WriterWatch:
    """Reads the guest's consoles (source and destination) every 10 ms for the writer's
    "wrote N": the longest time between two new writes as the host sees them, which is the
    pause as the guest's disk writer sees it."""

    def __init__(self, paths) -> None:
        self.paths = paths  # () -> the console files, those that exist so far
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.last_n, self.last_t, self.gap = 0, None, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(0.01):
            now, newest = time.monotonic(), 0
            for path in self.paths():
                try:
                    with open(path, "rb") as f:
                        f.seek(self.offsets.get(path, 0))
                        data = f.read()
                except OSError:
                    continue
                self.offsets[path] = self.offsets.get(path, 0) + len(data)
                lines, _, self.partial[path] = (self.partial.get(path, b"") + data).rpartition(b"\n")
                newest = max([newest, *(int(n) for n in re.findall(rb"^wrote (\d+)", lines, re.M))])
            if newest > self.last_n:
                if self.last_t is not None:
                    self.gap = max(self.gap, now - self.last_t)
                self.last_n, self.last_t = newest, now

    def stop(self) -> dict:
        self.done.set()
        self.thread.join(5)
        return {"writer_gap_ms": self.gap * 1000 if self.last_t is not None else None}


class Held:
    """Opens each file as soon as it exists (checked every 10 ms) and keeps it open, so that
    it can still be read once removed (the CLI removes a failed destination's files)."""

    def __init__(self, paths: list[Path]) -> None:
        self.fds: dict[Path, int] = {}
        self.paths = paths
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while len(self.fds) < len(self.paths) and not self.done.wait(0.01):
            for path in self.paths:
                if path not in self.fds:
                    with contextlib.suppress(OSError):
                        self.fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)

    def texts(self) -> dict[Path, str]:
        out = {}
        for path, fd in self.fds.items():
            chunks, offset = [], 0
            while chunk := os.pread(fd, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
            out[path] = b"".join(chunks).decode(errors="replace")
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def wait_console(path_of, what: str, pattern: re.Pattern | str, count: int = 1,
                 timeout: float = 60.0) -> None:
    rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
    try:
        wait_for(f"{what} in the guest's console", lambda: len(rx.findall(read(path_of()))) >= count,
                 timeout, every=0.2)
    except SampleError as exc:
        raise SampleError(f"{exc}; its console ends:\n{read(path_of())[-800:]}") from None


# -- ours


class Ours:
    def __init__(self, cleanup: Cleanup, image) -> None:
        self.cleanup, self.image = cleanup, image
        self.disk = cleanup.root / "ours.img"
        self.disk.write_bytes(b"")
        os.truncate(self.disk, IMAGE_MIB << 20)
        self.tap = f"almo{os.getpid() % 100000}"
        self.daemon = Daemon(cleanup).start()
        self.daemon.sh(f"""
            mkdir $A/buses/{BUS} $A/devices/{DISK} $A/devices/{SWITCH}
            echo blk > $A/devices/{DISK}/type
            echo {self.disk} > $A/devices/{DISK}/path
            echo switch > $A/devices/{SWITCH}/type
            echo {self.tap} > $A/devices/{SWITCH}/uplink
            ln -s ../../devices/{DISK} $A/buses/{BUS}/{DISK}
            ln -s ../../devices/{SWITCH} $A/buses/{BUS}/{SWITCH}
        """)
        # The tap goes with the switch's fd; this is in case it did not.
        cleanup.callbacks.append(lambda: subprocess.run(["ip", "link", "del", self.tap], capture_output=True))
        run_ok(["ip", "addr", "add", f"{OURS_HOST}/24", "dev", self.tap], "ip addr add")
        self.cli = [sys.executable, *self.daemon.cli()]
        self.vm_dir = Path(self.daemon.env["ALACRITY_VM_DIR"])
        self.held: Held | None = None
        # A detached VM's QEMU is in no process group of ours: stopped by name, before the daemon.
        cleanup.callbacks.append(self.stop)

    def stop(self) -> None:
        subprocess.run([*self.cli, "vm", "stop", VM_NAME], env=self.daemon.env, capture_output=True,
                       timeout=120)

    def console(self) -> str:
        return json.loads(read(self.vm_dir / VM_NAME / "vm.json") or "{}").get("console", "/nonexistent")

    def sample(self, load: str, warmup: float, ping_ms: float, tag: str) -> dict:
        run_ok([*self.cli, "vm", "run", "--bus", BUS, "--name", VM_NAME, "--detach",
                "--ip", f"{OURS_GUEST}/24", "--cmd", GUEST_CMD[load],
                "--kernel", str(self.image.kernel), "--initrd", str(self.image.initrd)],
               "vm run", env=self.daemon.env, timeout=300)
        try:
            wait_console(self.console, "BENCH-UP", r"^BENCH-UP")
            host = Load(self.cleanup, OURS_GUEST, load, ping_ms, tag,
                        lambda: [*self.vm_dir.glob(f"{VM_NAME}/qemu/console.log"),
                                 *sorted(self.vm_dir.glob(f"{VM_NAME}/m*/qemu/console.log"))])
            try:
                time.sleep(warmup)
                host.check_running()
                if load == "load":
                    wait_console(self.console, "the writer", WROTE, 3)
                # What the destination QEMU says, kept open: its files go if the migration fails.
                home = self.vm_dir / VM_NAME / "m1"
                self.held = Held([home / "qemu.log", home / "qemu" / "console.log"])
                begun = time.time()
                try:
                    out = subprocess.run([*self.cli, "vm", "migrate", VM_NAME], env=self.daemon.env,
                                         capture_output=True, text=True, timeout=900)
                finally:
                    self.held.stop()
                ended = time.time()
                if out.returncode != 0:
                    raise SampleError(f"vm migrate failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
                figures = {"downtime_ms": CLI_DOWNTIME.search(out.stderr),
                           "total_ms": CLI_TOTAL.search(out.stderr),
                           "ram_mib": CLI_RAM.search(out.stderr), "wall_s": CLI_WALL.search(out.stdout)}
                if figures["downtime_ms"] is None or figures["total_ms"] is None:
                    raise SampleError(f"no downtime or total in vm migrate's line: {out.stderr.strip()!r}")
                got = {k: float(m.group(1)) if m else None for k, m in figures.items()}
                got["cli_line"] = out.stderr.strip().splitlines()[-1]
                after = self.console()  # the new QEMU's console
                if load == "load":
                    wait_console(lambda: after, "the writer after the migration", WROTE, 3, timeout=60)
                host.wait_replies_after(ended)
                host.check_running()
                got["migrated_s_wall_clock"] = ended - begun
            except SampleError as exc:
                path, oops = self.diagnose(tag)
                raise SampleError(f"{exc}{oops} (diagnostics: {path})") from None
            finally:
                got_host = host.stop()
            return {**got, **got_host}
        finally:
            self.stop()
            if self.held is not None:
                self.held.close()
                self.held = None

    def diagnose(self, tag: str) -> tuple[Path, str]:
        """What a failed sample leaves to look at (kept with --keep): the switch's ports and
        FDB, the guest's consoles (the destination's too), the daemon's log; and the guest
        kernel's first complaint on the destination, if any."""
        path = self.cleanup.root / f"diagnostics-{tag}.txt"
        sw = self.daemon.admin / "devices" / SWITCH
        parts = [f"== {sw}/fdb\n{read(sw / 'fdb')}", f"== {sw}/stats\n{read(sw / 'stats')}"]
        parts += [f"== port {p.name}\n{read(p)}" for p in sorted((sw / "ports").glob("*"))]
        for console in [*self.vm_dir.glob(f"{VM_NAME}/qemu/console.log"), self.vm_dir / VM_NAME / "qemu.log"]:
            parts.append(f"== {console}\n{read(console)[-3000:]}")
        if self.held is not None:
            for held, text in self.held.texts().items():
                parts.append(f"== {held} (the destination's)\n{text[-6000:]}")
        try:
            record = json.loads(read(self.vm_dir / VM_NAME / "vm.json"))
            parts.append(f"== {record['qmp']}: {qmp(record['qmp'], 'query-status')}")
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            parts.append(f"== query-status: {exc}")
        parts.append(f"== daemon log\n{read(self.daemon.log)[-6000:]}")
        path.write_text("\n".join(parts))
        oops = re.search(r"(list_\w+ corruption|kernel BUG|BUG:|Kernel panic|general protection)[^\r\n]*",
                         "\n".join(parts))
        return path, f"; the guest says: {oops.group(0)}" if oops else ""


# -- QEMU's built-in devices


class Builtin:
    def __init__(self, cleanup: Cleanup, image) -> None:
        self.cleanup, self.image = cleanup, image
        self.disk = cleanup.root / "builtin.img"
        self.disk.write_bytes(b"")
        os.truncate(self.disk, IMAGE_MIB << 20)
        # A tap per QEMU on a Linux bridge that holds the host address, as libvirt migrates on
        # one host: the source on tap A, the destination on tap B.
        tag = os.getpid() % 100000
        self.bridge, self.taps = f"almbr{tag}", (f"almb{tag}a", f"almb{tag}b")
        cleanup.callbacks.append(lambda: [subprocess.run(["ip", "link", "del", n], capture_output=True)
                                          for n in (*self.taps, self.bridge)])
        run_ok(["ip", "link", "add", self.bridge, "type", "bridge"], "ip link add bridge")
        for tap in self.taps:
            run_ok(["ip", "tuntap", "add", "mode", "tap", "vnet_hdr", "name", tap], "ip tuntap add")
            run_ok(["ip", "link", "set", tap, "master", self.bridge], "ip link set master")
            run_ok(["ip", "link", "set", tap, "up"], "ip link set up")
        run_ok(["ip", "addr", "add", f"{BUILTIN_HOST}/24", "dev", self.bridge], "ip addr add")
        run_ok(["ip", "link", "set", self.bridge, "up"], "ip link set up")
        self.n = 0

    def spec(self, load: str, run_dir: Path, incoming: bool):
        from alacrity.vm.machine import DEFAULT_MACHINE, virtio_device
        from alacrity.vm.qemu import VmSpec

        devices = [["-drive", f"file={self.disk},if=none,id=d0,format=raw,cache=writeback",
                    *virtio_device("virtio-blk", DEFAULT_MACHINE, drive="d0")],
                   ["-netdev", f"tap,id=n0,ifname={self.taps[incoming]},script=no,downscript=no,vhost=off",
                    *virtio_device("virtio-net", DEFAULT_MACHINE, netdev="n0", mac=BUILTIN_MAC)]]
        return VmSpec(name=VM_NAME, kernel=self.image.kernel, initrd=self.image.initrd, cmd=GUEST_CMD[load],
                      console=str(run_dir / "console.log"), ip=f"{BUILTIN_GUEST}/24", devices=devices,
                      run_dir=run_dir, incoming=incoming)

    def start(self, load: str, run_dir: Path, incoming: bool) -> tuple[subprocess.Popen, Path]:
        from alacrity.vm.qemu import VM

        run_dir.mkdir(parents=True)
        argv = VM(self.spec(load, run_dir, incoming)).command()
        with open(run_dir / "qemu.log", "wb") as err:
            proc = self.cleanup.popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        return proc, run_dir

    def quit(self, proc: subprocess.Popen, run_dir: Path) -> None:
        if proc.poll() is None:
            try:
                qmp(run_dir / "qmp.sock", "quit", timeout=2.0)
                proc.wait(5)
            except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
                pass
        self.cleanup.kill(proc)

    def sample(self, load: str, warmup: float, ping_ms: float, tag: str) -> dict:
        self.n += 1
        src, src_dir = self.start(load, self.cleanup.root / f"builtin-{self.n}-src", incoming=False)
        dst = None
        try:
            def alive(proc: subprocess.Popen, run_dir: Path) -> None:
                if proc.poll() is not None:
                    raise SampleError(f"QEMU exited ({proc.returncode}): "
                                      f"{read(run_dir / 'qemu.log')[-1500:]}")

            def up() -> bool:
                alive(src, src_dir)
                return "BENCH-UP" in read(src_dir / "console.log")

            wait_for("BENCH-UP in the guest's console", up, 60, every=0.2)
            host = Load(self.cleanup, BUILTIN_GUEST, load, ping_ms, tag,
                        lambda: [src_dir / "console.log",
                                 self.cleanup.root / f"builtin-{self.n}-dst" / "console.log"])
            try:
                time.sleep(warmup)
                host.check_running()
                if load == "load":
                    wait_console(lambda: src_dir / "console.log", "the writer", WROTE, 3)
                begun = time.time()
                started = time.monotonic()
                dst, dst_dir = self.start(load, self.cleanup.root / f"builtin-{self.n}-dst", incoming=True)

                def inmigrate() -> bool:
                    alive(dst, dst_dir)
                    try:
                        status = qmp(dst_dir / "qmp.sock", "query-status", timeout=2.0).get("status")
                        return status == "inmigrate"
                    except (OSError, RuntimeError, TimeoutError):
                        return False

                wait_for("the destination QEMU", inmigrate, 60)
                from alacrity.vm.migrate import MigrationError, follow, watch_incoming

                ours, theirs = socket.socketpair()
                last: dict = {}
                with ours, theirs, watch_incoming(dst_dir / "qmp.sock") as watch:
                    watch.execute("getfd", {"fdname": "migration"}, [theirs.fileno()])
                    watch.execute("migrate-incoming", {"uri": "fd:migration"})
                    qmp(src_dir / "qmp.sock", "getfd", {"fdname": "migration"}, [ours.fileno()])
                    qmp(src_dir / "qmp.sock", "migrate", {"uri": "fd:migration"})
                    try:
                        follow(str(src_dir / "qmp.sock"), watch, lambda: alive(dst, dst_dir), last.update,
                               time.monotonic() + 900)
                    except (MigrationError, TimeoutError) as exc:
                        raise SampleError(f"migration: {exc}") from None
                    watch.execute("cont")  # held paused (-S) until the source completed, as vm migrate does
                info = last
                self.quit(src, src_dir)
                wall = time.monotonic() - started
                ended = time.time()
                got = {"downtime_ms": float(info["downtime"]), "total_ms": float(info["total-time"]),
                       "ram_mib": info.get("ram", {}).get("transferred", 0) / (1 << 20), "wall_s": wall,
                       "migrated_s_wall_clock": ended - begun}
                if load == "load":
                    wait_console(lambda: dst_dir / "console.log", "the writer after the migration", WROTE, 3)
                host.wait_replies_after(ended)
                host.check_running()
            finally:
                got_host = host.stop()
            return {**got, **got_host}
        finally:
            self.quit(src, src_dir)
            if dst is not None:
                self.quit(dst, dst_dir)


# -- the run


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "?"


def cpu_model() -> str:
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="migrations per kind and load (5)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds the guest runs (loaded) first (3)")
    parser.add_argument("--ping-ms", type=float, default=10.0, help="host ping interval, 0 for none (10)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="ours,builtin (both)")
    parser.add_argument("--loads", default=",".join(LOADS), help="idle,load (both)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (consoles, logs)")
    args = parser.parse_args()
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    loads = [x for x in LOADS if x in args.loads.split(",")]
    if os.geteuid() != 0:
        parser.error("run as root (a daemon, taps and VMs)")
    if args.runs < 1 or not kinds or not loads:
        parser.error("--runs must be at least 1, --kinds and --loads name at least one")
    from alacrity.vm.accel import choose_accel
    from alacrity.vm.image import default_image

    image = default_image(progress=False)
    machine = {"cpus": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
               "qemu": qemu_version(), "accel": choose_accel().accel, "guest": "microvm, 512 MiB, 1 vCPU",
               "loadavg_before": os.getloadavg()}
    progress(f"machine: {machine}")
    samples: dict[str, dict[str, list[dict]]] = {k: {x: [] for x in loads} for k in kinds}
    failures: list[str] = []
    with Cleanup(prefix="alacrity-migrate-", keep=args.keep) as cleanup:
        makers = {"ours": Ours, "builtin": Builtin}
        rigs = {k: makers[k](cleanup, image) for k in kinds}
        for run in range(args.runs):
            for load in loads:
                order = kinds[run % len(kinds):] + kinds[:run % len(kinds)]
                for kind in order:
                    tag = f"{kind}-{load}-{run}"
                    try:
                        got = rigs[kind].sample(load, args.warmup, args.ping_ms, tag)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                        failures.append(f"{tag}: {exc}")
                        progress(f"{tag}: FAILED: {exc}")
                        continue
                    samples[kind][load].append(got)
                    shown = [f"downtime {got['downtime_ms']:.0f} ms", f"total {got['total_ms']:.0f} ms"]
                    shown += [f"{label} {got[key]:.0f} ms" for key, label in
                              (("ping_gap_ms", "ping gap"), ("writer_gap_ms", "writer gap")) if got.get(key)]
                    shown += [f"RAM {got.get('ram_mib') or 0:.0f} MiB",
                              f"wall {got.get('wall_s') or 0:.2f} s"]
                    if "iperf_survived" in got:
                        shown.append(f"iperf3 survived {got['iperf_survived']}")
                    progress(f"{tag}: " + ", ".join(shown))
    machine["loadavg_after"] = os.getloadavg()

    def stats(kind: str, load: str, metric: str) -> dict | None:
        values = [s[metric] for s in samples.get(kind, {}).get(load, []) if s.get(metric) is not None]
        if not values:
            return None
        return {"median": median(values), "min": min(values), "max": max(values), "samples": values}

    summary = {load: {metric: {kind: stats(kind, load, metric) for kind in kinds} for metric in METRICS}
               for load in loads}
    for load in loads:
        for metric in METRICS:
            row = summary[load][metric]
            if row.get("ours") and row.get("builtin") and row["builtin"]["median"]:
                row["ratio"] = row["ours"]["median"] / row["builtin"]["median"]
    survived = {k: {x: [s["iperf_survived"] for s in samples[k][x] if "iperf_survived" in s]
                    for x in loads} for k in kinds}
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup_s": args.warmup, "ping_ms": args.ping_ms,
                          "machine": machine, "summary": summary, "samples": samples,
                          "iperf_survived": survived, "failures": failures}, indent=1))
        return 1 if failures else 0

    def cell(s: dict | None, digits: int) -> str:
        if s is None:
            return "-"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    names = {"downtime_ms": ("downtime, ms", 0), "total_ms": ("total time, ms", 0),
             "ping_gap_ms": ("ping gap, ms", 0), "writer_gap_ms": ("writer gap, ms", 0),
             "wall_s": ("wall, s", 2), "ram_mib": ("RAM sent, MiB", 0)}
    rows = []
    for load in loads:
        for metric in METRICS:
            label, digits = names[metric]
            row = summary[load][metric]
            if not any(row.get(k) for k in kinds):
                continue  # the writer gap of an idle guest
            rows.append([f"{load}: {label}", *(cell(row.get(k), digits) for k in kinds),
                         *([f"{row['ratio']:.2f}x" if "ratio" in row else "-"] if len(kinds) == 2 else [])])
    print_table(f"Live migration on one host, median [min-max] of {args.runs} ({machine['accel']} guests, "
                f"{machine['cpus']} cores); goal: downtime ours/built-in <= 1.2",
                ["measure", *kinds, *(["ours/built-in"] if len(kinds) == 2 else [])], rows)
    for kind in kinds:
        for load in loads:
            if survived[kind][load]:
                print(f"{kind}, {load}: iperf3 survived {sum(survived[kind][load])} of "
                      f"{len(survived[kind][load])} migrations")
    print(f"machine: {machine['cpu']}, {machine['cpus']} cores, kernel {machine['kernel']}, "
          f"{machine['qemu']}, guests {machine['accel']} ({machine['guest']}); "
          f"load average {machine['loadavg_before'][0]:.2f} before, {machine['loadavg_after'][0]:.2f} after")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
