"""VM to VM: TCP throughput and ping RTT between two guests, through our switch and
through the Linux bridge with tap devices (QEMU's own tap backend, vhost=off), side by side.

Both contenders boot the same default guest twice (TCG here, KVM where the host has it):
guest A runs `iperf3 -s`, guest B waits for A, pings it (`--pings`, 0.2 s apart) and runs
`iperf3 -c` for `--seconds` in each direction. Only the network backend differs:

- ours: `python -m alacrity.switch` (offloads on); each guest's QEMU connects to a unix
  socket of ours as the vhost-user client and we hand the connection to the switch, as
  alacrityd's gate does;
- bridge: a Linux bridge with two taps (no address on the host side: the frames stay on
  the bridge), `-netdev tap,vhost=off` with offloads as QEMU negotiates them.

Runs alternate (`--runs` each); medians are reported with [min-max] over the runs, with
ours/bridge ratios (goals: throughput >= 1.0x, RTT <= 1.0x). Around each iperf3 direction,
guest B prints a marker with its NIC's frame and interrupt counts (/proc/interrupts, the
virtio lines), and the host snapshots at each marker the CPU time of both QEMUs and the
switch, and the switch's port counters. From these:
- CPU seconds per GB moved, per process (QEMU A, QEMU B, the switch; the bridge's own work
  is softirq time charged to the QEMU threads that write the taps), over both directions;
- frames back per data frame, each direction (ACKs, from B's NIC counters: its frames
  received over sent when it sends, sent over received when it receives);
- notifications per frame, each direction: the interrupts guest B took per frame through
  its NIC (both contenders, measured the same way inside the guest), and for ours the
  switch's kicks per frame sent and interrupts per frame received, all ports together.

    python bench/vm_net.py [--runs 5] [--seconds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import Cleanup, cpu_seconds, fmt, median, print_table, progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from alacrity import ids  # noqa: E402
from alacrity.devices import Slot  # noqa: E402
from alacrity.devices.switch import SwitchDevice  # noqa: E402
from alacrity.switch.coalesce import COALESCE_US, TX_DEFER_US  # noqa: E402
from alacrity.switch.launcher import SwitchProcess  # noqa: E402
from alacrity.switch.process import LOOP_ENV  # noqa: E402
from alacrity.virtio.net import local_mac  # noqa: E402
from alacrity.vm.image import default_image  # noqa: E402
from alacrity.vm.qemu import VM, VmSpec  # noqa: E402

SERVER_IP, CLIENT_IP = "10.55.0.1", "10.55.0.2"
SERVER_CMD = "iperf3 -s >/dev/null 2>&1 & sleep 3600"


#: A marker line: B's NIC counters (frames received, frames sent, virtio interrupts); the
#: sleep gives the host time to take its snapshot before the next phase starts.
MARK = ("echo MARK $1 $(cat /sys/class/net/eth0/statistics/rx_packets) "
        "$(cat /sys/class/net/eth0/statistics/tx_packets) "
        "$(awk '/virtio/ {for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i} END {print s + 0}' "
        "/proc/interrupts); sleep 0.5")
MARK_RE = re.compile(r"^MARK (\d) (\d+) (\d+) (\d+)\s*$", re.M)


def client_cmd(seconds: int, pings: int) -> str:
    return (
        f"mark() {{ {MARK}; }}; "
        f"for i in $(seq 100); do ping -c 1 -W 1 {SERVER_IP} >/dev/null 2>&1 && break; done; sleep 1; "
        f"ping -q -c {pings} -i 0.2 {SERVER_IP} | tail -1; "
        f"mark 0; iperf3 -c {SERVER_IP} -t {seconds} -f m | grep receiver; "
        f"mark 1; iperf3 -c {SERVER_IP} -t {seconds} -f m -R | grep receiver; mark 2"
    )


class Marks:
    """Watch B's console for its markers; at each, snapshot the CPU time of `pids` and
    `stats()` (the switch's counters, for ours)."""

    def __init__(self, log: Path, pids: dict[str, int], stats=None) -> None:
        self.log, self.pids, self.stats = log, pids, stats
        self.snaps: dict[int, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set() and len(self.snaps) < 3:
            try:
                text = self.log.read_text(errors="replace")
            except OSError:
                text = ""
            for m in MARK_RE.finditer(text):
                k = int(m[1])
                if k not in self.snaps:
                    snap = {"guest": tuple(int(x) for x in m.groups()[1:]), "t": time.monotonic(),
                            "cpu": {name: cpu_seconds(pid) for name, pid in self.pids.items()}}
                    if self.stats is not None:
                        snap["ports"] = self.stats()
                    self.snaps[k] = snap
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def figures(self, got: dict[str, float], seconds: int) -> dict[str, float]:
        """CPU s/GB per process over both directions; notifications per frame each direction."""
        s = self.snaps
        if len(s) < 3:
            return {}
        out: dict[str, float] = {}
        gb = (got["b_to_a_mbit"] + got["a_to_b_mbit"]) * seconds / 8 / 1000
        for name in self.pids:
            a, b = s[0]["cpu"][name], s[2]["cpu"][name]
            if a is not None and b is not None and gb:
                out[f"cpu_s_per_gb_{name}"] = (b - a) / gb
        for w, direction in ((0, "b_to_a"), (1, "a_to_b")):
            g0, g1 = s[w]["guest"], s[w + 1]["guest"]
            frames = (g1[0] - g0[0]) + (g1[1] - g0[1])
            if frames:
                out[f"guest_b_irq_per_frame_{direction}"] = (g1[2] - g0[2]) / frames
            received, sent = g1[0] - g0[0], g1[1] - g0[1]
            data, acks = (sent, received) if direction == "b_to_a" else (received, sent)
            if data:
                out[f"acks_per_data_frame_{direction}"] = acks / data
            if "ports" in s[w]:
                p0, p1 = s[w]["ports"], s[w + 1]["ports"]
                tx = p1["tx_packets"] - p0["tx_packets"]
                rx = p1["rx_packets"] - p0["rx_packets"]
                if tx:
                    out[f"kicks_per_tx_{direction}"] = (p1["kicks"] - p0["kicks"]) / tx
                if rx:
                    out[f"irq_per_rx_{direction}"] = (p1["interrupts"] - p0["interrupts"]) / rx
                batches = p1["batches"] - p0["batches"]
                if batches:  # how far apart frames come: what interrupt coalescing could gather
                    out[f"frames_per_batch_{direction}"] = tx / batches
                    out[f"us_between_batches_{direction}"] = (s[w + 1]["t"] - s[w]["t"]) / batches * 1e6
                    out[f"sleeps_per_batch_{direction}"] = (p1["sleeps"] - p0["sleeps"]) / batches
        return out


def parse(console: str) -> dict[str, float]:
    """RTT avg (ms) and the two receiver-side Mbit/s figures from B's console."""
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", console)
    rates = re.findall(r"([\d.]+) Mbits/sec\s.*receiver", console)
    if rtt is None or len(rates) != 2:
        raise RuntimeError(f"unexpected guest output:\n{console[-2000:]}")
    return {"rtt_ms": float(rtt.group(1)), "b_to_a_mbit": float(rates[0]), "a_to_b_mbit": float(rates[1])}


def run_pair(c: Cleanup, tag: str, nets: list[list[str]], image, seconds: int, pings: int,
             sample=None, switch_pid: int | None = None, stats=None,
             jail_uids: tuple[int, int] | None = None) -> dict[str, float]:
    """Boot the pair, let B finish; B's figures, plus `sample()`'s while both still run, and
    the per-process CPU and notification figures (`Marks`)."""
    logs = [c.root / f"{tag}-{side}.log" for side in ("a", "b")]
    roles = (("a", SERVER_CMD, SERVER_IP), ("b", client_cmd(seconds, pings), CLIENT_IP))
    specs = [
        VmSpec(name=f"bench-{tag}-{side}-{os.getpid()}", kernel=image.kernel, initrd=image.initrd, cmd=cmd,
               console=log, ip=f"{ip}/24", devices=[net], run_dir=c.root / f"{tag}-{side}",
               jail_uid=jail_uids[n] if jail_uids else None)
        for n, ((side, cmd, ip), log, net) in enumerate(zip(roles, logs, nets, strict=True))
    ]
    vms = [VM(spec) for spec in specs]
    marks = None
    try:
        for vm in vms:
            vm.start()
        if jail_uids:  # the jailed QEMUs are the jailers' children, a moment later
            deadline = time.monotonic() + 10
            while any(vm.qemu_pid() is None for vm in vms) and time.monotonic() < deadline:
                time.sleep(0.01)
        pids = {"qemu_a": vms[0].qemu_pid(), "qemu_b": vms[1].qemu_pid()}
        if switch_pid is not None:
            pids["switch"] = switch_pid
        marks = Marks(logs[1], {k: v for k, v in pids.items() if v is not None}, stats)
        vms[1].wait_exit(timeout=120 + 4 * seconds)
        got = parse(logs[1].read_text(errors="replace"))
        if sample is not None:
            got.update(sample())
        marks.close()
        got.update(marks.figures(got, seconds))
        return got
    finally:
        if marks is not None:
            marks.close()
        for vm in vms:
            vm.kill()


class SwitchRig:
    """Our switch process, fed every connection made to its per-VM sockets."""

    def __init__(self, c: Cleanup, poll_us: float | None = None, adaptive_poll: bool | None = None,
                 coalesce_us: float = COALESCE_US, python_loop: bool = False,
                 tx_defer_us: float = TX_DEFER_US, nice: int | None = None) -> None:
        saved = os.environ.get(LOOP_ENV)
        if python_loop:  # the switch process inherits it
            os.environ[LOOP_ENV] = "python"
        try:
            with open(c.root / "switch.log", "ab") as log:
                self.switch = SwitchProcess("bench", log_file=log, poll_us=poll_us,
                                            adaptive_poll=adaptive_poll, coalesce_us=coalesce_us,
                                            tx_defer_us=tx_defer_us, nice=nice)
        finally:
            if saved is None:
                os.environ.pop(LOOP_ENV, None)
            else:
                os.environ[LOOP_ENV] = saved
        self.ctl = self.switch.control
        self.listeners = []
        self.stopping = False

    def socket_for(self, path: Path, label: str) -> str:
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(str(path))
        os.chmod(path, 0o666)  # a jailed QEMU (--jailed) connects as a uid of its own
        lst.listen(4)
        self.listeners.append(lst)
        threading.Thread(target=self._accept, args=(lst, label), daemon=True).start()
        return str(path)

    def _accept(self, lst: socket.socket, label: str) -> None:
        while not self.stopping:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            with conn:
                self.ctl.add_port(conn.fileno(), label=label)

    def totals(self) -> dict[str, int]:
        """The switch's counters, summed over its ports (for `Marks`)."""
        stats = self.ctl.stats()
        ports = stats["ports"]
        out = {k: sum(p[k] for p in ports) for k in ("tx_packets", "rx_packets", "kicks", "interrupts")}
        return {**out, "batches": stats["stats"]["batches"], "sleeps": stats["stats"]["sleeps"]}

    def signals(self) -> dict[str, float]:
        """Kicks per frame sent and interrupts per frame received, over both guests' ports.
        B has just powered off, so its port may be gone: A's port counts both directions."""
        ports = [p for p in self.ctl.stats()["ports"] if p["tx_packets"] or p["rx_packets"]]
        tx = sum(p["tx_packets"] for p in ports)
        rx = sum(p["rx_packets"] for p in ports)
        return {"kicks_per_tx": sum(p["kicks"] for p in ports) / tx if tx else float("nan"),
                "interrupts_per_rx": sum(p["interrupts"] for p in ports) / rx if rx else float("nan")}

    def close(self) -> None:
        self.stopping = True
        for lst in self.listeners:
            lst.close()
        self.switch.stop()


def spread(runs: list[dict[str, float]], key: str) -> tuple[float, float] | None:
    values = [r[key] for r in runs if key in r]
    return (min(values), max(values)) if values else None


def with_spread(value: float, runs: list[dict[str, float]], key: str, digits: int) -> str:
    span = spread(runs, key)
    if span is None:
        return "-"
    return f"{fmt(value, digits)} [{fmt(span[0], digits)}-{fmt(span[1], digits)}]"


def make_bridge(c: Cleanup, tag: str) -> tuple[str, list[str]]:
    bridge, taps = f"albr{tag}", [f"altp{tag}a", f"altp{tag}b"]

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True)

    c.callbacks.append(lambda: [subprocess.run(["ip", "link", "del", n], capture_output=True)
                                for n in (*taps, bridge)])
    ip("link", "add", bridge, "type", "bridge")
    for tap in taps:
        ip("tuntap", "add", "mode", "tap", "vnet_hdr", "name", tap)
        ip("link", "set", tap, "master", bridge)
        ip("link", "set", tap, "up")
    ip("link", "set", bridge, "up")
    return bridge, taps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs of each contender (alternating)")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 time per direction")
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--poll-us", type=float, default=None,
                        help="the switch's busy-poll budget (default: the switch's own)")
    parser.add_argument("--adaptive-poll", action=argparse.BooleanOptionalAction, default=None,
                        help="the switch's adaptive polling on or off (default: the switch's own)")
    parser.add_argument("--jailed", action="store_true",
                        help="also run our switch with both QEMUs jailed, as 'alacrity vm run' starts "
                             "them (vm/jail.py): what the jail costs VM-to-VM traffic, side by side")
    parser.add_argument("--also-poll-us", type=float, default=None,
                        help="also run a second switch with this fixed spin (no adaptation), "
                             "alternating with the others: the polling policy side by side")
    parser.add_argument("--also-coalesce-us", type=float, action="append", default=[],
                        help="also run a switch that holds interrupts up to this long (coalescing; "
                             "repeat for several), alternating with the others")
    parser.add_argument("--also-tx-defer-us", type=float, action="append", default=[],
                        help="also run a switch whose TX interrupt decisions wait up to this long "
                             f"(ours: {TX_DEFER_US:g}; 0: decided at once; repeat for several), alternating")
    parser.add_argument("--also-nice", type=int, default=None,
                        help="also run a switch at this scheduling priority (-5: ahead of the QEMUs), "
                             "alternating with the others")
    parser.add_argument("--also-python-loop", action="store_true",
                        help="also run a switch whose loop stays in Python (the reference) instead of "
                             "the C wake-up loop, alternating with the others")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (taps and a bridge are made for the baseline)")
    image = default_image(progress=False)
    spin = f"ours-spin{args.also_poll_us:g}" if args.also_poll_us is not None else None
    held = {f"ours-coalesce{us:g}": us for us in args.also_coalesce_us}
    deferred = {f"ours-txdefer{us:g}": us for us in args.also_tx_defer_us}
    niced = f"ours-nice{args.also_nice}" if args.also_nice is not None else None
    kinds = (["ours", "bridge"] + ([spin] if spin else []) + list(held) + list(deferred)
             + ([niced] if niced else []) + (["ours-pyloop"] if args.also_python_loop else [])
             + (["ours-jailed"] if args.jailed else []))
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with Cleanup(prefix="alacrity-vmnet-") as c:
        tag = str(os.getpid() % 10000)
        _, taps = make_bridge(c, tag)
        rigs, socks = {}, {}
        for kind in kinds:
            if kind in ("bridge", "ours-jailed"):  # the jailed pair uses our switch too
                continue
            # `spin`: a second switch with a fixed spin, for a side-by-side look at the polling policy
            if kind == spin:
                rig = SwitchRig(c, args.also_poll_us, False)
            elif kind == "ours-pyloop":
                rig = SwitchRig(c, args.poll_us, args.adaptive_poll, python_loop=True)
            elif kind == niced:
                rig = SwitchRig(c, args.poll_us, args.adaptive_poll, nice=args.also_nice)
            elif kind in deferred:
                rig = SwitchRig(c, args.poll_us, args.adaptive_poll, tx_defer_us=deferred[kind])
            else:
                rig = SwitchRig(c, args.poll_us, args.adaptive_poll, held.get(kind, COALESCE_US))
            rigs[kind] = rig
            c.callbacks.append(rig.close)
            sockets = c.root / f"{kind}-sockets"  # bound into the jails: traversable, nothing else
            sockets.mkdir(mode=0o711)
            sockets.chmod(0o711)
            socks[kind] = [rig.socket_for(sockets / f"vm{side}.sock", f"vm-{side}") for side in ("a", "b")]
        for run in range(args.runs):
            for kind in kinds:
                progress(f"run {run + 1}/{args.runs}: {kind}")
                macs = [local_mac(f"{kind}{run}{side}") for side in ("a", "b")]
                switch_kind = "ours" if kind == "ours-jailed" else kind
                rig = rigs.get(switch_kind)
                if rig is not None:
                    nets = [SwitchDevice.qemu_args(Slot("lan", str(sock), "mmio", "vm", "n0", 0,
                                                        {"mac": mac}))
                            for sock, mac in zip(socks[switch_kind], macs, strict=True)]
                else:
                    nets = [["-netdev", f"tap,id=t0,ifname={tap},script=no,downscript=no,vhost=off",
                             "-device", f"virtio-net-device,netdev=t0,mac={mac}"]
                            for tap, mac in zip(taps, macs, strict=True)]
                jail_uids = None
                if kind == "ours-jailed":
                    jail_uids = (ids.unprivileged.lease(reserve_s=60), ids.unprivileged.lease(reserve_s=60))
                got = run_pair(c, f"{kind}{run}", nets, image, args.seconds, args.pings,
                               rig.signals if rig else None, rig.switch.proc.pid if rig else None,
                               rig.totals if rig else None, jail_uids)
                progress(f"  {got}")
                results[kind].append(got)
    rows = []
    summary: dict[str, dict] = {}
    metrics = [("b_to_a_mbit", "TCP B->A, Mbit/s", "higher", 1),
               ("a_to_b_mbit", "TCP A->B, Mbit/s", "higher", 1), ("rtt_ms", "ping RTT avg, ms", "lower", 2)]
    for proc in ("qemu_a", "qemu_b", "switch"):
        metrics.append((f"cpu_s_per_gb_{proc}", f"CPU s per GB, {proc.replace('_', ' ')}", "lower", 2))
    metrics.append(("cpu_s_per_gb_total", "CPU s per GB, all three", "lower", 2))
    for direction, label in (("b_to_a", "B->A"), ("a_to_b", "A->B")):
        metrics += [(f"acks_per_data_frame_{direction}", f"frames back per frame, {label}", "lower", 3),
                    (f"guest_b_irq_per_frame_{direction}", f"B's interrupts/frame, {label}", "lower", 3),
                    (f"kicks_per_tx_{direction}", f"switch kicks/frame sent, {label}", "lower", 3),
                    (f"irq_per_rx_{direction}", f"switch irqs/frame received, {label}", "lower", 3),
                    (f"frames_per_batch_{direction}", f"switch frames/batch, {label}", "-", 2),
                    (f"us_between_batches_{direction}", f"switch us between batches, {label}", "-", 0),
                    (f"sleeps_per_batch_{direction}", f"switch sleeps/batch, {label}", "-", 2)]
    for runs in results.values():
        for r in runs:
            parts = [v for k, v in r.items() if k.startswith("cpu_s_per_gb_")]
            if parts:
                r["cpu_s_per_gb_total"] = sum(parts)
    ours_kinds = [k for k in kinds if k != "bridge"]
    for key, label, better, digits in metrics:
        bridge = median([r[key] for r in results["bridge"] if key in r])
        row = [label]
        cells, ratios = [], []
        for kind in kinds:
            value = median([r[key] for r in results[kind] if key in r])
            cells.append(with_spread(value, results[kind], key, digits))
            if kind != "bridge":
                ratio = value / bridge if bridge and value == value and bridge == bridge else float("nan")
                ratios.append(f"{ratio:.2f}x" if ratio == ratio else "-")
                summary.setdefault(key, {"bridge": bridge, "bridge_range": spread(results["bridge"], key)})
                summary[key].update({kind: value, f"{kind}_range": spread(results[kind], key),
                                     f"{kind}_ratio": ratio})
        rows.append([*row, *cells, *ratios, better])
    header = ["what", *(("Linux bridge + tap" if k == "bridge" else f"{k} (switch)") for k in kinds),
              *(f"{k}/bridge" for k in ours_kinds), "better"]
    print_table(f"VM to VM: median [min-max] of {args.runs} runs", header, rows)
    kicks = median([r["kicks_per_tx"] for r in results["ours"]])
    irqs = median([r["interrupts_per_rx"] for r in results["ours"]])
    print(f"switch signals (guest A's port, whole run): {kicks:.3f} kicks per frame sent, "
          f"{irqs:.3f} interrupts per frame received (goal < 0.1)")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": summary},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
