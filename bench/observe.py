"""What watching the bus costs the daemon: `alacrity top` (one `status` request a second)
and a Prometheus scraper (one GET /metrics a second), with 50 devices, against the idle
daemon measured the same way.

    python bench/observe.py [--runs 3] [--seconds 30] [--disks 48] [--switches 2]

The daemon gets DISKS blk devices and SWITCHES switches, spread over buses of five
devices each; every switch has two ports open (held, idle, by a process on its bus), so
its process answers each snapshot. Each run measures three windows of SECONDS, in turn:
idle; one status request a second over one kept control connection (as `alacrity top`
does); one scrape a second over a new connection to RUN_DIR/metrics.sock, with Prometheus's
Accept header (as Prometheus does: OpenMetrics). The daemon's CPU in a window is the
growth of utime + stime in /proc/PID/stat, as % of one core. Medians with [min-max] over
the runs; "cost" is each window less the idle one of the same run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import textwrap
import time

from common import Cleanup, Daemon, cpu_seconds, dump_json, print_table, progress

HOLD = textwrap.dedent("""
    import sys
    from alacrity import client
    bus = client.connect()
    ports = [bus.open(name, timeout=10) for name in sys.argv[1:] for _ in range(2)]
    print("ready", flush=True)
    sys.stdin.read()
""")


def build(daemon: Daemon, disks: int, switches: int) -> list[str]:
    """The devices, five to a bus; each switch linked into its bus. Returns the buses."""
    names = [f"disk{i}" for i in range(disks)] + [f"lan{i}" for i in range(switches)]
    lines, buses = [], []
    for i, name in enumerate(names):
        bus = f"bus{i // 5}"
        if bus not in buses:
            buses.append(bus)
            lines.append(f"mkdir $A/buses/{bus}")
        lines.append(f"mkdir $A/devices/{name}")
        if name.startswith("disk"):
            lines += [f"echo blk > $A/devices/{name}/type",
                      f"echo {daemon.root}/{name}.img > $A/devices/{name}/path",
                      f"echo 64M > $A/devices/{name}/size"]
        else:
            lines.append(f"echo switch > $A/devices/{name}/type")
        lines.append(f"ln -s ../../devices/{name} $A/buses/{bus}/{name}")
    daemon.sh("\n".join(lines))
    return buses


def bus_of(name: str, disks: int) -> str:
    index = int(name[3:]) + disks
    return f"bus{index // 5}"


class Control:
    """One kept control connection, as `alacrity top` keeps it (made again after the
    gate closed it for idling, as top does)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def status(self, retry: bool = True) -> dict:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(self.path)
            self.stream = self.sock.makefile("rb")
        try:
            self.sock.sendall(b'{"op": "status"}\n')
            line = self.stream.readline()
            if not line:
                raise ConnectionResetError("the gate closed the connection")
        except OSError:
            self.sock.close()
            self.sock = None
            if not retry:
                raise
            return self.status(retry=False)
        reply = json.loads(line)
        if "status" not in reply:
            raise RuntimeError(f"status refused: {reply}")
        return reply["status"]


#: What Prometheus (2.x and 3.x) asks for: OpenMetrics first.
PROMETHEUS_ACCEPT = (b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     b"version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scrape(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nAccept: " + PROMETHEUS_ACCEPT
                     + b"\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(1 << 16):
            data += chunk
    if not data.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"scrape failed: {bytes(data[:200])!r}")
    return bytes(data)


def window(pid: int, seconds: float, action) -> tuple[float, list[float]]:
    """% of a core the daemon used over `seconds`, doing `action` once a second (if any),
    and how long each action took."""
    took: list[float] = []
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    tick = start
    while (now := time.monotonic()) < start + seconds:
        if action is not None and now >= tick:
            begun = time.monotonic()
            action()
            took.append(time.monotonic() - begun)
            tick += 1.0
        time.sleep(max(0.0, min(tick, start + seconds) - time.monotonic()) if action else
                   start + seconds - now)
    end_cpu, end = cpu_seconds(pid), time.monotonic()
    return 100.0 * (end_cpu - start_cpu) / (end - start), took


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    parser.add_argument("--disks", type=int, default=48)
    parser.add_argument("--switches", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with Cleanup() as cleanup:
        daemon = Daemon(cleanup).start()
        build(daemon, args.disks, args.switches)
        for i in range(args.switches):
            name = f"lan{i}"
            argv = daemon.bus_exec(bus_of(name, args.disks), [sys.executable, "-c", HOLD, name])
            holder = cleanup.popen(argv, env=daemon.env, stdin=-1, stdout=-1, text=True)
            if holder.stdout.readline().strip() != "ready":
                raise RuntimeError(f"could not open the ports of {name}")
        pid = daemon.proc.pid
        control = Control(str(daemon.run_dir / "control.sock"))
        snap = control.status()
        ports = sum(len(d["views"].get("ports", {})) for d in snap["devices"])
        size = len(scrape(str(daemon.run_dir / "metrics.sock")))
        progress(f"{len(snap['devices'])} devices on {len(snap['buses'])} buses, {ports} switch ports; "
                 f"a scrape is {size} bytes")
        time.sleep(2.0)  # let the set-up settle
        cpu: dict[str, list[float]] = {"idle": [], "status": [], "scrape": []}
        took: dict[str, list[float]] = {"status": [], "scrape": []}
        actions = {"idle": None, "status": control.status,
                   "scrape": lambda: scrape(str(daemon.run_dir / "metrics.sock"))}
        for run in range(args.runs):
            for mode, action in actions.items():
                pct, times = window(pid, args.seconds, action)
                cpu[mode].append(pct)
                if mode in took:
                    took[mode] += times
                progress(f"run {run + 1}/{args.runs} {mode:6} {pct:.3f} % of a core")
        cost = {mode: [cpu[mode][i] - cpu["idle"][i] for i in range(args.runs)]
                for mode in ("status", "scrape")}
        result = {"cpu_percent": cpu, "cost_percent": cost, "request_ms": {
            m: statistics.median(t) * 1e3 for m, t in took.items()}, "devices": len(snap["devices"]),
            "ports": ports, "scrape_bytes": size, "seconds": args.seconds, "runs": args.runs}
        if args.json:
            dump_json(result)
            return 0
        print_table(f"alacrityd CPU with {len(snap['devices'])} devices ({args.disks} blk, {args.switches} "
                    f"switches with {ports} ports), {args.runs} runs of {args.seconds:g} s per window; "
                    "% of one core, median [min-max]",
                    ["window", "daemon CPU %", "cost over idle %", "request ms (median)"],
                    [["idle", spread(cpu["idle"], 3), "-", "-"],
                     ["1 status/s (alacrity top)", spread(cpu["status"], 3), spread(cost["status"], 3),
                      f"{result['request_ms']['status']:.1f}"],
                     ["1 scrape/s (metrics.sock)", spread(cpu["scrape"], 3), spread(cost["scrape"], 3),
                      f"{result['request_ms']['scrape']:.1f}"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
