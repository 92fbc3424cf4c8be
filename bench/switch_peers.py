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
round; every figure is shown as median [min–max] over the rounds.

Pinning (2 cores): the contender's forwarding thread on CPU 0 (ours: taskset -c 0, one
Python thread; testpmd: --lcores 0@0,1@0; ovs: pmd-cpu-mask=0x1, its other threads
float; bridge: RPS steers the bridge ports' receive work to CPU 0), the traffic source on
CPU 1 (--lcores 0@1,1@1). The bridge still does part of its work (veth xmit, af_packet
sendto) on the source's core.

What each sample measures, over exactly its window (between the two port counter reads):
  rate     Mpps and Gbit/s, as above; ours/testpmd and ours/ovs are ratios of the medians,
           with the range of the per-round ratios (both measured in the same round) beside.
  CPU      CPU seconds per million frames forwarded, and % of one core, of every process
           involved: utime+stime of all its threads from /proc/PID/stat, read right after
           each counter read. Ours: the switch process; testpmd: its process; ovs:
           ovs-vswitchd and ovsdb-server; and the source in every case. The bridge has no
           process: the kernel forwards in softirq context, so its row is CPU 0's
           system+irq+softirq time from /proc/stat (RPS puts the receive work there), which
           also counts any other kernel work on CPU 0; the source's af_packet sends on CPU 1
           are in the source's figure. Also both CPUs' busy time from /proc/stat: the whole
           machine's cost, and what the named processes do not explain (other load: a
           sample with more than 10 % of a core of it is named in a warning).
           DPDK's poll-mode threads spin at 100 % of a core whatever the load, so their
           CPU per frame is just the inverse of their rate; ours sleeps when there is no
           work. /proc counts in 10 ms ticks: about 1 % of a 1.5 s window.
  signals  ours: driver kicks and switch interrupts per forwarded frame in each direction,
           from Control.stats() port counters.
  idle     in every round, before the samples: with the source connected and silent, CPU
           % of one core of the contender's processes over --idle-seconds (ours also
           checks that both ports are up).
64 KiB GSO frames are not measured (why: GSO_NOTE, printed at the end). The JSON (--json)
keeps every sample, with its CPU seconds per process and per CPU (/proc/stat fields), and
the medians, spreads, ratios, idle figures and the machine (nproc, kernel, load average).

Goals (issue 11): ours >= 1.0x OVS-DPDK at 64 B and at 1500 B; ours >= 0.8x testpmd at
64 B and >= 1.0x testpmd at 1500 B; our switch idle with its ports connected < 1 % of a
core. The GOALS lines judge the medians and count the rounds that met each goal.
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

from common import (
    BENCH_DIR,
    Cleanup,
    cpu_seconds,
    cpu_times,
    cpu_times_delta,
    fmt,
    fmt_spread,
    median,
    print_table,
    progress,
    ratio,
    spread,
)

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
    in_kernel = False  # True: the forwarding is the kernel's work, done for no process of its own

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

    def processes(self) -> dict[str, int]:
        """{role: pid} of every process the contender runs: their CPU time is its cost. Empty
        for the bridge, whose work the kernel does on behalf of no process of its own."""
        pid = self.pid()
        return {self.name: pid} if pid is not None else {}

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
                    self._add_port(i, conn, pid)
                except Exception as exc:  # reported by the sample that waits for it
                    self.errors.append(f"hand-over of port {i}: {exc}")
                    progress(f"ours: hand-over of port {i} failed: {exc}")

    def _add_port(self, i: int, conn: socket.socket, pid: int) -> None:
        """Port `i` of the source connected on `conn` (pid `pid`): the switch takes it."""
        with conn:
            self.ctl.add_port(conn.fileno(), mac=MACS[i], label=f"gen{i}", peer_pid=pid)

    def endpoints(self) -> list[str]:
        return [virtio_user(i, p) for i, p in enumerate(self.paths)]

    def pid(self) -> int | None:
        return self.proc.pid

    def processes(self) -> dict[str, int]:
        return {"switch": self.proc.pid}

    def counters(self) -> dict[str, dict] | None:
        reply = self.stats_ctl.stats()
        self.switch_stats = reply.get("stats", {})  # engine, sleeps, wakeups, poll_us
        ports: dict[str, dict] = {}
        for port in sorted(reply["ports"], key=lambda p: p["port"]):
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

    def processes(self) -> dict[str, int]:
        return {"ovs-vswitchd": self.proc.pid, "ovsdb-server": self.db.pid}

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
    in_kernel = True

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


def usage(cont: Contender, gen: TestPmd) -> dict:
    """CPU seconds used so far by every process involved (utime+stime of all its threads,
    /proc/PID/stat) and by every CPU (/proc/stat), read at one instant."""
    procs = {role: cpu_seconds(pid) for role, pid in cont.processes().items()}
    procs["source"] = cpu_seconds(gen.proc.pid)
    return {"t": time.monotonic(), "procs": procs, "stat": cpu_times()}


def cpu_use(cont: Contender, u0: dict, u1: dict, mpps: float) -> dict:
    """CPU seconds, % of one core and CPU seconds per million frames forwarded, per role,
    between two usage() readings. Roles: the contender's processes (or, for the bridge,
    `kernel_cpu0`: system+irq+softirq time of CPU 0 from /proc/stat), `contender` (their
    sum), `source`, `all_cpus` (every CPU's busy time) and `unattributed` (all_cpus minus
    the contender and the source: other work on the machine, and this script)."""
    dt = u1["t"] - u0["t"]
    stat = cpu_times_delta(u0["stat"], u1["stat"])
    cpu = {r: u1["procs"][r] - v for r, v in u0["procs"].items()
           if v is not None and u1["procs"].get(r) is not None}
    if cont.in_kernel and "cpu0" in stat:
        cpu["kernel_cpu0"] = sum(stat["cpu0"][f] for f in ("system", "irq", "softirq"))
    cpu["contender"] = sum(v for r, v in cpu.items() if r != "source")
    cpu["all_cpus"] = stat["cpu"]["busy"]
    cpu["unattributed"] = cpu["all_cpus"] - cpu["contender"] - cpu.get("source", 0.0)
    return {"window_s": dt, "cpu_s": cpu, "core_pct": {r: 100 * v / dt for r, v in cpu.items()},
            "cpu_s_per_mframe": {r: v / dt / mpps for r, v in cpu.items()},
            "proc_stat": {c: {f: round(v, 2) for f, v in d.items()} for c, d in stat.items()}}


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def sample(cleanup: Cleanup, cont: Contender, size: int, args: argparse.Namespace) -> dict:
    last = ""
    for attempt in range(3):
        gen = gen_for(cleanup, cont, size)
        try:
            procs = {role: {"pid": pid, "comm": comm(pid)}
                     for role, pid in {**cont.processes(), "source": gen.proc.pid}.items()}
            gen.cmd(f"start tx_first {args.bursts}")
            time.sleep(args.warmup)
            c0 = cont.counters()
            s0, t0 = gen.port_stats(), time.monotonic()
            u0 = usage(cont, gen)
            time.sleep(args.seconds)
            s1, t1 = gen.port_stats(), time.monotonic()
            u1 = usage(cont, gen)
            c1 = cont.counters()
            gen.cmd("stop")
        finally:
            gen.quit()
        rx = [s1[p][0] - s0[p][0] for p in (0, 1)]
        if min(rx) > 0:
            pps = sum(rx) / (t1 - t0)
            result = {"size": size, "pps": pps, "mpps": pps / 1e6, "gbit_s": pps * size * 8 / 1e9,
                      "rx_per_port": rx, "seconds": t1 - t0, "attempt": attempt + 1,
                      "processes": procs, "cpu": cpu_use(cont, u0, u1, pps / 1e6)}
            if c0 is not None and c1 is not None:
                result["signals"] = signals(c0, c1)
            if getattr(cont, "switch_stats", None):
                result["switch"] = cont.switch_stats
            return result
        last = f"a direction carried nothing (rx per port {rx})"
        progress(f"  {cont.name} {size} B: {last}; restarting the source")
    raise RuntimeError(last)


def idle(cleanup: Cleanup, cont: Contender, seconds: float) -> dict | None:
    """CPU % of one core of the contender's processes with the source connected and
    silent (None for the bridge: no process of its own)."""
    if not cont.processes():
        return None
    gen = gen_for(cleanup, cont, 64)
    try:
        time.sleep(1.0)  # let the connection settle
        ports = cont.counters()
        u0 = usage(cont, gen)
        time.sleep(seconds)
        u1 = usage(cont, gen)
    finally:
        gen.quit()
    dt = u1["t"] - u0["t"]
    out: dict = {r: 100 * (u1["procs"][r] - v) / dt for r, v in u0["procs"].items()
                 if r != "source" and v is not None and u1["procs"].get(r) is not None}
    out["contender"] = sum(out.values())
    out["seconds"] = dt
    if ports is not None:  # ours: were both ports up while we measured?
        out["ports_running"] = sum(1 for p in ports.values() if p.get("running"))
    return out


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


SIGNAL_KEYS = ("frames", "kicks", "interrupts", "kicks_per_frame", "interrupts_per_frame", "notify_per_frame")
# (ratio, size, at least): issue 11's forwarding goals.
GOALS = (("ovs", 64, 1.0), ("ovs", 1500, 1.0), ("testpmd", 64, 0.8), ("testpmd", 1500, 1.0))
IDLE_GOAL_PCT = 1.0
#: A sample whose window had more than this (% of a core) busy outside the processes measured
#: is named in a warning: something else ran on the machine.
UNATTRIBUTED_WARN_PCT = 10.0


def dig(d: dict, *path: str) -> object:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def as_spread(values: list) -> dict | None:
    s = spread(values)
    return None if s is None else {"median": s[0], "min": s[1], "max": s[2], "n": len(values)}


def summarize(results: dict) -> None:
    """Medians (as before), spreads (median, min, max over rounds) and the ratios of ours to
    each peer: of the medians, and per round (ours and the peer measured in the same round)."""
    for n, per_size in results["samples"].items():
        for size, samples in per_size.items():
            m: dict = {k: median([s[k] for s in samples]) for k in ("pps", "mpps", "gbit_s")}
            sp: dict = {k: as_spread([s[k] for s in samples]) for k in ("mpps", "gbit_s")}
            for key in ("cpu_s_per_mframe", "core_pct"):
                roles = sorted({r for s in samples for r in dig(s, "cpu", key) or {}})
                sp[key] = {r: as_spread([dig(s, "cpu", key, r) for s in samples]) for r in roles}
                m[key] = {r: v["median"] for r, v in sp[key].items() if v}
            sig: dict = {}
            for direction in ("0->1", "1->0"):
                vals = [s["signals"][direction] for s in samples if direction in s.get("signals", {})]
                if vals:
                    sig[direction] = {k: as_spread([v[k] for v in vals]) for k in SIGNAL_KEYS}
            if sig:
                sp["signals"] = sig
                m["signals"] = {d: {k: v["median"] for k, v in x.items()} for d, x in sig.items()}
            m["n"] = len(samples)
            results["medians"].setdefault(n, {})[size] = m
            results["spread"].setdefault(n, {})[size] = sp
    ours = results["samples"].get("ours", {})
    for peer, per_size in results["samples"].items():
        if peer == "ours":
            continue
        for size, samples in per_size.items():
            mine = {s["round"]: s["mpps"] for s in ours.get(size, [])}
            per_round = {str(s["round"]): mine[s["round"]] / s["mpps"] for s in samples if s["round"] in mine}
            results["ratios"].setdefault(f"ours/{peer}", {})[size] = {
                "of_medians": ratio(dig(results["medians"], "ours", size, "mpps"),
                                    results["medians"][peer][size]["mpps"]),
                "per_round": per_round}
    for n, rounds in results["idle"].items():
        results["idle_cpu_pct"][n] = as_spread([r["contender"] for r in rounds if r])


def cell(values: list, digits: int, rounds: int) -> str:
    """median [min–max], with the number of samples when some rounds are missing."""
    text = fmt_spread(values, digits)
    got = sum(1 for v in values if v is not None)
    return text if got in (0, rounds) else f"{text} n={got}"


def sci(sp: dict | None) -> str:
    if not sp:
        return "-"
    return f"{sp['median']:.1e} [{sp['min']:.1e}–{sp['max']:.1e}]"


def ratio_cell(r: dict | None, digits: int = 2) -> str:
    if not r or r["of_medians"] is None:
        return "-"
    per = list(r["per_round"].values())
    text = f"{r['of_medians']:.{digits}f}x"
    return f"{text} [{min(per):.{digits}f}–{max(per):.{digits}f}]" if len(per) > 1 else text


FORWARDER = {"ours": "switch", "testpmd": "testpmd", "ovs": "ovs-vswitchd", "bridge": "kernel_cpu0"}


def report(results: dict, args: argparse.Namespace) -> None:
    names = [n for n in results["contenders"] if n not in results["skipped"]]
    peers = [n for n in names if n != "ours"]
    rounds = results["config"].get("rounds_done", args.rounds)
    samples = results["samples"]
    title = {n: CONTENDERS[n].title for n in names}
    have_ours = "ours" in names

    def vals(n: str, size: int, *path: str) -> list:
        return [dig(s, *path) for s in samples.get(n, {}).get(str(size), [])]

    header = ["measure", *[title[n] for n in names], *[f"ours/{n}" for n in peers if have_ours]]
    rows = []
    for size in args.sizes:
        for key, label, digits in (("mpps", "Mpps", 3), ("gbit_s", "Gbit/s", 2)):
            row = [f"{size} B, {label}", *[cell(vals(n, size, key), digits, rounds) for n in names]]
            if have_ours:
                row += [ratio_cell(dig(results["ratios"], f"ours/{n}", str(size))) if key == "mpps" else ""
                        for n in peers]
            rows.append(row)
    print_table(f"Forwarding, 2 ports, both directions, testpmd io loop as source: median [min–max] "
                f"of {rounds} rounds x {args.seconds:g} s", header, rows)
    if have_ours and peers:
        print("ratios: of the medians; in brackets min–max of the per-round ratios (ours and the peer "
              "in the same round); the same for Gbit/s")

    rows = []
    for size in args.sizes:
        for label, role, key in (("forwarder, CPU s/Mframe", None, "cpu_s_per_mframe"),
                                 ("forwarder, % of a core", None, "core_pct"),
                                 ("ovsdb-server, CPU s/Mframe", "ovsdb-server", "cpu_s_per_mframe"),
                                 ("source, CPU s/Mframe", "source", "cpu_s_per_mframe"),
                                 ("source, % of a core", "source", "core_pct"),
                                 ("all CPUs busy, CPU s/Mframe", "all_cpus", "cpu_s_per_mframe")):
            if role == "ovsdb-server" and "ovs" not in names:
                continue
            row = [f"{size} B, {label}"]
            for n in names:
                r = role or FORWARDER[n]
                v = vals(n, size, "cpu", key, r)
                row.append(cell(v, 1 if key == "core_pct" else 3, rounds) if any(x is not None for x in v)
                           else "-")
            rows.append(row)
    print_table("CPU per million frames forwarded (utime+stime over the measured window): "
                "median [min–max]", ["measure", *[title[n] for n in names]], rows)
    print("forwarder: ours = the switch process; testpmd = its process; OVS-DPDK = ovs-vswitchd "
          "(ovsdb-server on its own row);\n  bridge = no process: the kernel's system+irq+softirq time on "
          "CPU 0 (/proc/stat, where RPS puts the bridge's receive work;\n  it also counts any other kernel "
          "work there); the source's af_packet sends on CPU 1 are in the source's row.\n"
          "all CPUs busy: /proc/stat, both CPUs, everything (also other load on the machine).")

    if have_ours:
        rows = []
        for size in args.sizes:
            for direction in ("0->1", "1->0"):
                sig = dig(results["spread"], "ours", str(size), "signals", direction)
                if sig:
                    rows.append([f"{size} B, port {direction}", fmt(sig["frames"]["median"], 0),
                                 fmt_spread(vals("ours", size, "signals", direction, "kicks"), 0),
                                 fmt_spread(vals("ours", size, "signals", direction, "interrupts"), 0),
                                 sci(sig["notify_per_frame"])])
        engines = sorted({s.get("switch", {}).get("engine", "?") for ps in samples.get("ours", {}).values()
                          for s in ps})
        print_table(f"ours: notifications at saturation (engine {', '.join(engines) or '?'}), "
                    f"median [min–max] over rounds",
                    ["direction", "frames", "kicks (driver)", "interrupts (to driver)",
                     "notifications/frame"], rows)

    if results["idle"]:
        rows = []
        for n in names:
            runs = results["idle"].get(n)
            if not runs or all(r is None for r in runs):
                rows.append([title[n], "n/a (kernel: no process)", "", ""])
                continue
            runs = [r for r in runs if r]
            what = " + ".join(r for r in runs[0] if r not in ("contender", "seconds", "ports_running"))
            up = {r.get("ports_running") for r in runs} - {None}
            rows.append([title[n], fmt_spread([r["contender"] for r in runs], 2), what,
                         "/".join(str(u) for u in sorted(up)) or "-"])
        print_table(f"Idle: source connected, no traffic, {args.idle_seconds:g} s per round, "
                    f"CPU % of one core (goal ours < {IDLE_GOAL_PCT:g} %)",
                    ["contender", "CPU %", "processes", "ports up"], rows)

    print("\nGOALS (issue 11), from the medians; [per-round range], rounds that met it:")
    for peer, size, goal in GOALS:
        what = f"ours >= {goal:.1f}x {CONTENDERS[peer].title} at {size} B"
        r = dig(results["ratios"], f"ours/{peer}", str(size))
        if not r or r["of_medians"] is None:
            print(f"  {what:<44} not measured")
            continue
        per = list(r["per_round"].values())
        verdict = "MET" if r["of_medians"] >= goal else "NOT MET"
        print(f"  {what:<44} {ratio_cell(r, 3):<24} {verdict:<8} "
              f"({sum(v >= goal for v in per)}/{len(per)} rounds)")
    idle_ours = [r["contender"] for r in results["idle"].get("ours", []) if r]
    what = f"ours idle, ports connected, < {IDLE_GOAL_PCT:g} % of a core"
    if idle_ours:
        m = median(idle_ours)
        print(f"  {what:<44} {fmt_spread(idle_ours, 2, ' %'):<24} "
              f"{'MET' if m < IDLE_GOAL_PCT else 'NOT MET':<8} "
              f"({sum(v < IDLE_GOAL_PCT for v in idle_ours)}/{len(idle_ours)} rounds)")
    else:
        print(f"  {what:<44} not measured")

    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, errs in results["errors"].items():
        for err in errs:
            print(f"error {name}: {err.splitlines()[0] if err else ''}")
    for n in names:
        for size, ps in samples.get(n, {}).items():
            for s in ps:
                other = dig(s, "cpu", "core_pct", "unattributed")
                if other is not None and other > UNATTRIBUTED_WARN_PCT:
                    print(f"warning: {n} {size} B round {s['round']}: {other:.0f} % of a core busy "
                          f"outside the processes measured (other load on the machine?)")
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
                        help="idle CPU window in every round, 0 to skip (default 5)")
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help=f"contenders (default {','.join(CONTENDERS)})")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="stop starting rounds after this many seconds (default 900)")
    parser.add_argument("--json", metavar="FILE", help="also write all samples and summaries as JSON to FILE")
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
                     "spread": {}, "ratios": {}, "idle": {}, "idle_cpu_pct": {},
                     "config": {k: v for k, v in vars(args).items() if k != "json"},
                     "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release,
                                 "loadavg_before": os.getloadavg()},
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
                    if args.idle_seconds > 0:
                        got = idle(cleanup, cont, args.idle_seconds)
                        results["idle"].setdefault(n, []).append(got)
                        progress(f"  idle CPU {fmt(got['contender'], 2) if got else 'n/a'} %")
                    for size in args.sizes:
                        s = sample(cleanup, cont, size, args)
                        s["round"] = rnd + 1
                        results["samples"].setdefault(n, {}).setdefault(str(size), []).append(s)
                        cpu = s["cpu"]["cpu_s_per_mframe"]
                        progress(f"  {size} B: {s['mpps']:.3f} Mpps {s['gbit_s']:.2f} Gbit/s, CPU s/Mframe "
                                 f"{cpu['contender']:.3f} (source {cpu.get('source', float('nan')):.3f})")
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

    summarize(results)
    # A contender that failed in a later round still has its earlier samples in the table.
    for n in list(results["skipped"]):
        if n in results["medians"]:
            results["errors"].setdefault(n, []).append(results["skipped"].pop(n))
    results["elapsed_s"] = time.monotonic() - started
    results["machine"]["loadavg_after"] = os.getloadavg()
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
