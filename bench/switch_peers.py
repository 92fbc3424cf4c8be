"""Two-port forwarding: our switch process against DPDK testpmd, Open vSwitch with DPDK
and the Linux bridge, all driven by the same traffic source, in one run.

    python bench/switch_peers.py [--rounds 5] [--seconds 1.5] [--sizes 64,1500] [--json FILE]

Contenders (each forwards between two ports; a missing one is skipped with a reason):
  ours     `python -m alacrity.switch`; this script listens on two unix sockets, accepts
           the traffic source's vhost-user connections and hands them to the switch with
           Control.add_port (the switch is the vhost-user backend). MAC learning.
  testpmd  dpdk-testpmd --forward-mode=io between two net_vhost ports (vhost-user server).
  ovs      ovs-vswitchd-dpdk, a datapath_type=netdev bridge with two dpdkvhostuser ports,
           NORMAL (learning) flows; its own ovsdb-server, db and run dir in the temp dir,
           inside a private network namespace (its tap devices die with it).
  bridge   a Linux bridge with two veth pairs in a private network namespace.

Traffic source and sink, the same for all: one dpdk-testpmd with two ports, virtio-user
(vhost-user client; --no-huge memory is memfd-backed, so it can be shared) for ours,
testpmd and ovs, and af_packet on the veth ends for the bridge (nothing else can drive
a kernel bridge from a DPDK process). It runs in io mode as a loopback: `start tx_first
N` puts N bursts of 32 frames on each port (port P sends from its own MAC to the other
port's MAC), and every frame that comes back on one port is sent out of the other
unchanged, so both directions stay saturated with a fixed number of frames in flight and
the addresses stay consistent for MAC learning. Forwarding rate = frames received by
the source on both ports per second (both directions together), read from testpmd's
port counters over --seconds after --warmup. Gbit/s counts frame bytes (no FCS, no
preamble). A fresh source is started for every sample; contenders alternate within each
round and the tables show medians over rounds.

Pinning (2 cores): the contender's forwarding thread on CPU 0 (ours: taskset -c 0, one
Python thread; testpmd: --lcores 0@0,1@0; ovs: pmd-cpu-mask=0x1, its other threads
float; bridge: RPS steers the bridge ports' receive work to CPU 0), the traffic source on
CPU 1 (--lcores 0@1,1@1). The bridge still does part of its work (veth xmit, af_packet
sendto) on the source's core.

Also measured: for ours, notifications (driver kicks + switch interrupts, from
Control.stats()) per forwarded frame in each direction; and idle CPU: with the source
connected and silent, CPU time (utime+stime from /proc/PID/stat) of the switch process,
testpmd and ovs-vswitchd over --idle-seconds, as % of one core (first round only).
64 KiB GSO frames are not measured (see NOTES below / the JSON).

Goals: ours >= 1 Mpps per core at 64 B; ours >= 0.25x testpmd at 1500 B; ours < 0.1
notifications per frame; ours idle < 2 % of a core.
Needs root and bench/install-peers (dpdk-testpmd, openvswitch-switch-dpdk, iproute2).
DPDK runs with --no-huge; no hugepages are used. Everything started is stopped by its
process group, and the temp dir, the DPDK runtime dirs (/var/run/dpdk/<prefix>) and the
network namespace are removed, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import BENCH_DIR, Cleanup, cpu_seconds, fmt, median, print_table, progress, ratio

SRC = BENCH_DIR.parent / "src"
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")
GEN_LCORES = "0@1,1@1"
FWD_LCORES = "0@0,1@0"
OVS_VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
GSO_NOTE = ("64 KiB GSO: not measured. The common source (testpmd io loop seeded by txonly) "
            "cannot emit virtio-net GSO frames, and the bridge's af_packet PMD has no vnet header; "
            "a GSO source would mean a different driver per contender, so no fair comparison.")


def find_testpmd() -> str | None:
    return shutil.which("dpdk-testpmd") or next(
        (p for p in ("/usr/local/bin/dpdk-testpmd", "/usr/bin/dpdk-testpmd") if os.access(p, os.X_OK)), None)


def run(argv: list[str], **kw) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 30), **kw)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class TestPmd:
    """An interactive dpdk-testpmd driven over a pipe (stdout unbuffered through stdbuf,
    so command output is complete when the next prompt shows)."""

    PROMPT = "testpmd> "

    def __init__(self, cleanup: Cleanup, name: str, lcores: str, vdevs: list[str], app: list[str],
                 netns: str | None = None, mem_mb: int = 512) -> None:
        self.cleanup = cleanup
        self.name = name
        prefix = f"albench{os.getpid()}{name}"
        cleanup.callbacks.append(lambda: shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True))
        self.log_path = cleanup.root / f"{name}.log"
        argv = in_netns(netns, ["stdbuf", "-o0", "-e0", TESTPMD, "--lcores", lcores, "--no-huge",
                                "-m", str(mem_mb), "--no-pci", "--file-prefix", prefix])
        for vdev in vdevs:
            argv += ["--vdev", vdev]
        argv += ["--", "-i", "--total-num-mbufs=32768", "--nb-cores=1", *app]
        self.log = open(self.log_path, "a")  # noqa: SIM115 (closed in quit)
        self.log.write(f"\n==== {' '.join(argv)}\n")
        self.proc = cleanup.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf = ""
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            text = data.decode(errors="replace")
            with self.cond:
                self.buf += text
                if not data:
                    self.buf += "\0EOF"
                self.cond.notify_all()
            if not data:
                return
            with contextlib.suppress(ValueError):
                self.log.write(text)

    def _wait(self, mark: int, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.PROMPT not in self.buf[mark:]:
                left = deadline - time.monotonic()
                if "\0EOF" in self.buf[mark:] or left <= 0:
                    tail = self.buf[-1500:].replace("\0EOF", "")
                    raise RuntimeError(f"{self.name}: {what} failed "
                                       f"({'exited' if left > 0 else 'timeout'}):\n{tail}")
                self.cond.wait(min(left, 0.5))
            return self.buf[mark:]

    def start(self, timeout: float = 40.0) -> TestPmd:
        self._wait(0, timeout, "start")
        return self

    def cmd(self, line: str, timeout: float = 15.0) -> str:
        with self.cond:
            mark = len(self.buf)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._wait(mark, timeout, repr(line))

    def port_stats(self) -> dict[int, tuple[int, int]]:
        """{port: (rx_packets, tx_packets)}"""
        out = self.cmd("show port stats all")
        stats = {}
        for m in re.finditer(r"NIC statistics for port (\d+).*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)",
                             out, re.S):
            stats[int(m[1])] = (int(m[2]), int(m[3]))
        if len(stats) != 2:
            raise RuntimeError(f"{self.name}: cannot parse port stats:\n{out[-1500:]}")
        return stats

    def quit(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.cleanup.kill(self.proc)
        self.reader.join(5)
        self.log.close()


def virtio_user(i: int, path: Path) -> str:
    return f"net_virtio_user{i},path={path},queues=1,queue_size=1024,mac={MACS[i]}"


class Contender:
    name = ""
    title = ""
    gen_netns: str | None = None

    def __init__(self, cleanup: Cleanup, netns: str | None) -> None:
        self.cleanup = cleanup
        self.netns = netns
        self.dir = cleanup.root / self.name
        self.dir.mkdir(exist_ok=True)

    def missing(self) -> str | None:
        """Why this contender cannot run here (None: it can)."""
        return None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def endpoints(self) -> list[str]:
        raise NotImplementedError

    def pid(self) -> int | None:
        return None

    def wait_ready(self, mark: object) -> None:
        """After the source started (mark = ready_mark() taken before): wait until both
        ports can carry frames."""

    def ready_mark(self) -> object:
        return None

    def counters(self) -> dict[str, dict] | None:
        return None


class Ours(Contender):
    name = "ours"
    title = "ours (alacrity.switch)"

    def missing(self) -> str | None:
        try:
            _control()
        except ImportError as exc:
            return f"cannot import alacrity ({exc})"
        return None

    def start(self) -> None:
        Control = _control()
        self.ctl_path = self.dir / "switch.ctl"
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()
        log = open(self.dir / "switch.log", "ab")  # noqa: SIM115 (closed in stop)
        self.logf = log
        paths = [str(SRC), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        self.proc = self.cleanup.popen(["taskset", "-c", "0", sys.executable, "-m", "alacrity.switch",
                                        "--control", str(self.ctl_path), "--log-level", "WARNING"],
                                       stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 20
        while not self.ctl_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"switch did not start: {(self.dir / 'switch.log').read_text()[-1500:]}")
            time.sleep(0.02)
        self.ctl = Control(str(self.ctl_path))
        self.stats_ctl = Control(str(self.ctl_path))
        self.listeners = []
        self.paths = [self.dir / f"p{i}.sock" for i in range(2)]
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(4)
            self.listeners.append(sock)
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._hand_over, daemon=True)
        self.thread.start()

    def _hand_over(self) -> None:
        """Accept the source's vhost-user connections and give them to the switch."""
        while not self.stopping.is_set():
            try:
                ready, _, _ = select.select(self.listeners, [], [], 0.2)
            except (OSError, ValueError):
                return
            for sock in ready:
                i = self.listeners.index(sock)
                try:
                    conn, _ = sock.accept()
                    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                    with conn:
                        self.ctl.add_port(conn.fileno(), mac=MACS[i], label=f"gen{i}", peer_pid=pid)
                except Exception as exc:  # reported by the sample that waits for it
                    self.errors.append(f"hand-over of port {i}: {exc}")
                    progress(f"ours: hand-over of port {i} failed: {exc}")

    def endpoints(self) -> list[str]:
        return [virtio_user(i, p) for i, p in enumerate(self.paths)]

    def pid(self) -> int | None:
        return self.proc.pid

    def counters(self) -> dict[str, dict] | None:
        ports: dict[str, dict] = {}
        for port in sorted(self.stats_ctl.stats()["ports"], key=lambda p: p["port"]):
            ports[port["label"]] = port  # the newest port of each label wins
        return ports

    def stop(self) -> None:
        if getattr(self, "stopping", None) is not None:
            self.stopping.set()
            self.thread.join(2)
            for sock in self.listeners:
                sock.close()
            self.stopping = None
        for attr in ("ctl", "stats_ctl"):
            if getattr(self, attr, None) is not None:
                getattr(self, attr).close()
                setattr(self, attr, None)
        if getattr(self, "proc", None) is not None:
            self.cleanup.kill(self.proc)
            self.logf.close()
            self.proc = None


class TestPmdFwd(Contender):
    name = "testpmd"
    title = "DPDK testpmd io"

    def start(self) -> None:
        self.paths = [self.dir / f"vhost{i}.sock" for i in range(2)]
        self.tp = TestPmd(self.cleanup, "fwd", FWD_LCORES,
                          [f"net_vhost{i},iface={p},queues=1" for i, p in enumerate(self.paths)],
                          ["--forward-mode=io"]).start()
        self.tp.cmd("start")

    def endpoints(self) -> list[str]:
        return [virtio_user(i, p) for i, p in enumerate(self.paths)]

    def pid(self) -> int | None:
        return self.tp.proc.pid

    def stop(self) -> None:
        if getattr(self, "tp", None) is not None:
            self.tp.quit()
            self.tp = None


class Ovs(Contender):
    name = "ovs"
    title = "OVS-DPDK"

    def missing(self) -> str | None:
        for path in (OVS_VSWITCHD, OVS_SCHEMA):
            if not os.path.exists(path):
                return f"no {path} (openvswitch-switch-dpdk; run bench/install-peers)"
        for tool in ("ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-appctl"):
            if not shutil.which(tool):
                return f"no {tool}"
        if not self.netns:
            return "no private network namespace for its tap devices"
        return None

    def start(self) -> None:
        d = self.dir
        for f in d.iterdir():
            f.unlink()
        self.env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_DBDIR": str(d), "OVS_LOGDIR": str(d),
                    "OVS_SYSCONFDIR": str(d)}
        run(["ovsdb-tool", "create", str(d / "conf.db"), OVS_SCHEMA], env=self.env)
        with open(d / "ovsdb-server.out", "ab") as out:
            self.db = self.cleanup.popen(["ovsdb-server", str(d / "conf.db"), f"--remote=punix:{d}/db.sock",
                                          f"--unixctl={d}/ovsdb-server.ctl",
                                          f"--log-file={d}/ovsdb-server.log"],
                                         stdout=out, stderr=out, env=self.env)
        self._wait_path(d / "db.sock", self.db, "ovsdb-server")
        self.vsctl = ["ovs-vsctl", f"--db=unix:{d}/db.sock", "--timeout=30"]
        prefix = f"albench{os.getpid()}ovs"
        self.cleanup.callbacks.append(lambda: shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True))
        run([*self.vsctl, "--no-wait", "init"], env=self.env)
        run([*self.vsctl, "--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
             f'other_config:dpdk-extra="--no-huge --legacy-mem -m 2048 --no-pci --file-prefix={prefix}"',
             "other_config:pmd-cpu-mask=0x1", "other_config:dpdk-lcore-mask=0x2"], env=self.env)
        self.log = d / "ovs-vswitchd.log"
        with open(d / "ovs-vswitchd.out", "ab") as out:
            self.proc = self.cleanup.popen(
                in_netns(self.netns, [OVS_VSWITCHD, f"unix:{d}/db.sock", f"--unixctl={d}/ovs-vswitchd.ctl",
                                      f"--log-file={self.log}"]),
                stdout=out, stderr=out, env=self.env)
        run([*self.vsctl, "add-br", "ovsbr0", "--", "set", "bridge", "ovsbr0", "datapath_type=netdev",
             "--", "add-port", "ovsbr0", "vhu0", "--", "set", "Interface", "vhu0", "type=dpdkvhostuser",
             "--", "add-port", "ovsbr0", "vhu1", "--", "set", "Interface", "vhu1", "type=dpdkvhostuser"],
            env=self.env, timeout=60)
        self.paths = [d / "vhu0", d / "vhu1"]
        for path in self.paths:
            self._wait_path(path, self.proc, "ovs-vswitchd")

    def _wait_path(self, path: Path, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in self.dir.glob("*.log"))
                raise RuntimeError(f"{what} did not come up ({path.name}):\n{logs}")
            time.sleep(0.05)

    def endpoints(self) -> list[str]:
        return [virtio_user(i, p) for i, p in enumerate(self.paths)]

    def pid(self) -> int | None:
        return self.proc.pid

    def ready_mark(self) -> object:
        return self.log.stat().st_size

    def wait_ready(self, mark: object) -> None:
        # OVS's vhost thread enables the queues a second or two after the device is
        # ready; frames sent before that are dropped (and the loop would stay empty).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(mark)  # type: ignore[arg-type]
                if f.read().count(b"changed to 'enabled'") >= 4:
                    return
            time.sleep(0.1)

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None:
            with contextlib.suppress(Exception):
                run(["ovs-appctl", "-t", f"{self.dir}/ovs-vswitchd.ctl", "exit", "--cleanup"], env=self.env,
                    timeout=10)
            self.cleanup.kill(self.proc)
            self.proc = None
        if getattr(self, "db", None) is not None:
            self.cleanup.kill(self.db)
            self.db = None


class Bridge(Contender):
    name = "bridge"
    title = "Linux bridge+veth"

    def missing(self) -> str | None:
        if not self.netns:
            return "cannot create a network namespace"
        if not list(Path("/usr/lib/x86_64-linux-gnu/dpdk").glob("pmds-*/librte_net_af_packet.so*")):
            return "no DPDK af_packet PMD (librte-net-af-packet23; run bench/install-peers)"
        return None

    def start(self) -> None:
        self.gen_netns = self.netns
        self.stop()  # leftovers of an earlier round that failed half-way
        script = f"""
            ip link add lnxbr0 type bridge
            for i in 0 1; do
              ip link add algen$i type veth peer name albrp$i
              ip link set albrp$i master lnxbr0
              ip link set algen$i up; ip link set albrp$i up
            done
            ip link set algen0 address {MACS[0]}; ip link set algen1 address {MACS[1]}
            ip link set lnxbr0 up
        """
        run(in_netns(self.netns, ["sh", "-ec", script]))
        self.rps = True
        for i in range(2):  # the bridge's receive work on CPU 0, like the other contenders
            try:
                rps = f"/sys/class/net/albrp{i}/queues/rx-0/rps_cpus"
                run(in_netns(self.netns, ["sh", "-ec", f"echo 1 > {rps}"]))
            except RuntimeError as exc:
                self.rps = False
                progress(f"bridge: no RPS ({exc})")

    def endpoints(self) -> list[str]:
        return [f"net_af_packet{i},iface=algen{i},qpairs=1,framecnt=1024" for i in range(2)]

    def stop(self) -> None:
        subprocess.run(in_netns(self.netns, ["sh", "-c", "ip link del algen0; ip link del algen1; "
                                             "ip link del lnxbr0"]), capture_output=True)


def _control():
    try:
        from alacrity.switch.process import Control
    except ImportError:
        if str(SRC) not in sys.path:
            sys.path.insert(0, str(SRC))
        from alacrity.switch.process import Control
    return Control


TESTPMD = find_testpmd() or "dpdk-testpmd"
CONTENDERS = {c.name: c for c in (Ours, TestPmdFwd, Ovs, Bridge)}


def gen_for(cleanup: Cleanup, cont: Contender, size: int) -> TestPmd:
    mark = cont.ready_mark()
    gen = TestPmd(cleanup, "gen", GEN_LCORES, cont.endpoints(),
                  ["--forward-mode=io", f"--txpkts={size}", f"--eth-peer=0,{MACS[1]}",
                   f"--eth-peer=1,{MACS[0]}", "--rxd=1024", "--txd=1024", "--burst=32"],
                  netns=cont.gen_netns)
    try:
        gen.start()
        cont.wait_ready(mark)
    except BaseException:
        gen.quit()
        raise
    return gen


def signals(c0: dict, c1: dict) -> dict:
    """Kicks (by the sending driver) and interrupts (to the receiving driver) per frame,
    per direction, from the switch's port counters over the measured window."""
    out = {}
    for a, b in (("gen0", "gen1"), ("gen1", "gen0")):
        if a not in c0 or b not in c0 or a not in c1 or b not in c1:
            continue
        frames = c1[b]["rx_packets"] - c0[b]["rx_packets"]
        kicks = c1[a]["kicks"] - c0[a]["kicks"]
        irqs = c1[b]["interrupts"] - c0[b]["interrupts"]
        if frames > 0:
            out[f"{a[-1]}->{b[-1]}"] = {
                "frames": frames, "kicks": kicks, "interrupts": irqs, "kicks_per_frame": kicks / frames,
                "interrupts_per_frame": irqs / frames, "notify_per_frame": (kicks + irqs) / frames}
    return out


def sample(cleanup: Cleanup, cont: Contender, size: int, args: argparse.Namespace) -> dict:
    last = ""
    for attempt in range(3):
        gen = gen_for(cleanup, cont, size)
        try:
            gen.cmd(f"start tx_first {args.bursts}")
            time.sleep(args.warmup)
            c0 = cont.counters()
            s0, t0 = gen.port_stats(), time.monotonic()
            time.sleep(args.seconds)
            s1, t1 = gen.port_stats(), time.monotonic()
            c1 = cont.counters()
            gen.cmd("stop")
        finally:
            gen.quit()
        rx = [s1[p][0] - s0[p][0] for p in (0, 1)]
        if min(rx) > 0:
            pps = sum(rx) / (t1 - t0)
            result = {"size": size, "pps": pps, "mpps": pps / 1e6, "gbit_s": pps * size * 8 / 1e9,
                      "rx_per_port": rx, "seconds": t1 - t0, "attempt": attempt + 1}
            if c0 is not None and c1 is not None:
                result["signals"] = signals(c0, c1)
            return result
        last = f"a direction carried nothing (rx per port {rx})"
        progress(f"  {cont.name} {size} B: {last}; restarting the source")
    raise RuntimeError(last)


def idle(cleanup: Cleanup, cont: Contender, seconds: float) -> float | None:
    pid = cont.pid()
    if pid is None:
        return None
    gen = gen_for(cleanup, cont, 64)
    try:
        time.sleep(1.0)  # let the connection settle
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    finally:
        gen.quit()
    if cpu0 is None or cpu1 is None:
        return None
    return 100 * (cpu1 - cpu0) / (t1 - t0)


def make_netns(cleanup: Cleanup) -> tuple[str | None, str | None]:
    name = f"albench-{os.getpid()}"
    try:
        run(["ip", "netns", "add", name])
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    cleanup.callbacks.append(lambda: subprocess.run(["ip", "netns", "del", name], capture_output=True))
    run(in_netns(name, ["sh", "-ec", "ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                        "net.ipv6.conf.default.disable_ipv6=1 || true"]))
    return name, None


def report(results: dict, args: argparse.Namespace) -> None:
    names = [n for n in results["contenders"] if n not in results["skipped"]]
    peers = [n for n in names if n != "ours"]
    med = results["medians"]
    title = {n: CONTENDERS[n].title for n in names}
    header = ["measure", *[title[n] for n in names], *[f"ours/{n}" for n in peers if "ours" in names]]
    rows = []
    for size in args.sizes:
        for key, label, digits in (("mpps", "Mpps", 3), ("gbit_s", "Gbit/s", 2)):
            vals = {n: med.get(n, {}).get(str(size), {}).get(key) for n in names}
            row = [f"{size} B, {label}", *[fmt(vals[n], digits) for n in names]]
            if "ours" in names:
                row += [fmt(ratio(vals["ours"], vals[n]), 3) for n in peers]
            rows.append(row)
    print_table(f"Forwarding, 2 ports, both directions, testpmd io loop as source "
                f"(median of {args.rounds} rounds x {args.seconds:g} s)", header, rows)

    if "ours" in names:
        rows = []
        for size in args.sizes:
            sig = med.get("ours", {}).get(str(size), {}).get("signals", {})
            for direction in ("0->1", "1->0"):
                s = sig.get(direction)
                if s:
                    rows.append([f"{size} B, port {direction}", str(s["frames"]), str(s["kicks"]),
                                 str(s["interrupts"]), fmt(s["notify_per_frame"], 5)])
        print_table("ours: notifications at saturation, median round (goal < 0.1 per frame)",
                    ["direction", "frames", "kicks", "interrupts", "per frame"], rows)

    if results["idle_cpu_pct"]:
        rows = [[CONTENDERS[n].title, fmt(v, 2) if v is not None else "n/a (kernel, no process)"]
                for n, v in results["idle_cpu_pct"].items()]
        print_table(f"Idle: source connected, no traffic, {args.idle_seconds:g} s (goal ours < 2 %)",
                    ["contender", "CPU % of one core"], rows)

    ours64 = med.get("ours", {}).get("64", {}).get("mpps")
    ours1500 = med.get("ours", {}).get("1500", {}).get("mpps")
    tp1500 = med.get("testpmd", {}).get("1500", {}).get("mpps")
    print("\nGoals:")
    print(f"  ours >= 1 Mpps per core at 64 B (one core): {fmt(ours64, 3)} Mpps")
    print(f"  ours >= 0.25x testpmd at 1500 B: {fmt(ratio(ours1500, tp1500), 3)}x")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, errs in results["errors"].items():
        for err in errs:
            print(f"error {name}: {err.splitlines()[0] if err else ''}")
    print(f"note: {GSO_NOTE}")
    print(f"note: pinning: contender on CPU 0, source on CPU 1; bridge RPS to CPU 0: "
          f"{results.get('bridge_rps', '-')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="measured time per sample (default 1.5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="time before measuring (default 0.5)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes in bytes, no FCS (default 64,1500)")
    parser.add_argument("--bursts", type=int, default=8,
                        help="tx_first bursts of 32 frames per port put in the loop "
                             "(default 8: 256 per direction)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="idle CPU window, 0 to skip (default 5)")
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help=f"contenders (default {','.join(CONTENDERS)})")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="stop starting rounds after this many seconds (default 300)")
    parser.add_argument("--json", metavar="FILE", help="also write all samples and medians as JSON to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in wanted:
        if n not in CONTENDERS:
            parser.error(f"unknown contender {n!r}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, DPDK, OVS)")
    if not find_testpmd() or not shutil.which("stdbuf"):
        print("dpdk-testpmd (the traffic source) or stdbuf not found: run bench/install-peers",
              file=sys.stderr)
        return 2

    started = time.monotonic()
    results: dict = {"contenders": wanted, "skipped": {}, "errors": {}, "samples": {}, "medians": {},
                     "idle_cpu_pct": {}, "config": {k: v for k, v in vars(args).items() if k != "json"},
                     "notes": [GSO_NOTE], "pinning": {"contender": "CPU 0", "source": "CPU 1"}}
    with Cleanup(prefix="alacrity-peers-", keep=args.keep) as cleanup:
        # Runs last: /var/run/dpdk itself, if our runtime dirs were all it held.
        cleanup.callbacks.append(lambda: os.path.isdir("/var/run/dpdk") and not os.listdir("/var/run/dpdk")
                                 and os.rmdir("/var/run/dpdk"))
        netns, why = (make_netns(cleanup) if {"ovs", "bridge"} & set(wanted) else (None, None))
        if why:
            progress(f"no network namespace: {why}")
        conts: dict[str, Contender] = {}
        for n in wanted:
            cont = CONTENDERS[n](cleanup, netns)
            reason = cont.missing()
            if reason:
                results["skipped"][n] = reason
                progress(f"skip {n}: {reason}")
            else:
                conts[n] = cont
        failures = dict.fromkeys(conts, 0)
        for rnd in range(args.rounds):
            if rnd and time.monotonic() - started > args.budget:
                progress(f"budget of {args.budget:g} s used: stopping after {rnd} rounds")
                results["config"]["rounds_done"] = rnd
                break
            order = list(conts) if rnd % 2 == 0 else list(reversed(conts))
            for n in order:
                if n in results["skipped"]:
                    continue
                cont = conts[n]
                progress(f"round {rnd + 1}/{args.rounds}: {n}")
                try:
                    cont.start()
                    if n == "bridge":
                        results["bridge_rps"] = cont.rps
                    if rnd == 0 and args.idle_seconds > 0:
                        results["idle_cpu_pct"][n] = idle(cleanup, cont, args.idle_seconds)
                        progress(f"  idle CPU {fmt(results['idle_cpu_pct'][n], 2)} %")
                    for size in args.sizes:
                        s = sample(cleanup, cont, size, args)
                        results["samples"].setdefault(n, {}).setdefault(str(size), []).append(s)
                        progress(f"  {size} B: {s['mpps']:.3f} Mpps {s['gbit_s']:.2f} Gbit/s")
                    failures[n] = 0
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    results["errors"].setdefault(n, []).append(str(exc))
                    progress(f"  {n} failed: {str(exc)[:2000]}")
                    failures[n] += 1
                    if failures[n] >= 2:
                        results["skipped"][n] = f"failed twice: {str(exc).splitlines()[0]}"
                finally:
                    cont.stop()
        else:
            results["config"]["rounds_done"] = args.rounds
        if isinstance(getattr(conts.get("ours"), "errors", None), list) and conts["ours"].errors:
            results["errors"].setdefault("ours", []).extend(conts["ours"].errors)

    for n, per_size in results["samples"].items():
        for size, samples in per_size.items():
            m: dict = {k: median([s[k] for s in samples]) for k in ("pps", "mpps", "gbit_s")}
            sig: dict = {}
            for direction in ("0->1", "1->0"):
                vals = [s["signals"][direction] for s in samples if direction in s.get("signals", {})]
                if vals:
                    keys = ("frames", "kicks", "interrupts", "kicks_per_frame", "interrupts_per_frame",
                            "notify_per_frame")
                    sig[direction] = {k: median([v[k] for v in vals]) for k in keys}
            if sig:
                m["signals"] = sig
            m["n"] = len(samples)
            results["medians"].setdefault(n, {})[size] = m
    # A contender that failed in a later round still has its earlier samples in the table.
    for n in list(results["skipped"]):
        if n in results["medians"]:
            results["errors"].setdefault(n, []).append(results["skipped"].pop(n))
    results["elapsed_s"] = time.monotonic() - started
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted (everything started was stopped)", file=sys.stderr)
        sys.exit(130)
