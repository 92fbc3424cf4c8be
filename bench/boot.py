"""Boot to the ready line: `alacrity vm run --bus B --cmd true` (its QEMU jailed, as by
default), the same with `--no-jail`, and the same bare QEMU command line, all with one
blk disk served by the same alacrityd. The jail's cost is jailed against --no-jail.

The bare command is `VM(spec).command()` with the same kernel, initrd, machine and
vhost-user socket. QEMU may only connect to the device socket as a bus member, so
this script joins the bus itself once (members' children inherit it) and starts
every kind of run as its own children: the baseline carries no `alacrity bus exec`
start-up, and `vm run` sees it is already a member.

Each run is timed from process start to the ALACRITY-READY line in the console log
(polled every 2 ms), then left to finish (`true` exits, the guest powers off).
Runs rotate, `--runs` of each; medians with [min-max] and the overheads (goals: the
jail <= 3 %, vm run against bare QEMU <= 5 %) are reported, with alacrityd's VmRSS
idle and after the runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import Cleanup, Daemon, dump_json, fmt, median, print_table, progress

BUS = "boot"
DISK = "disk0"
READY = b"ALACRITY-READY"


def timed_run(cleanup: Cleanup, argv: list[str], env: dict, log: Path, timeout: float) -> tuple[float, float]:
    """(seconds to the ready line, seconds to exit)."""
    log.unlink(missing_ok=True)
    start = time.monotonic()
    proc = cleanup.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    ready = None
    while ready is None:
        now = time.monotonic()
        try:
            if READY in log.read_bytes():
                ready = now - start
                break
        except FileNotFoundError:
            pass
        if proc.poll() is not None or now - start > timeout:
            err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
            cleanup.kill(proc)
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"no ready line from {argv[:6]}...:\n{tail}\n{err[-1500:]}")
        time.sleep(0.002)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        cleanup.kill(proc)
    else:
        cleanup.procs.remove(proc)
    proc.stderr.close()
    return ready, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=8, help="runs of each, alternating (8)")
    p.add_argument("--image-mib", type=int, default=64, help="disk size (64)")
    p.add_argument("--timeout", type=float, default=120.0, help="per run (120 s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for debugging")
    args = p.parse_args()

    from alacrity.devices import Slot
    from alacrity.devices.blk import BlkDevice
    from alacrity.vm.image import default_image
    from alacrity.vm.qemu import VM, VmSpec

    guest = default_image(progress=False)
    with Cleanup(prefix="alacrity-boot-", keep=args.keep) as cleanup:
        image = cleanup.root / "disk.img"
        with open(image, "wb") as f:
            f.truncate(args.image_mib << 20)
        daemon = Daemon(cleanup).start()
        daemon.make_disk(DISK, BUS, image)
        sock = daemon.device_socket(BUS, DISK)
        time.sleep(1.0)
        rss_idle = daemon.rss_kib()
        daemon.join(BUS)  # our children (QEMU, `vm run`) inherit the membership
        log = cleanup.root / "console.log"
        ours_argv = [sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", BUS, "--cmd", "true",
                     "--log", str(log), "--kernel", str(guest.kernel), "--initrd", str(guest.initrd)]
        kinds = ("jailed", "unjailed", "bare")
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for n in range(args.runs):
            order = kinds[n % 3:] + kinds[:n % 3]  # each kind goes first, second and last in turn
            for who in order:
                if who == "jailed":
                    argv = ours_argv
                elif who == "unjailed":
                    argv = [*ours_argv, "--no-jail"]
                else:
                    spec = VmSpec(name=f"bare-{n}", kernel=guest.kernel, initrd=guest.initrd, cmd="true",
                                  console=str(log),
                                  devices=[BlkDevice.qemu_args(Slot("bare", str(sock), "mmio", "bare",
                                                                    "d0", 0))],
                                  run_dir=cleanup.root / "vms" / f"bare-{n}")
                    spec.run_dir.mkdir(parents=True, exist_ok=True)
                    argv = VM(spec).command()
                ready, total = timed_run(cleanup, argv, daemon.env, log, args.timeout)
                times[who].append((ready, total))
                progress(f"run {n + 1}/{args.runs} {who:8} ready {ready:6.3f} s  exit {total:6.3f} s")
        rss_after = daemon.rss_kib()
        connections = (daemon.admin / "devices" / DISK / "connections")
        conns = connections.read_text().strip() if connections.exists() else "?"

    ready = {k: [t[0] for t in times[k]] for k in kinds}
    done = {k: [t[1] for t in times[k]] for k in kinds}

    def over(values: dict[str, list[float]], a: str, b: str) -> float:
        return 100 * (median(values[a]) / median(values[b]) - 1)

    result = {
        "runs": times,
        "ready_s": {k: median(v) for k, v in ready.items()},
        "exit_s": {k: median(v) for k, v in done.items()},
        "jail_overhead_pct": {"ready": over(ready, "jailed", "unjailed"),
                              "exit": over(done, "jailed", "unjailed")},
        "vm_run_overhead_pct": {"ready": over(ready, "jailed", "bare"), "exit": over(done, "jailed", "bare")},
        "alacrityd_rss_kib": {"idle": rss_idle, "after": rss_after},
        "connections_after": conns,
    }
    if args.json:
        dump_json(result)
        return 0

    def spread(values: list[float]) -> str:
        return f"{fmt(median(values), 3)} [{fmt(min(values), 3)}-{fmt(max(values), 3)}]"

    rows = [
        ["start -> ALACRITY-READY", *(spread(ready[k]) for k in kinds),
         fmt(result["jail_overhead_pct"]["ready"], 1), fmt(result["vm_run_overhead_pct"]["ready"], 1)],
        ["start -> exit (cmd true)", *(spread(done[k]) for k in kinds),
         fmt(result["jail_overhead_pct"]["exit"], 1), fmt(result["vm_run_overhead_pct"]["exit"], 1)],
    ]
    print_table(f"boot, seconds, median [min-max] of {args.runs} rotating runs",
                ["measure", "vm run (jailed)", "vm run --no-jail", "bare qemu",
                 "jail cost % (goal <= 3)", "vm run vs bare % (goal <= 5)"], rows)
    print(f"\nalacrityd VmRSS: idle {rss_idle} KiB, after {args.runs * 3} boots {rss_after} KiB "
          f"(device connections now: {conns})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
