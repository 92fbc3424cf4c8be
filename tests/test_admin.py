"""The bus model, its store, and the FUSE admin tree driven by shell commands."""

from __future__ import annotations

import errno
import grp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alacrity.bus import peers
from alacrity.bus.model import Model
from alacrity.bus.store import Store
from alacrity.devices.base import Attribute, Device, parse_size
from alacrity.errors import AdminError


class Toy(Device):
    class_name = "toy"
    summary = "a device for tests"
    attributes = (
        Attribute("size", parse_size, "1K", "a size"),
        Attribute("mode", str, "a", "anything", live=True),
    )


CLASSES = {"toy": Toy}


def errno_of(fn, *args) -> int:
    with pytest.raises(AdminError) as exc:
        fn(*args)
    return exc.value.errno


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Model]:
    m = Model(tmp_path / "bus.db", classes=CLASSES)
    yield m
    m.store.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A shell with a sleeping child: (shell pid, child pid read from its stdout)."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    proc.child = int(proc.stdout.readline())  # type: ignore[attr-defined, union-attr]
    yield proc
    os.kill(proc.child, signal.SIGKILL)  # type: ignore[attr-defined]
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- peers


def test_peers_identify_this_process():
    me = peers.task(os.getpid())
    assert me is not None and me.start_time == peers.start_time(os.getpid())
    assert peers.parent(os.getpid()) == os.getppid()
    chain = peers.ancestry(os.getpid())
    assert chain[0] == me and chain[1].pid == os.getppid()
    assert chain[-1].pid == 1 or peers.parent(chain[-1].pid) in (0, None)
    assert peers.start_time(2**22 + 7) is None


def test_peers_parse_comm_with_parens_and_spaces(tmp_path: Path):
    odd = tmp_path / "a) b (c"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "60"])
    try:
        time.sleep(0.1)
        assert peers.parent(proc.pid) == os.getpid()
        assert peers.start_time(proc.pid) is not None
    finally:
        proc.kill()
        proc.wait()
    assert peers.task(proc.pid) is None


# ---------------------------------------------------------------- model rules


def test_device_names_and_types(model: Model):
    assert errno_of(model.mkdir_device, "-bad") == errno.EINVAL
    assert errno_of(model.mkdir_device, "a" * 65) == errno.EINVAL
    model.mkdir_device("d1")
    assert errno_of(model.mkdir_device, "d1") == errno.EEXIST
    assert errno_of(model.set_attribute, "d1", "size", "4K") == errno.ENOENT
    assert errno_of(model.set_type, "d1", "nope") == errno.ENOENT
    assert errno_of(model.set_type, "d1", "") == errno.EINVAL
    model.set_type("d1", "toy")
    assert errno_of(model.set_type, "d1", "toy") == errno.EBUSY
    assert errno_of(model.set_attribute, "d1", "size", "xx") == errno.EINVAL
    assert errno_of(model.set_attribute, "d1", "color", "1") == errno.ENOENT
    model.set_attribute("d1", "size", "4K")
    assert model.device("d1").instance.values["size"] == 4096


def test_in_use_device_refuses_changes_and_rmdir(model: Model):
    model.mkdir_device("d1")
    model.set_type("d1", "toy")
    dev = model.device("d1").instance
    dev.counters["connections"] = 1
    assert errno_of(model.set_attribute, "d1", "size", "4K") == errno.EBUSY
    model.set_attribute("d1", "mode", "b")  # live attribute
    assert errno_of(model.rmdir_device, "d1") == errno.EBUSY
    dev.counters["connections"] = 0
    model.rmdir_device("d1")
    assert model.device_names() == []


def test_links(model: Model):
    model.mkdir_bus("b1")
    model.mkdir_device("d1")
    assert errno_of(model.link, "b1", "d1", "../../devices/d1") == errno.EINVAL  # typeless
    model.set_type("d1", "toy")
    assert errno_of(model.link, "b1", "x", "../../devices/nope") == errno.ENOENT
    assert errno_of(model.link, "b1", "x", "../../classes/toy") == errno.EINVAL
    assert errno_of(model.link, "b1", "x", "/elsewhere/devices/d1", "/run/a") == errno.EINVAL
    model.link("b1", "d1", "/run/a/devices/d1", "/run/a")
    assert errno_of(model.link, "b1", "again", "../../devices/d1") == errno.EEXIST
    assert model.devices_of_bus("b1")[0][0] == "d1"
    assert model.buses_of_device("d1") == ["b1"]
    assert errno_of(model.rmdir_device, "d1") == errno.EBUSY
    assert errno_of(model.rmdir_bus, "b1") == errno.EBUSY
    model.unlink("b1", "d1")
    assert errno_of(model.unlink, "b1", "d1") == errno.ENOENT
    model.rmdir_device("d1")
    model.rmdir_bus("b1")


def test_membership(model: Model, sleeper: subprocess.Popen):
    child = sleeper.child  # type: ignore[attr-defined]
    model.mkdir_bus("b1")
    model.mkdir_bus("b2")
    assert errno_of(model.admit, "b1", 2**22 + 7) == errno.ESRCH
    model.admit("b1", sleeper.pid)
    model.admit("b1", sleeper.pid)  # same bus: no-op
    assert model.bus_of(child) == "b1"  # inherited from its parent
    assert model.bus_of(os.getpid()) is None
    assert errno_of(model.admit, "b2", sleeper.pid) == errno.EBUSY
    assert errno_of(model.admit, "b2", child) == errno.EBUSY  # via its ancestor
    assert errno_of(model.rmdir_bus, "b1") == errno.EBUSY
    model.expel("b1", sleeper.pid)
    assert model.bus_of(child) is None
    model.admit("b2", child)
    assert model.members("b2") == [child]


def test_dead_and_reused_pids_are_not_members(model: Model, tmp_path: Path):
    model.mkdir_bus("b1")
    proc = subprocess.Popen(["sleep", "60"])
    model.admit("b1", proc.pid)
    assert model.bus_of(proc.pid) == "b1"
    proc.kill()
    proc.wait()
    assert model.bus_of(proc.pid) is None
    assert model.members("b1") == []
    model.rmdir_bus("b1")  # the dead member does not hold it

    # A recorded member whose start time differs is another process on a reused pid.
    model.mkdir_bus("b2")
    model.admit("b2", os.getpid())
    with model.store.transaction() as cur:
        cur.execute("UPDATE members SET start_time = start_time - 1")
    reloaded = Model(model.store, classes=CLASSES)
    assert reloaded.bus_of(os.getpid()) is None
    assert reloaded.members("b2") == []


def test_pid_reused_within_one_clock_tick_is_not_a_member(model: Model):
    """Start times have 10 ms resolution; the pidfs inode tells such twins apart."""
    if os.geteuid() != 0 or peers.ident(os.getpid()) is None:
        pytest.skip("needs root (ns_last_pid) and pidfs (Linux 6.9+)")
    model.mkdir_bus("b1")
    first = subprocess.Popen(["sleep", "60"])
    model.admit("b1", first.pid)
    first.kill()
    first.wait()
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(first.pid - 1))
        twin = subprocess.Popen(["sleep", "60"])
        if twin.pid == first.pid:
            break
        twin.kill()
        twin.wait()
    else:
        pytest.skip("could not make the kernel reuse the pid")
    try:
        # Force the hard case: same pid and same start time as the recorded member.
        started = peers.start_time(twin.pid)
        with model.store.transaction() as cur:
            cur.execute("UPDATE members SET start_time=?", (started,))
        reloaded = Model(model.store, classes=CLASSES)
        assert reloaded.bus_of(twin.pid) is None
        assert reloaded.members("b1") == []
    finally:
        twin.kill()
        twin.wait()


def test_listeners_run_after_commit_without_the_lock(model: Model):
    seen: list[tuple[str, str, bool]] = []

    def listener(event: str, name: str) -> None:
        # The lock is an RLock: probe it from another thread.
        free: list[bool] = []

        def probe() -> None:
            free.append(model.lock.acquire(timeout=1))
            if free[0]:
                model.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        seen.append((event, name, free[0]))

    model.listeners.append(listener)
    model.mkdir_device("d1")
    model.set_type("d1", "toy")
    model.set_attribute("d1", "size", "2K")
    model.mkdir_bus("b1")
    model.rmdir_device("d1")
    assert seen == [
        ("device_typed", "d1", True),
        ("device_changed", "d1", True),
        ("bus_changed", "b1", True),
        ("device_removed", "d1", True),
    ]


def test_model_persists(tmp_path: Path, sleeper: subprocess.Popen):
    db = tmp_path / "bus.db"
    m = Model(db, classes=CLASSES)
    m.mkdir_device("d1")
    m.set_type("d1", "toy")
    m.set_attribute("d1", "size", "8K")
    m.mkdir_device("bare")
    m.mkdir_bus("b1")
    m.link("b1", "disk", "../../devices/d1")
    m.admit("b1", sleeper.pid)
    m.store.close()
    m = Model(db, classes=CLASSES)
    assert m.device_names() == ["bare", "d1"]
    assert m.device("bare").instance is None
    assert m.device("d1").instance.texts["size"] == "8K"
    assert m.links("b1") == {"disk": "d1"}
    assert m.members("b1") == [sleeper.pid]
    m.store.close()


def test_members_of_another_boot_are_forgotten(tmp_path: Path):
    db = tmp_path / "bus.db"
    m = Model(Store(db, boot_id="boot-a"), classes=CLASSES)
    m.mkdir_bus("b1")
    m.admit("b1", os.getpid())
    m.store.close()
    assert Model(Store(db, boot_id="boot-a"), classes=CLASSES).members("b1") == [os.getpid()]
    assert Model(Store(db, boot_id="boot-b"), classes=CLASSES).members("b1") == []


def test_store_survives_kill_9(tmp_path: Path):
    db = tmp_path / "bus.db"
    script = textwrap.dedent(f"""
        import sys
        from alacrity.bus.model import Model
        from tests_toy import CLASSES
        m = Model({str(db)!r}, classes=CLASSES)
        m.mkdir_bus("b")
        print("ready", flush=True)
        i = 0
        while True:
            name = f"d{{i}}"
            m.mkdir_device(name)
            m.set_type(name, "toy")
            m.set_attribute(name, "size", f"{{i + 1}}K")
            m.link("b", name, f"../../devices/{{name}}")
            if i >= 3:
                old = f"d{{i - 3}}"
                m.unlink("b", old)
                m.rmdir_device(old)
            print(i, flush=True)
            i += 1
    """)
    (tmp_path / "tests_toy.py").write_text(
        "from alacrity.devices.base import Attribute, Device, parse_size\n"
        "class Toy(Device):\n"
        "    class_name = 'toy'\n"
        "    attributes = (Attribute('size', parse_size, '1K', 'a size'),)\n"
        "CLASSES = {'toy': Toy}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.stdout.readline().strip() == b"ready"  # type: ignore[union-attr]
    for _ in range(20):  # let it commit some changes, then kill it in the middle of more
        proc.stdout.readline()  # type: ignore[union-attr]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    names = [r[0] for r in conn.execute("SELECT name FROM devices")]
    assert max(int(n[1:]) for n in names) >= 19
    conn.close()
    m = Model(db, classes=CLASSES)
    for link, device in m.links("b").items():
        assert link == device and m.device(device).instance is not None
    m.store.close()


# ---------------------------------------------------------------- the FUSE tree


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "the admin tree tests write as root"
    return None


needs_fuse = pytest.mark.skipif(_fuse_missing() is not None, reason=str(_fuse_missing()))


class Tree:
    def __init__(self, db: Path) -> None:
        # Under /tmp, not tmp_path: `nobody` must be able to reach the mountpoint.
        self.root = Path(tempfile.mkdtemp(prefix="alacrity-admin-"))
        self.root.chmod(0o755)
        self.mnt = self.root / "mnt"
        self.db = db
        self.handle = None
        self.model: Model | None = None

    def start(self) -> Tree:
        from alacrity.admin.tree import mount

        self.model = Model(self.db)
        self.handle = mount(self.model, self.mnt)
        return self

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.unmount()
            self.handle = None
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)])
        if self.model is not None:
            self.model.store.close()
            self.model = None

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        # bash, not dash: dash's echo reports every failed write as "I/O error".
        done = subprocess.run(
            ["bash", "-c", command], cwd=self.mnt, capture_output=True, text=True, timeout=30
        )
        if check:
            assert done.returncode == 0, f"{command}: {done.stderr}"
        return done

    def fails(self, command: str, message: str) -> None:
        done = self.sh(command, check=False)
        assert done.returncode != 0 and message in done.stderr, (command, done.stderr)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    t = Tree(tmp_path / "bus.db").start()
    try:
        yield t
    finally:
        t.stop()
        shutil.rmtree(t.root, ignore_errors=True)


@needs_fuse
def test_tree_layout_and_typing(tree: Tree):
    assert tree.sh("ls").stdout.split() == ["buses", "classes", "devices"]
    assert "size 1G" in tree.sh("cat classes/blk/attributes").stdout
    assert tree.sh("cat classes/blk/summary").stdout.strip()
    tree.sh("mkdir devices/d1")
    assert tree.sh("ls devices/d1").stdout.split() == ["buses", "type"]
    assert tree.sh("cat devices/d1/type").stdout == ""
    tree.fails("echo nope > devices/d1/type", "No such file or directory")
    tree.sh("echo blk > devices/d1/type")
    assert tree.sh("cat devices/d1/type").stdout == "blk\n"
    tree.fails("echo blk > devices/d1/type", "Device or resource busy")
    tree.fails("echo xx > devices/d1/size", "Invalid argument")
    tree.sh("echo 2G > devices/d1/size")
    assert tree.sh("cat devices/d1/size").stdout == "2G\n"
    assert tree.sh("cat devices/d1/connections").stdout == "0\n"
    listing = tree.sh("ls -l devices/d1").stdout
    assert "-rw------- 1 root root" in listing and "-r-------- 1 root root" in listing
    tree.fails("echo 1 > devices/d1/connections", "Permission denied")
    tree.fails("echo x > devices/d1/newfile", "Operation not permitted")
    tree.fails("mkdir classes/new", "Operation not permitted")
    tree.fails("mkdir devices/-x", "Invalid argument")
    tree.fails("mkdir devices/d1", "File exists")
    os.mkdir(tree.mnt / "devices/d2")
    with pytest.raises(OSError) as exc, open(tree.mnt / "devices/d2/type", "wb", 0) as f:
        f.write(b"nope\n")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        os.mkdir(tree.mnt / "devices/bad name")
    assert exc.value.errno == errno.EINVAL


@needs_fuse
def test_tree_buses_and_links(tree: Tree):
    tree.sh("mkdir devices/d1 devices/d2 buses/b1 && echo blk > devices/d1/type")
    tree.fails("ln -s ../../devices/d2 buses/b1/d2", "Invalid argument")  # typeless
    tree.fails("ln -s ../../devices/none buses/b1/x", "No such file or directory")
    tree.sh("ln -s ../../devices/d1 buses/b1/d1")
    assert tree.sh("readlink buses/b1/d1").stdout == "../../devices/d1\n"
    assert tree.sh("cat buses/b1/d1/type").stdout == "blk\n"  # the link resolves
    tree.fails(f"ln -s {tree.mnt}/devices/d1 buses/b1/again", "File exists")
    assert tree.sh("cat buses/b1/devices").stdout == "d1\n"
    assert tree.sh("cat devices/d1/buses").stdout == "b1\n"
    assert "connections 0" in tree.sh("cat buses/b1/state").stdout
    tree.fails("rmdir devices/d1", "Device or resource busy")
    tree.fails("rmdir buses/b1", "Device or resource busy")
    with pytest.raises(OSError) as exc:
        os.rmdir(tree.mnt / "devices/d1")
    assert exc.value.errno == errno.EBUSY
    tree.fails("rm buses/b1/members", "Operation not permitted")
    tree.sh("rm buses/b1/d1 && rmdir devices/d1 devices/d2 buses/b1")
    assert tree.sh("ls devices buses").stdout.split() == ["buses:", "devices:"]


@needs_fuse
def test_tree_members(tree: Tree, sleeper: subprocess.Popen):
    child = sleeper.child  # type: ignore[attr-defined]
    tree.sh("mkdir buses/b1 buses/b2")
    tree.sh(f"echo {sleeper.pid} > buses/b1/members")
    assert tree.sh("cat buses/b1/members").stdout == f"{sleeper.pid}\n"
    assert tree.model.bus_of(child) == "b1"
    tree.fails(f"echo {sleeper.pid} > buses/b2/members", "Device or resource busy")
    tree.fails(f"echo {child} > buses/b2/members", "Device or resource busy")
    tree.fails(f"echo {2**22 + 7} > buses/b2/members", "No such process")
    tree.fails("echo abc > buses/b2/members", "Invalid argument")
    # Only ASCII decimal names a pid ("\u0663" is ARABIC-INDIC DIGIT THREE), and never the daemon's.
    tree.fails("echo \u0663 > buses/b2/members", "Invalid argument")
    tree.fails(f"echo {os.getpid()} > buses/b2/members", "Invalid argument")
    tree.sh(f"echo -{sleeper.pid} > buses/b1/members")
    assert tree.sh("cat buses/b1/members").stdout == ""
    tree.sh(f"echo {child} > buses/b2/members")
    assert tree.model.bus_of(child) == "b2"


@needs_fuse
def test_tree_refuses_non_root(tree: Tree):
    tree.sh("mkdir devices/d1 && echo blk > devices/d1/type")
    as_nobody = "setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c"
    # The tree tells other buses' secrets (image paths, member pids): root reads it, nobody else.
    tree.fails(f"{as_nobody} 'cat devices/d1/type'", "Permission denied")
    tree.fails(f"{as_nobody} 'ls {tree.mnt}'", "Permission denied")
    tree.fails(f"{as_nobody} 'stat {tree.mnt}/buses'", "Permission denied")
    tree.fails(f"{as_nobody} 'echo 1G > devices/d1/size'", "Permission denied")
    tree.fails(f"{as_nobody} 'mkdir devices/d2'", "Permission denied")
    tree.fails(f"{as_nobody} 'mkdir buses/b1'", "Permission denied")
    tree.sh("mkdir buses/b1")
    tree.fails(f"{as_nobody} 'ln -s ../../devices/d1 buses/b1/d1'", "Permission denied")
    tree.fails(f"{as_nobody} 'rmdir devices/d1'", "Permission denied")
    assert tree.sh("cat devices/d1/size").stdout == "1G\n"
    assert tree.model.device_names() == ["d1"]


@needs_fuse
def test_admin_group_may_read_but_not_write(tree: Tree):
    from alacrity.admin.tree import mount

    tree.sh("mkdir devices/d1 && echo blk > devices/d1/type")
    tree.handle.unmount()
    tree.handle = mount(tree.model, tree.mnt, admin_gid=grp.getgrnam("adm").gr_gid)
    as_admin = "setpriv --reuid=nobody --regid=nogroup --groups=adm bash -c"
    assert tree.sh(f"{as_admin} 'cat devices/d1/type'").stdout == "blk\n"
    assert tree.sh(f"{as_admin} 'ls {tree.mnt}'").stdout.split() == ["buses", "classes", "devices"]
    tree.fails(f"{as_admin} 'echo 1G > devices/d1/size'", "Permission denied")
    tree.fails(f"{as_admin} 'mkdir devices/d2'", "Permission denied")
    as_other = "setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c"
    tree.fails(f"{as_other} 'cat devices/d1/type'", "Permission denied")


@needs_fuse
def test_tree_restart_keeps_configuration(tree: Tree, sleeper: subprocess.Popen):
    tree.sh("mkdir devices/d1 devices/d2 buses/b1 && echo blk > devices/d1/type")
    tree.sh("echo 3G > devices/d1/size && echo 1 > devices/d1/readonly")
    tree.sh(f"ln -s ../../devices/d1 buses/b1/disk && echo {sleeper.pid} > buses/b1/members")
    tree.stop()
    assert not os.path.ismount(tree.mnt)
    tree.start()
    assert tree.sh("ls devices").stdout.split() == ["d1", "d2"]
    assert tree.sh("cat devices/d1/type devices/d1/size devices/d1/readonly").stdout == "blk\n3G\n1\n"
    assert tree.sh("cat devices/d2/type").stdout == ""
    assert tree.sh("readlink buses/b1/disk").stdout == "../../devices/d1\n"
    assert tree.sh("cat buses/b1/members").stdout == f"{sleeper.pid}\n"
