"""A blk device's path and size are checked fully at the root write, and images are
opened without following symlinks (issue 12, findings 4, 5 and 6).

Each hostile value goes through the real admin tree of a real alacrityd: the write
fails with EINVAL, no file appears, the stored configuration is unchanged, and the
gate keeps admitting members afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alacrity.bus.model import Model
from alacrity.devices import base, image
from alacrity.devices.base import MAX_SIZE, Attribute, Device, parse_size, reserve_paths, reserved_paths
from alacrity.devices.blk import BlkDevice
from alacrity.errors import AdminError

# Writes one attribute file as `echo` does (truncate, then write) and prints the errno (0: accepted).
WRITE = """
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
    os.write(fd, bytes.fromhex(sys.argv[2]))
    print(0)
except OSError as exc:
    print(exc.errno)
"""

# A member reads the first 4 KiB of a disk, or reports the refusal.
READ = """
from alacrity import client
try:
    with client.connect().open({name!r}) as dev:
        print("read", dev.read(0, 4096).hex())
except Exception as exc:
    print("refused", type(exc).__name__, exc)
"""


def write(daemon, device: str, attr: str, data: bytes, timeout: float = 10.0) -> int:
    """Write `data` to devices/DEVICE/ATTR from another process; its errno (0: accepted).
    A hang fails the test instead of hanging it."""
    target = str(daemon.admin / "devices" / device / attr)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE, target, data.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = writer.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_fuse(daemon.admin)
        writer.kill()
        writer.communicate()
        pytest.fail(f"writing {data!r} to {attr} hung for {timeout} s: the admin tree is stuck")
    assert writer.returncode == 0, err
    return int(out)


def abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection behind `mountpoint`: a writer blocked on a stuck FUSE
    server cannot be killed, nor can that server, until the connection is aborted."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):  # the connection is named after the mount's minor
            (connections / fields[2].split(":")[1] / "abort").write_text("1")


def stored(daemon, device: str) -> dict[str, str]:
    """The attributes the daemon saved for `device`, read from its SQLite store."""
    db = daemon.state_dir / "config.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (attrs,) = conn.execute("SELECT attrs FROM devices WHERE name=?", (device,)).fetchone()
    return json.loads(attrs)


def listing(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def member_reads(daemon, bus: str, device: str) -> str:
    out = daemon.in_bus(bus, READ.format(name=device))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def refused(daemon, device: str, values: list[bytes], watched: Path) -> None:
    """Each value fails with EINVAL, creates nothing under `watched`, stores nothing."""
    before_files, before_attrs = listing(watched), stored(daemon, device)
    for value in values:
        attr, _, text = value.partition(b"=")
        assert write(daemon, device, attr.decode(), text + b"\n") == errno.EINVAL, value
        assert listing(watched) == before_files, value
        assert stored(daemon, device) == before_attrs, value


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 (1 KiB blocks: no file over 4 TiB), loop-mounted for the test."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    backing, mnt = tmp_path / "fs.img", tmp_path / "small"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", str(backing)], check=True, capture_output=True)
    done = subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def hostile_nodes(tmp_path: Path) -> Path:
    """A directory holding one of each kind of file an image must not be."""
    root = tmp_path / "nodes"
    (root / "real").mkdir(parents=True)
    (root / "real" / "file.img").write_bytes(b"\0" * 4096)
    (root / "link.img").symlink_to(root / "real" / "file.img")
    (root / "dangling.img").symlink_to(root / "real" / "absent.img")
    (root / "linkdir").symlink_to(root / "real")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    return root


# ---------------------------------------------------------------- through the admin tree


def test_hostile_paths_fail_at_the_write_and_the_gate_stays_up(daemon, tmp_path, hostile_nodes):
    good = tmp_path / "good.img"
    daemon.make_disk("d", "b1", good, size="1M")
    n = hostile_nodes
    refused(
        daemon,
        "d",
        [
            b"path=/tmp/x\x00y",
            b"path=/tmp/x\x01y",
            b"path=/tmp/x\ty",
            b"path=/tmp/x\x1by",
            b"path=relative.img",
            f"path={n}/real/../x.img".encode(),
            f"path={n}//x.img".encode(),
            f"path={n}/./x.img".encode(),
            f"path={n}/".encode(),
            f"path={n}/real".encode(),
            b"path=/dev/zero",
            f"path={n}/fifo".encode(),
            f"path={n}/sock".encode(),
            f"path={n}/link.img".encode(),
            f"path={n}/dangling.img".encode(),
            f"path={n}/linkdir/file.img".encode(),
            f"path={n}/linkdir/new.img".encode(),
            f"path={n}/absent/new.img".encode(),
            b"size=99999999999999999999T",
            b"size=0",
            b"size=\xd9\xa3G",  # an Arabic-Indic 3: only ASCII digits are a size
        ],
        tmp_path,
    )
    assert (daemon.admin / "devices/d/path").read_text() == f"{good}\n"
    assert not good.exists()  # checked, never created by the check
    assert member_reads(daemon, "b1", "d") == "read " + "00" * 4096
    assert good.stat().st_size == 1 << 20
    assert daemon.proc.poll() is None


def test_sizes_the_filesystem_cannot_hold_fail_at_the_write(daemon, small_fs):
    daemon.make_disk("d", "b1", small_fs / "d.img", size="1M")
    refused(daemon, "d", [b"size=17T", b"size=99999999999999999999T", b"size=0", b"size=5T"], small_fs)
    # The pair is checked whichever is written last: a size first, then the path.
    daemon.sh("mkdir $A/devices/e && echo blk > $A/devices/e/type && echo 17T > $A/devices/e/size")
    refused(daemon, "e", [f"path={small_fs}/e.img".encode()], small_fs)
    assert write(daemon, "e", "size", b"8M\n") == 0
    assert write(daemon, "e", "path", f"{small_fs}/e.img\n".encode()) == 0
    assert not (small_fs / "e.img").exists()
    assert member_reads(daemon, "b1", "d").startswith("read ")


def test_a_path_on_the_admin_tree_fails_promptly(daemon):
    daemon.sh("mkdir $A/devices/d && echo blk > $A/devices/d/type")
    for path in (daemon.admin / "devices/d/disk.img", daemon.admin / "disk.img", daemon.admin):
        # Before the fix, this write stat'ed the admin tree under the model lock: deadlock.
        assert write(daemon, "d", "path", f"{path}\n".encode(), timeout=10) == errno.EINVAL, path
    assert subprocess.run(["cat", str(daemon.admin / "devices/d/path")], timeout=10).returncode == 0
    assert stored(daemon, "d") == {}


def test_paths_under_the_daemons_own_directories_fail(daemon, tmp_path):
    daemon.sh("mkdir $A/devices/d && echo blk > $A/devices/d/type")
    pid_file = (daemon.run_dir / "alacrityd.pid").read_bytes()
    refused(
        daemon,
        "d",
        [
            f"path={daemon.run_dir}/alacrityd.pid".encode(),
            f"path={daemon.run_dir}/new.img".encode(),
            f"path={daemon.state_dir}/config.db".encode(),
            f"path={daemon.state_dir}/config.db-journal".encode(),
        ],
        tmp_path,
    )
    # Beside the database is a fine place for images (/var/lib/alacrity/disk0.img).
    daemon.sh(f"echo {daemon.state_dir}/disk0.img > $A/devices/d/path")
    assert (daemon.run_dir / "alacrityd.pid").read_bytes() == pid_file


def test_an_image_swapped_for_a_symlink_is_refused(daemon, tmp_path):
    # A user-writable directory (not sticky, so fs.protected_symlinks does not apply).
    shared = Path(tempfile.mkdtemp(prefix="alacrity-shared-"))
    try:
        shared.chmod(0o777)
        secret = tmp_path / "secret"
        secret.write_bytes(b"TOP-SECRET " * 1024)
        secret.chmod(0o600)
        daemon.make_disk("d1", "b1", shared / "disk.img", size="1M")
        daemon.make_disk("d2", "b2", tmp_path / "d2.img", size="1M")
        assert member_reads(daemon, "b1", "d1").startswith("read ")  # creates the image
        swap = f"rm -f {shared}/disk.img && ln -s {secret} {shared}/disk.img"
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-ec", swap]
        subprocess.run(as_nobody, check=True, timeout=10)
        assert (shared / "disk.img").is_symlink()

        answer = member_reads(daemon, "b1", "d1")
        assert answer.startswith("refused"), answer[:200]
        assert b"TOP-SECRET".hex() not in answer
        assert daemon.proc.poll() is None
        assert "symlink" in daemon.log.read_text()
        assert member_reads(daemon, "b2", "d2") == "read " + "00" * 4096
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_image_with_a_second_hard_link_is_refused(daemon, tmp_path):
    """A hard link is another name for the same data, which O_NOFOLLOW cannot see: with
    fs.protected_hardlinks off (or a careless admin), an image swapped for a link to
    another file would hand guests that file. Refused at the write and at every open."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET " * 1024)
    (tmp_path / "twice.img").hardlink_to(secret)
    daemon.sh("mkdir $A/devices/d0; echo blk > $A/devices/d0/type")
    assert write(daemon, "d0", "path", f"{tmp_path / 'twice.img'}\n".encode()) == errno.EINVAL
    assert "has 2 hard links" in daemon.log.read_text()

    daemon.make_disk("d1", "b1", tmp_path / "disk.img", size="1M")
    assert member_reads(daemon, "b1", "d1").startswith("read ")  # creates the image
    (tmp_path / "disk.img").unlink()
    (tmp_path / "disk.img").hardlink_to(secret)  # a swap after the write was checked
    answer = member_reads(daemon, "b1", "d1")
    assert answer.startswith("refused"), answer[:200]
    assert b"TOP-SECRET".hex() not in answer
    assert daemon.proc.poll() is None


# ---------------------------------------------------------------- the pieces, directly


def test_parse_size_is_bounded():
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    assert parse_size("8388607T") == 8388607 << 40
    for text in ("8388608T", str(MAX_SIZE + 1), "9" * 5000, "\u0663G", "-1"):
        with pytest.raises(ValueError):
            parse_size(text)


def test_reserve_paths_resolves_parents_and_matches_whole_components(monkeypatch, tmp_path):
    monkeypatch.setattr(base, "_reserved", ())
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    reserve_paths(tmp_path / "via" / "run", str(tmp_path / "state"))
    assert str(tmp_path / "real" / "run") in reserved_paths()
    assert str(tmp_path / "state") in reserved_paths()
    for inside in ("real/run", "real/run/x.img", "state/config.db"):
        with pytest.raises(AdminError) as exc:
            image.check_place(str(tmp_path / inside))
        assert exc.value.errno == errno.EINVAL and "alacrityd's own directory" in exc.value.message
    image.check_place(str(tmp_path / "real" / "run2.img"))  # a prefix of the name is not "under"


def test_fuse_mounts_are_read_from_mountinfo(daemon):
    assert str(daemon.admin) in image.fuse_mounts()
    with pytest.raises(AdminError, match="FUSE"):
        image.check_place(str(daemon.admin / "devices" / "x.img"))


@pytest.fixture(params=["openat2", "walk"])
def resolution(request, monkeypatch) -> str:
    """Both ways to reach the directory: openat2, and the walk kernels before 5.6 need."""
    if request.param == "walk":

        def no_openat2(path: str, flags: int, resolve: int) -> int:
            raise OSError(errno.ENOSYS, "openat2 not implemented", path)

        monkeypatch.setattr(image, "_openat2", no_openat2)
    return request.param


def test_open_image_refuses_what_is_not_a_plain_file(resolution, hostile_nodes):
    n = hostile_nodes
    for path in (
        f"{n}/link.img",
        f"{n}/dangling.img",
        f"{n}/linkdir/file.img",
        f"{n}/linkdir/new.img",
        f"{n}/fifo",  # O_NONBLOCK: no wait for a writer
        f"{n}/sock",
        f"{n}/real",
        "/dev/zero",
        "/tmp/x\x00y",
    ):
        for writable in (True, False):
            with pytest.raises(AdminError) as exc:
                os.close(image.open_image(path, 1 << 20, writable))
            assert exc.value.errno == errno.EINVAL, (path, exc.value)
        with pytest.raises(AdminError):
            image.inspect(path, 1 << 20)
    assert not (n / "real" / "new.img").exists() and not (n / "real" / "absent.img").exists()
    fd = image.open_image(f"{n}/real/file.img", 1 << 20, writable=True)
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode) and os.get_blocking(fd)
    finally:
        os.close(fd)


def test_open_image_creates_sparse_or_leaves_nothing(resolution, small_fs):
    with pytest.raises(AdminError) as exc:
        image.inspect(f"{small_fs}/big.img", 17 << 40)
    assert exc.value.errno == errno.EINVAL and "cannot hold a file of" in exc.value.message
    with pytest.raises(AdminError):
        image.open_image(f"{small_fs}/big.img", 17 << 40, writable=True)
    assert sorted(os.listdir(small_fs)) == ["lost+found"]
    fd = image.open_image(f"{small_fs}/new.img", 8 << 20, writable=True)
    try:
        info = os.fstat(fd)
        assert info.st_size == 8 << 20 and info.st_blocks == 0 and stat.S_IMODE(info.st_mode) == 0o600
    finally:
        os.close(fd)


def test_stored_hostile_values_are_refused_at_open_not_raised(tmp_path):
    """A configuration saved before these checks skips them at load: open() refuses."""
    dev = BlkDevice("old")
    for path, size in (("/tmp/x\x00y", 1 << 20), (str(tmp_path / "huge.img"), 1 << 70), ("/dev/zero", 1)):
        dev.values.update(path=path, size=size)
        with pytest.raises(AdminError):
            dev.open(os.getpid())
    assert not (tmp_path / "huge.img").exists()


class Probed(Device):
    """A device whose filesystem check runs `Probed.during` (set by each test)."""

    class_name = "probed"
    attributes = (Attribute("a", str, "", "checked"), Attribute("b", str, "", "another"))
    during: Callable[[], None] = staticmethod(lambda: None)

    def precheck(self, name: str, text: str) -> None:
        type(self).during()


@pytest.fixture
def probed_model(tmp_path: Path) -> Iterator[Model]:
    model = Model(tmp_path / "bus.db", classes={"probed": Probed})
    model.mkdir_device("p")
    model.set_type("p", "probed")
    yield model
    model.store.close()


def test_precheck_runs_without_the_model_lock(probed_model, monkeypatch):
    def other_thread_takes_the_lock() -> None:
        taken: list[bool] = []

        def take() -> None:
            taken.append(probed_model.lock.acquire(timeout=5))
            if taken[0]:
                probed_model.lock.release()

        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
        checks.append(taken == [True])

    checks: list[bool] = []
    monkeypatch.setattr(Probed, "during", staticmethod(other_thread_takes_the_lock))
    probed_model.set_attribute("p", "a", "x")
    assert checks == [True]
    assert probed_model.device("p").texts["a"] == "x"


def test_a_change_during_the_precheck_fails_the_write(probed_model, monkeypatch):
    def concurrent_write() -> None:
        monkeypatch.setattr(Probed, "during", staticmethod(lambda: None))
        probed_model.set_attribute("p", "b", "new")

    monkeypatch.setattr(Probed, "during", staticmethod(concurrent_write))
    with pytest.raises(AdminError) as exc:
        probed_model.set_attribute("p", "a", "x")
    assert exc.value.errno == errno.EBUSY and "write it again" in exc.value.message
    assert probed_model.device("p").texts == {"b": "new"}
