"""Start and control one QEMU guest."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import ipaddress
import os
import re
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
# Failed vhost-user-net setups (QEMU retries at once) before we give up on a guest.
NIC_INIT_ATTEMPTS = 5


@dataclass(frozen=True)
class NetAttachment:
    """One NIC: QEMU connects to `socket` (a vhost-user-net backend: a switch port) as
    the vhost-user client; the guest driver sees `mac`."""

    socket: str | Path
    mac: str  # xx:xx:xx:xx:xx:xx, unicast


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
    nics: list[NetAttachment] = field(default_factory=list)  # eth0, eth1, ... in this order
    extra_devices: list[list[str]] = field(default_factory=list)  # raw QEMU args
    ip: str | None = None  # ADDR/PREFIX for eth0
    gw: str | None = None
    run_dir: Path | None = None  # default: runtime_root() / name


def _opt(value: str | Path) -> str:
    """A value inside a QEMU option string, where a comma must be doubled."""
    return str(value).replace(",", ",,")


def check_mac(text: str) -> str:
    """`text` as a lowercase xx:xx:xx:xx:xx:xx unicast MAC address, else ValueError."""
    parts = text.strip().split(":")
    try:
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ValueError
        octets = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r} (use xx:xx:xx:xx:xx:xx)") from None
    if octets[0] & 1:
        raise ValueError(f"{text!r} is a multicast address; a NIC needs a unicast one")
    if octets == bytes(6):
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return ":".join(f"{b:02x}" for b in octets)


def local_mac(seed: str | None = None) -> str:
    """A locally administered unicast MAC: derived from `seed` (stable, e.g. "VMNAME/0"),
    or random without one."""
    raw = bytearray(hashlib.sha256(seed.encode()).digest()[:6] if seed is not None else os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


def check_network(ip: str | None, gw: str | None) -> None:
    """ValueError unless `ip` is ADDR/PREFIX and `gw` an address of the same family
    (each message names the option: --ip or --gw)."""
    if ip is not None:
        if "/" not in ip:
            raise ValueError(f"--ip {ip}: give the prefix length too, e.g. {ip}/24")
        try:
            iface = ipaddress.ip_interface(ip)
        except ValueError:
            raise ValueError(f"--ip {ip}: not ADDR/PREFIX (e.g. 10.0.0.2/24)") from None
    if gw is not None:
        if ip is None:
            raise ValueError("--gw needs --ip (eth0 has no address to route from)")
        try:
            gateway = ipaddress.ip_address(gw)
        except ValueError:
            raise ValueError(f"--gw {gw}: not an IP address") from None
        if gateway.version != iface.version:
            raise ValueError(f"--gw {gw} and --ip {ip} are of different address families")


def kernel_append(spec: VmSpec) -> str:
    try:
        check_network(spec.ip, spec.gw)
    except ValueError as exc:
        raise VmError(str(exc)) from None
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
        args += ["-chardev", f"file,id=con,path={_opt(spec.console)}", "-serial", "chardev:con"]
    for i, sock in enumerate(spec.vhost_user_blk):
        args += ["-chardev", f"socket,id=vu{i},path={_opt(sock)},reconnect=1"]
        args += virtio_device("vhost-user-blk", spec.machine, chardev=f"vu{i}", num_queues=1)
    for i, nic in enumerate(spec.nics):
        try:
            mac = check_mac(nic.mac)
        except ValueError as exc:
            raise VmError(str(exc)) from None
        # QEMU connects before the guest starts and waits for the backend's answers;
        # reconnect=1 only matters if the socket is absent (then QEMU retries every
        # second) or the backend restarts.
        args += ["-chardev", f"socket,id=net{i},path={_opt(nic.socket)},reconnect=1",
                 "-netdev", f"vhost-user,id=n{i},chardev=net{i}"]
        # vectors=0 (PCI only): QEMU 7.2 under TCG crashes with MSI-X on vhost-user net.
        args += virtio_device("virtio-net", spec.machine, netdev=f"n{i}", mac=mac, vectors=0)
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
        self._log_offset = 0
        self._nic_failures = 0

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
            self._check_startup()
            if self.console.done.is_set() or self._proc().poll() is not None:
                if self.console.ready.wait(0.5):
                    return
                raise VmError(f"QEMU exited before the guest was ready{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest not ready in {timeout}s{self._diagnostics()}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for QEMU to exit; the guest command's status, or QEMU's own without one."""
        proc = self._proc()
        deadline = time.monotonic() + timeout
        while not self.console.ready.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
            self._check_startup()
        try:
            code = proc.wait(max(0.0, deadline - time.monotonic()))
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

    def _check_startup(self) -> None:
        """VmError if QEMU keeps failing to set up a vhost-user NIC. With reconnect=1 it
        retries at once and forever when the backend accepts and then closes (as the gate
        does for a refused peer), so the guest would never start and nothing would say why."""
        if not self.spec.nics:
            return
        try:
            with open(self.run_dir / "qemu.log", "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read(1 << 20)
        except OSError:
            return
        complete = chunk.rfind(b"\n") + 1
        self._log_offset += complete
        lines = chunk[:complete].decode(errors="replace").splitlines()
        failed = [line for line in lines if "failed to init vhost_net" in line]
        self._nic_failures += len(failed)
        if self._nic_failures >= NIC_INIT_ATTEMPTS:
            m = re.search(r"vhost-user,id=n(\d+),", failed[-1]) if failed else None
            nic = self.spec.nics[int(m.group(1))] if m and int(m.group(1)) < len(self.spec.nics) else None
            what = f"the NIC on {nic.socket}" if nic else "a NIC"
            raise VmError(f"QEMU cannot set up {what}: the vhost-user backend closed the connection "
                          f"during setup, {self._nic_failures} times (a switch on a bus refuses "
                          f"non-members; see the daemon's log){self._diagnostics()}")

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

