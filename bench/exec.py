"""Round-trip time of one command in a running guest: `alacrity vm exec NAME -- true`
(through the vsock device and the guest agent) against `ssh root@GUEST true` to the same
guest (dropbear, over our switch and its tap uplink).

    python bench/exec.py [--runs 100] [--warmup 3] [--json]

One VM is started detached (`vm run --detach`) on a bus with a vsock device and a switch
whose uplink is a tap with an address on the host. Its initramfs is the default image's
with a second archive appended (Linux unpacks concatenated archives in turn): dropbear
from the host's `dropbear-bin` package with its libraries, a host key, /etc/passwd and a
throwaway client key in root's authorized_keys. The default image is not changed.
dropbear is started in the guest through `vm exec` once the agent answers.

Each round times, in turn (the order rotates every round; the first --warmup rounds are
thrown away), each a full command run from here and waited for:
- cli: `alacrity vm exec NAME -- true`, the console script, as a user runs it;
- ssh: `ssh root@GUEST true`, a new connection each time (host key exchange, public key
  authentication, a session channel);
- api: `client.vm(NAME).exec(["true"])`, one call in a Python process that stays up (on
  the bus; each call connects to the agent anew);
- ssh-mux: `ssh root@GUEST true` through a ControlMaster connection opened once (a new
  session channel on it), the persistent-connection peer of `api`;
- python: `python -c pass`, for reference: what starting the interpreter costs here.
Figures are milliseconds: median, p99 (nearest rank), min, max. Needs root, qemu, and
dropbear-bin and openssh-client on the host (`apt-get install dropbear-bin
openssh-client`, or bench/install-peers).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import Cleanup, Daemon, dump_json, median, print_table, progress

BUS, VM_NAME = "ex", "exbench"
HOST_IP, GUEST_IP = "10.78.0.254", "10.78.0.1"
DROPBEAR = Path("/usr/sbin/dropbear")
HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"
CONTENDERS = ("cli", "ssh", "api", "ssh-mux", "python")
#: (label, ours, peer): the ratios reported.
RATIOS = (("cli / ssh", "cli", "ssh"), ("cli / ssh-mux", "cli", "ssh-mux"),
          ("api / ssh-mux", "api", "ssh-mux"), ("api / ssh", "api", "ssh"))

#: Run on the bus (through `alacrity bus exec`): one `exec(["true"])` per line read,
#: answering with its time in seconds.
API_LOOP = """
import sys, time
from alacrity import client
guest = client.vm(sys.argv[1])
for _ in sys.stdin:
    begun = time.perf_counter()
    result = guest.exec(["true"], timeout=120)
    took = time.perf_counter() - begun
    ok = result.status == 0 and not result.stdout and not result.stderr
    print(f"{took:.9f}" if ok else f"error {result!r}", flush=True)
"""


def p99(values: list[float]) -> float:
    """Nearest rank: of 100 samples, the 99th smallest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def missing_tools() -> list[str]:
    wanted = {"dropbear-bin": [str(DROPBEAR), "dropbearkey"], "openssh-client": ["ssh", "ssh-keygen"]}
    return [pkg for pkg, tools in wanted.items() if not all(shutil.which(t) for t in tools)]


def run_ok(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    return proc


def dropbear_archive(path: Path, tmp: Path) -> Path:
    """An extra gzip'd newc archive with dropbear, its libraries, a host key, root's
    account and a throwaway client key in its authorized_keys; returns the client key."""
    from alacrity.vm.cpio import CpioWriter, open_gzip
    from alacrity.vm.initramfs import shared_libraries

    host_key, client_key = tmp / "host_key", tmp / "id_ed25519"
    run_ok(["dropbearkey", "-t", "ed25519", "-f", str(host_key)], "dropbearkey")
    run_ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alacrity-bench", "-f", str(client_key)],
           "ssh-keygen")
    with open_gzip(str(path)) as out:
        cpio = CpioWriter(out)
        cpio.file(str(DROPBEAR), DROPBEAR.read_bytes(), mode=0o755)
        for lib in shared_libraries(DROPBEAR):  # the same paths as on the host, like iperf3's
            cpio.file(str(lib), lib.resolve().read_bytes(), mode=0o755)
        cpio.directory("etc/dropbear", mode=0o700)
        cpio.file(HOST_KEY, host_key.read_bytes(), mode=0o600)
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("etc/shells", b"/bin/sh\n")  # dropbear refuses a shell not listed there
        cpio.file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\n")
        cpio.directory("root", mode=0o700)
        cpio.directory("root/.ssh", mode=0o700)
        cpio.file("root/.ssh/authorized_keys", (tmp / "id_ed25519.pub").read_bytes(), mode=0o600)
        cpio.close()
    return client_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="samples of each (100)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds thrown away first (3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (a daemon, a tap and a VM)")
    if missing := missing_tools():
        print(f"exec.py: dropbear and ssh are needed on the host: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 2
    from alacrity.vm.image import default_image

    image = default_image(progress=False)
    tap = f"alex{os.getpid() % 100000}"
    # The console script next to this interpreter, as a user runs `alacrity` (not pyenv's
    # bash shim in front of it); `python -m alacrity.cli` where there is none.
    script = Path(sys.executable).parent / "alacrity"
    load_before = os.getloadavg()
    with Cleanup(prefix="alacrity-exec-") as cleanup:
        tmp = cleanup.root / "ssh"
        tmp.mkdir(mode=0o700)
        extra = cleanup.root / "dropbear.cpio.gz"
        client_key = dropbear_archive(extra, tmp)
        initrd = cleanup.root / "initrd.img"
        with open(initrd, "wb") as out:
            out.write(image.initrd.read_bytes())
            out.write(extra.read_bytes())
        initrd.chmod(0o644)  # the guest's jailed QEMU (its own uid) reads it

        daemon = Daemon(cleanup).start()
        daemon.sh(f"""
            mkdir $A/buses/{BUS} $A/devices/vs0 $A/devices/lan0
            echo vsock > $A/devices/vs0/type
            echo switch > $A/devices/lan0/type
            echo {tap} > $A/devices/lan0/uplink
            ln -s ../../devices/vs0 $A/buses/{BUS}/vs0
            ln -s ../../devices/lan0 $A/buses/{BUS}/lan0
        """)
        # The tap goes with the switch's fd; this is in case it did not.
        cleanup.callbacks.append(lambda: subprocess.run(["ip", "link", "del", tap], capture_output=True))
        run_ok(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], "ip addr add")
        cli = [sys.executable, *daemon.cli()]
        alacrity = [str(script)] if script.exists() else cli
        progress(f"booting {VM_NAME} (TCG) with dropbear appended to the default initramfs")
        run_ok([*cli, "vm", "run", "--bus", BUS, "--name", VM_NAME, "--detach", "--ip", f"{GUEST_IP}/24",
                "--kernel", str(image.kernel), "--initrd", str(initrd)], "vm run", env=daemon.env,
               timeout=300)
        cleanup.callbacks.append(lambda: subprocess.run([*cli, "vm", "stop", VM_NAME], env=daemon.env,
                                                        capture_output=True, timeout=60))
        run_ok([*cli, "vm", "exec", VM_NAME, "--", str(DROPBEAR), "-r", HOST_KEY, "-p", "22", "-s",
                "-P", "/run/dropbear.pid"], "starting dropbear in the guest", env=daemon.env, timeout=120)

        ssh = ["ssh", "-F", "/dev/null", "-i", str(client_key), "-o", "IdentitiesOnly=yes", "-o",
               "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=60"]
        deadline = time.monotonic() + 120
        while subprocess.run([*ssh, f"root@{GUEST_IP}", "true"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                run_ok([*ssh, "-v", f"root@{GUEST_IP}", "true"], "ssh to the guest")
            time.sleep(1)
        control = tmp / "mux.sock"
        cleanup.popen([*ssh, "-M", "-S", str(control), "-o", "ControlPersist=no", "-N",
                       f"root@{GUEST_IP}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while subprocess.run(["ssh", "-S", str(control), "-O", "check", "x"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the ssh ControlMaster connection did not come up")
            time.sleep(0.2)
        api = cleanup.popen(daemon.bus_exec(BUS, [sys.executable, "-c", API_LOOP, VM_NAME]),
                            env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
            begun = time.perf_counter()
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120)
            took = time.perf_counter() - begun
            if proc.returncode != 0 or proc.stdout or proc.stderr:
                raise RuntimeError(f"{argv[:3]}... gave {proc.returncode}: {proc.stdout!r} {proc.stderr!r}")
            return took

        def api_call() -> float:
            assert api.stdin is not None and api.stdout is not None
            api.stdin.write("\n")
            api.stdin.flush()
            line = api.stdout.readline().strip()
            if not line or line.startswith("error"):
                raise RuntimeError(f"client.vm().exec failed: {line or 'the process ended'}")
            return float(line)

        measure = {
            "cli": lambda: timed([*alacrity, "vm", "exec", VM_NAME, "--", "true"], daemon.env),
            "ssh": lambda: timed([*ssh, f"root@{GUEST_IP}", "true"]),
            "api": api_call,
            "ssh-mux": lambda: timed([*ssh, "-S", str(control), "-o", "ControlMaster=no",
                                      f"root@{GUEST_IP}", "true"]),
            "python": lambda: timed([sys.executable, "-c", "pass"]),
        }
        samples: dict[str, list[float]] = {k: [] for k in CONTENDERS}
        progress(f"{args.warmup} warm-up rounds, then {args.runs}: {', '.join(CONTENDERS)}, rotating")
        for rnd in range(args.warmup + args.runs):
            shift = rnd % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                took = measure[name]()
                if rnd >= args.warmup:
                    samples[name].append(took * 1000)
            if rnd >= args.warmup and (rnd - args.warmup + 1) % 10 == 0:
                progress(f"{rnd - args.warmup + 1}/{args.runs}: median ms "
                         + ", ".join(f"{k} {median(v):.1f}" for k, v in samples.items()))
        api.stdin.close()  # type: ignore[union-attr]

    stats = {k: {"median_ms": median(v), "p99_ms": p99(v), "min_ms": min(v), "max_ms": max(v),
                 "samples_ms": [round(x, 3) for x in v]} for k, v in samples.items()}
    ratios = {label: {"median": stats[a]["median_ms"] / stats[b]["median_ms"],
                      "p99": stats[a]["p99_ms"] / stats[b]["p99_ms"]} for label, a, b in RATIOS}
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(), "guest": "TCG (microvm, 1 vCPU)",
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "alacrity_cli": " ".join(alacrity)}
    if args.json:
        dump_json({"runs": args.runs, "warmup": args.warmup, "stats": stats, "ratios": ratios,
                   "machine": machine})
        return 0
    labels = {"cli": "alacrity vm exec NAME -- true", "ssh": "ssh root@GUEST true (new connection)",
              "api": "client.vm(NAME).exec(['true'])", "ssh-mux": "ssh (ControlMaster) root@GUEST true",
              "python": "python -c pass (reference)"}
    print_table(f"`true` in the guest, ms over {args.runs} rounds (TCG guest, {os.cpu_count()} cores)",
                ["command", "median", "p99", "min", "max"],
                [[labels[k], *(f"{stats[k][f]:.1f}" for f in ("median_ms", "p99_ms", "min_ms", "max_ms"))]
                 for k in CONTENDERS])
    print_table("ours / peer", ["ratio", "median", "p99"],
                [[label, f"{r['median']:.2f}x", f"{r['p99']:.2f}x"] for label, r in ratios.items()])
    print(f"\nload average {load_before[0]:.2f} before, {machine['loadavg_after'][0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
