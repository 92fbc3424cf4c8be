"""Bus crossings: can a member of bus A get served by a device of bus B? Every route is
replayed N times against a real alacrityd, each attempt set up deterministically.

Bus A has disk diskA, bus B has disk diskB. A long-lived member of A (a Python child,
admitted through the admin tree) connects to diskB on request; a member of B is
crossing_helper.c (compiled here with gcc), which takes over exact pids with clone3's
set_tid. The routes, in cycles of 15 (6 reuse-thread, 6 reuse-proc, 1 of each other):

  reuse-thread   the gate is stalled (alacrityd SIGSTOPped: the connection waits in the
                 listen backlog); a child of the A member connects to diskB, hands the
                 connection to this script (SCM_RIGHTS) and exits; it is reaped, and its
                 pid is taken by a new THREAD under the B member; the gate resumes.
  reuse-proc     the same, the pid taken by a new PROCESS under the B member.
  exited         the same, the pid left free: the connector is gone at accept.
  member         the A member itself connects to diskB (the gate running).
  member-thread  a thread of the A member connects to diskB.

Then the connection is used: a vhost-user GET_FEATURES, answer awaited for --timeout s.
EOF or a reset is "refused"; any byte back is a CROSSING; no answer is a hang. A reuse
attempt counts as armed when, at accept, the pid's /proc ancestry reached the B member,
i.e. a gate identifying peers by pid would have let it in.

A member of B times its opens of diskB (connect, open, 4 KiB read, close) before the
run, in a loop during it (these include waits on the stopped daemon: the share of the
run it was stopped is printed), and for --load-seconds after it while A's members keep
connecting to diskB with the gate running (what the refusals cost B). Afterwards the
daemon must be alive and a member of B must open diskB within --open-bound s.

Exits 1 on any crossing, hang, unarmed reuse attempt, daemon death, or a failed final
open. Needs root (set_tid, FUSE, membership), x86-64, gcc, /dev/fuse, fusermount3.

    python bench/crossing.py --attempts 10000
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

from common import BENCH_DIR, Cleanup, Daemon, fmt, median, print_table, progress

from alacrity.bus import peers

ROUTES = ("reuse-thread", "reuse-proc", "exited", "member", "member-thread")
#: One cycle of the schedule: mostly pid reuse, alternating thread / process.
SCHEDULE = (
    ["reuse-thread", "reuse-proc"] * 3
    + ["exited"]
    + ["reuse-thread", "reuse-proc"] * 3
    + ["member", "member-thread"]
)
STALLED = {"reuse-thread", "reuse-proc", "exited"}
REUSE = {"reuse-thread": "thread", "reuse-proc": "proc"}

GET_FEATURES = struct.pack("<III", 1, 1, 0)  # request 1, version 1, no payload
REPLY_FLAG = 0x4

#: The member of bus A. Commands on a SOCK_SEQPACKET socket (fd argv[1]), each with the
#: socket path to connect to; every connection made is sent back with SCM_RIGHTS.
A_MEMBER = textwrap.dedent("""
    import os, socket, sys, threading
    ctl = socket.socket(fileno=int(sys.argv[1]))

    def connect_and_hand_over(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            ctl.send(b"err connect %d" % exc.errno)
            return
        socket.send_fds(ctl, [b"conn"], [s.fileno()])
        s.close()

    def serve():
        ctl.send(b"ready")
        while cmd := ctl.recv(4096):
            verb, path = cmd.decode().split(" ", 1)
            if verb == "fork":      # a child connects, hands the connection over and exits
                pid = os.fork()
                if pid == 0:
                    try:
                        connect_and_hand_over(path)
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)  # reaped: its pid is free
                ctl.send(b"reaped %d" % pid)
            elif verb == "self":
                connect_and_hand_over(path)
            elif verb == "thread":
                t = threading.Thread(target=connect_and_hand_over, args=(path,))
                t.start()
                t.join()

    try:
        serve()
    except (ConnectionResetError, BrokenPipeError):  # the bench is gone
        pass
""")

#: A member of bus B opens diskB and reads 4 KiB, argv[2] times (0: until stdin closes,
#: argv[3] s apart); prints the seconds of each open as JSON.
TIMED_OPENS = textwrap.dedent("""
    import json, select, sys, time
    from alacrity import client
    times, count, pause = [], int(sys.argv[2]), float(sys.argv[3])
    print("go", flush=True)
    while True:
        start = time.monotonic()
        with client.connect().open(sys.argv[1], timeout=10) as dev:
            dev.read(0, 4096)
        times.append(time.monotonic() - start)
        if count and len(times) >= count:
            break
        if count:
            time.sleep(pause)
        elif select.select([sys.stdin], [], [], pause)[0]:
            break
    print(json.dumps(times), flush=True)
""")


class DaemonFailure(Exception):
    """alacrityd died or did not stop when told."""


class Gated:
    """alacrityd, stopped and continued by its parent (us), which sees it stop."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.proc is not None
        self.proc = daemon.proc
        self.pid = daemon.proc.pid
        self.stopped_s = 0.0
        self._since = 0.0

    def stop(self, timeout: float) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while True:  # every thread stopped: the gate is not running
            pid, status = os.waitpid(self.pid, os.WUNTRACED | os.WNOHANG)
            if pid == self.pid:
                if os.WIFSTOPPED(status):
                    self._since = time.monotonic()
                    return
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                raise DaemonFailure(f"alacrityd died (exit {self.proc.returncode})")
            if time.monotonic() > deadline:
                raise DaemonFailure(f"alacrityd did not stop within {timeout} s")
            time.sleep(0.00005)

    def cont(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        if self._since:
            self.stopped_s += time.monotonic() - self._since
            self._since = 0.0

    def alive(self) -> bool:
        if self.proc.returncode is not None or self.proc.poll() is not None:
            return False
        state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X", "T")


class Helper:
    """crossing_helper: the member of bus B that takes over pids."""

    def __init__(self, cleanup: Cleanup, binary: Path) -> None:
        self.proc = cleanup.popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        words = self._read().split()
        if words[:1] != ["ready"]:
            raise RuntimeError(f"crossing_helper did not start: {' '.join(words)!r}")
        self.member, self.worker = int(words[1]), int(words[2])
        self.last = ""  # the last answer to thread/proc

    def _read(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"crossing_helper exited ({self.proc.poll()})")
        return line.strip()

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def take(self, kind: str, pid: int, tries: int = 3) -> bool:
        for _ in range(tries):
            self.last = self.ask(f"{kind} {pid}")
            if self.last == f"ok {pid}":
                return True
            time.sleep(0.001)  # e.g. EEXIST: the pid is not quite free yet
        return False


class AMember:
    """The member of bus A: connects where told and hands each connection over."""

    def __init__(self, cleanup: Cleanup, daemon: Daemon, timeout: float) -> None:
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = cleanup.popen(
            [sys.executable, "-c", A_MEMBER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self.ctl.settimeout(timeout)
        if self.ctl.recv(64) != b"ready":
            raise RuntimeError("the bus-A member did not start")
        daemon.join("A", self.proc.pid)

    def connection(self, verb: str, path: str) -> tuple[socket.socket, int | None]:
        """A connection to `path` made by route `verb`, and the pid of a connector that
        exited and was reaped (for "fork")."""
        self.ctl.send(f"{verb} {path}".encode())
        msg, fds, _, _ = socket.recv_fds(self.ctl, 64, 1)
        if not fds:
            raise RuntimeError(f"the bus-A member could not connect: {msg.decode()}")
        conn = socket.socket(fileno=fds[0])
        reaped = None
        if verb == "fork":
            reaped = int(self.ctl.recv(64).split()[1])
        return conn, reaped


def verdict(conn: socket.socket, timeout: float) -> str:
    """'refused' (EOF or reset), 'served' (a valid GET_FEATURES reply), 'garbage' (other
    bytes: served by something) or 'hang' (no answer within `timeout`)."""
    conn.settimeout(timeout)
    data = b""
    try:
        while len(data) < 20:
            chunk = conn.recv(20 - len(data))
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        if not data:
            return "hang"
    if not data:
        return "refused"
    request, flags, size = struct.unpack_from("<III", data) if len(data) >= 12 else (0, 0, 0)
    return "served" if (request, flags & REPLY_FLAG, size, len(data)) == (1, REPLY_FLAG, 8, 20) else "garbage"


def armed(pid: int, kind: str, helper: Helper) -> bool:
    """At accept, a pid-based gate would have found the B member above `pid`."""
    chain = [t.pid for t in peers.ancestry(pid, depth=4)]
    is_thread = not peers.is_process(pid)
    return chain[:1] == [pid] and helper.member in chain and is_thread == (kind == "thread")


def build_helper(dest: Path) -> Path:
    binary = dest / "crossing_helper"
    out = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(BENCH_DIR / "crossing_helper.c")],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"cannot build crossing_helper:\n{out.stderr}")
    return binary


def peerpidfd_of_reaped() -> str:
    """What this kernel's SO_PEERPIDFD gives for a peer that exited and was reaped."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"\0alacrity-crossing-probe-{os.getpid()}")
        listener.listen(1)
        pid = os.fork()
        if pid == 0:
            with contextlib.suppress(OSError):
                socket.socket(socket.AF_UNIX).connect(listener.getsockname())
            os._exit(0)
        os.waitpid(pid, 0)
        conn, _ = listener.accept()
        with conn:
            try:
                pidfd = conn.getsockopt(socket.SOL_SOCKET, 77)
            except OSError as exc:
                return f"{errno.errorcode.get(exc.errno, exc.errno)} (as Linux 6.5 to ~6.14 does)"
            try:
                pid = peers.pidfd_pid(pidfd)
                if pid is None:
                    return "a pidfd of an exited process (as Linux 6.16+ does)"
                return f"a pidfd of live pid {pid}?"
            finally:
                os.close(pidfd)


def timed_opens(daemon: Daemon, cleanup: Cleanup, count: int, pause: float = 0.05) -> subprocess.Popen:
    """A bus-B member that opens diskB `count` times (0: until told to stop), `pause` s
    apart; returns once it is about to make its first open."""
    argv = daemon.bus_exec("B", [sys.executable, "-c", TIMED_OPENS, "diskB", str(count), str(pause)])
    pipe = subprocess.PIPE
    proc = cleanup.popen(argv, env=daemon.env, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    if proc.stdout.readline() != "go\n":  # type: ignore[union-attr]
        raise RuntimeError(f"a bus-B member did not start: {proc.communicate(timeout=10)[1].strip()[-500:]}")
    return proc


def open_times(proc: subprocess.Popen, timeout: float, stop: bool = False) -> list[float]:
    out, err = proc.communicate("stop\n" if stop else None, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"a bus-B member could not open diskB: {err.strip()[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def summary(times: list[float]) -> str:
    if not times:
        return "-"
    return (
        f"median {median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f} "
        f"({len(times)} opens)"
    )


def run(args: argparse.Namespace, c: Cleanup) -> int:
    failures: list[str] = []
    binary = build_helper(c.root)
    images = c.root / "images"
    images.mkdir()
    for name in ("A", "B"):
        with open(images / f"disk{name}.img", "wb") as f:
            f.truncate(args.image_mib << 20)
    daemon = Daemon(c).start()
    gated = Gated(daemon)
    c.callbacks.append(gated.cont)  # never leave it stopped (kill it, or let it exit)
    daemon.make_disk("diskA", "A", images / "diskA.img")
    daemon.make_disk("diskB", "B", images / "diskB.img")
    # Several writers allowed: a connection past the gate is served, never turned away by
    # the disk because an earlier one still has it open (that would hide a crossing).
    daemon.sh("echo 1 > $A/devices/diskB/shared")
    disk_b = daemon.device_socket("B", "diskB")
    disk_a = daemon.device_socket("A", "diskA")
    helper = Helper(c, binary)
    daemon.join("B", helper.member)
    member_a = AMember(c, daemon, timeout=args.timeout + 5)

    # Controls: the same plumbing must see a connection that is served.
    conn, _ = member_a.connection("self", disk_a)
    with conn:
        conn.sendall(GET_FEATURES)
        if verdict(conn, args.timeout) != "served":
            raise RuntimeError("control failed: the bus-A member was not served by its own diskA")
    progress("control: the bus-A member is served by diskA; a bus-B member opens diskB ...")
    before = open_times(timed_opens(daemon, c, args.opens), timeout=120)
    progress(f"bus-B member, diskB open + 4 KiB read before the run: {summary(before)}")

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    route_s: Counter[str] = Counter()
    background = timed_opens(daemon, c, 0)
    start = time.monotonic()
    every = max(1, min(1000, args.attempts // 10))
    for n in range(args.attempts):
        route = SCHEDULE[n % len(SCHEDULE)]
        t0 = time.monotonic()
        result, placed = one_attempt(route, args, gated, member_a, helper, disk_b)
        route_s[route] += time.monotonic() - t0
        counts[route][result] += 1
        counts[route]["attempts"] += 1
        if placed is not None:
            counts[route]["armed" if placed else "unarmed"] += 1
        if result != "refused" or placed is False:
            unarmed = "" if placed is not False else f", UNARMED (helper: {helper.last})"
            progress(f"attempt {n + 1} ({route}): {result}{unarmed}")
        if result == "hang":
            failures.append(f"attempt {n + 1} ({route}): no answer within {args.timeout} s; run stopped")
            break
        if (n + 1) % every == 0 or n + 1 == args.attempts:
            crossed = sum(k["served"] + k["garbage"] for k in counts.values())
            progress(
                f"{n + 1}/{args.attempts} attempts, {crossed} crossings, "
                f"{(n + 1) / (time.monotonic() - start):.0f}/s"
            )
    wall = time.monotonic() - start
    during = open_times(background, timeout=60, stop=True)

    # The same opens while A's members connect to diskB with the gate running: what the
    # refusals themselves cost a member of B.
    load: Counter[str] = Counter()
    loaded: list[float] = []
    if args.load_seconds > 0 and not failures:
        progress(f"load: A's members connect to diskB for {args.load_seconds:.0f} s, gate running ...")
        background = timed_opens(daemon, c, 0)
        t_end = time.monotonic() + args.load_seconds
        while time.monotonic() < t_end and not load["hang"]:
            for route in ("member", "member-thread"):
                load[one_attempt(route, args, gated, member_a, helper, disk_b)[0]] += 1
        loaded = open_times(background, timeout=60, stop=True)

    alive = gated.alive()
    if not alive:
        failures.append("alacrityd is not running after the run")
    after: list[float] = []
    if alive:
        try:
            after = open_times(timed_opens(daemon, c, 1), timeout=args.open_bound + 5)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            failures.append(f"a bus-B member could not open diskB after the run: {exc}")
        if after and max(after) > args.open_bound:
            failures.append(f"a bus-B member took {max(after):.2f} s to open diskB after the run")

    rows = []
    total: Counter[str] = Counter()
    for route in ROUTES:
        k = counts[route]
        total.update(k)
        rows.append(
            [
                route,
                str(k["attempts"]),
                str(k["armed"]) if route in REUSE else "-",
                str(k["served"] + k["garbage"]),
                str(k["refused"]),
                str(k["hang"]),
                fmt(k["attempts"] / route_s[route] if route_s[route] else None, 0),
            ]
        )
    rows.append(
        [
            "all",
            str(total["attempts"]),
            str(total["armed"]),
            str(total["served"] + total["garbage"]),
            str(total["refused"]),
            str(total["hang"]),
            fmt(total["attempts"] / wall, 0),
        ]
    )
    print_table(
        f"Bus crossings, {time.strftime('%Y-%m-%d')}",
        ["route", "attempts", "armed", "crossings", "refused", "hang", "attempts/s"],
        rows,
    )
    print(
        f"\nmachine: nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}; "
        f"SO_PEERPIDFD of a reaped peer gives {peerpidfd_of_reaped()}"
    )
    print(
        f"run: {wall:.1f} s, alacrityd stopped for {gated.stopped_s / wall * 100:.0f} % of it "
        "(the stalled gate of reuse-thread, reuse-proc, exited)"
    )
    print("bus-B member, diskB connect + open + 4 KiB read + close:")
    print(f"  before the run       {summary(before)}")
    print(f"  during the run       {summary(during)}  (includes waits on the stopped daemon)")
    if args.load_seconds > 0:
        print(
            f"  under A's connects   {summary(loaded)}  ({sum(load.values())} connections to diskB by "
            f"A's members, {load['refused']} refused)"
        )
    print(f"  after the run        {summary(after)}")
    if before and during:
        print(f"median during / before: {median(during) / median(before):.2f}x", end="")
        if loaded:
            print(f"; under A's connects / before: {median(loaded) / median(before):.2f}x", end="")
        print()
    log = daemon.log.read_text(errors="replace")
    found = re.findall(r"refused device diskB to .*?: (.*?)( \(\d+ more like it not logged\))?$", log, re.M)
    reasons = Counter(re.sub(r"\d+", "N", reason) for reason, _ in found)
    print(
        f"daemon log: {log.count('Traceback')} tracebacks; diskB refusals logged (once per peer and reason "
        "every 10 s), by reason:"
    )
    for reason, count in reasons.most_common():
        print(f"  {count:6}  {reason}")

    crossings = total["served"] + total["garbage"] + load["served"] + load["garbage"]
    if crossings:
        failures.append(f"{crossings} crossings")
    if load["hang"]:
        failures.append(f"under A's connects, a connection had no answer within {args.timeout} s")
    if total["unarmed"]:
        failures.append(f"{total['unarmed']} reuse attempts could not place the pid under the B member")
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("PASS: every attempt was refused, and bus B's member still opens its disk")
    return 1 if failures else 0


def one_attempt(
    route: str, args: argparse.Namespace, gated: Gated, member_a: AMember, helper: Helper, disk_b: str
) -> tuple[str, bool | None]:
    """The gate's verdict on one connection to diskB by `route`; for the reuse routes, also
    whether the connector's pid was under the B member when the gate accepted."""
    verb = {"member": "self", "member-thread": "thread"}.get(route, "fork")
    kind = REUSE.get(route)
    taken = placed = False
    if route in STALLED:
        gated.stop(args.timeout)
    try:
        conn, reaped = member_a.connection(verb, disk_b)
        if kind and reaped is not None:
            taken = helper.take(kind, reaped)
            placed = taken and armed(reaped, kind, helper)
        with contextlib.suppress(OSError):  # queued while the gate is stalled
            conn.sendall(GET_FEATURES)
    finally:
        if route in STALLED:
            gated.cont()
    with conn:
        answer = verdict(conn, args.timeout)
    if taken:
        helper.ask("free")
    return answer, (placed if kind else None)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attempts", type=int, default=10000, help="attempts in all routes (default 10000)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the gate's answer on each connection (default 5)",
    )
    parser.add_argument(
        "--opens",
        type=int,
        default=20,
        help="timed opens of diskB by a bus-B member before the run (default 20)",
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=5.0,
        help="after the run, seconds during which A's members connect to diskB with the "
        "gate running while B's member times its opens (default 5; 0 skips)",
    )
    parser.add_argument(
        "--open-bound",
        type=float,
        default=5.0,
        help="seconds a bus-B member may take to open diskB after the run (default 5)",
    )
    parser.add_argument("--image-mib", type=int, default=16, help="size of each disk image (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log) afterwards")
    args = parser.parse_args()
    if args.attempts < 1:
        parser.error("--attempts must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root: clone3 set_tid, the FUSE admin tree and membership need it")
    if platform.machine() != "x86_64":
        parser.error("crossing_helper.c is x86-64 only")
    with Cleanup(prefix="alacrity-crossing-", keep=args.keep) as c:
        try:
            return run(args, c)
        except (DaemonFailure, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"FAIL: {type(exc).__name__}: {exc}")
            return 1
        except KeyboardInterrupt:
            progress("interrupted: cleaning up")
            return 130


if __name__ == "__main__":
    sys.exit(main())
