"""Block throughput and latency: alacrityd's blk device against qemu-storage-daemon
(and, from a guest, QEMU's built-in virtio-blk), all on the same raw image file.

Host side: the same Python vhost-user-blk client (alacrity.client.BlkClient), run as
a child process per test, drives (1) our device, as a bus member via
`alacrity bus exec`, and (2) qemu-storage-daemon's vhost-user-blk export, through a
plain unix socket. Runs alternate ours/qsd, `--rounds` times; medians are reported.
  seq_write / seq_read   1 MiB requests, --seq-depth in flight, --seq-mib per pass (MB/s;
                         the final flush is timed separately)
  rand_read / rand_write 4 KiB requests at random offsets, --rand-depth in flight, for
                         --rand-seconds (IOPS)
  notify/req             (client kicks + interrupts) / requests
Guest side (TCG): one boot per run, `dd` of --guest-mib at 1 MiB, write with
conv=fsync and read with iflag=direct, timed inside the guest with /proc/uptime
(10 ms resolution; busybox date has no %N). Runs rotate ours (jailed, as `vm run`
does by default) / ours with --no-jail / qsd / built-in.

Goals: host seq >= 0.8x qsd, host 4 KiB IOPS >= 0.5x qsd.
Needs root, FUSE, qemu-storage-daemon and qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    MIB,
    Cleanup,
    Daemon,
    dump_json,
    fmt,
    make_image,
    median,
    print_table,
    progress,
    ratio,
    start_qsd,
)

BUS = "bench"
DISK = "disk0"
TESTS = ("seq_write", "seq_read", "rand_read", "rand_write")


def host_pass(args, daemon: Daemon, qsd_sock: Path, who: str, test: str) -> dict | None:
    client = [sys.executable, str(BENCH_DIR / "blk_client.py"), "--test", test,
              "--seq-mib", str(args.seq_mib), "--seq-depth", str(args.seq_depth),
              "--rand-depth", str(args.rand_depth), "--rand-seconds", str(args.rand_seconds)]
    if who == "ours":
        argv = daemon.bus_exec(BUS, [*client, "--device", DISK])
    else:
        argv = [*client, "--socket", str(qsd_sock)]
    proc = daemon.cleanup.popen(argv, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        daemon.cleanup.kill(proc)
        progress(f"  {who} {test}: timed out")
        return None
    daemon.cleanup.procs.remove(proc)
    if proc.returncode:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        progress(f"  {who} {test}: FAILED: {last}")
        return {"error": last}
    return json.loads(out)


def run_host(args, daemon: Daemon, qsd_sock: Path) -> dict:
    runs: dict[str, dict[str, list]] = {w: {t: [] for t in TESTS} for w in ("ours", "qsd")}
    for rnd in range(args.rounds):
        order = ("ours", "qsd") if rnd % 2 == 0 else ("qsd", "ours")
        for test in TESTS:
            for who in order:
                res = host_pass(args, daemon, qsd_sock, who, test)
                runs[who][test].append(res)
                if res and "error" not in res:
                    value = res.get("mb_s", res.get("iops"))
                    progress(f"round {rnd + 1}/{args.rounds} {test:10} {who:4} {value:10.1f} "
                             f"{'MB/s' if 'mb_s' in res else 'IOPS'}  notify/req "
                             f"{res['notify_per_req']:.3f}")
    return runs


def summarize_host(runs: dict) -> list[dict]:
    rows = []
    for test in TESTS:
        metric = "mb_s" if test.startswith("seq") else "iops"
        row = {"test": test, "unit": "MB/s" if metric == "mb_s" else "IOPS"}
        for who in ("ours", "qsd"):
            good = [r for r in runs[who][test] if r and "error" not in r]
            row[who] = median([r[metric] for r in good])
            row[f"{who}_notify_per_req"] = median([r["notify_per_req"] for r in good])
            row[f"{who}_failures"] = len(runs[who][test]) - len(good)
            if test == "seq_write":
                row[f"{who}_flush_s"] = median([r["flush_s"] for r in good])
        row["ratio"] = ratio(row["ours"], row["qsd"])
        row["goal"] = 0.8 if test.startswith("seq") else 0.5
        rows.append(row)
    return rows


# -- guest
GUEST_CMD = (
    "up() {{ cut -d' ' -f1 /proc/uptime; }}; i=0; while [ $i -lt {reps} ]; do "
    "a=$(up); dd if=/dev/zero of=/dev/vda bs=1048576 count={mib} conv=fsync 2>/dev/null || echo DDFAIL; "
    "b=$(up); echo 3 > /proc/sys/vm/drop_caches; c=$(up); "
    "dd if=/dev/vda of=/dev/null bs=1048576 count={mib} iflag=direct 2>/dev/null || echo DDFAIL; "
    "d=$(up); echo BENCH $a $b $c $d; i=$((i+1)); done"
)
BENCH_LINE = re.compile(r"^BENCH ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", re.M)


def guest_run(args, daemon: Daemon, qsd_sock: Path, image: Path, who: str, n: int) -> list[dict]:
    from alacrity.devices import Slot
    from alacrity.devices.blk import BlkDevice
    from alacrity.vm.image import default_image
    from alacrity.vm.machine import DEFAULT_MACHINE, virtio_device
    from alacrity.vm.qemu import VM, VmSpec

    guest = default_image(progress=False)
    cmd = GUEST_CMD.format(reps=args.guest_reps, mib=args.guest_mib)
    log = daemon.cleanup.root / f"console-{who}-{n}.log"
    if who in ("ours", "unjailed"):
        argv = [sys.executable, *daemon.cli(), "vm", "run", "--bus", BUS, "--cmd", cmd,
                "--log", str(log), "--kernel", str(guest.kernel), "--initrd", str(guest.initrd)]
        if who == "unjailed":
            argv.append("--no-jail")
    else:
        spec = VmSpec(name=f"bench-{who}-{n}", kernel=guest.kernel, initrd=guest.initrd, cmd=cmd,
                      console=str(log), run_dir=daemon.cleanup.root / "vms" / f"{who}-{n}")
        if who == "qsd":
            spec.devices = [BlkDevice.qemu_args(Slot("qsd", str(qsd_sock), "mmio", spec.name, "d0", 0))]
        else:
            # file.locking=off: qemu-storage-daemon holds the image's write lock meanwhile.
            spec.devices = [[
                "-drive", f"file={image},if=none,id=d0,format=raw,cache=writeback,file.locking=off",
                *virtio_device("virtio-blk", DEFAULT_MACHINE, drive="d0")]]
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        argv = VM(spec).command()
    proc = daemon.cleanup.popen(argv, env=daemon.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=args.guest_timeout)
    except subprocess.TimeoutExpired:
        daemon.cleanup.kill(proc)
        progress(f"  guest {who}: timed out")
        return []
    daemon.cleanup.procs.remove(proc)
    console = log.read_text(errors="replace") if log.exists() else ""
    if "DDFAIL" in console or not BENCH_LINE.search(console):
        progress(f"  guest {who}: no result:\n{console[-1500:]}\n{err.decode(errors='replace')[-800:]}")
        return []
    out = []
    for m in BENCH_LINE.finditer(console):
        a, b, c, d = (float(x) for x in m.groups())
        size = args.guest_mib * MIB / 1e6
        out.append({"write_mb_s": size / max(b - a, 0.01), "read_mb_s": size / max(d - c, 0.01)})
    return out


def run_guest(args, daemon: Daemon, qsd_sock: Path, image: Path) -> dict:
    runs: dict[str, list] = {"ours": [], "unjailed": [], "qsd": [], "builtin": []}
    for n in range(args.guest_rounds):
        order = ["ours", "unjailed", "qsd", "builtin"]
        order = order[n % 4:] + order[: n % 4]
        for who in order:
            t = time.monotonic()
            res = guest_run(args, daemon, qsd_sock, image, who, n)
            runs[who] += res
            for r in res:
                progress(f"guest {n + 1}/{args.guest_rounds} {who:8} write {r['write_mb_s']:7.1f} "
                         f"read {r['read_mb_s']:7.1f} MB/s  (boot+run {time.monotonic() - t:.1f} s)")
    return runs


def summarize_guest(runs: dict) -> list[dict]:
    rows = []
    for key in ("write_mb_s", "read_mb_s"):
        row = {"test": f"guest dd {key[:-5]} 1M", "unit": "MB/s"}
        for who in ("ours", "unjailed", "qsd", "builtin"):
            row[who] = median([r[key] for r in runs[who]])
            row[f"{who}_samples"] = len(runs[who])
            row[f"{who}_spread"] = [min((r[key] for r in runs[who]), default=None),
                                    max((r[key] for r in runs[who]), default=None)]
        row["ratio_jail"] = ratio(row["ours"], row["unjailed"])
        row["ratio_qsd"] = ratio(row["ours"], row["qsd"])
        row["ratio_builtin"] = ratio(row["ours"], row["builtin"])
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-mib", type=int, default=512, help="image size (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="host rounds, ours/qsd alternating (3)")
    p.add_argument("--seq-mib", type=int, default=256, help="MiB per sequential pass (256)")
    p.add_argument("--seq-depth", type=int, default=8, help="1 MiB requests in flight (8)")
    p.add_argument("--rand-depth", type=int, default=32, help="4 KiB requests in flight (32)")
    p.add_argument("--rand-seconds", type=float, default=3.0, help="seconds per random pass (3)")
    p.add_argument("--guest-rounds", type=int, default=2, help="boots per backend (2; 0 skips)")
    p.add_argument("--guest-reps", type=int, default=2, help="dd write+read pairs per boot (2)")
    p.add_argument("--guest-mib", type=int, default=256, help="MiB per guest dd (256)")
    p.add_argument("--guest-timeout", type=float, default=300.0)
    p.add_argument("--no-host", action="store_true", help="skip the host-client part")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for debugging")
    args = p.parse_args()

    with Cleanup(keep=args.keep) as cleanup:
        image = cleanup.root / "disk.img"
        progress(f"writing {args.image_mib} MiB of random data to {image}")
        make_image(image, args.image_mib * MIB)
        daemon = Daemon(cleanup).start()
        daemon.make_disk(DISK, BUS, image)
        qsd_sock = cleanup.root / "qsd.sock"
        start_qsd(cleanup, image, qsd_sock)
        rss_idle = daemon.rss_kib()
        result: dict = {"config": vars(args)}
        if not args.no_host:
            host = run_host(args, daemon, qsd_sock)
            result["host_runs"] = host
            result["host"] = summarize_host(host)
        if args.guest_rounds:
            guest = run_guest(args, daemon, qsd_sock, image)
            result["guest_runs"] = guest
            result["guest"] = summarize_guest(guest)
        result["alacrityd_rss_kib"] = {"idle": rss_idle, "after": daemon.rss_kib()}
        result["device_counters"] = daemon.counters(DISK)

    if args.json:
        dump_json(result)
        return 0
    if "host" in result:
        rows = []
        for r in result["host"]:
            fails = f"{r['ours_failures']}/{r['qsd_failures']}"
            rows.append([r["test"], r["unit"], fmt(r["ours"]), fmt(r["qsd"]), fmt(r["ratio"], 2),
                         f">={r['goal']}", fmt(r["ours_notify_per_req"], 3), fmt(r["qsd_notify_per_req"], 3),
                         fails])
        print_table(f"host client, medians of {args.rounds} (ours = alacrityd, qsd = qemu-storage-daemon)",
                    ["test", "unit", "ours", "qsd", "ours/qsd", "goal", "notify/req ours", "notify/req qsd",
                     "failed ours/qsd"], rows)
        sw = result["host"][0]
        print(f"seq_write final flush: ours {fmt(sw.get('ours_flush_s'), 3)} s, "
              f"qsd {fmt(sw.get('qsd_flush_s'), 3)} s")
    if "guest" in result:
        def spread(r: dict, who: str) -> str:
            low, high = r[f"{who}_spread"]
            return f"{fmt(r[who])} [{fmt(low)}-{fmt(high)}]"

        rows = [[r["test"], r["unit"], spread(r, "ours"), spread(r, "unjailed"), spread(r, "qsd"),
                 spread(r, "builtin"), fmt(r["ratio_jail"], 2), fmt(r["ratio_qsd"], 2),
                 fmt(r["ratio_builtin"], 2),
                 f"{r['ours_samples']}/{r['unjailed_samples']}/{r['qsd_samples']}/{r['builtin_samples']}"]
                for r in result["guest"]]
        print_table(f"guest (TCG) dd of {args.guest_mib} MiB, median [min-max]; ours is jailed (vm run), "
                    "unjailed is vm run --no-jail",
                    ["test", "unit", "ours", "unjailed", "qsd", "builtin", "jailed/unjailed", "ours/qsd",
                     "ours/builtin", "samples"], rows)
    rss = result["alacrityd_rss_kib"]
    print(f"\nalacrityd VmRSS: idle {rss['idle']} KiB, after {rss['after']} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
