"""A guest's byte streams to and from the host over our vsock device, raw and through the
guest agent, against TCP over our switch and its tap uplink (iperf3), side by side, in the
same run with the same guest.

    python bench/vsock.py [--runs 3] [--mib 128] [--json]

One VM is started detached (`vm run --detach`) on a bus with a vsock device and a switch
whose uplink is a tap with an address on the host. bench/vsock_stream.c is built with
`gcc -O2 -static` into the bench's temp dir and put into the guest once. Each run moves MIB
MiB guest->host, then host->guest, with each of three contenders (their order rotates):
- raw: a plain AF_VSOCK stream. In the guest, vsock_stream (started through the agent)
  connects to the host (CID 2) and writes MIB MiB of zeros in 64 KiB writes, or reads to
  the end; on the host, a process on the bus takes the connection with
  `alacrity.client.vsock.Listener` and reads to the end, or writes MIB MiB, shuts its
  write side and waits for the guest to close. Both ends count the bytes.
- agent: the bytes go through the guest agent, as `alacrity vm exec` moves them:
  `dd if=/dev/zero bs=65536` streamed as the command's stdout (client.vm().exec with a
  sink), and MIB MiB fed as stdin to `dd of=/dev/null bs=65536`, which counts them. In
  the guest the bytes cross a pipe between dd and the agent, and the agent copies them
  to and from its vsock socket and frames them; under TCG that guest-side work, not the
  device, is what limits it (dd's pipe alone takes about half the guest's CPU).
- tcp: `iperf3 -c HOST -n BYTES` (MIB MiB) from the guest (run through the agent) to
  an `iperf3 -s` on the host, and `-R`, over our switch and the tap.
A run whose byte counts are not MIB MiB on both ends fails.

Host->guest trails guest->host on vsock. Linux 6.1's virtio-vsock driver posts 4 KiB
receive buffers, so every 4 KiB is a packet with its own work in the guest, and the guest
sends a CREDIT_UPDATE each time its reader drains the socket (about 8,300 packets back
for 128 MiB with vsock_stream's 64 KiB reads); TCP over virtio-net gets 64 KiB GSO frames.
For the raw and agent transfers the bench reads the guest's counters in the admin tree
(devices/vs0/guests/NAME: packets each way, kicks, calls) before and after, and prints
packets per direction, payload per data packet, and kicks and calls per packet (they
include the few packets of the agent session that starts vsock_stream).

Rates are MB/s (10^6) of payload as the receiver saw it, timed on the host: from the
accepted connection or the exec call to the end of the stream; medians with [min-max];
iperf3's receiver rate. The goal is vsock >= 1.0x TCP. Needs root, gcc with a static libc,
qemu and iperf3 on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, Cleanup, Daemon, median, print_table, progress

BUS, VM_NAME, DEVICE = "vs", "vsbench", "vs0"
HOST_IP, GUEST_IP = "10.77.0.254", "10.77.0.1"
PORT = 7000  # the host vsock port vsock_stream connects to
GUEST_PROGRAM = "/tmp/vsock_stream"
CONTENDERS = ("raw", "agent", "tcp")
DIRECTIONS = ("g2h", "h2g")
ARROW = {"g2h": "guest -> host", "h2g": "host -> guest"}
#: Counters of the guest's admin entry, read around the raw and agent transfers.
COUNTERS = ("packets_in", "packets_out", "bytes_to_host", "bytes_to_guest", "kicks", "calls")

#: Run on the bus (through `alacrity bus exec`): moves SIZE bytes one way with the raw or
#: agent contender once, checks both ends' counts, prints the seconds as JSON.
MEASURE = r"""
import json, os, socket, sys, threading, time
from alacrity import client
from alacrity.client.vsock import Listener

how, direction, size, name, program, port = sys.argv[1:7]
size, port = int(size), int(port)
guest = client.vm(name)
BLOCK = 1 << 16


def fail(msg):
    print(f"{how} {direction}: {msg}", file=sys.stderr)
    sys.exit(1)


def raw():
    argv = [program, "send", str(port), str(size)] if direction == "g2h" else [program, "recv", str(port)]
    done = {}

    def run():
        try:
            done["result"] = guest.exec(argv, timeout=600)
        except BaseException as exc:
            done["error"] = exc

    listener = Listener(guest.device_socket, port, name)
    try:
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                sock, _ = listener.accept(timeout=0.5)
                break
            except TimeoutError:
                if not runner.is_alive() or time.monotonic() > deadline:
                    fail(f"{program} in the guest did not connect: {done or 'still running'}")
        with sock:
            sock.settimeout(600)
            begun = time.monotonic()
            moved = 0
            if direction == "g2h":
                buf = bytearray(1 << 20)
                while n := sock.recv_into(buf):
                    moved += n
            else:
                block = memoryview(bytes(1 << 20))
                while moved < size:
                    n = min(size - moved, len(block))
                    sock.sendall(block[:n])
                    moved += n
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1):
                    fail("the guest sent bytes back")
            took = time.monotonic() - begun
    finally:
        listener.close()
    runner.join(120)
    result = done.get("result")
    if result is None:
        fail(f"exec of {program}: {done.get('error', 'did not return')}")
    if result.status != 0:
        fail(f"{program} exited {result.status}: {result.stderr.decode(errors='replace')[-500:]}")
    counted = result.stdout.decode().strip()
    if moved != size or counted != str(size):
        fail(f"moved {size} bytes? the host counted {moved}, the guest {counted!r}")
    return took


def agent():
    if direction == "g2h":
        got, err = [0], bytearray()

        def take(stream, data):
            if stream == 1:
                got[0] += len(data)
            else:
                err.extend(data[-2000:])

        begun = time.monotonic()
        result = guest.exec(["dd", "if=/dev/zero", f"bs={BLOCK}", f"count={size // BLOCK}"], sink=take,
                            timeout=600)
        took = time.monotonic() - begun
        if result.status != 0 or got[0] != size:
            fail(f"dd exited {result.status} after {got[0]} of {size} bytes: {err.decode(errors='replace')}")
        return took
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        block = memoryview(bytes(1 << 20))
        left = size
        while left:
            left -= os.write(w, block[:min(left, len(block))])
        os._exit(0)
    os.close(w)
    begun = time.monotonic()
    result = guest.exec(["dd", "of=/dev/null", f"bs={BLOCK}", "iflag=fullblock"], stdin=r, timeout=600)
    took = time.monotonic() - begun
    os.close(r)
    os.waitpid(pid, 0)
    stderr = result.stderr.decode(errors="replace")
    # With iflag=fullblock, every block but a short last one is full: "N+0 records in" is N * BLOCK bytes.
    if result.status != 0 or f"{size // BLOCK}+0 records in" not in stderr.splitlines():
        fail(f"dd exited {result.status}, did it read {size // BLOCK} blocks of {BLOCK}? {stderr}")
    return took


print(json.dumps({"seconds": raw() if how == "raw" else agent()}))
"""

#: Run on the bus: put the built vsock_stream into the guest.
PUT = """
import sys
from alacrity import client
with open(sys.argv[3], "rb") as f:
    client.vm(sys.argv[1]).put(sys.argv[2], f.read(), mode=0o755)
"""


def build_stream(dest: Path) -> Path:
    binary = dest / "vsock_stream"
    out = subprocess.run(
        ["gcc", "-O2", "-Wall", "-static", "-o", str(binary), str(BENCH_DIR / "vsock_stream.c")],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"cannot build vsock_stream (gcc -static needs libc6-dev):\n{out.stderr}")
    return binary


def run_ok(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    return proc


def guest_counters(daemon: Daemon) -> dict[str, int]:
    """The guest's entry in the admin tree: packets_in (guest -> host), packets_out, bytes,
    kicks (the guest's), calls (our interrupts)."""
    path = daemon.admin / "devices" / DEVICE / "guests" / VM_NAME
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in COUNTERS:
            values[key] = int(value)
    return values


def per_transfer(before: dict[str, int], after: dict[str, int], direction: str) -> dict[str, float]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    packets = delta["packets_in"] + delta["packets_out"]
    data_packets, data = ((delta["packets_in"], delta["bytes_to_host"]) if direction == "g2h"
                          else (delta["packets_out"], delta["bytes_to_guest"]))
    return {**delta, "bytes_per_data_packet": data / data_packets if data_packets else 0.0,
            "kicks_per_packet": delta["kicks"] / packets if packets else 0.0,
            "calls_per_packet": delta["calls"] / packets if packets else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=128, help="MiB per transfer (128)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (a daemon, a tap and a VM)")
    if args.runs < 1 or args.mib < 1:
        parser.error("--runs and --mib must be at least 1")
    from alacrity.vm.image import default_image

    image = default_image(progress=False)
    size = args.mib << 20
    tap = f"alvs{os.getpid() % 100000}"
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {f"{c}_{d}": [] for c in CONTENDERS for d in DIRECTIONS}
    counters: dict[str, list[dict[str, float]]] = {f"{c}_{d}": [] for c in ("raw", "agent")
                                                   for d in DIRECTIONS}
    with Cleanup(prefix="alacrity-vsock-") as cleanup:
        program = build_stream(cleanup.root)
        daemon = Daemon(cleanup).start()
        daemon.sh(f"""
            mkdir $A/buses/{BUS} $A/devices/{DEVICE} $A/devices/lan0
            echo vsock > $A/devices/{DEVICE}/type
            echo switch > $A/devices/lan0/type
            echo {tap} > $A/devices/lan0/uplink
            ln -s ../../devices/{DEVICE} $A/buses/{BUS}/{DEVICE}
            ln -s ../../devices/lan0 $A/buses/{BUS}/lan0
        """)
        # The tap goes with the switch's fd; this is in case it did not.
        cleanup.callbacks.append(lambda: subprocess.run(["ip", "link", "del", tap], capture_output=True))
        run_ok(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], "ip addr add")
        cli = [sys.executable, *daemon.cli()]
        progress(f"booting {VM_NAME} (TCG)")
        run_ok([*cli, "vm", "run", "--bus", BUS, "--name", VM_NAME, "--detach", "--ip", f"{GUEST_IP}/24",
                "--kernel", str(image.kernel), "--initrd", str(image.initrd)], "vm run", env=daemon.env,
               timeout=300)
        cleanup.callbacks.append(lambda: subprocess.run([*cli, "vm", "stop", VM_NAME], env=daemon.env,
                                                        capture_output=True, timeout=60))
        run_ok(daemon.bus_exec(BUS, [sys.executable, "-c", PUT, VM_NAME, GUEST_PROGRAM, str(program)]),
               f"putting vsock_stream into {VM_NAME}", env=daemon.env, timeout=300)
        cleanup.popen(["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

        def vsock(how: str, direction: str) -> float:
            before = guest_counters(daemon)
            measured = run_ok(daemon.bus_exec(BUS, [sys.executable, "-c", MEASURE, how, direction, str(size),
                                                    VM_NAME, GUEST_PROGRAM, str(PORT)]),
                              f"vsock {how} {direction}", env=daemon.env, timeout=900)
            counters[f"{how}_{direction}"].append(per_transfer(before, guest_counters(daemon), direction))
            return size / json.loads(measured.stdout.strip().splitlines()[-1])["seconds"] / 1e6

        def tcp(direction: str) -> float:
            reverse = ["-R"] if direction == "h2g" else []
            out = run_ok([*cli, "vm", "exec", VM_NAME, "--", "iperf3", "-c", HOST_IP, "-n", str(size), "-J",
                          *reverse], f"iperf3 {direction}", env=daemon.env, timeout=900)
            received = json.loads(out.stdout)["end"]["sum_received"]
            if received["bytes"] < size:
                raise RuntimeError(f"iperf3 {direction}: {received['bytes']} bytes received, not {size}")
            return received["bits_per_second"] / 8 / 1e6

        for run in range(args.runs):
            for i, direction in enumerate(DIRECTIONS):
                shift = (run * len(DIRECTIONS) + i) % len(CONTENDERS)
                for how in CONTENDERS[shift:] + CONTENDERS[:shift]:
                    rate = tcp(direction) if how == "tcp" else vsock(how, direction)
                    rates[f"{how}_{direction}"].append(rate)
            progress(f"run {run + 1}/{args.runs}: "
                     + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " MB/s")

    stats = {k: {"median": median(v), "min": min(v), "max": max(v), "samples": [round(x, 2) for x in v]}
             for k, v in rates.items()}
    ratios = {f"{how}_{d}": median(rates[f"{how}_{d}"]) / median(rates[f"tcp_{d}"])
              for how in ("raw", "agent") for d in DIRECTIONS}
    notes = {k: {field: median([c[field] for c in v]) for field in v[0]} for k, v in counters.items()}
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(), "guest": "TCG (microvm, 1 vCPU)",
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if args.json:
        print(json.dumps({"mib": args.mib, "runs": args.runs, "rates_mb_s": stats, "ratio_to_tcp": ratios,
                          "counters_median": notes, "machine": machine}, indent=1))
        return 0

    def cell(key: str) -> str:
        values = rates[key]
        return f"{median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"

    print_table(f"{args.mib} MiB streams, MB/s, median [min-max] of {args.runs} (TCG guest, "
                f"{os.cpu_count()} cores); goal vsock/TCP >= 1.0",
                ["direction", "vsock raw", "vsock, agent (vm exec)", "TCP (iperf3, switch + tap)", "raw/TCP",
                 "agent/TCP"],
                [[ARROW[d], cell(f"raw_{d}"), cell(f"agent_{d}"), cell(f"tcp_{d}"),
                  f"{ratios[f'raw_{d}']:.2f}x", f"{ratios[f'agent_{d}']:.2f}x"] for d in DIRECTIONS])
    print_table(f"vsock device counters per {args.mib} MiB transfer (median; guest entry in the admin tree)",
                ["transfer", "packets g->h", "packets h->g", "bytes/data packet", "kicks/packet",
                 "calls/packet"],
                [[f"{how} {ARROW[d]}", f"{n['packets_in']:.0f}", f"{n['packets_out']:.0f}",
                  f"{n['bytes_per_data_packet']:.0f}", f"{n['kicks_per_packet']:.3f}",
                  f"{n['calls_per_packet']:.3f}"]
                 for key, n in notes.items() for how, d in [key.split("_")]])
    print(f"\nload average {load_before[0]:.2f} before, {machine['loadavg_after'][0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
