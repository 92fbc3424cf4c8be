"""Real QEMU guests (TCG) on a switch: vhost-user-net NICs, ping and iperf3 between VMs,
a host NetClient talking ARP and ICMP with a guest kernel, and a VM killed mid-transfer.

How a VM NIC reaches the switch is the `Lan` fixture alone: today a standalone switch
process, fed each connection QEMU makes to a socket of ours (as alacrityd's gate does).
The guests are driven over a second serial port (ttyS1) carrying a shell, so three VMs
boot once for the whole module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity.client.net import NetClient
from alacrity.devices import Slot
from alacrity.devices.switch import SwitchDevice
from alacrity.switch.launcher import SwitchProcess
from alacrity.virtio.net import check_mac, local_mac
from alacrity.vm.machine import machine
from alacrity.vm.qemu import QEMU, VM, VmSpec, build_command, check_network
from alacrity.vm.runtime import VmError
from tests import packets


@dataclasses.dataclass(frozen=True)
class NetAttachment:
    """A NIC on a switch port's socket, as a switch device on a bus gives a VM."""

    socket: str | Path
    mac: str


def nic_devices(nics: list[NetAttachment], machine_name: str = "microvm") -> list[list[str]]:
    transport = machine(machine_name).transport
    return [SwitchDevice.qemu_args(Slot("lan", str(nic.socket), transport, "vm", f"net{i}", i,
                                        {"mac": nic.mac}))
            for i, nic in enumerate(nics)]


needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")
NET = "10.77.0"
HOST_IP = f"{NET}.99"


# virtio-net feature bits (virtio 1.1, 5.1.3), as the guest's sysfs `features` string shows them.
F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_HOST_TSO4, F_MRG_RXBUF = 0, 1, 7, 11, 15
NO_GUEST_OFFLOADS = [["-global", f"virtio-net-device.{prop}=off"]
                     for prop in ("guest_csum", "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo")]


# --- how a VM NIC reaches the switch ----------------------------------------------------

class Lan:
    """One switch process and the sockets its VMs' QEMUs connect to. `attach(label)` gives
    a NIC for a VmSpec; every connection made to it becomes a switch port (with the NIC's
    MAC and QEMU's pid), as the gate does for a switch device on a bus. To run these tests
    on alacrityd's switch devices instead, this class is the one thing to replace (the
    guests would then be started in the bus, e.g. by `alacrity vm run`)."""

    def __init__(self, root: Path, *, offloads: bool = True) -> None:
        self.root = root
        self.log = root / "switch.log"
        with open(self.log, "ab") as log:
            self.switch = SwitchProcess("lan", offloads=offloads, log_file=log, timeout=10.0)
        self.ctl = self.switch.control
        self.listeners: list[socket.socket] = []
        self.clients: list[NetClient] = []
        self.errors: list[str] = []

    def attach(self, label: str) -> NetAttachment:
        path = self.root / f"{label}.net.sock"
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(4)
        self.listeners.append(listener)
        mac = local_mac(f"{self.root}/{label}")
        threading.Thread(target=self._accept, args=(listener, label, mac), daemon=True).start()
        return NetAttachment(path, mac)

    def _accept(self, listener: socket.socket, label: str, mac: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with conn:
                pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                try:
                    self.ctl.add_port(conn.fileno(), mac=mac, label=label, peer_pid=pid)
                except (OSError, RuntimeError) as exc:
                    self.errors.append(f"{label}: {exc}")

    def host_nic(self) -> NetClient:
        """A port driven by this process."""
        ours, theirs = socket.socketpair()
        with ours:
            self.ctl.add_port(ours.fileno(), label="host", peer_pid=os.getpid())
        nic = NetClient(theirs, timeout=5)
        self.clients.append(nic)
        return nic

    def ports(self) -> dict[str, dict]:
        """The switch's ports by label."""
        return {p["label"]: p for p in self.ctl.stats()["ports"]}

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met in {timeout}s; port errors {self.errors}\n"
                                     f"{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        for nic in self.clients:
            nic.close()
        for listener in self.listeners:
            close_listener(listener)
        self.switch.stop()


def close_listener(listener: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its accept()."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


# --- guests driven over ttyS1 ---------------------------------------------------------------

# The guest's /init runs this as its command: a non-interactive shell reading ttyS1.
# Input that arrives while no process has the tty open is dropped, so fd 3 holds it open;
# `tr` (not `cat`, whose sendfile() from a tty waits for more) feeds the shell.
SHELL_CMD = ("exec 3<>/dev/ttyS1 && stty raw -echo <&3 && echo @@hello@@ >&3 && "
             "tr -d '\\r' <&3 | sh >&3 2>&3")


class Guest:
    """A booted VM, and a shell in it: `run(script)` gives (status, output)."""

    _tokens = itertools.count()

    def __init__(self, root: Path, image, name: str, ip: str, nics: list[NetAttachment],
                 extra: list[list[str]] | None = None) -> None:
        self.name = name
        self.ip = ip
        self.mac = nics[0].mac if nics else ""
        self.shell_path = root / f"{name}.sh.sock"
        self.console = root / f"{name}.console"
        self.vm = VM(VmSpec(
            f"vmnet-{name}-{os.getpid()}", image.kernel, image.initrd, console=self.console,
            cmd=SHELL_CMD, ip=f"{ip}/24", run_dir=root / f"{name}.run",
            devices=[*nic_devices(nics),
                     ["-chardev", f"socket,id=sh,path={self.shell_path},server=on,wait=off",
                      # microvm makes one serial port; this one is COM2.
                      "-device", "isa-serial,chardev=sh,iobase=0x2f8,irq=3"], *(extra or [])]))
        self.sock: socket.socket | None = None
        self.buffer = b""

    def start(self) -> Guest:
        """Start QEMU and connect to its COM2 socket before the guest can write to it."""
        self.vm.start()
        deadline = time.monotonic() + 30
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.shell_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline or self.vm.proc.poll() is not None:  # type: ignore[union-attr]
                    raise AssertionError(f"{self.name}: QEMU made no {self.shell_path}") from None
                time.sleep(0.02)
        self.sock = sock
        return self

    def connect(self, timeout: float = 120.0) -> None:
        """Wait for the guest's shell (its hello comes after stty, so no input is lost)."""
        self.vm.wait_ready(timeout)
        self._read_until(re.compile(rb"@@hello@@\n"), timeout, "the shell's hello")

    def run(self, script: str, timeout: float = 30.0) -> tuple[int, str]:
        assert self.sock is not None, "not connected"
        token = f"@@{next(self._tokens)}@@"
        self.sock.sendall(f"{script}\necho; echo \"{token} $?\"\n".encode())
        out, m = self._read_until(re.compile(rf"\n{re.escape(token)} (\d+)\n".encode()), timeout, script)
        return int(m.group(1)), out.decode(errors="replace")

    def _read_until(self, marker: re.Pattern[bytes], timeout: float, what: str) -> tuple[bytes, re.Match]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while not (m := marker.search(self.buffer)):
            left = deadline - time.monotonic()
            if left <= 0 or self.vm.proc is None or self.vm.proc.poll() is not None:
                raise AssertionError(f"{self.name}: no answer to {what!r} in {timeout}s; got "
                                     f"{self.buffer[-2000:]!r}\n{self.vm.console.tail()}")
            self.sock.settimeout(min(left, 0.5))
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(65536)
                if not data:
                    raise AssertionError(f"{self.name}: shell socket closed")
                self.buffer += data
        out, self.buffer = self.buffer[: m.start()], self.buffer[m.end():]
        return out, m

    def ok(self, script: str, timeout: float = 30.0) -> str:
        status, out = self.run(script, timeout)
        assert status == 0, f"{self.name}: {script!r} exited {status}:\n{out}"
        return out

    def kill(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.vm.kill()


def boot(guests: list[Guest]) -> None:
    """Start every guest, then wait for all: they boot in parallel."""
    for g in guests:
        g.start()
    for g in guests:
        g.connect()


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    lan = Lan(tmp_path_factory.mktemp("lan"))
    try:
        yield lan
    finally:
        lan.close()


@pytest.fixture(scope="module")
def trio(lan: Lan, guest_image) -> Iterator[dict[str, Guest]]:
    """Guests a, b and c on `lan`. c's NIC takes no offloads, so the switch segments and
    checksums what a and b send it; test_killed_vm_leaves_the_switch kills c."""
    guests = {name: Guest(lan.root, guest_image, name, f"{NET}.{i}", [lan.attach(name)],
                          NO_GUEST_OFFLOADS if name == "c" else None)
              for i, name in enumerate("abc", 1)}
    try:
        boot(list(guests.values()))
        assert not lan.errors, lan.errors
        yield guests
    finally:
        for g in guests.values():
            g.kill()


# --- without guests --------------------------------------------------------------------------

def test_nic_command_line(tmp_path: Path) -> None:
    nic = NetAttachment(tmp_path / "a,b.sock", "02:AA:bb:cc:dd:ee")
    spec = VmSpec("t", Path("k"), Path("i"), devices=nic_devices([nic]), accel="tcg",
                  console=tmp_path / "log", ip="10.0.0.2/24", gw="10.0.0.1")
    args = build_command(spec, tmp_path, VM(spec).accel)
    assert f"socket,id=net0,path={tmp_path}/a,,b.sock,reconnect=1" in args
    assert "vhost-user,id=net0,chardev=net0" in args
    assert "virtio-net-device,netdev=net0,mac=02:aa:bb:cc:dd:ee" in args
    append = args[args.index("-append") + 1]
    assert "alacrity.ip=10.0.0.2/24" in append and "alacrity.gw=10.0.0.1" in append
    assert "virtio-net-pci,netdev=net0,mac=02:aa:bb:cc:dd:ee,vectors=0" in nic_devices([nic], "q35")[0]
    with pytest.raises(ValueError, match="multicast"):
        nic_devices([NetAttachment("s", "01:00:5e:00:00:01")])


def test_macs_and_addresses() -> None:
    assert local_mac("vm/0") == local_mac("vm/0") != local_mac("vm/1")
    for mac in (local_mac("x"), local_mac(), local_mac()):
        first = int(mac[:2], 16)
        assert first & 3 == 2 and check_mac(mac) == mac  # unicast, locally administered
    assert local_mac() != local_mac()
    for bad in ("02:00:00:00:00", "02-00-00-00-00-01", "zz:00:00:00:00:01", "03:00:00:00:00:01",
                "00:00:00:00:00:00"):
        with pytest.raises(ValueError):
            check_mac(bad)
    check_network("10.0.0.1/24", "10.0.0.254")
    check_network("fd00::2/64", "fd00::1")
    for ip, gw in (("10.0.0.1", None), ("10.0.0.1/33", None), ("nope/24", None), (None, "10.0.0.1"),
                   ("10.0.0.1/24", "fd00::1"), ("10.0.0.1/24", "x")):
        with pytest.raises(ValueError):
            check_network(ip, gw)


def test_vm_run_nics_follow_the_bus_switches() -> None:
    from alacrity.cli.errors import UserError
    from alacrity.cli.vm_cmd import attach
    from alacrity.client import DeviceInfo

    devices = [DeviceInfo("lan0", "lan0", "switch", "/run/lan0.sock"),
               DeviceInfo("disk0", "disk0", "blk", "/run/disk0.sock"),
               DeviceInfo("lan1", "lan1", "switch", "/run/lan1.sock")]
    args, nics = attach(devices, "vm1", "microvm", ["02:00:00:00:00:01"])
    assert nics == 2 and len(args) == 3
    assert "socket,id=d0,path=/run/lan0.sock,reconnect=1" in args[0]
    assert "vhost-user-blk,chardev=d1,num-queues=1" in args[1]
    assert f"virtio-net-device,netdev=d2,mac={local_mac('vm1/lan1')}" in args[2]  # stable per VM name
    assert "virtio-net-device,netdev=d0,mac=02:00:00:00:00:01" in args[0]
    with pytest.raises(UserError, match="3 --mac given"):
        attach(devices, "vm1", "microvm", ["02:00:00:00:00:01"] * 3)


@pytest.mark.parametrize("argv, message", [
    (["--ip", "10.0.0.1"], "prefix length"),
    (["--ip", "10.0.0.1/24", "--gw", "10.0.0.300"], "not an IP address"),
    (["--gw", "10.0.0.1"], "--gw needs --ip"),
    (["--mac", "02:00:00:00:00"], "not a MAC address"),
    (["--mac", "ff:ff:ff:ff:ff:ff"], "multicast"),
])
def test_vm_run_refuses_bad_network_options(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", "nobus", *argv],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "ALACRITY_RUN_DIR": str(tmp_path / "none")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alacrity: ") and message in lines[0], proc.stderr


@needs_qemu
def test_refused_nic_fails_fast(tmp_path: Path, guest_image) -> None:
    """A backend that accepts and closes (the gate refusing a non-member) makes QEMU retry
    at once, forever; the VM gives up with a reason instead of hanging."""
    path = tmp_path / "refuse.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)

    def refuse() -> None:
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()

    threading.Thread(target=refuse, daemon=True).start()
    vm = VM(VmSpec("refused", guest_image.kernel, guest_image.initrd, cmd="true", console=tmp_path / "log",
                   devices=nic_devices([NetAttachment(path, local_mac())]), run_dir=tmp_path / "run"))
    try:
        vm.start()
        start = time.monotonic()
        with pytest.raises(VmError, match=f"cannot set up the NIC on {path}"):
            vm.wait_exit(60)
        assert time.monotonic() - start < 10
    finally:
        vm.kill()
        close_listener(listener)


# --- guests on a switch -------------------------------------------------------------------------

def eth0_counters(g: Guest) -> dict[str, int]:
    """eth0's /proc/net/dev receive counters in the guest."""
    line = next(x for x in g.ok("cat /proc/net/dev").splitlines() if x.strip().startswith("eth0:"))
    fields = [int(v) for v in line.split(":", 1)[1].split()]
    names = ("rx_bytes", "rx_packets", "rx_errs", "rx_drop", "rx_fifo", "rx_frame")
    return dict(zip(names, fields[: len(names)], strict=True))


def features(g: Guest) -> str:
    return g.ok("cat /sys/class/net/eth0/device/features").strip()


@pytest.mark.vm
@needs_qemu
def test_guests_ping_each_other(lan: Lan, trio: dict[str, Guest]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    shown = a.ok("ip addr show eth0")
    assert f"inet {a.ip}/24" in shown and f"link/ether {a.mac}" in shown and ",UP" in shown
    for src, dst in ((a, b), (b, c), (c, a)):
        out = src.ok(f"ping -c 3 -i 0.2 -W 5 {dst.ip}")
        assert "3 packets received" in out, out
    ports = lan.ports()
    assert set(ports) == {"a", "b", "c"}
    for g in (a, b, c):
        assert ports[g.name]["peer_pid"] == g.vm.pid and ports[g.name]["mac"] == g.mac
        assert g.mac in ports[g.name]["learned"]




@pytest.mark.vm
@needs_qemu
def test_iperf3_both_ways_with_offloads(lan: Lan, trio: dict[str, Guest]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    for g in (a, b):  # the switch offers CSUM/TSO and QEMU passes them to the guest
        bits = features(g)
        wanted = (F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_GUEST_TSO4, F_MRG_RXBUF)
        assert all(bits[f] == "1" for f in wanted), bits
    bits = features(c)
    assert bits[F_CSUM] == bits[F_HOST_TSO4] == "1" and bits[F_GUEST_CSUM] == bits[F_GUEST_TSO4] == "0"
    before = {g.name: eth0_counters(g) for g in (a, b, c)}
    b.ok("iperf3 -s -D")
    c.ok("iperf3 -s -D")
    rates = {}
    for label, script in (("a->b", f"iperf3 -c {b.ip} -t 2 -J"), ("b->a", f"iperf3 -c {b.ip} -t 2 -J -R"),
                          ("a->c (segmented by the switch)", f"iperf3 -c {c.ip} -t 2 -J")):
        result = json.loads(a.ok(script, timeout=30))
        received = result["end"]["sum_received"]
        assert received["bytes"] > 1 << 20 and received["bits_per_second"] > 0, result["end"]
        rates[label] = received["bits_per_second"] / 1e6
    print("iperf3 Mbit/s:", {k: round(v) for k, v in rates.items()})
    ports = lan.ports()
    assert ports["b"]["rx_bytes"] / ports["b"]["rx_packets"] > 1514  # TSO frames travelled whole
    assert ports["c"]["rx_dropped_offload"] == 0
    # A frame spread over several RX buffers must appear whole: a guest that saw
    # num_buffers=N before all N buffers were used would count a frame error and drop it.
    errors = {g.name: eth0_counters(g)["rx_frame"] - before[g.name]["rx_frame"] for g in (a, b, c)}
    assert not any(errors.values()), f"guest eth0 rx frame errors: {errors}"


@pytest.mark.vm
@needs_qemu
def test_host_process_exchanges_arp_and_icmp_with_a_guest(lan: Lan, trio: dict[str, Guest]) -> None:
    a = trio["a"]
    nic = lan.host_nic()
    nic.send(packets.arp_request(nic.mac, HOST_IP, a.ip))
    guest_mac = expect(nic, lambda f: packets.arp_reply_from(f, a.ip))
    assert guest_mac == bytes.fromhex(a.mac.replace(":", ""))
    for seq in (1, 2, 3):
        payload = os.urandom(200)
        nic.send(packets.icmp_echo(nic.mac, guest_mac, HOST_IP, a.ip, 0x4242, seq, payload))
        expect(nic, lambda f, seq=seq, payload=payload:
               packets.echo_reply_ok(f, a.ip, 0x4242, seq, payload) or None)
    assert HOST_IP in a.ok(f"ip neigh show {HOST_IP}")


def expect(nic: NetClient, match, timeout: float = 10.0):
    """The first non-None match(frame) among the frames `nic` receives."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        frame = nic.recv(max(0.0, deadline - time.monotonic()))
        if frame is None:
            break
        if (got := match(frame)) is not None:
            return got
        seen.append(frame[:42].hex())
    raise AssertionError(f"no matching frame in {timeout}s; saw {seen[-5:]}")


@pytest.mark.vm
@needs_qemu
def test_killed_vm_leaves_the_switch_and_the_others_carry_on(lan: Lan, trio: dict[str, Guest]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    a.ok("iperf3 -s -D -p 5202")
    c.ok(f"iperf3 -c {a.ip} -p 5202 -t 60 >/dev/null 2>&1 </dev/null &")
    start = lan.ports()["c"]["tx_packets"]
    lan.wait_for(lambda: lan.ports()["c"]["tx_packets"] > start + 200, what="c's transfer")
    c.kill()  # SIGKILL to QEMU's process group
    killed = time.monotonic()
    lan.wait_for(lambda: "c" not in lan.ports(), timeout=5, what="c's port gone")
    gone = time.monotonic() - killed
    removed = [r for r in lan.ctl.stats()["removed"] if r["label"] == "c"]
    assert removed and "closed" in removed[-1]["reason"], removed
    for src, dst in ((a, b), (b, a)):
        assert "3 packets received" in src.ok(f"ping -c 3 -i 0.2 -W 5 {dst.ip}")
    assert {"a", "b"} <= set(lan.ports()) and "c" not in lan.ports()
    print(f"c's port went {gone:.2f}s after SIGKILL")


# --- `alacrity vm run` on a bus with a switch device (alacrityd, the gate) --------------------------

@pytest.mark.vm
@needs_qemu
def test_vm_run_attaches_the_bus_switches(daemon, guest_image) -> None:
    daemon.make_switch("lan0", ["lab"])
    daemon.sh("mkdir $A/buses/empty")
    # Each pings the other until it answers, then lingers so the other hears back too.
    meet = ("cat /sys/class/net/eth0/address; n=0; until ping -c 1 -W 1 {peer} >/dev/null; do "
            "n=$((n + 1)); [ $n -lt 60 ] || exit 1; done; sleep 2; exit 3")
    runs = []
    for name, ip, peer, extra in (("vma", "10.78.0.1", "10.78.0.2", []),
                                  ("vmb", "10.78.0.2", "10.78.0.1", ["--mac", "02:00:00:00:be:ef"])):
        log = daemon.root / f"{name}.console"
        argv = [*daemon.vm_run_argv("lab", meet.format(peer=peer), log, guest_image), "--name", name,
                "--ip", f"{ip}/24", *extra]
        runs.append((subprocess.Popen(argv, env=daemon.env, stderr=subprocess.PIPE, text=True), log))
    try:
        errors = [proc.communicate(timeout=120)[1] for proc, _ in runs]
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()  # QEMU dies with it (PR_SET_PDEATHSIG)
                proc.wait()
    consoles = [log.read_text(errors="replace") for _, log in runs]
    for (proc, _), err, console in zip(runs, errors, consoles, strict=True):
        assert proc.returncode == 3, f"{err}\n{console[-2000:]}"  # the guest's `exit 3`
        assert "not attaching" not in err
    assert local_mac("vma/lan0") in consoles[0]  # stable per VM name
    assert "02:00:00:00:be:ef" in consoles[1]
    assert (daemon.admin / "devices/lan0/ports_opened").read_text() == "2\n"

    argv = [*daemon.vm_run_argv("empty", "true", daemon.root / "x.log", guest_image), "--ip", "10.78.0.3/24"]
    proc = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "has no switch device" in proc.stderr, proc.stderr


@pytest.mark.vm
@needs_qemu
def test_killed_qemu_leaves_the_ports_view(daemon, guest_image) -> None:
    daemon.make_switch("lan0", ["lab"])
    ports_dir = daemon.admin / "devices/lan0/ports"
    runs = []
    try:
        guests = (("vma", "10.79.0.1", "ping -q -i 0.2 10.79.0.2"), ("vmb", "10.79.0.2", "sleep 600"))
        for name, ip, cmd in guests:
            argv = [*daemon.vm_run_argv("lab", cmd, daemon.root / f"{name}.log", guest_image), "--name", name,
                    "--ip", f"{ip}/24"]
            runs.append(subprocess.Popen(argv, env=daemon.env, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        fdb = daemon.admin / "devices/lan0/fdb"
        while len(fdb.read_text().splitlines()) < 2:  # both guests are talking
            assert time.monotonic() < deadline, "the guests never exchanged frames"
            time.sleep(0.2)
        ports = {p: dict(line.split(" ", 1) for line in (ports_dir / p).read_text().splitlines())
                 for p in os.listdir(ports_dir)}
        assert len(ports) == 2
        victim = next(p for p, info in ports.items() if local_mac("vmb/lan0") in info["learned"])
        os.kill(int(ports[victim]["peer_pid"]), signal.SIGKILL)  # vmb's QEMU itself
        deadline = time.monotonic() + 10
        while victim in os.listdir(ports_dir):
            assert time.monotonic() < deadline, "the dead guest's port is still listed"
            time.sleep(0.1)
        assert len(os.listdir(ports_dir)) == 1 and runs[0].poll() is None
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.vm
@needs_qemu
def test_a_switch_spans_buses_and_another_switch_is_apart(daemon, guest_image) -> None:
    daemon.make_switch("shared", ["lab", "lab2"])
    daemon.make_switch("other", ["lab3"])
    # a (bus lab) and b (bus lab2) share a switch; c (bus lab3, its own switch) has an address
    # on the same subnet and must hear nothing from them.
    # a and b stay up after they meet, while c (4 s in) tries both of them.
    reach = ("n=0; until ping -c 1 -W 1 {peer} >/dev/null; do n=$((n + 1)); [ $n -lt 60 ] || exit 1; done; "
             "sleep 8; exit 3")
    alone = ("sleep 4; for peer in 10.80.0.1 10.80.0.2; do ping -c 3 -W 1 $peer >/dev/null && exit 1; done; "
             "exit 4")
    runs = []
    try:
        for name, bus, ip, cmd in (("sa", "lab", "10.80.0.1", reach.format(peer="10.80.0.2")),
                                   ("sb", "lab2", "10.80.0.2", reach.format(peer="10.80.0.1")),
                                   ("sc", "lab3", "10.80.0.3", alone)):
            argv = [*daemon.vm_run_argv(bus, cmd, daemon.root / f"{name}.log", guest_image), "--name", name,
                    "--ip", f"{ip}/24"]
            runs.append(subprocess.Popen(argv, env=daemon.env, stderr=subprocess.PIPE, text=True))
        codes = [proc.wait(timeout=120) for proc in runs]
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    logs = {name: (daemon.root / f"{name}.log").read_text(errors="replace")[-1500:]
            for name in ("sa", "sb", "sc")}
    assert codes == [3, 3, 4], logs
    assert (daemon.admin / "devices/shared/ports_opened").read_text() == "2\n"
    assert (daemon.admin / "devices/other/ports_opened").read_text() == "1\n"
