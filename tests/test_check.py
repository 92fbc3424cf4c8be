"""`alacrity check`, run as a user runs it: on this host as it is, then with a part of the
host really taken away (QEMU or fusermount3 off PATH, /dev/fuse covered in a mount
namespace of its own, an id range that an account uses), and beside a running alacrityd."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alacrity.cli.check_cmd import Daemon, qemu_version
from tests.conftest import need

NAMES = ("KVM", "QEMU", "QEMU devices", "FUSE", "cgroup v2", "id range", "guest image", "tap",
         "switch engine", "peer identity", "alacrityd")


def check(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
          tmp_path: Path | None = None) -> tuple[int, dict[str, str], str]:
    """Run `alacrity check`; (exit status, line by check name, whole output). The daemon is
    looked for in tmp_path unless env says otherwise, so a host's own alacrityd is not met."""
    base = {**os.environ}
    if tmp_path is not None:
        base |= {"ALACRITY_RUN_DIR": str(tmp_path / "run"), "ALACRITY_ADMIN": str(tmp_path / "admin")}
    proc = subprocess.run([*prefix, sys.executable, "-m", "alacrity.cli", "check", *args],
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)
    lines = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(PASS|WARN|FAIL)  (.{15})", line)
        if m:
            lines[m.group(2).strip()] = line
    return proc.returncode, lines, proc.stdout + proc.stderr


def path_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH with every program of ours except `hidden`: one directory of symlinks."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = shadow / entry.name
            if entry.name not in hidden and not target.exists() and not target.is_symlink():
                target.symlink_to(entry.path)
    return str(shadow)


def test_this_host_passes(tmp_path: Path) -> None:
    code, lines, out = check(tmp_path=tmp_path)
    assert code == 0, out
    assert list(lines) == list(NAMES), out  # one line per check, in order
    assert not [line for line in lines.values() if line.startswith("FAIL")], out
    assert out.rstrip().splitlines()[-1].startswith("alacrity check: ") and "0 failed" in out
    kvm = lines["KVM"]
    if Path("/sys/module/kvm_pvm").exists():  # this machine: nested PVM, so TCG
        assert kvm.startswith("WARN") and "TCG" in kvm and "nested PVM" in kvm and "What to do:" in kvm, kvm
    elif not os.path.exists("/dev/kvm"):
        assert kvm.startswith("WARN") and "TCG" in kvm, kvm
    assert lines["alacrityd"].startswith("WARN") and "not running" in lines["alacrityd"]
    assert "alacrityd &" in lines["alacrityd"]
    for line in lines.values():  # every WARN says what to do
        assert line.startswith("PASS") or "What to do: " in line, line


def test_without_qemu_it_fails_and_names_the_fix(tmp_path: Path) -> None:
    need(shutil.which("qemu-system-x86_64") is not None, "QEMU is not installed here to take away")
    code, lines, out = check(env={"PATH": path_without(tmp_path, "qemu-system-x86_64")}, tmp_path=tmp_path)
    assert code == 1, out
    qemu = lines["QEMU"]
    assert qemu.startswith("FAIL") and "qemu-system-x86_64 is not on PATH" in qemu, out
    assert "apt-get install --no-install-recommends qemu-system-x86" in qemu, qemu
    assert "QEMU devices" not in lines  # nothing to ask
    assert lines["FUSE"].startswith("PASS"), out  # the rest is still checked
    assert re.search(r"^alacrity check: .* 1 failed: fix QEMU", out, re.M), out


def test_a_qemu_without_vhost_user_blk_fails(tmp_path: Path) -> None:
    """The real QEMU behind a wrapper that drops vhost-user-blk from its `-device help`, as a
    QEMU built without vhost-user would."""
    real = shutil.which("qemu-system-x86_64")
    need(real is not None, "QEMU is not installed here")
    bin_dir = tmp_path / "qemu-bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\n"{real}" "$@" | grep -v "vhost-user-blk"\n')
    wrapper.chmod(0o755)
    code, lines, out = check(env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, tmp_path=tmp_path)
    assert code == 1, out
    assert lines["QEMU"].startswith("PASS"), out
    devices = lines["QEMU devices"]
    assert devices.startswith("FAIL") and "lacks: vhost-user-blk (disks)" in devices, devices
    assert "apt-get install --no-install-recommends qemu-system-x86" in devices, devices


def test_with_dev_fuse_covered_it_fails_and_names_the_fix(tmp_path: Path) -> None:
    """In a mount namespace of its own, /dev/null is bind-mounted over /dev/fuse."""
    need(os.geteuid() == 0, "unshare -m and a bind mount need root")
    need(shutil.which("unshare") is not None, "no unshare (util-linux)")
    need(os.path.exists("/dev/fuse"), "no /dev/fuse to cover")
    script = 'mount --bind /dev/null /dev/fuse && exec "$@"'
    code, lines, out = check(prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
                             tmp_path=tmp_path)
    assert code == 1, out
    fuse = lines["FUSE"]
    assert fuse.startswith("FAIL") and "not the FUSE device" in fuse and "1:3 (null)" in fuse, fuse
    assert "umount /dev/fuse" in fuse and "modprobe fuse" in fuse, fuse
    assert os.major(os.stat("/dev/fuse").st_rdev) == 10  # the host's own is untouched


def test_without_fusermount3_it_fails_and_names_the_fix(tmp_path: Path) -> None:
    need(shutil.which("fusermount3") is not None, "fusermount3 is not installed here to take away")
    code, lines, out = check(env={"PATH": path_without(tmp_path, "fusermount3")}, tmp_path=tmp_path)
    assert code == 1, out
    fuse = lines["FUSE"]
    assert fuse.startswith("FAIL") and "fusermount3 is not on PATH" in fuse, fuse
    assert "apt-get install --no-install-recommends fuse3" in fuse, fuse


def test_an_id_range_an_account_uses_fails(tmp_path: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")
    code, lines, out = check("--id-range", f"{nobody - 2}:5", tmp_path=tmp_path)
    assert code == 1, out
    line = lines["id range"]
    assert line.startswith("FAIL") and f"user nobody ({nobody})" in line, line
    assert "alacrityd --id-range" in line, line
    code, lines, out = check("--id-range", "12:x", tmp_path=tmp_path)
    assert code == 1 and "bad id range" in lines["id range"], out


def test_beside_a_running_daemon(daemon) -> None:
    code, lines, out = check(env=daemon.env)
    assert code == 0, out
    line = lines["alacrityd"]
    assert line.startswith("PASS") and f"pid {daemon.proc.pid}" in line, line
    assert f"admin tree mounted at {daemon.admin}" in line, line
    assert "alacrityd's default" in lines["id range"]  # the daemon runs without --id-range


def test_a_daemon_that_does_not_answer_fails(tmp_path: Path) -> None:
    """A live process named in the pid file, but nothing on the control socket."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "alacrityd"])
    try:
        (run_dir / "alacrityd.pid").write_text(f"{sleeper.pid}\n")
        code, lines, out = check(tmp_path=tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 1, out
    line = lines["alacrityd"]
    assert line.startswith("FAIL") and f"pid {sleeper.pid} runs but does not answer" in line, line


def test_help_teaches() -> None:
    proc = subprocess.run([sys.executable, "-m", "alacrity.cli", "check", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    text = proc.stdout
    for name in NAMES:
        assert re.search(rf"^  {re.escape(name)}\s", text, re.M), name
    for word in ("virt-host-validate", "PASS", "WARN", "FAIL", "exit status", "--id-range", "kvm_pvm", "TCG"):
        assert word in text, word
    top = subprocess.run([sys.executable, "-m", "alacrity.cli", "--help"], capture_output=True, text=True)
    assert re.search(r"^\s+check\s+check that this host can run Alacrity", top.stdout, re.M), top.stdout


def test_parsing_helpers() -> None:
    assert qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == (7, 2, 22)
    assert qemu_version("QEMU emulator version 8.1") == (8, 1)
    assert qemu_version("nonsense") is None
    d = Daemon(1, ["python", "-m", "alacrity.cli", "daemon", "--id-range", "700000:10", "--mount=/x"])
    assert d.id_range == "700000:10" and d.option("--mount") == "/x" and d.option("--run-dir") is None
