"""Random bytes to a guest: our `rng` class (vhost-user-rng, served by alacrityd) against
QEMU's built-in virtio-rng reading /dev/urandom (`rng-random`), on the same guest, side by
side; and to a host process through `alacrity.client`.

    python bench/rng.py [--runs 3] [--mib 1]

Each run boots the default guest twice (ours, then QEMU's, alternating which goes first),
and the guest times `head -c N /dev/hwrng` with /proc/uptime after stopping the kernel's
own hwrng reader (khwrngd). The host figure is one process on the bus reading N bytes
through `RngClient` with 4 KiB buffers. Medians with [min-max]; the ratio is ours/QEMU's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from common import Cleanup, Daemon, dump_json, fmt, median, print_table, progress

BUS = "rngbench"
DEVICE = "rng0"
GUEST_CMD = ("echo 0 > /sys/class/misc/hw_random/rng_quality 2>/dev/null; "
             "read t0 rest < /proc/uptime; head -c {nbytes} /dev/hwrng | wc -c; "
             "read t1 rest < /proc/uptime; echo \"RNG $t0 $t1\"")


def guest_rate(cleanup: Cleanup, argv: list[str], env: dict, log: Path, nbytes: int, timeout: float) -> float:
    log.unlink(missing_ok=True)
    proc = cleanup.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        cleanup.kill(proc)
        raise RuntimeError(f"guest did not finish in {timeout} s") from None
    cleanup.procs.remove(proc)
    console = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(r"RNG ([\d.]+) ([\d.]+)", console)
    if proc.returncode or m is None or f"\n{nbytes}" not in console.replace("\r", ""):
        err = proc.stderr.read().decode(errors="replace")
        raise RuntimeError(f"guest run failed ({proc.returncode}):\n{console[-1500:]}\n{err[-1500:]}")
    proc.stderr.close()
    return nbytes / max(float(m.group(2)) - float(m.group(1)), 0.01)


def host_rate(daemon: Daemon, nbytes: int) -> float:
    code = ("import time; from alacrity import client\n"
            f"dev = client.connect().open({DEVICE!r})\n"
            f"t = time.monotonic(); n = len(dev.read({nbytes})); print(n / (time.monotonic() - t))")
    proc = subprocess.run(daemon.bus_exec(BUS, [sys.executable, "-c", code]), env=daemon.env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"client read failed: {proc.stderr[-1500:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="boots of each (3)")
    p.add_argument("--mib", type=float, default=1.0, help="MiB the guest reads per boot (1)")
    p.add_argument("--host-mib", type=float, default=64.0, help="MiB the host process reads (64)")
    p.add_argument("--timeout", type=float, default=300.0, help="per boot (300 s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()

    from alacrity.vm.image import default_image
    from alacrity.vm.machine import DEFAULT_MACHINE, virtio_device
    from alacrity.vm.qemu import VM, VmSpec

    nbytes = int(args.mib * (1 << 20))
    guest = default_image(progress=False)
    rates: dict[str, list[float]] = {"ours": [], "qemu": [], "host": []}
    with Cleanup(prefix="alacrity-rng-", keep=args.keep) as cleanup:
        daemon = Daemon(cleanup).start()
        daemon.sh(f"mkdir $A/devices/{DEVICE}; echo rng > $A/devices/{DEVICE}/type; mkdir $A/buses/{BUS}; "
                  f"ln -s ../../devices/{DEVICE} $A/buses/{BUS}/{DEVICE}")
        log = cleanup.root / "console.log"
        cmd = GUEST_CMD.format(nbytes=nbytes)
        for n in range(args.runs):
            for who in (("ours", "qemu") if n % 2 == 0 else ("qemu", "ours")):
                if who == "ours":
                    argv = [sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", BUS, "--cmd", cmd,
                            "--log", str(log), "--kernel", str(guest.kernel), "--initrd", str(guest.initrd)]
                else:
                    spec = VmSpec(name=f"rng-qemu-{n}", kernel=guest.kernel, initrd=guest.initrd, cmd=cmd,
                                  console=str(log), run_dir=cleanup.root / "vms" / f"qemu-{n}",
                                  devices=[["-object", "rng-random,id=r0,filename=/dev/urandom",
                                            *virtio_device("virtio-rng", DEFAULT_MACHINE, rng="r0")]])
                    spec.run_dir.mkdir(parents=True, exist_ok=True)
                    argv = VM(spec).command()
                rate = guest_rate(cleanup, argv, daemon.env, log, nbytes, args.timeout)
                rates[who].append(rate)
                progress(f"run {n + 1}/{args.runs} {who:4} {rate / 1e3:8.1f} kB/s")
            rates["host"].append(host_rate(daemon, int(args.host_mib * (1 << 20))))
            progress(f"run {n + 1}/{args.runs} host {rates['host'][-1] / 1e6:8.1f} MB/s")
            time.sleep(0.2)

    def spread(values: list[float], scale: float) -> str:
        return f"{median(values) / scale:.1f} [{min(values) / scale:.1f}-{max(values) / scale:.1f}]"

    result = {"bytes_per_s": rates, "ratio_guest": median(rates["ours"]) / median(rates["qemu"])}
    if args.json:
        dump_json(result)
        return 0
    print_table(f"rng, {args.runs} runs: guest reads {args.mib} MiB of /dev/hwrng; median [min-max]",
                ["reader", "ours", "QEMU virtio-rng (rng-random)", "ours/QEMU"],
                [["guest, kB/s", spread(rates["ours"], 1e3), spread(rates["qemu"], 1e3),
                  fmt(result["ratio_guest"], 2)],
                 ["host process (client), MB/s", spread(rates["host"], 1e6), "-", "-"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
