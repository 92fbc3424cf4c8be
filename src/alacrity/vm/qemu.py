"""Start and control one QEMU guest."""

from __future__ import annotations

import base64
import ctypes
import functools
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import jail
from .accel import AccelChoice, choose_accel
from .console import ConsoleScanner, follow_file, pump_stream
from .image import cache_root
from .machine import DEFAULT_MACHINE, machine
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
#: QEMU before 9.0 loses guest stores under TCG during a live migration (its commit
#: 03bfc2188f fixed it): the dirty-bitmap sync takes a fast path for a RAM block whose
#: length is a multiple of 64 pages, clearing the migration's dirty bits without resetting
#: TCG's TLB, so the vCPU's later stores through cached entries go unlogged and the
#: destination gets those pages stale (here 1 move in 6 to 13 with the host busy; the
#: guest's kernel then oopses or hangs). 8 KiB more RAM (QEMU's -m granularity) sends the
#: sync down its per-page path, which resets the TLB. KVM logs dirty pages in the kernel.
TCG_SAFE_MIGRATION = (9, 0)
TCG_RAM_PAD_KIB = 8
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
BASE_APPEND = "console=ttyS0 quiet panic=-1"
# x86 COMMAND_LINE_SIZE is 2048; leave room for the rest of the command line.
MAX_CMD_B64 = 1500
# Failed vhost-user-net setups (QEMU retries at once) before we give up on a guest.
NIC_INIT_ATTEMPTS = 5


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
    # "stdio" (teed to our stdout) or a log file path. When a device takes the serial port
    # (a bus's console device), QEMU still keeps a log of it: this path, or console.log in
    # the run directory for "stdio" (then echoed to our stdout).
    console: str | Path = "stdio"
    machine: str = DEFAULT_MACHINE
    # QEMU arguments of each device: a bus's (from its class's `qemu_args`), or raw ones.
    # NICs become eth0, eth1, ... in this order.
    devices: list[list[str]] = field(default_factory=list)
    ip: str | None = None  # ADDR/PREFIX for eth0
    gw: str | None = None
    run_dir: Path | None = None  # default: runtime_root() / name
    # The uid (and gid) QEMU runs as in a jail of its own (vm/jail.py): one of the range's
    # for root, the user's own for anyone else; None runs it as the caller, unjailed
    # (`vm run --no-jail`, and tests that measure the bare QEMU).
    jail_uid: int | None = None
    # Left running when its starter exits (`vm run --detach`): QEMU is not killed with it,
    # its console is logged in its own directory, and its jailer joins `detach_bus` as a
    # member itself (through the control socket `detach_control`), so that it stays on the
    # bus. Only jailed VMs detach.
    detach_bus: str | None = None
    detach_control: str = ""
    bus: str = ""  # the bus it runs on, for `vm list` and `vm exec` (recorded, not used)
    # A migration's destination (vm/migrate.py): QEMU waits for the VM's state instead of
    # booting it; its record stays in run_dir until the migration has succeeded.
    incoming: bool = False


def _opt(value: str | Path) -> str:
    """A value inside a QEMU option string, where a comma must be doubled."""
    return str(value).replace(",", ",,")


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


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) of the QEMU we run; (0, 0) if it does not say."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    found = re.search(r"version (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def ram_size(mem_mib: int, accel: AccelChoice) -> str:
    """The guest's RAM as QEMU's -m and memory backend take it (see TCG_RAM_PAD_KIB)."""
    if accel.accel == "tcg" and qemu_version() < TCG_SAFE_MIGRATION:
        return f"{mem_mib * 1024 + TCG_RAM_PAD_KIB}K"
    return f"{mem_mib}M"


def build_command(spec: VmSpec, run_dir: Path, accel: AccelChoice) -> list[str]:
    m = machine(spec.machine)
    machine_opts = ",".join(o for o in (m.name, m.options, "memory-backend=mem") if o)
    ram = ram_size(spec.mem_mib, accel)
    args = [
        QEMU, "-name", spec.name, "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", *accel.qemu_args(),
        "-machine", machine_opts, "-smp", str(spec.cpus), "-m", ram,
        # vhost-user backends map guest memory, so it must be a shareable fd.
        "-object", f"memory-backend-memfd,id=mem,size={ram},share=on",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", kernel_append(spec),
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
    ]
    if spec.incoming:
        # -S: the destination holds the VM paused once it has it; the migration resumes it
        # (vm/migrate.py), and only after that may the source be gone.
        args += ["-incoming", "defer", "-S"]
    for g in m.globals_:
        args += ["-global", g]
    serial = serial_chardev(spec.devices)
    if serial is not None:
        # A device has the serial port (a bus's console device): QEMU keeps a log of that
        # chardev too, which we scan for the ready and exit lines. QEMU writes it even
        # while the socket is down (a daemon restart), so it misses nothing.
        log = console_log(spec, run_dir)
        for extra in spec.devices:
            args += _with_logfile(extra, serial, log)
        return args
    if spec.console == "stdio":
        # signal=off: Ctrl-C goes to the guest shell, not to QEMU.
        args += ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
    else:
        args += ["-chardev", f"file,id=con,path={_opt(spec.console)}", "-serial", "chardev:con"]
    for extra in spec.devices:
        args += extra
    return args


def serial_chardev(devices: list[list[str]]) -> str | None:
    """The chardev id to which a device's arguments connect the serial port
    (`-serial chardev:ID`, as a bus's console device does), or None."""
    for extra in devices:
        for option, value in zip(extra, extra[1:], strict=False):
            if option == "-serial" and value.startswith("chardev:"):
                return value.removeprefix("chardev:")
    return None


def console_log(spec: VmSpec, run_dir: Path) -> Path:
    """Where the guest's console is logged when a device has the serial port."""
    return run_dir / "console.log" if spec.console == "stdio" else Path(spec.console)


def _with_logfile(extra: list[str], chardev: str, log: Path) -> list[str]:
    """`extra` with `logfile=LOG,logappend=on` added to the -chardev whose id is `chardev`."""
    out = list(extra)
    for i, (option, value) in enumerate(zip(extra, extra[1:], strict=False)):
        if option == "-chardev" and re.search(rf"(^|,)id={re.escape(chardev)}(,|$)", value):
            out[i + 1] = f"{value},logfile={_opt(log)},logappend=on"
    return out


def chardev_sockets(args: list[str]) -> dict[str, str]:
    """The socket path of each `-chardev socket,...` in a QEMU command line, by chardev id
    (`,,` in a value is a comma)."""
    found = {}
    for option, value in zip(args, args[1:], strict=False):
        if option == "-chardev" and value.startswith("socket,"):
            fields = dict(re.findall(r"(?:^|,)(id|path)=((?:[^,]|,,)*)", value))
            if "path" in fields:
                found[fields.get("id", "").replace(",,", ",")] = fields["path"].replace(",,", ",")
    return found


class VM:
    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.accel = (AccelChoice(spec.accel, "requested") if spec.accel else choose_accel())
        self.run_dir = Path(spec.run_dir or runtime_root() / spec.name)
        self.jailed = spec.jail_uid is not None
        # A jailed QEMU writes only in a directory of its own (its QMP socket and console
        # log), never beside vm.json, which root's `vm stop` trusts. A console log the user
        # named is copied there from QEMU's, by us.
        self.qemu_dir = self.run_dir / "qemu" if self.jailed else self.run_dir
        self.console_copy: Path | None = None
        if spec.detach_bus is not None and not self.jailed:
            raise VmError("only a jailed VM can be detached")
        if self.jailed:
            console = spec.console
            if spec.detach_bus is not None:
                console = self.qemu_dir / "console.log"  # nobody stays to copy it elsewhere
            elif console != "stdio":
                self.console_copy, console = Path(console), self.qemu_dir / "console.log"
            spec = replace(spec, console=console, kernel=Path(os.path.abspath(spec.kernel)),
                           initrd=Path(os.path.abspath(spec.initrd)))
        self.qemu_spec = spec
        self.cgroup = ""
        self.qmp_path = self.qemu_dir / "qmp.sock"
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
        """QEMU's own command line (what runs in the jail, if jailed)."""
        return build_command(self.qemu_spec, self.qemu_dir, self.accel)

    def _jailed(self, cmd: list[str]) -> list[str]:
        """The jailer's command line around QEMU's, after making what the jail mounts:
        QEMU's directory (its uid's), the empty mountpoint of the jail's root, the cgroup."""
        spec, uid = self.qemu_spec, self.spec.jail_uid
        assert uid is not None
        for path in (spec.kernel, spec.initrd):
            try:
                readable = os.stat(path).st_mode & 0o004
            except OSError as exc:
                raise VmError(f"cannot use {path}: {exc.strerror}") from None
            if not readable:
                raise VmError(f"{path} is not readable by others, so the guest's jail (uid {uid}) cannot "
                              f"read it: chmod o+r {path}")
        self.qemu_dir.mkdir(mode=0o700)
        as_root = os.geteuid() == 0
        if as_root:
            os.chown(self.qemu_dir, uid, uid)
        root = self.run_dir / "root"
        root.mkdir(mode=0o755)
        try:
            binary = jail.qemu_binary(cmd[0])
            # A migration's destination runs beside its source: a cgroup of its own.
            group = f"{spec.name}.{self.run_dir.name}" if spec.incoming else spec.name
            self.cgroup = jail.make_cgroup(group, spec.mem_mib, spec.cpus) if as_root else ""
            sandbox = jail.JailSpec(
                uid=uid, root=str(root), writable=str(self.qemu_dir),
                read_only=[binary, *jail.shared_libraries(binary, cache=cache_root()),
                           *(p for p in jail.QEMU_DATA if os.path.exists(p)), str(spec.kernel),
                           str(spec.initrd)],
                sockets=list(chardev_sockets(cmd).values()),
                devices=["null", "urandom"] + (["kvm"] if self.accel.accel == "kvm" else []),
                mem_mib=spec.mem_mib, cpus=spec.cpus, cgroup=self.cgroup, user_namespace=not as_root,
                join={"control": spec.detach_control, "bus": spec.detach_bus} if spec.detach_bus else None)
        except (jail.JailError, OSError) as exc:
            raise VmError(f"cannot jail the guest: {exc}") from None
        return jail.jailer_argv(sandbox, [binary, *cmd[1:], *jail.SANDBOX])

    def start(self) -> VM:
        if not self.spec.incoming and find_vm(self.spec.name, self.run_dir.parent) is not None:
            raise VmError(f"a VM named {self.spec.name!r} is already running")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True, mode=0o700)
        cmd = self.command()
        argv = self._jailed(cmd) if self.jailed else cmd
        on_bus = serial_chardev(self.spec.devices) is not None
        stdio = self.qemu_spec.console == "stdio" and not on_bus
        log = console_log(self.qemu_spec, self.qemu_dir)
        if not stdio:
            # A previous run's log would show a stale ready line.
            log.unlink(missing_ok=True)
        # Only an interactive guest shell reads our terminal.
        stdin = None if stdio and self.spec.cmd is None else subprocess.DEVNULL
        with open(self.run_dir / "qemu.log", "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=stdin, stderr=err,
                                         stdout=subprocess.PIPE if stdio else subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=None if self.spec.detach_bus else _die_with_parent)
        self.record = VmRecord(self.spec.name, self.proc.pid,
                               proc_start_time(self.proc.pid) or 0, str(self.qmp_path),
                               time.time(), cmd, "stdio" if stdio else str(log), str(self.run_dir),
                               self.spec.jail_uid, self.spec.bus, self.spec.detach_bus is not None,
                               spec_fields(self.spec), str(self.run_dir))
        write_record(self.record)
        if stdio:
            assert self.proc.stdout is not None
            self._pump = pump_stream(self.proc.stdout, self.console, _echo)
        else:
            echo = _echo if self.qemu_spec.console == "stdio" else None  # a bus console, shown here too
            if self.console_copy is not None:
                echo = _appender(self.console_copy)
            self._pump = follow_file(log, self.console,
                                     lambda: self.proc is not None and self.proc.poll() is None, echo)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.console.ready.wait(0.05):
            self._check_startup()
            if self.console.done.is_set() or self._proc().poll() is not None:
                if self.console.ready.wait(0.5):
                    return
                self._check_jail()
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
        self._check_jail()
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
            m = re.search(r"vhost-user,id=([^,]+),", failed[-1]) if failed else None
            socket = chardev_sockets(self.command()).get(m.group(1)) if m else None
            what = f"the NIC on {socket}" if socket else "a NIC"
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
        jail.remove_cgroup(self.cgroup)

    def qemu_pid(self) -> int | None:
        """QEMU's pid (the jailer's child when jailed), or None if it is not running."""
        if self.proc is None:
            return None
        return jail.jailed_pid(self.proc.pid) if self.jailed else self.proc.pid

    def _check_jail(self) -> None:
        """VmError with the jailer's own line if the jail could not be set up."""
        if not self.jailed or self.proc is None or self.proc.poll() != jail.JAIL_FAILED:
            return
        try:
            lines = (self.run_dir / "qemu.log").read_text(errors="replace").splitlines()
        except OSError:
            return
        why = next((line for line in reversed(lines) if line.startswith("alacrity jail:")), None)
        if why:
            raise VmError(f"{why.removeprefix('alacrity jail: ')}: the guest's jail could not be set up "
                          "(alacrity vm run --no-jail runs it unjailed, as root, to tell whether the jail "
                          "is the cause)")

    def _diagnostics(self) -> str:
        try:
            err = (self.run_dir / "qemu.log").read_text(errors="replace").strip()[-1000:]
        except OSError:
            err = ""
        out = f"\n--- console tail ---\n{self.console.tail()}"
        return out + (f"\n--- qemu stderr ---\n{err}" if err else "")


def spec_fields(spec: VmSpec) -> dict:
    """`spec` as JSON-able fields, for the VM's record (`vm migrate` starts it again)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()}


def spec_from_fields(fields: dict) -> VmSpec:
    spec = VmSpec(**fields)
    return replace(spec, kernel=Path(spec.kernel), initrd=Path(spec.initrd),
                   run_dir=Path(spec.run_dir) if spec.run_dir else None)


def _appender(path: Path) -> Callable[[bytes], None]:
    """Writes each chunk to `path` (made empty first), as QEMU would have written it."""
    out = open(path, "wb", buffering=0)  # noqa: SIM115 (kept open while the guest runs)

    def write(chunk: bytes) -> None:
        out.write(chunk)

    return write


def _die_with_parent() -> None:
    """In the child before exec: QEMU gets SIGKILL if the process that started it dies,
    so a killed `alacrity vm run` never leaves a guest behind."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)


#: Kernel lines that alarm for no reason, left out of what we echo (the log keeps them):
#: microvm has no PCI bus, and x86's PCI set-up says so as an error on every boot.
_NOISE = re.compile(rb"\[ *[0-9]+\.[0-9]+\] PCI: Fatal: No config space access function found\r?\n")


def _echo(chunk: bytes) -> None:
    chunk = _NOISE.sub(b"", chunk)
    # Under test capture sys.stdout may be a text-only stream.
    if (buf := getattr(sys.stdout, "buffer", None)) is not None:
        buf.write(chunk)
        buf.flush()
    else:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
