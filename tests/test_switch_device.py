"""The switch as a device of alacrityd: built with the admin tree, opened through the
gate by real processes on buses, served by its own unprivileged process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import packets

BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Holder:
    """tests/port_holder.py in a bus: ports held by a real second process."""

    def __init__(self, daemon, bus: str, device: str, count: int = 1) -> None:
        argv = [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--",
                sys.executable, "-m", "tests.port_holder", device, str(count)]
        self.proc = subprocess.Popen(argv, env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).parent.parent)
        hello = json.loads(self.proc.stdout.readline() or '{"error": "no answer"}')
        self.error = hello.get("error")
        self.macs = [bytes.fromhex(m) for m in hello.get("macs", [])]

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def send(self, port: int, data: bytes) -> None:
        assert self.ask(f"send {port} {data.hex()}") == "ok"

    def recv(self, port: int, timeout: float = 5.0) -> bytes | None:
        answer = self.ask(f"recv {port} {timeout}")
        assert not answer.startswith("error"), answer
        return None if answer == "none" else bytes.fromhex(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders():
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.close()


def hold(daemon, holders, bus: str, device: str, count: int = 1) -> Holder:
    holder = Holder(daemon, bus, device, count)
    holders.append(holder)
    return holder


def read(daemon, rel: str) -> str:
    return (daemon.admin / rel).read_text()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write(daemon, rel: str, text: str) -> int:
    """Write an attribute as `echo` would; the errno it fails with, or 0."""
    try:
        with open(daemon.admin / rel, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        return exc.errno
    return 0


def switch_pid(daemon, name: str) -> int | None:
    text = read(daemon, f"devices/{name}/pid").strip()
    return int(text) if text else None


def test_attributes_checked_and_kept_across_restart(daemon):
    daemon.make_switch("sw0", ["b1"])
    assert read(daemon, "devices/sw0/mtu") == "1500\n"
    assert "uplink" in read(daemon, "classes/switch/attributes")
    for attr, bad in (("mtu", "10"), ("mtu", "x"), ("mac_prefix", "01:00"), ("mac_prefix", "02:zz"),
                      ("uplink", "no such name!"), ("learning_ageing_s", "0")):
        assert write(daemon, f"devices/sw0/{attr}", bad) == errno.EINVAL, (attr, bad)
    daemon.sh("echo 9000 > $A/devices/sw0/mtu; echo 0a:0b > $A/devices/sw0/mac_prefix")
    assert os.listdir(daemon.admin / "devices/sw0/ports") == []
    daemon.stop()
    daemon.start()
    assert read(daemon, "devices/sw0/mtu") == "9000\n"
    assert read(daemon, "devices/sw0/mac_prefix") == "0a:0b\n"


def test_every_open_is_a_port_of_an_unprivileged_process(daemon, holders):
    daemon.make_switch("sw0", ["b1"])
    holder = hold(daemon, holders, "b1", "sw0", 2)
    assert holder.error is None
    a, b = holder.macs
    assert a != b and a.startswith(bytes.fromhex("02a1ac"))
    holder.send(0, frame(BROADCAST, a, b"hello"))
    assert holder.recv(1) == frame(BROADCAST, a, b"hello")
    holder.send(1, frame(a, b, b"back"))
    assert holder.recv(0) == frame(a, b, b"back")

    ports = sorted(os.listdir(daemon.admin / "devices/sw0/ports"), key=int)
    assert len(ports) == 2
    port = dict(line.split(" ", 1) for line in read(daemon, f"devices/sw0/ports/{ports[0]}").splitlines())
    children = subprocess.run(["pgrep", "-P", str(holder.proc.pid)], capture_output=True, text=True)
    inner = children.stdout.split()
    assert port["peer_pid"] in [str(holder.proc.pid), *inner]
    assert port["mac"] == a.hex(":") and port["tx_packets"] == "1" and port["rx_packets"] == "1"
    assert f"{a.hex(':')} port {ports[0]}" in read(daemon, "devices/sw0/fdb")
    assert read(daemon, "devices/sw0/connections") == "2\n"

    pid = switch_pid(daemon, "sw0")
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    # A uid and gid of its own from the daemon's id range, shared with no other process.
    uid = status["Uid"].split()
    assert len(set(uid)) == 1 and 900000 <= int(uid[0]) < 901000, status["Uid"]
    assert status["Gid"].split() == uid and status["Groups"].strip() == "", status["Gid"]
    others = subprocess.run(["pgrep", "-U", uid[0]], capture_output=True, text=True).stdout.split()
    assert others == [str(pid)]
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    assert sorted(os.listdir(f"/proc/{pid}/fd"), key=int)  # it holds only what it was handed
    assert write(daemon, "devices/sw0/mtu", "1400") == errno.EBUSY

    holder.proc.send_signal(signal.SIGKILL)  # ports go when their process does
    wait_for(lambda: os.listdir(daemon.admin / "devices/sw0/ports") == [], what="ports to disappear")
    daemon.sh("echo 1400 > $A/devices/sw0/mtu")


def test_one_switch_spans_two_buses_and_others_are_apart(daemon, holders):
    daemon.make_switch("shared", ["b1", "b2"])
    daemon.make_switch("private", ["b3"])
    one, two = hold(daemon, holders, "b1", "shared"), hold(daemon, holders, "b2", "shared")
    assert one.error is None and two.error is None
    one.send(0, frame(BROADCAST, one.macs[0], b"anyone?"))
    assert two.recv(0) == frame(BROADCAST, one.macs[0], b"anyone?")
    two.send(0, frame(one.macs[0], two.macs[0], b"me"))
    assert one.recv(0) == frame(one.macs[0], two.macs[0], b"me")

    three = hold(daemon, holders, "b3", "private")
    three.send(0, frame(BROADCAST, three.macs[0], b"hello?"))
    assert one.recv(0, 0.5) is None and two.recv(0, 0.5) is None
    outsider = hold(daemon, holders, "b1", "private")
    assert outsider.error and "no device 'private'" in outsider.error
    # Straight at the socket, bypassing the device list: the gate closes it.
    sock_path = daemon.run_dir / "devices" / "private.sock"
    code = (f"from alacrity.client.net import NetClient\nimport socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(sock_path)!r})\nNetClient(s, timeout=3)")
    probe = daemon.in_bus("b1", code)
    assert probe.returncode != 0 and ("Error" in probe.stderr.splitlines()[-1]), probe.stderr
    assert "refused device private" in daemon.log.read_text()
    assert len(os.listdir(daemon.admin / "devices/private/ports")) == 1


def test_crashed_switch_process_is_restarted(daemon, holders):
    daemon.make_switch("sw0", ["b1"])
    first = hold(daemon, holders, "b1", "sw0")
    old = switch_pid(daemon, "sw0")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: switch_pid(daemon, "sw0") not in (None, old), what="a new switch process")
    assert read(daemon, "devices/sw0/restarts") == "1\n"
    assert "died" in read(daemon, "devices/sw0/last_error")
    assert first.ask("recv 0 2").startswith("error")  # its port went with the old process
    second = hold(daemon, holders, "b1", "sw0", 2)
    second.send(0, frame(BROADCAST, second.macs[0], b"again"))
    assert second.recv(1) == frame(BROADCAST, second.macs[0], b"again")


def test_switch_process_ends_with_the_daemon(daemon, holders):
    daemon.make_switch("sw0", ["b1"])
    hold(daemon, holders, "b1", "sw0")
    pid = switch_pid(daemon, "sw0")
    daemon.kill9()

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_for(gone, what="the switch process to exit after its daemon")


@pytest.fixture
def netns():
    need_root_net()
    name = f"alac-up-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def need_root_net() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing: no tap devices on this machine")


def ns(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-n", name, *argv], capture_output=True, text=True)


def ping_host(holder: Holder, host_ip: str, my_ip: str) -> bytes:
    """ARP for the host behind the uplink, then an ICMP echo; the host kernel's MAC."""
    mac = holder.macs[0]
    holder.send(0, packets.arp_request(mac, my_ip, host_ip))
    host_mac = None
    for _ in range(20):
        got = holder.recv(0, 2.0)
        assert got is not None, "no ARP reply from the host"
        if (host_mac := packets.arp_reply_from(got, host_ip)) is not None:
            break
    assert host_mac is not None
    holder.send(0, packets.icmp_echo(mac, host_mac, my_ip, host_ip, 7, 1))
    for _ in range(20):
        got = holder.recv(0, 2.0)
        assert got is not None, "no echo reply from the host"
        if packets.echo_reply_ok(got, host_ip, 7, 1):
            return host_mac
    raise AssertionError("no valid echo reply")


def test_uplink_joins_the_host_and_survives_a_switch_crash(daemon, holders, netns):
    tap = f"altap{os.getpid() % 100000}"
    daemon.make_switch("sw0", ["b1"], extra=f"echo {tap} > $A/devices/sw0/uplink")
    # The daemon made the tap; it moves into our namespace with its fd still attached.
    subprocess.run(["ip", "link", "set", tap, "netns", netns], check=True)
    ns(netns, "addr", "add", "10.77.0.1/24", "dev", tap)
    ns(netns, "link", "set", tap, "up")
    holder = hold(daemon, holders, "b1", "sw0")
    host_mac = ping_host(holder, "10.77.0.1", "10.77.0.2")
    uplink = [p for p in os.listdir(daemon.admin / "devices/sw0/ports")
              if "uplink 1" in read(daemon, f"devices/sw0/ports/{p}")]
    assert len(uplink) == 1 and host_mac.hex(":") in read(daemon, "devices/sw0/fdb")

    os.kill(switch_pid(daemon, "sw0"), signal.SIGKILL)
    wait_for(lambda: read(daemon, "devices/sw0/restarts") == "1\n" and switch_pid(daemon, "sw0"),
             what="the switch to restart")
    holder.close()
    again = hold(daemon, holders, "b1", "sw0")
    ping_host(again, "10.77.0.1", "10.77.0.3")  # same tap, same address: the daemon kept it

    again.close()
    wait_for(lambda: os.listdir(daemon.admin / "devices/sw0/ports") != [], what="uplink port listed")
    daemon.sh("echo '' > $A/devices/sw0/uplink")
    wait_for(lambda: ns(netns, "link", "show", tap).returncode != 0, what="the tap to go with the uplink")
    assert write(daemon, "devices/sw0/uplink", "lo") == errno.EINVAL  # not a tap: refused, nothing changed
    assert read(daemon, "devices/sw0/uplink") == "\n"
