"""A refusal reaches the user in one line, before QEMU starts: `alacrity vm run` asks the
gate whether each device on its bus would take it, and stops (status 2) with the gate's
reason. A process that drives a device itself gets the same reason from the client."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

HOLD = """
import sys, time
from alacrity import client
dev = client.connect().open("d1")
print("open", flush=True)
time.sleep(60)
"""


@pytest.fixture(params=[False])
def held_disk(request, daemon, tmp_path):
    """Disk d1 on bus b1, held open for writing by a process on the bus (shared if the
    test is parametrized so)."""
    daemon.make_disk("d1", "b1", tmp_path / "d1.img",
                     extra="echo 1 > $A/devices/d1/shared" if request.param else "")
    holder = subprocess.Popen(
        [sys.executable, "-m", "alacrity.cli", "bus", "exec", "b1", "--", sys.executable, "-c", HOLD],
        env=daemon.env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def qemus_named(name: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*-name {name}"], capture_output=True, text=True)
    return out.stdout.split()


def vm_run(daemon, bus: str, name: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", bus, "--name", name, "--cmd", "true",
         "--kernel", str(tmp_path / "none"), "--initrd", str(tmp_path / "none")],
        env=daemon.env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_vm_run_on_a_held_disk_stops_before_qemu_with_the_reason(daemon, tmp_path, held_disk):
    proc, took = vm_run(daemon, "b1", "second", tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert took < 5, f"took {took:.1f} s"  # ~1 s of it is Python starting twice
    assert len(lines) == 1 and lines[0].startswith("alacrity: disk d1 is in use by pid "), proc.stderr
    assert "give each VM its own disk on its own bus, or set devices/d1/shared to 1" in lines[0]
    assert not qemus_named("second")


@pytest.mark.parametrize("held_disk", [True], indirect=True)
def test_a_shared_disk_is_not_refused(daemon, tmp_path, held_disk):
    code = "from alacrity import client; print(client.connect().refusals())"
    out = daemon.in_bus("b1", code)
    assert out.returncode == 0 and out.stdout.strip() == "{}", out.stderr


def test_the_client_carries_the_gates_reason(daemon, held_disk):
    out = daemon.in_bus("b1", "from alacrity import client; client.connect().open('d1')")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "GateError: device d1: disk d1 is in use by pid" in last, out.stderr


def test_vm_run_without_a_daemon_says_so(tmp_path):
    env = {"ALACRITY_RUN_DIR": str(tmp_path / "run"), "ALACRITY_ADMIN": str(tmp_path / "admin"),
           "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", "b1", "--cmd", "true",
                           "--kernel", "k", "--initrd", "i"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and time.monotonic() - start < 5
    assert proc.stderr.strip().splitlines() == [f"alacrity: no alacrityd at {tmp_path}/run/control.sock: "
                                                "start it with 'alacrityd'"], proc.stderr


def test_vm_run_as_a_member_of_another_bus_is_refused(daemon, tmp_path):
    daemon.make_disk("d1", "b1", tmp_path / "d1.img")
    daemon.make_disk("d2", "b2", tmp_path / "d2.img")
    proc = subprocess.run(
        [sys.executable, "-m", "alacrity.cli", "bus", "exec", "b1", "--",
         sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", "b2", "--cmd", "true",
         "--kernel", "k", "--initrd", "i"],
        env=daemon.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "alacrity: this process is already in bus 'b1'; a task belongs to one bus"], proc.stderr
