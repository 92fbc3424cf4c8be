"""A guest's byte streams to and from the host: over our vsock device (through the guest
agent, as `alacrity vm exec` moves them) against TCP over our switch and its tap uplink
(iperf3), side by side, with the same guest.

    python bench/vsock.py [--runs 3] [--mib 128]

One VM is started detached (`vm run --detach`) on a bus with a vsock device and a switch
whose uplink is a tap with an address on the host. Each run, in turn:
- vsock guest->host: `dd` of MIB MiB of zeros from the guest's /dev/zero in 64 KiB blocks,
  read by this process through the agent (client.vm().exec, output streamed); host->guest:
  MIB MiB of stdin into `dd of=/dev/null`, which counts the blocks. (dd, not busybox's
  head or wc: those move 6 MB/s of their own under TCG and would be what is measured);
- TCP: `iperf3 -c HOST -n MIB` from the guest to an `iperf3 -s` on the host, and `-R`.
Rates are MB/s (10^6) of payload as the receiver saw it; medians with [min-max]; the goal
is vsock >= 1.0x TCP. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from common import Cleanup, Daemon, median, print_table, progress

BUS, VM_NAME = "vs", "vsbench"
HOST_IP, GUEST_IP = "10.77.0.254", "10.77.0.1"

#: Run on the bus (through `alacrity bus exec`): times both vsock directions once.
MEASURE = """
import json, os, sys, time
from alacrity import client
size = int(sys.argv[1])
guest = client.vm(sys.argv[2])
got = [0]
def take(stream, data):
    if stream == 1:
        got[0] += len(data)
begun = time.monotonic()
result = guest.exec(["dd", "if=/dev/zero", "bs=65536", f"count={size // 65536}"], sink=take,
                    timeout=600)
out_s = time.monotonic() - begun
assert result.status == 0 and got[0] == size, (result, got)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    block = bytes(1 << 16)
    left = size
    while left:
        left -= os.write(w, block[:min(left, len(block))])
    os._exit(0)
os.close(w)
begun = time.monotonic()
result = guest.exec(["dd", "of=/dev/null", "bs=65536", "iflag=fullblock"], stdin=r, timeout=600)
in_s = time.monotonic() - begun
os.waitpid(pid, 0)
assert result.status == 0 and f"{size // 65536}+0 records in".encode() in result.stderr, result
print(json.dumps({"guest_to_host": size / out_s / 1e6, "host_to_guest": size / in_s / 1e6}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=128, help="MiB per transfer (128)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (a daemon, a tap and a VM)")
    from alacrity.vm.image import default_image

    image = default_image(progress=False)
    size = args.mib << 20
    tap = f"alvs{os.getpid() % 100000}"
    with Cleanup(prefix="alacrity-vsock-") as cleanup:
        daemon = Daemon(cleanup).start()
        daemon.sh(f"""
            mkdir $A/buses/{BUS} $A/devices/vs0 $A/devices/lan0
            echo vsock > $A/devices/vs0/type
            echo switch > $A/devices/lan0/type
            echo {tap} > $A/devices/lan0/uplink
            ln -s ../../devices/vs0 $A/buses/{BUS}/vs0
            ln -s ../../devices/lan0 $A/buses/{BUS}/lan0
        """)
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
        cli = [sys.executable, *daemon.cli()]
        started = subprocess.run([*cli, "vm", "run", "--bus", BUS, "--name", VM_NAME, "--detach", "--ip",
                                  f"{GUEST_IP}/24", "--kernel", str(image.kernel), "--initrd",
                                  str(image.initrd)], env=daemon.env, capture_output=True, text=True,
                                 timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"vm run failed: {started.stderr}")
        cleanup.callbacks.append(lambda: subprocess.run([*cli, "vm", "stop", VM_NAME], env=daemon.env,
                                                        capture_output=True, timeout=60))
        server = cleanup.popen(["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rates: dict[str, list[float]] = {k: [] for k in ("vsock_g2h", "vsock_h2g", "tcp_g2h", "tcp_h2g")}
        for run in range(args.runs):
            measure = daemon.bus_exec(BUS, [sys.executable, "-c", MEASURE, str(size), VM_NAME])
            measured = subprocess.run(measure, env=daemon.env, capture_output=True, text=True, timeout=900)
            if measured.returncode != 0:
                raise RuntimeError(f"vsock run failed: {measured.stderr[-2000:]}")
            got = json.loads(measured.stdout.strip().splitlines()[-1])
            rates["vsock_g2h"].append(got["guest_to_host"])
            rates["vsock_h2g"].append(got["host_to_guest"])
            for key, reverse in (("tcp_g2h", []), ("tcp_h2g", ["-R"])):
                out = subprocess.run([*cli, "vm", "exec", VM_NAME, "--", "iperf3", "-c", HOST_IP, "-n",
                                      str(size), "-f", "m", *reverse], env=daemon.env, capture_output=True,
                                     text=True, timeout=900)
                found = re.findall(r"([\d.]+) Mbits/sec.*receiver", out.stdout)
                if out.returncode != 0 or not found:
                    raise RuntimeError(f"iperf3 failed: {out.stdout[-1500:]} {out.stderr[-500:]}")
                rates[key].append(float(found[-1]) / 8)  # Mbit/s -> MB/s
            progress(f"run {run + 1}/{args.runs}: "
                     + ", ".join(f"{k} {v[-1]:.1f} MB/s" for k, v in rates.items()))
        cleanup.kill(server)

    def cell(key: str) -> str:
        values = rates[key]
        return f"{median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"

    result = {k: {"median": median(v), "min": min(v), "max": max(v)} for k, v in rates.items()}
    result["ratio"] = {"guest_to_host": median(rates["vsock_g2h"]) / median(rates["tcp_g2h"]),
                       "host_to_guest": median(rates["vsock_h2g"]) / median(rates["tcp_h2g"])}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print_table(f"{args.mib} MiB streams, MB/s, median [min-max] of {args.runs} (TCG guest)",
                ["direction", "vsock (agent)", "TCP over the switch + tap", "vsock/TCP (goal >= 1.0)"],
                [["guest -> host", cell("vsock_g2h"), cell("tcp_g2h"),
                  f"{result['ratio']['guest_to_host']:.2f}x"],
                 ["host -> guest", cell("vsock_h2g"), cell("tcp_h2g"),
                  f"{result['ratio']['host_to_guest']:.2f}x"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
