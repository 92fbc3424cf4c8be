"""Each guest's QEMU runs jailed (vm/jail.py): real guests started by `alacrity vm run` on
a real alacrityd, looked at from /proc, and attacked from inside a jail by a process
with the jailed QEMU's uid and namespaces."""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alacrity.vm import jail
from alacrity.vm.runtime import list_vms
from tests.conftest import Daemon, fuse_available, need
from tests.test_gate_attacks import AS_NOBODY, PLAIN_PYTHON, searchable_by_others, wait_for

pytestmark = pytest.mark.vm

ID_START, ID_COUNT = 930000, 50
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts")


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def uids_running() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.update(int(u) for u in status_of(int(pid))["Uid"].split())
        except (OSError, KeyError):
            continue  # gone meanwhile
    return found


class Lab:
    """alacrityd with two buses, each with a disk, one switch in both, and a VM on each."""

    def __init__(self, root: Path, image) -> None:
        self.root, self.image = root, image
        self.daemon = Daemon(root, args=["--id-range", f"{ID_START}:{ID_COUNT}"])
        self.vms: dict[str, subprocess.Popen] = {}

    def start(self) -> Lab:
        self.daemon.start()
        self.daemon.make_disk("d1", "j1", self.root / "d1.img")
        self.daemon.make_disk("d2", "j2", self.root / "d2.img")
        self.daemon.make_switch("lan0", ["j1", "j2"])
        return self

    def run_vm(self, name: str, bus: str) -> None:
        log = self.root / f"{name}.log"
        argv = [sys.executable, "-m", "alacrity.cli", "vm", "run", "--bus", bus, "--name", name,
                "--cmd", "sleep 600", "--log", str(log), "--kernel", str(self.image.kernel),
                "--initrd", str(self.image.initrd)]
        self.vms[name] = subprocess.Popen(argv, env=self.daemon.env, stdout=subprocess.DEVNULL,
                                          stderr=open(self.root / f"{name}.err", "wb"),  # noqa: SIM115
                                          start_new_session=True)
        wait_for(lambda: log.exists() and b"ALACRITY-READY" in log.read_bytes() or self._died(name),
                 timeout=120, what=f"{name} to boot")

    def _died(self, name: str) -> bool:
        if self.vms[name].poll() is not None:
            raise AssertionError(f"vm run {name} ended: {(self.root / f'{name}.err').read_text()}")
        return False

    def qemu(self, name: str) -> int:
        rec = next(r for r in list_vms(self.root / "vms", prune=False) if r.name == name)
        pid = jail.jailed_pid(rec.pid)
        assert pid is not None, f"{name}: no QEMU below its jailer (pid {rec.pid})"
        return pid

    def stop_vm(self, name: str) -> None:
        subprocess.run([sys.executable, "-m", "alacrity.cli", "vm", "stop", name], env=self.daemon.env,
                       capture_output=True, timeout=60)
        proc = self.vms.pop(name)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in list(self.vms):
            proc = self.vms.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.daemon.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, guest_image):
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd and the jail need root")
    lab = Lab(tmp_path_factory.mktemp("jail"), guest_image).start()
    try:
        lab.run_vm("a", "j1")
        lab.run_vm("b", "j2")
        yield lab
    finally:
        lab.close()


def test_a_guests_qemu_is_unprivileged_and_alone(lab):
    pids = {name: lab.qemu(name) for name in ("a", "b")}
    uids = {}
    for name, pid in pids.items():
        st = status_of(pid)
        uid = int(st["Uid"].split()[0])
        uids[name] = uid
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4, st
        assert ID_START <= uid < ID_START + ID_COUNT
        assert st["Groups"].strip() == ""
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # QEMU's -sandbox filter
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert uids["a"] != uids["b"]
    assert os.readlink(f"/proc/{pids['a']}/ns/mnt") != os.readlink(f"/proc/{pids['b']}/ns/mnt")
    listed = subprocess.run([sys.executable, "-m", "alacrity.cli", "vm", "list"], env=lab.daemon.env,
                            capture_output=True, text=True, timeout=30).stdout
    assert re.search(rf"^a\s+pid \d+\s+uid {uids['a']}\s", listed, re.M), listed


def test_the_jails_root_holds_only_what_qemu_needs(lab):
    pid = lab.qemu("a")
    root = f"/proc/{pid}/root"
    binary = jail.qemu_binary("qemu-system-x86_64")
    allowed_files = {binary, str(lab.image.kernel.resolve()), str(lab.image.initrd.resolve()),
                     *(os.path.realpath(lib) for lib in jail.shared_libraries(binary))}
    allowed_trees = [p for p in jail.QEMU_DATA if os.path.exists(p)]
    own_dir = str(lab.root / "vms" / "a" / "qemu")
    sockets = {str(lab.daemon.run_dir / "devices" / f"{d}.sock") for d in ("d1", "lan0")}
    real_sockets = {os.path.realpath(s) for s in sockets}  # each in a directory of its own
    found, stray = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            inside = os.path.join(dirpath, name)[len(root):]
            found.append(inside)
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if os.path.islink(os.path.join(dirpath, name)):
                continue  # a link on the way to a library (merged /usr), resolved below
            ok = (inside in allowed_files or inside in real_sockets or inside.startswith(own_dir + "/")
                  or any(inside.startswith(t + "/") or inside == t for t in allowed_trees)
                  or inside in ("/dev/null", "/dev/urandom", "/dev/kvm")
                  or os.path.realpath(inside) in allowed_files)
            if not ok:
                stray.append(f"{inside} ({oct(mode)})")
    assert not stray, f"the jail holds more than QEMU needs: {stray}"
    for needed in [binary, *sockets, "/dev/null", "/dev/urandom"]:
        assert needed in found, f"{needed} missing from the jail"
    assert str(lab.daemon.run_dir / "devices" / "d2.sock") not in found  # the other bus's disk
    assert not os.path.exists(f"{root}/proc/1") and not os.path.exists(f"{root}/etc/shadow")
    # Read-only everywhere but QEMU's own directory.
    mounts = Path(f"/proc/{pid}/mounts").read_text().splitlines()
    for line in mounts:
        _dev, where, _fs, options = line.split()[:4]
        writable = "rw" in options.split(",")
        assert writable == (where == own_dir), line


#: Run as root: enters a jailed QEMU's namespaces, forks (into its pid namespace), takes its
#: uid and gid with no groups, no capabilities and no_new_privs, and tries to get out.
ESCAPE = r"""
import ctypes, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, uid, t = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
for ns in ("ipc", "uts", "net", "pid", "mnt"):
    fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY)
    if libc.setns(fd, 0) != 0:
        sys.exit(f"setns {ns}: {os.strerror(ctypes.get_errno())}")
r, w = os.pipe()
child = os.fork()
if child:
    os.close(w)
    out = os.read(r, 1 << 20)
    os.waitpid(child, 0)
    print(out.decode())
    sys.exit(0)
os.close(r)
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
libc.prctl(38, 1, 0, 0, 0)
results = {}

def check(rc):
    if rc != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

def connect_unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2); s.connect(path)

def connect_tcp(addr):
    with socket.socket() as s:
        s.settimeout(2); s.connect(tuple(addr))

def attempt(name, fn):
    try:
        fn()
        results[name] = "SUCCEEDED"
    except OSError as exc:
        results[name] = f"refused: {exc.strerror or exc}"

attempt("read /etc/shadow", lambda: open("/etc/shadow", "rb").read(1))
attempt("list host processes in /proc", lambda: os.listdir("/proc"))
attempt("signal the daemon by pid", lambda: os.kill(t["daemon"], 0))
attempt("mount a proc to see processes",
        lambda: check(libc.mount(b"proc", t["own"].encode(), b"proc", 0, None)))
attempt("open another bus's disk socket", lambda: connect_unix(t["other_disk"]))
attempt("reach the control socket", lambda: connect_unix(t["control"]))
attempt("write the admin tree", lambda: open(t["members"], "w").write("1\n"))
attempt("open /dev/mem", lambda: open("/dev/mem", "rb"))
attempt("make a /dev/mem node", lambda: os.mknod(t["own"] + "/mem", 0o20600, os.makedev(1, 1)))
attempt("reach the host on loopback", lambda: connect_tcp(t["listener"]))
attempt("reach any network address", lambda: connect_tcp(["192.0.2.1", 80]))
attempt("ptrace the other VM's QEMU", lambda: check(libc.ptrace(16, t["other_qemu"], 0, 0)))
attempt("signal the other VM's QEMU", lambda: os.kill(t["other_qemu"], 0))
attempt("become root", lambda: os.setuid(0))
attempt("chroot out", lambda: os.chroot("/usr"))
attempt("write the jail's root", lambda: open("/escape", "w"))
attempt("overwrite the kernel", lambda: open(t["kernel"], "r+b"))
attempt("overwrite QEMU", lambda: open(t["qemu"], "r+b"))
os.write(w, json.dumps(results).encode())
os._exit(0)
"""


def test_a_guest_escape_gets_nowhere(lab, tmp_path):
    pid_a, pid_b = lab.qemu("a"), lab.qemu("b")
    uid = int(status_of(pid_a)["Uid"].split()[0])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        targets = {
            "daemon": lab.daemon.proc.pid, "other_qemu": pid_b,
            "own": str(lab.root / "vms" / "a" / "qemu"),
            "other_disk": str(lab.daemon.run_dir / "devices" / "d2.sock"),
            "control": str(lab.daemon.run_dir / "control.sock"),
            "members": str(lab.daemon.admin / "buses" / "j1" / "members"),
            "listener": list(listener.getsockname()),
            "kernel": str(lab.image.kernel.resolve()), "qemu": jail.qemu_binary("qemu-system-x86_64"),
        }
        out = subprocess.run([sys.executable, "-c", ESCAPE, str(pid_a), str(uid), json.dumps(targets)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 18, results
    succeeded = {k: v for k, v in results.items() if v == "SUCCEEDED"}
    assert not succeeded, f"{len(succeeded)} of {len(results)} escape attempts succeeded: {succeeded}"
    # The guest is still fine: the attempts hurt nothing.
    assert lab.vms["a"].poll() is None


def test_uids_are_per_vm_and_free_again_after_stop(lab):
    uid_a = int(status_of(lab.qemu("a"))["Uid"].split()[0])
    uid_b = int(status_of(lab.qemu("b"))["Uid"].split()[0])
    assert uid_a != uid_b
    lab.stop_vm("a")
    wait_for(what="a's uid to be free", predicate=lambda: uid_a not in uids_running(), timeout=30)
    lab.run_vm("c", "j1")
    assert int(status_of(lab.qemu("c"))["Uid"].split()[0]) == uid_a


def as_nobody(lab: Lab, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """argv prefix and env for `alacrity` run by `nobody`: a plain Python, our package
    copied where nobody can read it, the daemon's sockets reachable, a runtime dir of its own."""
    nobody = pwd.getpwnam("nobody")
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(jail.__file__).parents[1], pkg / "alacrity",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    guest = tmp_path / "guest"  # the cached image may be below root's home
    guest.mkdir()
    shutil.copy(lab.image.kernel, guest / "vmlinuz")
    shutil.copy(lab.image.initrd, guest / "initrd.img")
    subprocess.run(["chmod", "-R", "a+rX", str(pkg), str(guest)], check=True)
    searchable_by_others(tmp_path)
    searchable_by_others(lab.daemon.run_dir)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(pkg), "HOME": str(home),
           "ALACRITY_RUN_DIR": str(lab.daemon.run_dir), "ALACRITY_ADMIN": str(lab.daemon.admin),
           "ALACRITY_VM_DIR": str(home / "vms")}
    return [*AS_NOBODY, PLAIN_PYTHON, "-m", "alacrity.cli"], env


def test_a_listed_user_runs_a_jailed_guest_without_sudo(lab, tmp_path):
    nobody = pwd.getpwnam("nobody")
    alacrity, env = as_nobody(lab, tmp_path)
    lab.daemon.make_disk("du", "ju", lab.root / "du.img")
    log = Path(env["HOME"]) / "console.log"
    run = [*alacrity, "vm", "run", "--bus", "ju", "--name", "mine", "--log", str(log),
           "--kernel", str(tmp_path / "guest/vmlinuz"), "--initrd", str(tmp_path / "guest/initrd.img")]

    refused = subprocess.run([*run, "--cmd", "true"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "may not join bus 'ju'" in refused.stderr and "buses/ju/users" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    exec_refused = subprocess.run([*alacrity, "bus", "exec", "ju", "--", "true"], env=env,
                                  capture_output=True, text=True, timeout=60)
    assert exec_refused.returncode == 2 and "buses/ju/users" in exec_refused.stderr, exec_refused.stderr

    lab.daemon.sh("echo nobody > $A/buses/ju/users")
    assert (lab.daemon.admin / "buses/ju/users").read_text() == "nobody\n"
    show = [PLAIN_PYTHON, "-m", "alacrity.cli", "bus", "show"]
    shown = subprocess.run([*alacrity, "bus", "exec", "ju", "--", *show], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "bus ju" in shown.stdout and "du" in shown.stdout, shown.stderr
    unjailed = subprocess.run([*run, "--no-jail", "--cmd", "true"], env=env, capture_output=True, text=True,
                              timeout=60)
    assert unjailed.returncode == 2 and "only root" in unjailed.stderr, unjailed.stderr

    guest = subprocess.Popen([*run, "--cmd", "sleep 600"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: (log.exists() and b"ALACRITY-READY" in log.read_bytes())
                 or (guest.poll() is not None and AssertionError(guest.stderr.read())),
                 timeout=120, what="nobody's guest to boot")
        assert guest.poll() is None, guest.stderr.read()
        rec = next(r for r in list_vms(Path(env["ALACRITY_VM_DIR"]), prune=False) if r.name == "mine")
        qemu = jail.jailed_pid(rec.pid)
        st = status_of(qemu)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert int(st["CapEff"], 16) == int(st["CapBnd"], 16) == 0
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        for ns in (*NAMESPACES, "user"):
            assert os.readlink(f"/proc/{qemu}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert not os.path.exists(f"/proc/{qemu}/root/etc/shadow")
        assert os.path.exists(f"/proc/{qemu}/root{lab.daemon.run_dir}/devices/du.sock")
        stop = subprocess.run([*alacrity, "vm", "stop", "mine"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert stop.returncode == 0, stop.stderr
        guest.wait(30)
    finally:
        if guest.poll() is None:
            os.killpg(guest.pid, signal.SIGKILL)
            guest.wait()


def test_users_are_checked_when_root_writes_them_and_survive_a_restart(tmp_path):
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root")
    d = Daemon(tmp_path, args=["--id-range", f"{ID_START}:{ID_COUNT}"])
    d.start()
    try:
        d.sh("mkdir $A/buses/lab")
        users = d.admin / "buses/lab/users"
        for bad, why in [("no-such-user-here", "no user named"), ("@no-such-group-here", "no group named"),
                         ("root", "root's"), (str(ID_START + 3), "unprivileged id range"),
                         ("a/b", "not a user name"), ("\u0663", "not a user name")]:
            with pytest.raises(OSError) as refused:
                users.write_text(bad + "\n")
            assert refused.value.errno == errno.EINVAL, bad
            assert why in d.log.read_text(), (bad, why)  # the daemon logs why
            assert users.read_text() == ""
        d.sh("echo 'nobody, @nogroup 4242' > $A/buses/lab/users")
        assert users.read_text() == "nobody\n@nogroup\n4242\n"
        d.stop()
        d.start()
        assert users.read_text() == "nobody\n@nogroup\n4242\n"
    finally:
        d.stop()


def test_cgroup_limits_follow_mem_and_cpus(tmp_path, monkeypatch):
    """What make_cgroup writes, on a directory laid out as a cgroup v2 root (this host has
    only a hybrid hierarchy, so the kernel's enforcement is not exercised here)."""
    monkeypatch.setattr(jail, "CGROUP_ROOT", tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    group = Path(jail.make_cgroup("lab/vm 1", mem_mib=512, cpus=2))
    assert group == tmp_path / "alacrity" / "lab_vm_1"
    assert (group / "memory.max").read_text() == f"{(512 + jail.QEMU_OVERHEAD_MIB) << 20}\n"
    assert (group / "cpu.max").read_text() == "200000 100000\n"
    assert (group / "pids.max").read_text() == f"{jail.NPROC}\n"
    assert (tmp_path / "alacrity" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")  # no memory or pids controller
    assert jail.make_cgroup("other", mem_mib=512, cpus=1) == ""


def test_a_jail_that_cannot_be_made_says_why_in_one_line(tmp_path, guest_image):
    need(os.geteuid() == 0, "the jail needs root")
    from alacrity.vm.qemu import VM, VmSpec
    from alacrity.vm.runtime import VmError

    missing = tmp_path / "gone" / "d.sock"
    disk = ["-chardev", f"socket,id=c0,path={missing}", "-device", "vhost-user-blk-device,chardev=c0"]
    spec = VmSpec(name="nojail", kernel=guest_image.kernel, initrd=guest_image.initrd, cmd="true",
                  console=str(tmp_path / "console.log"), run_dir=tmp_path / "vm",
                  jail_uid=ID_START + ID_COUNT - 1, devices=[disk])
    vm = VM(spec)
    try:
        vm.start()
        with pytest.raises(VmError) as failed:
            vm.wait_exit(60)
    finally:
        vm.kill()
    message = str(failed.value)
    assert message.splitlines()[0].endswith("is the cause)"), message
    assert str(missing.parent) in message.splitlines()[0] and "--no-jail" in message


def test_a_killed_vm_run_leaves_no_jailed_qemu_behind(lab):
    """vm run's death kills the jailer (PDEATHSIG), and the jailer's the jailed QEMU: the
    uid change clears a parent-death signal, so the jail sets it again after it."""
    lab.daemon.sh("mkdir $A/buses/jk")
    lab.run_vm("k", "jk")
    qemu = lab.qemu("k")
    rec = next(r for r in list_vms(lab.root / "vms", prune=False) if r.name == "k")
    lab.vms["k"].kill()  # SIGKILL to vm run alone, not its group
    lab.vms.pop("k").wait()
    wait_for(what="the jailer and QEMU to go", predicate=lambda: not any(
        os.path.exists(f"/proc/{pid}") and status_of(pid).get("State", "Z").split()[0] not in "ZX"
        for pid in (rec.pid, qemu)), timeout=15)


def test_a_detached_vm_runs_on_after_vm_run_and_stays_on_its_bus(lab):
    lab.daemon.sh("mkdir $A/buses/jd")
    cli = [sys.executable, "-m", "alacrity.cli", "vm"]
    image = ["--kernel", str(lab.image.kernel), "--initrd", str(lab.image.initrd)]
    refused = subprocess.run([*cli, "run", "--bus", "jd", "--detach", "--no-jail", *image],
                             env=lab.daemon.env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "leave out --no-jail" in refused.stderr, refused.stderr
    started = subprocess.run([*cli, "run", "--bus", "jd", "--name", "det", "--detach", "--cmd", "sleep 600",
                              *image], env=lab.daemon.env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout == "det\n"
        rec = next(r for r in list_vms(lab.root / "vms", prune=False) if r.name == "det")
        qemu = jail.jailed_pid(rec.pid)
        assert qemu is not None and status_of(qemu)["State"].split()[0] in "RS"
        members = (lab.daemon.admin / "buses/jd/members").read_text().split()
        assert str(rec.pid) in members  # the jailer itself: its starter has exited
        assert b"ALACRITY-READY" in Path(rec.console).read_bytes()
        listed = subprocess.run([*cli, "list"], env=lab.daemon.env, capture_output=True, text=True,
                                timeout=30)
        assert re.search(r"^det\s", listed.stdout, re.M), listed.stdout
    finally:
        stop = subprocess.run([*cli, "stop", "det"], env=lab.daemon.env, capture_output=True, text=True,
                              timeout=60)
    assert stop.returncode == 0, stop.stderr
    wait_for(what="the detached VM to go", predicate=lambda: not os.path.exists(f"/proc/{qemu}") or
             status_of(qemu)["State"].split()[0] in "ZX", timeout=30)
    wait_for(what="its jailer to leave the bus", predicate=lambda: str(rec.pid) not in
             (lab.daemon.admin / "buses/jd/members").read_text().split(), timeout=30)


def test_the_jailer_reads_back_the_spec_it_is_given_and_refuses_anything_else(tmp_path):
    from alacrity.vm import jailer

    spec = jail.JailSpec(uid=930007, root="/r", writable="/w", read_only=["/a b", "/c"], sockets=["/s.sock"],
                         devices=["null", "kvm"], cgroup="/cg", user_namespace=True,
                         join={"control": "/ctl", "bus": "lab"})
    back, qemu = jailer.parse([*spec.options(), "--", "/usr/bin/qemu", "-name", "x"])
    assert qemu == ["/usr/bin/qemu", "-name", "x"]
    assert vars(back) == {"uid": 930007, "root": "/r", "writable": "/w", "hostname": "alacrity",
                          "read_only": ["/a b", "/c"], "sockets": ["/s.sock"], "devices": ["null", "kvm"],
                          "cgroup": "/cg", "user_namespace": True, "join": {"control": "/ctl", "bus": "lab"}}
    for bad in (["--uid", "1", "--root", "/r", "--writable", "/w", "--"],  # no QEMU
                ["--root", "/r", "--writable", "/w", "--", "q"],  # no uid
                ["--uid", "1", "--root", "/r", "--writable", "/w", "--dev", "mem", "--", "q"],
                ["--uid", "1", "--root", "/r", "--writable", "/w", "--frobnicate", "--", "q"]):
        with pytest.raises(ValueError):
            jailer.parse(bad)
