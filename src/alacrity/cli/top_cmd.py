"""`alacrity top`: every device and bus of the daemon, live, in the terminal.

It asks the gate for root's `{"op": "status"}` once a second over one control
connection (the snapshot of bus/status.py, the same one the metrics endpoint serves)
and shows rates from the differences of the counters between two snapshots, each
divided by the time between the two samples of that device.
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
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alacrity.cli.errors import UserError

DESCRIPTION = """\
Watch every device and bus of alacrityd, refreshed every second (as root: the status
of every bus is root's; other users are refused). Per device: its class, the buses it
is linked into, its connections, its rates, its errors and its last error:
  blk      RATE is requests a second (reads + writes, IOPS), THROUGHPUT is MB/s read
           and written;
  switch   one row per port below the switch: RATE is frames a second and THROUGHPUT
           bits a second, both directions of that port (the switch's own row: what
           its ports sent into it); DROPS is frames dropped at that port (no room in
           its receive ring, an offload it lacks, or no one to send to), total and a second;
  rng      RATE is requests a second, THROUGHPUT random bytes a second;
  others   THROUGHPUT from their byte counters.
Per bus: its devices (LINK=DEVICE where the link has another name), its members
(the pids admitted to it; their children are on it too) and the VMs running below them.
"""

EPILOG = """\
keys (shown at the bottom):
  n c o r e   sort by name, class, connections, rate (throughput) or errors;
              the same key again reverses the order
  q           quit (Ctrl-C too); the terminal is restored either way

examples:
  alacrity top                      # live, full terminal
  alacrity top --sort rate          # busiest first
  alacrity top --once               # one plain-text snapshot with rates over 1 s, for scripts
  alacrity top --once --interval 0  # at once: connections, errors, members, VMs (no rates)

The same counters, for Prometheus: alacrityd serves them on RUN_DIR/metrics.sock
(docs/metrics.md). The daemon is found at $ALACRITY_RUN_DIR (default /run/alacrityd).
"""

SORTS = {"n": "name", "c": "class", "o": "connections", "r": "rate", "e": "errors"}
NUMERIC = {"connections", "rate", "errors"}  # sorted largest first, until reversed
REQUEST_TIMEOUT_S = 5.0
MAX_REPLY = 64 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("top", help="watch every device and bus live: rates, errors, members, VMs (root)",
                            description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot as plain text and exit (rates over --interval)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between refreshes (default 1); with --once, the time the rates "
                        "are measured over (0: no rates, no waiting)")
    parser.add_argument("--sort", choices=sorted(SORTS.values()), default="name",
                        help="the column to sort devices by (default name)")
    parser.add_argument("--reverse", action="store_true", help="reverse the order")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="alacrityd's sockets (default: $ALACRITY_RUN_DIR or /run/alacrityd)")


# -- the gate

class StatusSource:
    """One control connection to the gate, kept open between refreshes; reopened once
    after a failure (a daemon restart)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "control.sock"
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def status(self) -> dict[str, Any]:
        for attempt in (0, 1):
            try:
                reply = self._ask()
                break
            except OSError as exc:
                self.close()
                if attempt:
                    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
                        raise UserError(f"no alacrityd at {self.path}: start it (as root) with "
                                        "'alacrityd &'") from None
                    raise UserError(f"alacrityd at {self.path}: {exc.strerror or exc}") from None
        if "error" in reply:
            raise UserError(reply["error"])
        return reply["status"]

    def _ask(self) -> dict[str, Any]:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(REQUEST_TIMEOUT_S)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self.sock = sock
        self.sock.sendall(b'{"op": "status"}\n')
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("alacrityd closed the control connection")
            data += chunk
            if len(data) > MAX_REPLY:
                raise OSError("the status reply is too large")
        return json.loads(data)


# -- rows

@dataclass
class Row:
    name: str
    cls: str = ""
    buses: str = ""
    connections: int = 0
    rate: str = ""
    throughput: str = ""
    drops: str = ""
    errors: int = 0
    last_error: str = ""
    speed: float = 0.0  # bytes a second, what `rate` sorts by
    failed: bool = False
    ports: list[Row] = field(default_factory=list)


def si(value: float, unit: str = "") -> str:
    """1234 -> '1.2k'; with a unit, 1234567 -> '1.2 Mbit/s'."""
    text, prefix = f"{value:.0f}" if value == int(value) or abs(value) >= 10 else f"{value:.1f}", ""
    for factor, name in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            text, prefix = f"{value / factor:.1f}", name
            break
    return f"{text} {prefix}{unit}" if unit else f"{text}{prefix}"


def _delta(cur: dict[str, Any], old: dict[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    if old is None:
        return None
    now = sum(v for k in keys if isinstance(v := cur.get(k), (int, float)))
    then = sum(v for k in keys if isinstance(v := old.get(k), (int, float)))
    return max(0, now - then)  # a restarted switch starts its counters again


def rows(snap: dict[str, Any], prev: dict[str, Any] | None) -> list[Row]:
    before = {d["name"]: d for d in prev["devices"]} if prev else {}
    vms = {vm["pid"]: vm["name"] for bus in snap["buses"] for vm in bus["vms"]}
    out = []
    for dev in snap["devices"]:
        old = before.get(dev["name"])
        if old is not None and (old["class"] != dev["class"] or dev["sampled"] <= old["sampled"]):
            old = None
        dt = dev["sampled"] - old["sampled"] if old else 0.0
        out.append(_device_row(dev, old, dt, vms))
    return out


def _per_s(amount: float | None, dt: float) -> float | None:
    return None if amount is None or dt <= 0 else amount / dt


def _device_row(dev: dict[str, Any], old: dict[str, Any] | None, dt: float, vms: dict[int, str]) -> Row:
    c = dev["counters"]
    oc = old["counters"] if old else None
    row = Row(dev["name"], dev["class"], ",".join(dev["buses"]) or "-", c.get("connections", 0),
              errors=c.get("errors", 0) + c.get("io_errors", 0),
              last_error=dev["error"] and f"not answering: {dev['error']}" or dev["last_error"],
              failed=bool(dev["error"]))
    if dev["class"] == "blk":
        iops = _per_s(_delta(c, oc, ("reads", "writes")), dt)
        speed = _per_s(_delta(c, oc, ("bytes_read", "bytes_written")), dt)
        row.rate = "-" if iops is None else f"{si(iops)} IOPS"
        row.throughput = "-" if speed is None else f"{speed / 1e6:.1f} MB/s"
    elif dev["class"] == "switch":
        _switch_rows(row, dev, old, dt, vms)
        return row
    else:
        requests = _per_s(_delta(c, oc, ("requests",)), dt) if "requests" in c else None
        byte_keys = tuple(k for k in c if "bytes" in k)
        speed = _per_s(_delta(c, oc, byte_keys), dt) if byte_keys else None
        row.rate = "-" if requests is None else f"{si(requests)} req/s"
        row.throughput = "-" if speed is None else f"{si(speed, 'B/s')}"
    row.speed = speed or 0.0
    return row


DROPS = ("rx_dropped", "rx_dropped_offload", "tx_dropped")


def _peer(port: dict[str, Any], vms: dict[int, str]) -> str:
    """Who is at the other end of a port: a VM by name, a process by pid, the host's tap."""
    label, pid = str(port.get("label", "")), port.get("peer_pid")
    if port.get("uplink"):
        return f"tap {label.partition(':')[2] or label}"
    if isinstance(pid, int) and pid > 0:
        return f"VM {vms[pid]} (pid {pid})" if pid in vms else f"pid {pid}"
    return label


def _switch_rows(row: Row, dev: dict[str, Any], old: dict[str, Any] | None, dt: float,
                 vms: dict[int, str]) -> None:
    ports = dev["views"].get("ports", {})
    old_ports = old["views"].get("ports", {}) if old else {}
    sent = bits = drops_total = 0.0
    drops_rate = 0.0
    known = old is not None
    for port_id in sorted(ports, key=lambda p: (len(p), p)):
        p = ports[port_id]
        op = old_ports.get(port_id) if known else None
        if op is not None and op.get("label") != p.get("label"):
            op = None  # another port got this number after a restart
        frames = _per_s(_delta(p, op, ("rx_packets", "tx_packets")), dt)
        speed = _per_s(_delta(p, op, ("rx_bytes", "tx_bytes")), dt)
        dropped = sum(p.get(k, 0) for k in DROPS)
        dropping = _per_s(_delta(p, op, DROPS), dt)
        port = Row(f" └ port {port_id}", "uplink" if p.get("uplink") else "port", _peer(p, vms),
                   1 if p.get("running") else 0,
                   rate="-" if frames is None else f"{si(frames)} f/s",
                   throughput="-" if speed is None else si(speed * 8, "bit/s"),
                   drops=f"{dropped}" + ("" if not dropping else f" (+{si(dropping)}/s)"),
                   errors=int(p.get("tx_errors", 0)), speed=speed or 0.0)
        row.ports.append(port)
        sent += _per_s(_delta(p, op, ("tx_packets",)), dt) or 0.0
        bits += (_per_s(_delta(p, op, ("tx_bytes",)), dt) or 0.0) * 8
        drops_total += dropped
        drops_rate += dropping or 0.0
    row.rate = f"{si(sent)} f/s" if known else "-"
    row.throughput = si(bits, "bit/s") if known else "-"
    row.drops = f"{drops_total:.0f}" + (f" (+{si(drops_rate)}/s)" if drops_rate else "")
    row.speed = bits / 8


def natural(name: str) -> list[Any]:
    """disk2 before disk10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sort_rows(found: list[Row], column: str, reverse: bool) -> list[Row]:
    """By `column`; equals by name, always ascending (the sort is stable, also reversed)."""
    by_name = sorted(found, key=lambda r: natural(r.name), reverse=column == "name" and reverse)
    if column == "name":
        return by_name
    keys = {"class": lambda r: r.cls, "connections": lambda r: r.connections, "rate": lambda r: r.speed,
            "errors": lambda r: r.errors}
    return sorted(by_name, key=keys[column], reverse=(column in NUMERIC) != reverse)


# -- rendering (rich)

def render(snap: dict[str, Any] | None, found: list[Row], column: str, reverse: bool, *,
           problem: str = "", height: int | None = None, interval: float = 1.0, live: bool = True,
           prev: dict[str, Any] | None = None) -> Any:
    """The screen: a header, the devices (ports below their switch), the buses, the keys.
    Live, it fills the terminal and cuts the device rows to its `height`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if snap is not None:
        d = snap["daemon"]
        gate = snap.get("gate", {})
        head = (f"alacrity top · alacrityd pid {d['pid']}, up {_uptime(d['uptime_s'])}{_own(d, prev)} · "
                f"{len(snap['devices'])} devices, {len(snap['buses'])} buses · "
                f"gate refusals {gate.get('refusals', 0)} · {time.strftime('%H:%M:%S')}")
        if live:
            head += f" · every {interval:g} s"
        parts.append(Text(head, style="bold", no_wrap=True, overflow="ellipsis"))
    if problem:
        parts.append(Text(problem, style="bold red", no_wrap=True, overflow="ellipsis"))
    devices = Table(expand=live, box=None, header_style="bold reverse", pad_edge=False)
    for title, kw in (("DEVICE", {}), ("CLASS", {}), ("BUSES / PEER", {"overflow": "ellipsis"}),
                      ("CONN", {"justify": "right"}), ("RATE", {"justify": "right"}),
                      ("THROUGHPUT", {"justify": "right"}), ("DROPS", {"justify": "right"}),
                      ("ERRORS", {"justify": "right"}), ("LAST ERROR", {"overflow": "ellipsis", "ratio": 1})):
        devices.add_column(title, no_wrap=True, **kw)  # type: ignore[arg-type]
    lines = [(r, False) for row in sort_rows(found, column, reverse) for r in (row, *row.ports)]
    buses = snap["buses"] if snap else []
    room = None if height is None else max(1, height - len(buses) - 7 - bool(problem))
    shown = lines if room is None or len(lines) <= room else lines[: room - 1]
    for row, _ in shown:
        port = row.name.startswith(" └")
        style = "red" if row.failed else ("dim" if port else None)
        devices.add_row(row.name, row.cls, row.buses, str(row.connections), row.rate, row.throughput,
                        row.drops or "-", str(row.errors) if row.errors else "0", row.last_error or "",
                        style=style)
    parts.append(devices)
    if len(shown) < len(lines):
        parts.append(Text(f"… {len(lines) - len(shown)} more rows: enlarge the terminal, or sort "
                          "to bring others up", style="dim"))
    table = Table(expand=live, box=None, header_style="bold reverse", pad_edge=False)
    table.add_column("BUS", no_wrap=True)
    table.add_column("DEVICES", overflow="ellipsis", no_wrap=True, ratio=2)
    table.add_column("MEMBERS", overflow="ellipsis", no_wrap=True, ratio=2)
    table.add_column("VMS", overflow="ellipsis", no_wrap=True, ratio=2)
    for bus in buses:
        links = " ".join(k if k == v else f"{k}={v}" for k, v in sorted(bus["devices"].items())) or "-"
        members = " ".join(f"{m['pid']}({m['command']})" for m in bus["members"]) or "-"
        vms = " ".join(f"{vm['name']}({vm['pid']})" for vm in bus["vms"]) or "-"
        table.add_row(bus["name"], links, members, vms)
    parts.append(Text(""))
    parts.append(table)
    if live:
        parts.append(Text(""))
        parts.append(_footer(column, reverse))
    return Group(*parts)


def _footer(column: str, reverse: bool) -> Any:
    from rich.text import Text

    footer = Text("[q]uit · sort: ", style="reverse", no_wrap=True, overflow="ellipsis")
    for key, name in SORTS.items():
        label = name.replace(key, f"[{key}]", 1) if key in name else f"[{key}]{name}"
        footer.append(label, style="bold reverse" if name == column else "reverse")
        footer.append(" ", style="reverse")
    order = "descending" if (column in NUMERIC) != reverse else "ascending"
    footer.append(f"({order}; the same key again reverses) ", style="reverse")
    return footer


def _own(daemon: dict[str, Any], prev: dict[str, Any] | None) -> str:
    """The daemon's own CPU (over the last interval) and memory."""
    text = f", {daemon['rss_bytes'] / (1 << 20):.0f} MiB" if "rss_bytes" in daemon else ""
    before = prev["daemon"] if prev else {}
    if "cpu_s" in daemon and "cpu_s" in before and daemon["uptime_s"] > before["uptime_s"]:
        busy = (daemon["cpu_s"] - before["cpu_s"]) / (daemon["uptime_s"] - before["uptime_s"])
        text += f", cpu {100 * busy:.1f} %"
    return text


def _uptime(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


# -- the command

def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path(os.environ.get("ALACRITY_RUN_DIR", "/run/alacrityd"))
    if args.interval < 0 or (not args.once and args.interval < 0.1):
        raise UserError(f"--interval {args.interval}: give at least 0.1 s (0 with --once: no rates)")
    source = StatusSource(run_dir)
    try:
        if args.once:
            return _once(source, args)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise UserError("alacrity top needs a terminal; for scripts, use 'alacrity top --once'")
        return _live(source, args)
    finally:
        source.close()


def _once(source: StatusSource, args: argparse.Namespace) -> int:
    prev = None
    if args.interval > 0:
        prev = source.status()
        time.sleep(args.interval)
    snap = source.status()
    from rich.console import Console  # after the gate answered: a refusal needs only the standard library

    width = shutil.get_terminal_size((200, 50)).columns if sys.stdout.isatty() else 200
    console = Console(file=sys.stdout, width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False)
    console.print(render(snap, rows(snap, prev), args.sort, args.reverse, live=False, prev=prev))
    return 0


def _live(source: StatusSource, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    snap = source.status()  # a refusal (not root, no daemon) stops us before the screen changes
    prev: dict[str, Any] | None = None  # the first frame has counters only: rates from the second
    column, reverse = args.sort, args.reverse
    console = Console(highlight=False, emoji=False)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    problem = ""
    try:
        tty.setcbreak(fd)  # keys one at a time, no echo; Ctrl-C still interrupts
        with Live(console=console, screen=True, auto_refresh=False, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            due = time.monotonic() + args.interval
            redraw = True
            while True:
                if time.monotonic() >= due:
                    try:
                        fresh = source.status()
                        prev, snap, problem = snap, fresh, ""
                    except UserError as exc:  # the daemon went away: say so, and keep trying
                        problem = f"{exc} (retrying every {args.interval:g} s)"
                    due = time.monotonic() + args.interval
                    redraw = True
                if redraw:
                    found = rows(snap, prev)
                    live.update(render(snap, found, column, reverse, problem=problem, prev=prev,
                                       height=console.size.height, interval=args.interval), refresh=True)
                    redraw = False
                ready, _, _ = select.select([fd], [], [], max(0.0, due - time.monotonic()))
                if not ready:
                    continue
                for key in os.read(fd, 64).decode(errors="ignore").lower():
                    if key == "q":
                        return 0
                    if key in SORTS:
                        column, reverse = SORTS[key], (not reverse if SORTS[key] == column else False)
                        redraw = True
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
