"""Kill -9 the daemon under a writing guest: flushed data and configuration survive,
and the running guest's disk works again after the restart, without a reboot."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from tests.test_guest_io import MIB, PATTERN, WRITE_PATTERN

pytestmark = pytest.mark.vm

GUEST = (
    WRITE_PATTERN + " && echo FLUSHED && "
    "i=0; while [ $i -lt 30 ]; do "
    "dd if=/dev/urandom of=/dev/vda bs=65536 seek=64 count=4 conv=fsync 2>/dev/null || exit 9; "
    "echo W$i; i=$((i+1)); sleep 0.2; done; "
    "dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | sha256sum"
)


def wait_for(path, text: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared:\n{path.read_text(errors='replace')[-2000:]}")


def test_daemon_kill9_under_writing_guest(daemon, tmp_path, guest_image):
    image = tmp_path / "disk.img"
    daemon.make_disk("d1", "b1", image)
    console = tmp_path / "console.log"
    vm = subprocess.Popen(
        daemon.vm_run_argv("b1", GUEST, console, guest_image),
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(console, "W2", 120, vm)
        daemon.kill9()
        # Flushed data is on disk while no daemon runs.
        with open(image, "rb") as f:
            f.seek(MIB)
            assert f.read(MIB) == PATTERN
        time.sleep(1.0)
        daemon.start()
        # The configuration came back from the store.
        assert (daemon.admin / "devices/d1/type").read_text().strip() == "blk"
        assert (daemon.admin / "buses/b1/d1").is_symlink()
        out, _ = vm.communicate(timeout=180)
        assert vm.returncode == 0, out + console.read_text(errors="replace")[-3000:]
        log = console.read_text(errors="replace")
        assert "W29" in log
        assert hashlib.sha256(PATTERN).hexdigest() in log
        # QEMU reconnected by itself: the second daemon served it.
        assert daemon.log.read_text().count("connected to d1") >= 2
    finally:
        if vm.poll() is None:
            import os
            import signal

            os.killpg(vm.pid, signal.SIGKILL)
            vm.wait()
