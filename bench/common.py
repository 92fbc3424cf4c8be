"""Shared pieces of the benchmark scripts: a private alacrityd in a temp dir, child
processes that are always cleaned up (by their own process group), image files,
medians and the result table.

Everything a script starts is registered in a `Cleanup`; `with Cleanup() as c:`
kills the process groups it started, lazily unmounts the FUSE admin tree and
removes the temp dir, on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20
BENCH_DIR = Path(__file__).resolve().parent


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Cleanup:
    """Owns a temp dir and every process group and mount made under it."""

    def __init__(self, prefix: str = "alacrity-bench-", keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []
        self.callbacks: list[Callable[[], None]] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        """Start a child in its own session, so its whole group can be killed."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kw)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # Whatever is left of the group (QEMU children of `alacrity vm run`, ...).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for cb in reversed(self.callbacks):
            try:
                cb()
            except Exception as exc:  # cleanup must go on
                progress(f"cleanup: {exc}")
        for proc in reversed(list(self.procs)):
            self.kill(proc)
        for mount in self.mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, capture_output=True)
        if self.keep:
            progress(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cleanup:
        # SIGTERM unwinds like Ctrl-C, so the finally blocks run.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Daemon:
    """A real alacrityd with its admin tree, run dir and state dir under `root`."""

    def __init__(self, cleanup: Cleanup, name: str = "d") -> None:
        self.cleanup = cleanup
        self.root = cleanup.root / name
        self.admin = self.root / "admin"
        self.run_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "ALACRITY_RUN_DIR": str(self.run_dir),
            "ALACRITY_ADMIN": str(self.admin),
            "ALACRITY_VM_DIR": str(self.root / "vms"),
        }

    def start(self, timeout: float = 20.0) -> Daemon:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cleanup.mounts.append(self.admin)
        with open(self.log, "ab") as log:
            self.proc = self.cleanup.popen(
                [sys.executable, *self.cli(), "daemon", "--mount", str(self.admin),
                 "--state-dir", str(self.state_dir), "--run-dir", str(self.run_dir)],
                stdout=log, stderr=log,
            )
        pidfile = self.run_dir / "alacrityd.pid"
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and pidfile.read_text().strip() == str(self.proc.pid)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"alacrityd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def cli(self) -> list[str]:
        """How to run `alacrity` with this interpreter."""
        return ["-m", "alacrity.cli"]

    def sh(self, script: str) -> None:
        proc = subprocess.run(["sh", "-ec", script], env={**self.env, "A": str(self.admin)},
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"admin script failed: {proc.stderr}\n{script}")

    def make_disk(self, name: str, bus: str, image: Path) -> None:
        self.sh(f"""
            mkdir -p $A/devices/{name}
            echo blk > $A/devices/{name}/type
            echo {image} > $A/devices/{name}/path
            [ -d $A/buses/{bus} ] || mkdir $A/buses/{bus}
            ln -s ../../devices/{name} $A/buses/{bus}/{name}
        """)

    def device_socket(self, bus: str, name: str) -> str:
        """Ask the gate (as a member of `bus`) where `name` is served."""
        code = (f"from alacrity import client; print(client.connect().device({name!r}).socket)")
        proc = subprocess.run(self.bus_exec(bus, [sys.executable, "-c", code]), env=self.env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise RuntimeError(f"cannot find device {name}: {proc.stderr}")
        return proc.stdout.strip()

    def bus_exec(self, bus: str, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--", *argv]

    def join(self, bus: str, pid: int | None = None) -> None:
        """Make `pid` (default: this process) a member; its later children inherit it."""
        (self.admin / "buses" / bus / "members").write_text(f"{pid or os.getpid()}\n")

    def rss_kib(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def counters(self, device: str) -> dict[str, str]:
        out = {}
        for name in ("reads", "writes", "flushes", "bytes_read", "bytes_written", "io_errors"):
            path = self.admin / "devices" / device / name
            if path.exists():
                out[name] = path.read_text().strip()
        return out


def make_image(path: Path, size: int) -> None:
    """A raw image full of real (random) data: no holes, so every read hits blocks."""
    chunk = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])
        f.flush()
        os.fsync(f.fileno())


def start_qsd(cleanup: Cleanup, image: Path, sock: Path, timeout: float = 20.0) -> subprocess.Popen:
    """qemu-storage-daemon exporting `image` as vhost-user-blk, buffered I/O like ours
    (cache.direct=off: page cache reads and writes, fdatasync on flush)."""
    log = open(cleanup.root / "qsd.log", "ab")  # noqa: SIM115 (lives as long as qsd)
    cleanup.callbacks.append(log.close)
    proc = cleanup.popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
         "--blockdev", "driver=raw,node-name=disk0,file=file0",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                     f"addr.path={sock},writable=on,num-queues=1"],
        stdout=log, stderr=log,
    )
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qemu-storage-daemon did not start:\n"
                               f"{(cleanup.root / 'qsd.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                        strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def dump_json(obj: object) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def ratio(ours: float | None, peer: float | None) -> float | None:
    if not ours or not peer or ours != ours or peer != peer:
        return None
    return ours / peer


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads) from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(values: list[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the values that are numbers (None and NaN left out); None if none are."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt_spread(values: list[float | None], digits: int = 2, suffix: str = "") -> str:
    """`median [min–max]` of the values, each with `digits` decimals (the median alone if
    there is one value; "-" if there are none)."""
    s = spread(values)
    if s is None:
        return "-"
    m, lo, hi = (f"{v:.{digits}f}" for v in s)
    one = sum(1 for v in values if v is not None and v == v) == 1
    return f"{m}{suffix}" if one else f"{m}{suffix} [{lo}–{hi}]"


#: The columns of a cpuN line of /proc/stat, in order (all in USER_HZ ticks).
PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest",
                    "guest_nice")


def cpu_times() -> dict[str, dict[str, float]]:
    """Per-CPU time from /proc/stat in seconds: {"cpu0": {"user": s, "system": s, ...}, ...}
    ("cpu", the sum over all CPUs, included)."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            continue
        name, *ticks = line.split()
        out[name] = {f: int(t) / tck for f, t in zip(PROC_STAT_FIELDS, ticks, strict=False)}
    return out


def cpu_times_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                    ) -> dict[str, dict[str, float]]:
    """after - before, per CPU and field, with `busy` (everything but idle and iowait) added."""
    out = {}
    for cpu, fields in after.items():
        if cpu not in before:
            continue
        d = {f: v - before[cpu].get(f, 0.0) for f, v in fields.items()}
        # guest and guest_nice are already counted in user and nice.
        d["busy"] = sum(v for f, v in d.items() if f not in ("idle", "iowait", "guest", "guest_nice"))
        out[cpu] = d
    return out
