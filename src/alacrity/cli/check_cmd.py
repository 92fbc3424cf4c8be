"""`alacrity check`: is this host ready to run Alacrity?

Like libvirt's virt-host-validate: each check prints one line, PASS, WARN (it works, but
slower or less safely; the line says what to do) or FAIL (something Alacrity needs is
missing; the line says how to fix it). Checks only look: they build, mount and start
nothing. Heavy imports happen inside the checks, so `alacrity --help` stays quick.
"""

from __future__ import annotations

import argparse
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
APT = "apt-get install --no-install-recommends"
TESTED_QEMU = (7, 2)  # Debian 12's; the version the tests and figures use
JAIL_CONTROLLERS = ("cpu", "memory", "pids")

DESCRIPTION = """\
Check that this host can run Alacrity, as libvirt's virt-host-validate does: one line per
check, PASS, WARN (works, but slower or less safely: the line says what to do) or FAIL
(something Alacrity needs is missing: the line says how to fix it). It only looks: it
builds, mounts and starts nothing, and needs no daemon.

  KVM            hardware virtualization for guests. Without it, or with nested PVM
                 (kvm_pvm, which cannot run stock Linux guests), QEMU emulates with TCG:
                 it works, several times slower.
  QEMU           qemu-system-x86_64 on PATH, and its version
  QEMU devices   what 'alacrity vm run' asks of QEMU: the microvm machine, vhost-user-blk,
                 virtio-net on a vhost-user netdev, memfd guest memory, socket chardevs
  FUSE           /dev/fuse (the real device), libfuse3 and fusermount3: the admin tree
  cgroup v2      and its cpu, memory and pids controllers, which the VM jail uses for limits
  id range       the uids alacrityd gives its unprivileged processes (--id-range) are
                 nobody else's: no account, group or subordinate range (/etc/subuid)
  guest image    the default guest (kernel + initramfs) is built, or can be
  tap            /dev/net/tun, for a switch's uplink to the host
  switch engine  the switch's native fast path is built, or can be (C compiler, headers)
  peer identity  SO_PEERPIDFD (Linux 6.5+): the gate identifies peers without a pid race
  alacrityd      the daemon answers on its control socket, and its admin tree is mounted

The daemon is looked for where the other commands look: ALACRITY_RUN_DIR (default
/run/alacrityd) and ALACRITY_ADMIN (default /run/alacrity), or --run-dir and --mount.
Its --id-range is read from the running daemon, else alacrityd's default is checked.
"""

EPILOG = """\
exit status: 0 when nothing FAILs (warnings allowed), 1 when something needed is missing,
2 on a usage error. Run it as the user who runs alacrityd (root) for the full picture.
examples:
  alacrity check                       # this host, before or after starting alacrityd
  alacrity check --id-range 700000:500 # would this range be safe for alacrityd?
"""


@dataclass
class Result:
    status: str  # PASS, WARN or FAIL
    name: str
    detail: str
    fix: str = ""  # what to do, for WARN and FAIL

    def line(self) -> str:
        fix = f". What to do: {self.fix}" if self.fix and self.status != PASS else ""
        return f"{self.status}  {self.name:<15}{self.detail}{fix}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="check that this host can run Alacrity (KVM, QEMU, FUSE, ...)",
                            description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="alacrityd's sockets (default: $ALACRITY_RUN_DIR or /run/alacrityd)")
    parser.add_argument("--mount", type=Path, metavar="DIR",
                        help="alacrityd's admin tree (default: $ALACRITY_ADMIN or /run/alacrity)")
    parser.add_argument("--id-range", metavar="START:COUNT",
                        help="check this range instead of the running daemon's (or the default)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="the guest image cache (default: as 'alacrity image build')")


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path(os.environ.get("ALACRITY_RUN_DIR", "/run/alacrityd"))
    daemon = find_daemon(run_dir)
    mount = args.mount or Path((daemon and daemon.option("--mount"))
                               or os.environ.get("ALACRITY_ADMIN", "/run/alacrity"))
    counts = {PASS: 0, WARN: 0, FAIL: 0}
    failed = []
    for result in checks(run_dir, mount, daemon, args.id_range, args.cache):
        print(result.line(), flush=True)
        counts[result.status] += 1
        if result.status == FAIL:
            failed.append(result.name)
    summary = f"{counts[PASS]} passed, {counts[WARN]} warned, {counts[FAIL]} failed"
    if failed:
        print(f"alacrity check: {summary}: fix {', '.join(failed)} (see the lines above)")
        return 1
    print(f"alacrity check: {summary}: this host can run Alacrity"
          + (" (see the warnings above)" if counts[WARN] else ""))
    return 0


def checks(run_dir: Path, mount: Path, daemon: Daemon | None, id_range: str | None,
           cache: Path | None) -> Iterator[Result]:
    steps: list[tuple[str, Callable[[], Result | list[Result]]]] = [
        ("KVM", check_kvm),
        ("QEMU", check_qemu),
        ("FUSE", check_fuse),
        ("cgroup v2", check_cgroup),
        ("id range", lambda: check_id_range(id_range, daemon)),
        ("guest image", lambda: check_image(cache)),
        ("tap", check_tun),
        ("switch engine", check_switch_engine),
        ("peer identity", check_peer_identity),
        ("alacrityd", lambda: check_daemon(run_dir, mount, daemon)),
    ]
    for name, step in steps:
        try:
            got = step()
        except Exception as exc:  # a check that cannot look says so; it never stops the others
            got = Result(WARN, name, f"could not check: {type(exc).__name__}: {exc}",
                         "report this as a bug in alacrity check")
        yield from got if isinstance(got, list) else [got]


# --- KVM -----------------------------------------------------------------------------------

def check_kvm(dev: str = "/dev/kvm", sys_module: str = "/sys/module") -> Result:
    from alacrity.vm.accel import choose_accel

    try:
        choice = choose_accel(dev, sys_module)  # what 'vm run' will do, for the same reason
    except ValueError as exc:  # a bad ALACRITY_ACCEL
        return Result(FAIL, "KVM", str(exc), "unset ALACRITY_ACCEL, or set it to kvm or tcg")
    if choice.accel == "kvm":
        status = WARN if "forced" in choice.reason else PASS
        return Result(status, "KVM", f"guests run with KVM: {choice.reason}",
                      "unset ALACRITY_ACCEL to let alacrity choose")
    reason = choice.reason
    if "forced" in reason:
        fix = "unset ALACRITY_ACCEL to use KVM where the host has it"
    elif "kvm_pvm" in reason:
        reason = ("/dev/kvm is kvm_pvm (nested PVM), which cannot run stock Linux guests, "
                  "so guests are emulated (slower)")
        fix = ("nothing, TCG works; for KVM, run on a host that exposes VT-x/AMD-V (bare metal, or a VM "
               "with nested virtualization), or set ALACRITY_ACCEL=kvm if this /dev/kvm is a hardware KVM")
    elif "Permission denied" in reason:
        fix = f"add this user to the group of {dev} (usually kvm: adduser $USER kvm), then log in again"
    elif "No such file" in reason:
        reason = f"no {dev}, so guests are emulated (slower)"
        fix = ("enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (modprobe); in a VM, "
               "enable nested virtualization; in a container, pass --device /dev/kvm")
    else:
        fix = f"check that {dev} is the kernel's KVM device (dmesg | grep -i kvm)"
    return Result(WARN, "KVM", f"TCG: {reason}", fix)


# --- QEMU ----------------------------------------------------------------------------------

def qemu_version(text: str) -> tuple[int, ...] | None:
    """(7, 2, 22) from `qemu-system-x86_64 --version` output."""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def _qemu_help(qemu: str, option: str) -> str:
    done = subprocess.run([qemu, option, "help"], capture_output=True, text=True, timeout=30)
    return done.stdout


def qemu_features(qemu: str) -> dict[str, set[str]]:
    """What this QEMU has, asked of QEMU itself (`-device help`, `-machine help`, ...)."""
    devices = set(re.findall(r'^name "([^"]+)"', _qemu_help(qemu, "-device"), re.M))
    machines = {line.split()[0] for line in _qemu_help(qemu, "-machine").splitlines()[1:] if line.strip()}

    def listing(option: str) -> set[str]:  # a header line, then one name per line
        return {line.strip() for line in _qemu_help(qemu, option).splitlines()[1:] if line.strip()}

    return {"-machine": machines, "-device": devices, "-netdev": listing("-netdev"),
            "-object": listing("-object"), "-chardev": listing("-chardev"), "-accel": listing("-accel")}


def qemu_needs() -> list[tuple[str, str, str]]:
    """(option, name, why): what `alacrity vm run` puts on QEMU's command line, with the
    model names the launcher itself picks for its default machine (vm/machine.py)."""
    from alacrity.vm.machine import DEFAULT_MACHINE, virtio_device

    def model(kind: str) -> str:
        return virtio_device(kind, DEFAULT_MACHINE)[1].split(",")[0]

    return [
        ("-machine", DEFAULT_MACHINE, "the default machine"),
        ("-device", model("vhost-user-blk"), "disks"),
        ("-device", model("virtio-net"), "NICs"),
        ("-netdev", "vhost-user", "NICs on a switch"),
        ("-object", "memory-backend-memfd", "guest memory the backends can map"),
        ("-chardev", "socket", "vhost-user and QMP sockets"),
        ("-accel", "tcg", "emulation where KVM is not usable"),
    ]


def check_qemu() -> list[Result]:
    from alacrity.vm.qemu import QEMU

    fix_install = f"{APT} qemu-system-x86 (Debian 12 has 7.2)"
    path = shutil.which(QEMU)
    if path is None:
        return [Result(FAIL, "QEMU", f"{QEMU} is not on PATH, so no VM can start", fix_install)]
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    version = qemu_version(done.stdout)
    if done.returncode != 0 or version is None:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return [Result(FAIL, "QEMU", f"{path} --version failed: {why[0]}", fix_install)]
    shown = ".".join(map(str, version))
    if version[:2] < TESTED_QEMU:
        tested = ".".join(map(str, TESTED_QEMU))
        first = Result(WARN, "QEMU", f"{path} is QEMU {shown}, older than the {tested} Alacrity is tested "
                       "with", f"install QEMU {tested} or later ({fix_install})")
    else:
        first = Result(PASS, "QEMU", f"{path}, QEMU {shown}")
    have = qemu_features(path)
    needs = qemu_needs()
    missing = [f"{name} ({why})" for option, name, why in needs if name not in have[option]]
    if missing:
        second = Result(FAIL, "QEMU devices", f"{path} lacks: {'; '.join(missing)}",
                        f"install a full QEMU for x86: {fix_install}")
    else:
        pci = [n for n in ("vhost-user-blk-pci", "virtio-net-pci") if n in have["-device"]]
        second = Result(PASS, "QEMU devices", ", ".join(name for _, name, _ in needs)
                        + (f" (and {', '.join(pci)} for pc/q35)" if pci else ""))
    return [first, second]


# --- FUSE ----------------------------------------------------------------------------------

def char_device_name(rdev: int) -> str | None:
    """The kernel's name for a character device number (fuse, null, tun), from sysfs."""
    try:
        return os.path.basename(os.readlink(f"/sys/dev/char/{os.major(rdev)}:{os.minor(rdev)}"))
    except OSError:
        return None


def check_fuse(dev: str = "/dev/fuse") -> Result:
    load = "load FUSE (modprobe fuse); in a container, pass the host's device (--device /dev/fuse)"
    try:
        st = os.stat(dev)
    except OSError as exc:
        return Result(FAIL, "FUSE", f"{dev}: {exc.strerror}, so alacrityd cannot mount its admin tree", load)
    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    name = char_device_name(st.st_rdev) if stat.S_ISCHR(st.st_mode) else None
    if not stat.S_ISCHR(st.st_mode) or name not in ("fuse", None) or (name is None and number != "10:229"):
        what = f"character device {number} ({name or 'unknown'})" if stat.S_ISCHR(st.st_mode) else "no device"
        covered = any(point == dev for point, _ in mounts())
        return Result(FAIL, "FUSE", f"{dev} is {what}, not the FUSE device (10:229), so alacrityd cannot "
                      f"mount its admin tree{'; something is mounted over it' if covered else ''}",
                      f"unmount it (umount {dev}), then {load}" if covered else load)
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Result(FAIL, "FUSE", f"{dev} cannot be opened: {exc.strerror}",
                      "run alacrityd as root" if exc.errno == errno.EACCES else load)
    library = ctypes.util.find_library("fuse3")
    if library is None:
        return Result(FAIL, "FUSE", "libfuse3 is missing (alacrityd's admin tree is built on it)",
                      f"{APT} fuse3")
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        return Result(FAIL, "FUSE", "fusermount3 is not on PATH (alacrityd unmounts its admin tree with it)",
                      f"{APT} fuse3")
    return Result(PASS, "FUSE", f"{dev}, {library}, {fusermount}")


# --- cgroup v2 -----------------------------------------------------------------------------

def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in order."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                found.append((point, right.split()[0]))
    return found


def check_cgroup() -> Result:
    table = mounts()
    v2 = [point for point, fstype in table if fstype == "cgroup2"]
    v1 = [point for point, fstype in table if fstype == "cgroup"]
    fix = ("boot the host with cgroup v2 alone (systemd.unified_cgroup_hierarchy=1 on the kernel command "
           "line, the default since Debian 11); in a container, give it the host's cgroup v2")
    why = "without them jailed guests get rlimits but no memory.max, cpu.max or pids.max"
    if not v2:
        return Result(WARN, "cgroup v2", f"no cgroup v2 mounted ({why})", fix)
    root = "/sys/fs/cgroup" if "/sys/fs/cgroup" in v2 else v2[0]
    try:
        controllers = Path(root, "cgroup.controllers").read_text().split()
    except OSError as exc:
        return Result(WARN, "cgroup v2", f"cannot read {root}/cgroup.controllers: {exc.strerror}", fix)
    missing = [c for c in JAIL_CONTROLLERS if c not in controllers]
    mode = "hybrid, beside cgroup v1," if v1 else "unified"
    have = " ".join(controllers) or "none"
    if missing:
        return Result(WARN, "cgroup v2", f"{mode} at {root}, controllers: {have}; without "
                      f"{', '.join(missing)} ({why})", fix)
    if v1:
        return Result(WARN, "cgroup v2", f"{mode} at {root}, controllers: {have}", fix)
    return Result(PASS, "cgroup v2", f"{mode} at {root}, controllers: {have}")


# --- the id range --------------------------------------------------------------------------

def subordinate_ranges(path: str) -> list[tuple[str, int, int]]:
    """(owner, start, count) lines of /etc/subuid or /etc/subgid."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    found.append((parts[0], int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return found


def processes_by_uid(lo: int, hi: int) -> dict[int, list[int]]:
    """uid -> pids, for processes whose real, effective, saved or fs uid is in [lo, hi)."""
    found: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                uids = next((line.split()[1:] for line in f if line.startswith(b"Uid:")), [])
        except OSError:
            continue
        for uid in {int(u) for u in uids}:
            if lo <= uid < hi:
                found.setdefault(uid, []).append(int(entry.name))
    return found


def check_id_range(text: str | None, daemon: Daemon | None) -> Result:
    import grp
    import pwd

    from alacrity import ids

    if text is not None:
        source = "given"
    elif daemon is not None and daemon.id_range:
        text, source = daemon.id_range, f"from alacrityd pid {daemon.pid}"
    else:
        text, source = f"{ids.DEFAULT_START}:{ids.DEFAULT_COUNT}", "alacrityd's default"
    try:
        start, count = ids.parse_range(text)
    except ValueError as exc:
        return Result(FAIL, "id range", str(exc), "write START:COUNT, e.g. --id-range 900000:1000")
    end = start + count
    shown = f"{start}:{count} ({source}, uids {start}-{end - 1})"
    choose = ("give alacrityd a range nothing else uses: alacrityd --id-range START:COUNT "
              f"(now {start}:{count})")
    clash = [f"user {p.pw_name} ({p.pw_uid})" for p in pwd.getpwall() if start <= p.pw_uid < end]
    clash += [f"group {g.gr_name} ({g.gr_gid})" for g in grp.getgrall() if start <= g.gr_gid < end]
    for path in ("/etc/subuid", "/etc/subgid"):
        clash += [f"{path} range of {owner} ({lo}-{lo + n - 1})"
                  for owner, lo, n in subordinate_ranges(path) if lo < end and start < lo + n]
    if clash:
        return Result(FAIL, "id range", f"{shown} overlaps {', '.join(clash[:4])}"
                      f"{' and more' if len(clash) > 4 else ''}: a switch would share its ids and could be "
                      "signalled or traced from there", choose)
    in_use = processes_by_uid(start, end)
    note = f"; {len(in_use)} in use now" if in_use else ""
    if in_use and daemon is None:
        uid, pids = next(iter(sorted(in_use.items())))
        return Result(WARN, "id range", f"{shown}: no account uses it, but uid {uid} runs pid {pids[0]} "
                      "while no alacrityd runs (leftovers are skipped, so fewer ids are free)",
                      f"find out what runs as uid {uid} (ps -o pid,user,cmd -u {uid}); or {choose}")
    return Result(PASS, "id range", f"{shown}: no account, group or subordinate range uses it{note}")


# --- the default guest image ---------------------------------------------------------------

def check_image(cache: Path | None) -> Result:
    from alacrity.vm import image, initramfs

    root = image.cache_root(cache)
    current = root / "current"
    build = "alacrity image build (or let the first 'alacrity vm run' build it)"
    try:
        meta = json.loads((current / "image.json").read_text())
    except (OSError, ValueError):
        meta = None
    if meta is not None and (current / "vmlinuz").exists() and (current / "initrd.img").exists():
        extras = "with " + (", ".join(Path(e).name for e in meta.get("extras", [])) or "no extra tools")
        what = f"{current.resolve()}: kernel {meta.get('kernel_version', '?')}, {extras}"
        if meta.get("recipe") == image.recipe_key():
            return Result(PASS, "guest image", what)
        return Result(WARN, "guest image", f"{what}; out of date (its recipe changed), so the next "
                      "'alacrity vm run' rebuilds it first", build)
    missing = [tool for tool in ("apt-get", "dpkg-deb", "ldd") if shutil.which(tool) is None]
    if shutil.which("depmod") is None and not Path("/usr/sbin/depmod").exists():
        missing.append("depmod (kmod)")
    try:
        initramfs.find_busybox()
    except RuntimeError:
        missing.append("a static busybox (busybox-static)")
    if missing:
        return Result(FAIL, "guest image", f"not built in {root}, and it cannot be: no {', '.join(missing)}",
                      f"{APT} busybox-static kmod (or run ./scripts/install-deps), then alacrity image build")
    return Result(WARN, "guest image", f"not built yet in {root} (it downloads Debian's cloud kernel)", build)


# --- the rest of the host ------------------------------------------------------------------

def check_tun(dev: str = "/dev/net/tun") -> Result:
    fix = "load it (modprobe tun); in a container, pass --device /dev/net/tun"
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Result(WARN, "tap", f"{dev}: {exc.strerror}: a switch cannot have a tap uplink to the host "
                      "(VMs and processes on a switch still reach each other)",
                      "run alacrityd as root" if exc.errno == errno.EACCES else fix)
    return Result(PASS, "tap", f"{dev}: switches can have a tap uplink to the host")


def check_switch_engine() -> Result:
    import importlib.machinery

    if os.environ.get("ALACRITY_SWITCH_ENGINE") == "python":
        return Result(WARN, "switch engine", "ALACRITY_SWITCH_ENGINE=python: switches use the Python "
                      "reference engine (several times slower)", "unset ALACRITY_SWITCH_ENGINE")
    from alacrity.switch import native

    try:
        name = native.module_name()
    except ImportError:
        return Result(WARN, "switch engine", "cffi is not installed: switches use the Python engine "
                      "(several times slower)", "pip install -e . (cffi is a dependency)")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    built = Path(base, "alacrity", "native", name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if built.exists():
        return Result(PASS, "switch engine", f"native fast path built: {built}")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    header = Path(sysconfig.get_paths()["include"], "Python.h")
    lacking = [what for what, ok in ((f"a C compiler ({compiler})", shutil.which(compiler)),
                                     (f"Python's headers ({header})", header.exists())) if not ok]
    if lacking:
        return Result(WARN, "switch engine", f"the native fast path cannot be built without "
                      f"{' or '.join(lacking)}: switches use the Python engine (several times slower)",
                      f"{APT} gcc python3-dev")
    return Result(PASS, "switch engine", f"native fast path: built with {compiler} at its first use")


def check_peer_identity() -> Result:
    from alacrity.bus.identity import SO_PEERPIDFD

    a, b = socket.socketpair()
    try:
        os.close(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as exc:
        return Result(WARN, "peer identity", f"no SO_PEERPIDFD on Linux {os.uname().release} "
                      f"({exc.strerror}): the gate identifies peers by pid and start time, which a pid "
                      "reused between connect and accept can defeat", "run a Linux 6.5 or later kernel")
    finally:
        a.close()
        b.close()
    return Result(PASS, "peer identity", "SO_PEERPIDFD: the gate knows each peer by its pidfd")


# --- the daemon ----------------------------------------------------------------------------

@dataclass
class Daemon:
    pid: int
    argv: list[str]

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    @property
    def id_range(self) -> str | None:
        return self.option("--id-range")


def find_daemon(run_dir: Path) -> Daemon | None:
    """The alacrityd whose pid file is in `run_dir`, if that process still runs."""
    try:
        pid = int((run_dir / "alacrityd.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (OSError, ValueError):
        return None
    return Daemon(pid, argv) if any("alacrity" in arg for arg in argv) else None


def check_daemon(run_dir: Path, mount: Path, daemon: Daemon | None) -> Result:
    from alacrity import client

    start = "start it (as root): alacrityd &"
    try:
        client.ask(run_dir, {"op": "whoami"})
        answers, why = True, ""
    except (client.GateError, OSError, ValueError) as exc:
        answers, why = False, str(exc)
    fuse = [point for point, fstype in mounts() if point == str(mount) and fstype.startswith("fuse")]
    try:
        os.stat(mount)
        stale = False
    except OSError as exc:
        stale = exc.errno == errno.ENOTCONN
    if daemon is None and not answers:
        if stale or fuse:
            return Result(WARN, "alacrityd", f"not running, and {mount} is left mounted by a daemon that "
                          "died (alacrityd clears it when it starts)", start)
        return Result(WARN, "alacrityd", f"not running (no answer on {run_dir}/control.sock)", start)
    who = f"pid {daemon.pid}" if daemon is not None else "a daemon"
    control = run_dir / "control.sock"
    if not answers:
        return Result(FAIL, "alacrityd", f"{who} runs but does not answer on {control}: {why}",
                      f"see its log, then restart it: kill {daemon.pid if daemon else 'it'}; alacrityd &")
    if stale or not fuse:
        return Result(FAIL, "alacrityd", f"{who} answers on {control}, but its admin tree "
                      f"{mount} is {'stale' if stale else 'not mounted'}",
                      "restart alacrityd (its log says why the mount failed), or give check its --mount")
    return Result(PASS, "alacrityd", f"{who} answers on {control}; admin tree mounted at {mount}")

