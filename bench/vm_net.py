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

Runs alternate (`--runs` each); medians are reported, with ours/bridge ratios (goals:
throughput >= 1.0x, RTT <= 1.0x), and the switch's notifications per packet.

    python bench/vm_net.py [--runs 2] [--seconds 5] [--json out.json]
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
from pathlib import Path

from common import Cleanup, fmt, median, print_table, progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from alacrity.devices import Slot  # noqa: E402
from alacrity.devices.switch import SwitchDevice  # noqa: E402
from alacrity.switch.launcher import SwitchProcess  # noqa: E402
from alacrity.virtio.net import local_mac  # noqa: E402
from alacrity.vm.image import default_image  # noqa: E402
from alacrity.vm.qemu import VM, VmSpec  # noqa: E402

SERVER_IP, CLIENT_IP = "10.55.0.1", "10.55.0.2"
SERVER_CMD = "iperf3 -s >/dev/null 2>&1 & sleep 3600"


def client_cmd(seconds: int, pings: int) -> str:
    return (
        f"for i in $(seq 100); do ping -c 1 -W 1 {SERVER_IP} >/dev/null 2>&1 && break; done; sleep 1; "
        f"ping -q -c {pings} -i 0.2 {SERVER_IP} | tail -1; "
        f"iperf3 -c {SERVER_IP} -t {seconds} -f m | grep receiver; "
        f"iperf3 -c {SERVER_IP} -t {seconds} -f m -R | grep receiver"
    )


def parse(console: str) -> dict[str, float]:
    """RTT avg (ms) and the two receiver-side Mbit/s figures from B's console."""
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", console)
    rates = re.findall(r"([\d.]+) Mbits/sec\s.*receiver", console)
    if rtt is None or len(rates) != 2:
        raise RuntimeError(f"unexpected guest output:\n{console[-2000:]}")
    return {"rtt_ms": float(rtt.group(1)), "b_to_a_mbit": float(rates[0]), "a_to_b_mbit": float(rates[1])}


def run_pair(c: Cleanup, tag: str, nets: list[list[str]],
             image, seconds: int, pings: int, sample=None) -> dict[str, float]:
    """Boot the pair, let B finish; B's figures, plus `sample()`'s while both still run."""
    logs = [c.root / f"{tag}-{side}.log" for side in ("a", "b")]
    roles = (("a", SERVER_CMD, SERVER_IP), ("b", client_cmd(seconds, pings), CLIENT_IP))
    specs = [
        VmSpec(name=f"bench-{tag}-{side}-{os.getpid()}", kernel=image.kernel, initrd=image.initrd, cmd=cmd,
               console=log, ip=f"{ip}/24", devices=[net], run_dir=c.root / f"{tag}-{side}")
        for (side, cmd, ip), log, net in zip(roles, logs, nets, strict=True)
    ]
    vms = [VM(spec) for spec in specs]
    try:
        for vm in vms:
            vm.start()
        vms[1].wait_exit(timeout=120 + 4 * seconds)
        got = parse(logs[1].read_text(errors="replace"))
        if sample is not None:
            got.update(sample())
        return got
    finally:
        for vm in vms:
            vm.kill()


class SwitchRig:
    """Our switch process, fed every connection made to its per-VM sockets."""

    def __init__(self, c: Cleanup) -> None:
        with open(c.root / "switch.log", "ab") as log:
            self.switch = SwitchProcess("bench", log_file=log)
        self.ctl = self.switch.control
        self.listeners = []
        self.stopping = False

    def socket_for(self, path: Path, label: str) -> str:
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(str(path))
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
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (taps and a bridge are made for the baseline)")
    image = default_image(progress=False)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "bridge": []}
    with Cleanup(prefix="alacrity-vmnet-") as c:
        tag = str(os.getpid() % 10000)
        _, taps = make_bridge(c, tag)
        rig = SwitchRig(c)
        c.callbacks.append(rig.close)
        socks = [rig.socket_for(c.root / f"vm{side}.sock", f"vm-{side}") for side in ("a", "b")]
        for run in range(args.runs):
            for kind in ("ours", "bridge"):
                progress(f"run {run + 1}/{args.runs}: {kind}")
                macs = [local_mac(f"{kind}{run}{side}") for side in ("a", "b")]
                if kind == "ours":
                    nets = [SwitchDevice.qemu_args(Slot("lan", str(sock), "mmio", "vm", "n0", 0,
                                                        {"mac": mac}))
                            for sock, mac in zip(socks, macs, strict=True)]
                else:
                    nets = [["-netdev", f"tap,id=t0,ifname={tap},script=no,downscript=no,vhost=off",
                             "-device", f"virtio-net-device,netdev=t0,mac={mac}"]
                            for tap, mac in zip(taps, macs, strict=True)]
                got = run_pair(c, f"{kind}{run}", nets, image, args.seconds, args.pings,
                               rig.signals if kind == "ours" else None)
                progress(f"  {got}")
                results[kind].append(got)
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for key, label, better in (("b_to_a_mbit", "TCP B->A, Mbit/s", "higher"),
                               ("a_to_b_mbit", "TCP A->B, Mbit/s", "higher"),
                               ("rtt_ms", "ping RTT avg, ms", "lower")):
        ours = median([r[key] for r in results["ours"]])
        bridge = median([r[key] for r in results["bridge"]])
        summary[key] = {"ours": ours, "bridge": bridge, "ratio": ours / bridge if bridge else float("nan")}
        rows.append([label, fmt(ours), fmt(bridge), f"{ours / bridge:.2f}x" if bridge else "-", better])
    header = ["what", "ours (switch)", "Linux bridge + tap", "ours/bridge", "better"]
    print_table("VM to VM (medians)", header, rows)
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
