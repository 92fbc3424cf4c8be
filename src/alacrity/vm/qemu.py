"""Start and control one QEMU guest."""

from __future__ import annotations

import base64
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accel import AccelChoice, choose_accel
from .console import ConsoleScanner, follow_file, pump_stream
from .machine import DEFAULT_MACHINE, machine, virtio_device
from .runtime import (
    VmError,
    VmRecord,
    find_vm,
    kill_group,
    proc_start_time,
    runtime_root,
    stop_record,
    write_record,
)

QEMU = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
BASE_APPEND = "console=ttyS0 quiet panic=-1"
# x86 COMMAND_LINE_SIZE is 2048; leave room for the rest of the command line.
MAX_CMD_B64 = 1500


@dataclass
class VmSpec:
    name: str
    kernel: Path
    initrd: Path
    mem_mib: int = 512
    cpus: int = 1
    cmd: str | None = None  # run by /init with `sh -c`; None gives an interactive shell
    append: str = ""  # extra kernel command line
    accel: str | None = None  # "kvm"/"tcg"; None lets choose_accel() decide
    console: str | Path = "stdio"  # "stdio" (teed to our stdout) or a log file path
    machine: str = DEFAULT_MACHINE
    vhost_user_blk: list[str | Path] = field(default_factory=list)  # socket paths
    extra_devices: list[list[str]] = field(default_factory=list)  # raw QEMU args
    ip: str | None = None  # ADDR/PREFIX for eth0
    gw: str | None = None
    run_dir: Path | None = None  # default: runtime_root() / name


def kernel_append(spec: VmSpec) -> str:
    parts = [BASE_APPEND, machine(spec.machine).append]
    if spec.ip:
        parts.append(f"alacrity.ip={spec.ip}")
    if spec.gw:
        parts.append(f"alacrity.gw={spec.gw}")
    if spec.cmd is not None:
        encoded = base64.b64encode(spec.cmd.encode()).decode()
        if len(encoded) > MAX_CMD_B64:
            raise VmError(f"guest command too long for the kernel command line "
                          f"({len(encoded)} > {MAX_CMD_B64} base64 chars)")
        parts.append(f"alacrity.cmd={encoded}")
    parts.append(spec.append)
    return " ".join(p for p in parts if p)


def build_command(spec: VmSpec, run_dir: Path, accel: AccelChoice) -> list[str]:
    m = machine(spec.machine)
    machine_opts = ",".join(o for o in (m.name, m.options, "memory-backend=mem") if o)
    args = [
        QEMU, "-name", spec.name, "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", *accel.qemu_args(),
        "-machine", machine_opts, "-smp", str(spec.cpus), "-m", f"{spec.mem_mib}M",
        # vhost-user backends map guest memory, so it must be a shareable fd.
        "-object", f"memory-backend-memfd,id=mem,size={spec.mem_mib}M,share=on",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", kernel_append(spec),
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
    ]
    for g in m.globals_:
        args += ["-global", g]
    if spec.console == "stdio":
        # signal=off: Ctrl-C goes to the guest shell, not to QEMU.
        args += ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
    else:
        args += ["-chardev", f"file,id=con,path={spec.console}", "-serial", "chardev:con"]
    for i, sock in enumerate(spec.vhost_user_blk):
        args += ["-chardev", f"socket,id=vu{i},path={sock},reconnect=1"]
        args += virtio_device("vhost-user-blk", spec.machine, chardev=f"vu{i}", num_queues=1)
    for extra in spec.extra_devices:
        args += extra
    return args


class VM:
    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.accel = (AccelChoice(spec.accel, "requested") if spec.accel else choose_accel())
        self.run_dir = Path(spec.run_dir or runtime_root() / spec.name)
        self.qmp_path = self.run_dir / "qmp.sock"
        self.console = ConsoleScanner()
        self.proc: subprocess.Popen[bytes] | None = None
        self.record: VmRecord | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return build_command(self.spec, self.run_dir, self.accel)

    def start(self) -> VM:
        if find_vm(self.spec.name, self.run_dir.parent) is not None:
            raise VmError(f"a VM named {self.spec.name!r} is already running")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True, mode=0o700)
        cmd = self.command()
        stdio = self.spec.console == "stdio"
        if not stdio:
            # A previous run's log would show a stale ready line.
            Path(self.spec.console).unlink(missing_ok=True)
        # Only an interactive guest shell reads our terminal.
        stdin = None if stdio and self.spec.cmd is None else subprocess.DEVNULL
        with open(self.run_dir / "qemu.log", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=stdin, stderr=err,
                                         stdout=subprocess.PIPE if stdio else subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self.record = VmRecord(self.spec.name, self.proc.pid,
                               proc_start_time(self.proc.pid) or 0, str(self.qmp_path),
                               time.time(), cmd, str(self.spec.console), str(self.run_dir))
        write_record(self.record)
        if stdio:
            assert self.proc.stdout is not None
            self._pump = pump_stream(self.proc.stdout, self.console, _echo)
        else:
            self._pump = follow_file(Path(self.spec.console), self.console,
                                     lambda: self.proc is not None and self.proc.poll() is None)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.console.ready.wait(0.05):
            if self.console.done.is_set() or self._proc().poll() is not None:
                if self.console.ready.wait(0.5):
                    return
                raise VmError(f"QEMU exited before the guest was ready{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest not ready in {timeout}s{self._diagnostics()}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for QEMU to exit; the guest command's status, or QEMU's own without one."""
        proc = self._proc()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"guest still running after {timeout}s{self._diagnostics()}") \
                from None
        self.console.done.wait(2.0)
        self._cleanup()
        if self.console.exit_status is not None:
            return self.console.exit_status
        if self.spec.cmd is not None:
            raise VmError(f"guest ended without ALACRITY-EXIT (qemu {code}){self._diagnostics()}")
        return code

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.record is None:
            return
        stop_record(self.record, grace)
        self.proc.wait()
        self._cleanup()

    def kill(self) -> None:
        if self.proc is None or self.record is None:
            return
        kill_group(self.record)
        self.proc.wait()
        self._cleanup()

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise VmError("VM not started")
        return self.proc

    def _cleanup(self) -> None:
        if self._pump is not None:
            self._pump.join(2.0)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        (self.run_dir / "vm.json").unlink(missing_ok=True)

    def _diagnostics(self) -> str:
        try:
            err = (self.run_dir / "qemu.log").read_text(errors="replace").strip()[-1000:]
        except OSError:
            err = ""
        out = f"\n--- console tail ---\n{self.console.tail()}"
        return out + (f"\n--- qemu stderr ---\n{err}" if err else "")


def _die_with_parent() -> None:
    """In the child before exec: QEMU gets SIGKILL if the process that started it dies,
    so a killed `alacrity vm run` never leaves a guest behind."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)


def _echo(chunk: bytes) -> None:
    # Under test capture sys.stdout may be a text-only stream.
    if (buf := getattr(sys.stdout, "buffer", None)) is not None:
        buf.write(chunk)
        buf.flush()
    else:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()


def run_command(spec: VmSpec, timeout: float = 300.0) -> int:
    """Boot, run spec.cmd, and return its exit status; QEMU is always killed."""
    vm = VM(spec).start()
    try:
        return vm.wait_exit(timeout)
    finally:
        vm.kill()

