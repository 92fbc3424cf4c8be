"""The README's quick tour is `scripts/tour`: the README quotes the script verbatim, and
these tests run it as written, with real QEMU guests (TCG here), a real alacrityd, a real
tap, then check what it printed and that it left nothing behind, also when it fails or
is stopped half-way.

The tour takes its places from the environment (the admin tree, sockets, VM records, the
segment and the tap), so a run here stays in tmp_path and never meets the host's own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from tests.conftest import fuse_available, need

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "scripts" / "tour"
README = ROOT / "README.md"


def readme_tour() -> str:
    """The fenced block of the README's tour section that starts with the script's shebang."""
    text = README.read_text()
    section = text[text.index("\n## A quick tour"):]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    m = re.search(r"^```(?:bash|sh)\n(#!/usr/bin/env bash\n.*?)^```$", section, re.M | re.S)
    assert m, "the README's tour section quotes no script"
    return m.group(1)


def test_the_readme_quotes_the_tour_verbatim() -> None:
    assert readme_tour() == TOUR.read_text(), "README.md's tour and scripts/tour differ: copy one over"


def test_the_tour_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(TOUR)], check=True)


# --- running it ------------------------------------------------------------------------------

def tour_env(tmp_path: Path) -> dict[str, str]:
    need(os.geteuid() == 0, "the tour runs as root (alacrityd, a tap)")
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.path.exists("/dev/net/tun"), "no /dev/net/tun for the tour's tap")
    for tool in ("qemu-system-x86_64", "ping", "ip", "iperf3"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (run scripts/install-deps)")
    scripts = sysconfig.get_path("scripts")  # `alacrity` and `alacrityd` of this Python
    return {
        **os.environ,
        "PATH": f"{scripts}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ALACRITY_ADMIN": str(tmp_path / "admin"),
        "ALACRITY_RUN_DIR": str(tmp_path / "run"),
        "ALACRITY_VM_DIR": str(tmp_path / "vms"),
        "TOUR_NET": f"10.213.{os.getpid() % 250}",
        "TOUR_TAP": f"altour{os.getpid() % 100000}",
    }


def start(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(TOUR)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The tour's output once it ends; on a timeout, its whole session is stopped first."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        raise AssertionError(f"the tour took over {timeout}s:\n{out[-5000:]}") from None
    return out


def leftovers(marker: str) -> list[str]:
    """Processes (QEMU, alacrityd, a switch, vm run, sed) whose command line or environment
    names `marker`: everything the tour starts inherits its environment."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{entry.name}: {shown}")
    return found


def assert_clean(tmp_path: Path, env: dict[str, str], out: str) -> None:
    """No process, mount, tap, directory or work directory of the tour is left."""
    deadline = time.monotonic() + 10
    while (left := leftovers(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {left}\n{out[-3000:]}"
    assert not any(line.split()[4] == str(tmp_path / "admin") for line in
                   Path("/proc/self/mountinfo").read_text().splitlines()), "the admin tree is still mounted"
    assert subprocess.run(["ip", "link", "show", env["TOUR_TAP"]], capture_output=True).returncode != 0, \
        f"tap {env['TOUR_TAP']} is still there"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"left in {tmp_path}: {list(tmp_path.iterdir())}"
    work = re.search(r"==> cleaning up: .*?(/tmp/alacrity-tour\.\w+)", out)
    assert work, out[-3000:]
    assert not Path(work.group(1)).exists(), f"{work.group(1)} is still there"


def vm_lines(out: str, vm: str) -> str:
    return "\n".join(line[len(vm) + 3:] for line in out.splitlines() if line.startswith(f"[{vm}] "))


def ping_summary(lines: str, target: str) -> str:
    """busybox ping's summary line for `target`."""
    m = re.search(rf"^--- {re.escape(target)} ping statistics ---\n(.*)$", lines, re.M)
    assert m, f"no ping of {target} in:\n{lines}"
    return m.group(1)


@pytest.mark.vm
def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    env = tour_env(tmp_path)
    started = time.monotonic()
    proc = start(env)
    out = finish(proc, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 0, out[-5000:]
    net = env["TOUR_NET"]
    host, vm1, vm2 = f"{net}.254", f"{net}.1", f"{net}.2"
    # It says what it does: the admin commands, as the shell ran them.
    for command in ("+ mkdir devices/disk1 buses/lab1", "+ echo switch",
                    "+ ln -s ../../devices/lan0 buses/lab2/lan0", f"+ echo {env['TOUR_TAP']}",
                    f"+ ip addr add {host}/24 dev {env['TOUR_TAP']}"):
        assert command in out, out[:3000]
    # The host reaches vm1 through its tap; each VM reaches the host and the other.
    host_ping = rf"--- {re.escape(vm1)} ping statistics ---\n3 packets transmitted, 3 received, 0% packet"
    assert re.search(host_ping, out), out
    one, two = vm_lines(out, "vm1"), vm_lines(out, "vm2")
    for lines, target in ((one, host), (one, vm2), (two, host), (two, vm1)):
        assert ping_summary(lines, target) == "3 packets transmitted, 3 packets received, 0% packet loss"
    # iperf3 between them: the client's summary of what vm1 received.
    receiver = r"\s0\.00-\d+\.\d+\s+sec\s+[\d.]+ [KMG]?Bytes\s+([\d.]+) ([KMG]?)bits/sec\s+receiver$"
    m = re.search(receiver, two, re.M)
    assert m, two
    mbit = float(m.group(1)) * {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[m.group(2)]
    assert mbit > 1, m.group(0)
    assert "ALACRITY-EXIT=0" in one and "ALACRITY-EXIT=0" in two
    assert "learned" in out and "==> the tour passed" in out
    print(f"tour: {took:.1f}s, vm2 -> vm1 {mbit:.0f} Mbit/s")
    assert_clean(tmp_path, env, out)


@pytest.mark.vm
def test_the_tour_cleans_up_when_a_step_fails(tmp_path: Path) -> None:
    """A refused write half-way (an uplink name no tap may have) stops the tour there, and
    the daemon, its mount and its files go."""
    env = {**tour_env(tmp_path), "TOUR_TAP": "no/such/tap"}
    proc = start(env)
    out = finish(proc, timeout=120)
    assert proc.returncode != 0, out
    assert "+ echo no/such/tap" in out and "Invalid argument" in out, out
    assert "==> vm1" not in out
    assert_clean(tmp_path, {**env, "TOUR_TAP": "lo-not-made"}, out)


@pytest.mark.vm
def test_the_tour_stops_its_vms_when_it_is_stopped(tmp_path: Path) -> None:
    """SIGTERM to the script alone (as `kill` or a supervisor sends it) while a VM runs:
    its cleanup stops the VMs and the daemon, and removes what it made."""
    env = tour_env(tmp_path)
    proc = start(env)
    seen = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("==> vm2") or time.monotonic() > deadline:
            break
    assert seen and seen[-1].startswith("==> vm2"), "".join(seen)[-3000:]
    assert any("qemu" in p for p in leftovers(str(tmp_path))), "no QEMU is running"
    proc.send_signal(signal.SIGTERM)
    out = "".join(seen) + finish(proc, timeout=60)
    assert proc.returncode != 0, out[-3000:]
    assert "==> the tour passed" not in out
    assert_clean(tmp_path, env, out)
