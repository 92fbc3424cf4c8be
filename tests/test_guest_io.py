"""Real QEMU guests (TCG) on a bus read and write our vhost-user-blk disk."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm

PATTERN_LINE = b"alacrity-pattern\n"
MIB = 1 << 20
PATTERN = (PATTERN_LINE * (MIB // len(PATTERN_LINE) + 1))[:MIB]
# The guest makes the same 1 MiB with busybox and writes it at 1 MiB.
WRITE_PATTERN = (
    "yes alacrity-pattern | head -c 1048576 > /tmp/p && "
    "dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null && sha256sum /tmp/p"
)
READ_PATTERN = "dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | sha256sum"


def vm_run(daemon, bus: str, cmd: str, image, timeout: float = 240) -> tuple[int, str]:
    log = daemon.root / f"console-{bus}-{abs(hash(cmd)) % 10**6}.log"
    proc = subprocess.run(
        daemon.vm_run_argv(bus, cmd, log, image),
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    console = log.read_text(errors="replace") if log.exists() else ""
    return proc.returncode, console + proc.stderr


def test_pattern_survives_power_off_and_second_boot(daemon, tmp_path, guest_image):
    image = tmp_path / "disk.img"
    daemon.make_disk("d1", "b1", image)
    status, out = vm_run(daemon, "b1", WRITE_PATTERN, guest_image)
    assert status == 0, out
    digest = hashlib.sha256(PATTERN).hexdigest()
    assert digest in out
    with open(image, "rb") as f:
        f.seek(MIB)
        assert f.read(MIB) == PATTERN
    status, out = vm_run(daemon, "b1", READ_PATTERN, guest_image)
    assert status == 0, out
    assert digest in out
    assert int((daemon.admin / "devices/d1/flushes").read_text()) >= 1


def test_readonly_disk_refuses_guest_writes(daemon, tmp_path, guest_image):
    image = tmp_path / "ro.img"
    image.write_bytes(PATTERN * 4)
    daemon.make_disk("ro", "b1", image, extra="echo 1 > $A/devices/ro/readonly")
    cmd = (
        "cat /sys/block/vda/ro; "
        "dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>&1; echo dd=$?; "
        "dd if=/dev/vda bs=65536 count=16 2>/dev/null | sha256sum"
    )
    status, out = vm_run(daemon, "b1", cmd, guest_image)
    assert status == 0, out
    lines = out.splitlines()
    assert "1" in [line.strip() for line in lines]  # the kernel sees VIRTIO_BLK_F_RO
    assert "dd=0" not in out
    assert hashlib.sha256(PATTERN).hexdigest() in out
    assert image.read_bytes() == PATTERN * 4


def test_python_client_and_guest_see_each_others_writes(daemon, tmp_path, guest_image):
    image = tmp_path / "shared.img"
    daemon.make_disk("d1", "b1", image)
    status, out = vm_run(daemon, "b1", WRITE_PATTERN, guest_image)
    assert status == 0, out
    client_code = f"""
import hashlib
from alacrity import client
with client.connect().open("d1") as dev:
    data = dev.read({MIB}, {MIB})
    print("guest-wrote", hashlib.sha256(data).hexdigest())
    dev.write(8 * {MIB}, bytes(range(256)) * 4096)
    dev.flush()
"""
    proc = daemon.in_bus("b1", client_code)
    assert proc.returncode == 0, proc.stderr
    assert f"guest-wrote {hashlib.sha256(PATTERN).hexdigest()}" in proc.stdout
    mine = bytes(range(256)) * 4096
    status, out = vm_run(
        daemon, "b1", "dd if=/dev/vda bs=1048576 skip=8 count=1 2>/dev/null | sha256sum", guest_image
    )
    assert status == 0, out
    assert hashlib.sha256(mine).hexdigest() in out


def test_second_writer_is_refused_unless_shared(daemon, tmp_path, guest_image):
    image = tmp_path / "excl.img"
    daemon.make_disk("d1", "b1", image)
    holder = """
import sys, time
from alacrity import client
dev = client.connect().open("d1")
print("open", flush=True)
time.sleep(30)
"""
    first = subprocess.Popen(
        [sys.executable, "-m", "alacrity.cli", "bus", "exec", "b1", "--", sys.executable, "-c", holder],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "open"
        second = daemon.in_bus("b1", "from alacrity import client; client.connect().open('d1')")
        assert second.returncode != 0
        assert "device d1: disk d1 is in use by pid" in second.stderr  # the gate's reason
        assert "disk d1 is in use by pid" in daemon.log.read_text()
    finally:
        first.kill()
        first.wait()
