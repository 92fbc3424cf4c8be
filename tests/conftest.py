"""Shared fixtures: a real alacrityd process with its own admin tree, sockets and store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def need(condition: bool, why: str) -> None:
    if not condition:
        pytest.skip(why)


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@dataclass
class Daemon:
    """An alacrityd under test; `env` points clients and the CLI at it."""

    root: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # more alacrityd options, e.g. --metrics

    def __post_init__(self) -> None:
        if not self.env:
            self.env = {**os.environ, "ALACRITY_RUN_DIR": str(self.run_dir),
                        "ALACRITY_ADMIN": str(self.admin), "ALACRITY_VM_DIR": str(self.root / "vms")}

    @property
    def admin(self) -> Path:
        return self.root / "admin"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    def start(self, timeout: float = 20.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "alacrity.cli",
                    "daemon",
                    "--mount",
                    str(self.admin),
                    "--state-dir",
                    str(self.state_dir),
                    "--run-dir",
                    str(self.run_dir),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        pidfile = self.run_dir / "alacrityd.pid"
        # A daemon killed with -9 leaves its pid file: wait for this one's.
        while not (pidfile.exists() and pidfile.read_text().strip() == str(self.proc.pid)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"alacrityd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.unmount()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.unmount()

    def unmount(self) -> None:
        # A dead FUSE daemon leaves a mount that answers ENOTCONN (ismount says False).
        subprocess.run(["fusermount3", "-u", "-z", str(self.admin)], check=False, capture_output=True)

    def sh(self, script: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run an admin shell script with A set to the admin tree."""
        return subprocess.run(
            ["sh", "-ec", script],
            env={**self.env, "A": str(self.admin)},
            capture_output=True,
            text=True,
            check=check,
            **kw,
        )

    def make_disk(self, name: str, bus: str, image: Path, size: str = "64M", extra: str = "") -> None:
        self.sh(f"""
            mkdir -p $A/devices/{name}
            echo blk > $A/devices/{name}/type
            echo {image} > $A/devices/{name}/path
            echo {size} > $A/devices/{name}/size
            {extra}
            [ -d $A/buses/{bus} ] || mkdir $A/buses/{bus}
            ln -s ../../devices/{name} $A/buses/{bus}/{name}
        """)

    def make_switch(self, name: str, buses: list[str], extra: str = "") -> None:
        links = "".join(
            f"[ -d $A/buses/{bus} ] || mkdir $A/buses/{bus}\n"
            f"ln -s ../../devices/{name} $A/buses/{bus}/{name}\n"
            for bus in buses
        )
        self.sh(f"mkdir $A/devices/{name}\necho switch > $A/devices/{name}/type\n{extra}\n{links}")

    @staticmethod
    def vm_run_argv(bus: str, cmd: str, log: Path, image) -> list[str]:
        """`alacrity vm run` of the default guest, its console to `log`."""
        return [
            sys.executable,
            "-m",
            "alacrity.cli",
            "vm",
            "run",
            "--bus",
            bus,
            "--cmd",
            cmd,
            "--log",
            str(log),
            "--kernel",
            str(image.kernel),
            "--initrd",
            str(image.initrd),
        ]

    def in_bus(self, bus: str, code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run Python `code` in a new process that `alacrity bus exec` admits to `bus`."""
        return subprocess.run(
            [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--", sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root (FUSE allow_other, membership as root)")
    d = Daemon(tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def guest_image():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    from alacrity.vm.image import default_image

    return default_image(progress=False)
