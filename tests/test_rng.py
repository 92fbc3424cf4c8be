"""The rng class: real TCG guests read /dev/hwrng from it, at the rate it is given, and a
process on the bus reads it through the client."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_guest_io import vm_run


def make_rng(daemon, name: str, bus: str, rate: int = 0) -> None:
    daemon.sh(f"""
        mkdir $A/devices/{name}
        echo rng > $A/devices/{name}/type
        echo {rate} > $A/devices/{name}/rate
        mkdir -p $A/buses/{bus}
        ln -s ../../devices/{name} $A/buses/{bus}/{name}
    """)


def counter(daemon, name: str, what: str) -> int:
    return int((daemon.admin / "devices" / name / what).read_text())


# Stops the kernel's own reader (khwrngd), which would otherwise share the device with us.
QUIET_KERNEL = "echo 0 > /sys/class/misc/hw_random/rng_quality 2>/dev/null; "


@pytest.mark.vm
def test_a_guest_reads_random_bytes_from_hwrng(daemon, guest_image):
    make_rng(daemon, "rng0", "r1")
    cmd = (QUIET_KERNEL + "cat /sys/class/misc/hw_random/rng_current; "
           "head -c 4096 /dev/hwrng | od -An -v -tx1 | tr -s ' ' '\\n' | sort -u | grep -c . ; "
           "head -c 64 /dev/hwrng | sha256sum; head -c 64 /dev/hwrng | sha256sum")
    status, out = vm_run(daemon, "r1", cmd, guest_image)
    assert status == 0, out
    assert "virtio_rng" in out
    distinct = [int(line) for line in re.findall(r"^\s*(\d+)\s*$", out, re.M)]
    assert distinct and distinct[-1] > 200, out  # 4096 random bytes take nearly all 256 values
    digests = re.findall(r"^([0-9a-f]{64})\s", out, re.M)
    assert len(digests) == 2 and digests[0] != digests[1], out
    assert counter(daemon, "rng0", "bytes") >= 4096 + 128
    assert counter(daemon, "rng0", "requests") > 0


@pytest.mark.vm
def test_a_rate_limits_what_the_guest_gets(daemon, guest_image):
    rate = 4096
    make_rng(daemon, "slow", "r2", rate=rate)
    nbytes = 4 * rate
    cmd = (QUIET_KERNEL + "read t0 rest < /proc/uptime; "
           f"head -c {nbytes} /dev/hwrng | wc -c; "
           "read t1 rest < /proc/uptime; echo \"took $t0 $t1\"")
    status, out = vm_run(daemon, "r2", cmd, guest_image, timeout=60)
    assert status == 0, out
    t0, t1 = map(float, re.search(r"took ([\d.]+) ([\d.]+)", out).groups())
    measured = nbytes / (t1 - t0)
    print(f"rng at rate {rate}: the guest read {nbytes} bytes at {measured:.0f} B/s")
    assert 0.8 * rate <= measured <= 1.2 * rate, out
    assert counter(daemon, "slow", "throttled") > 0


def test_a_process_on_the_bus_reads_entropy_through_the_client(daemon):
    make_rng(daemon, "rng0", "r3")
    code = """
import json
from alacrity import client
with client.connect().open("rng0") as dev:
    a, b = dev.read(100000), dev.read(100000)
print(json.dumps({"lengths": [len(a), len(b)], "same": a == b, "values": len(set(a))}))
"""
    out = daemon.in_bus("r3", code)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"lengths": [100000, 100000], "same": False, "values": 256}
    assert counter(daemon, "rng0", "bytes") >= 200000


def test_rate_is_checked_at_the_write(daemon):
    make_rng(daemon, "rng0", "r4")
    for bad in ("-1", "12", "255", "x", str(1 << 41)):
        result = daemon.sh(f"echo {bad} > $A/devices/rng0/rate", check=False)
        assert result.returncode != 0, bad
    assert (daemon.admin / "devices/rng0/rate").read_text().strip() == "0"
    daemon.sh("echo 1000 > $A/devices/rng0/rate")
    assert (daemon.admin / "devices/rng0/rate").read_text().strip() == "1000"
