"""`alacrity top` in a real terminal (tmux), against a real alacrityd, while a real process
on the bus writes a disk and sends frames through a switch; and the gate's root-only
`status` op it reads."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_gate_attacks import AS_NOBODY, PLAIN_PYTHON, searchable_by_others

ROOT = Path(__file__).parent.parent

#: A process on a bus: opens a disk (argv[1], or -) and two ports of a switch (argv[2], if
#: given), says "ready", then obeys stdin: "disk" and "net" start writing the disk and
#: exchanging frames between the two ports, "idle" stops both; each answered with "ok".
LOAD = textwrap.dedent("""
    import select, sys
    from alacrity import client
    bus = client.connect()
    disk = bus.open(sys.argv[1]) if sys.argv[1] != "-" else None
    nics = [bus.open(sys.argv[2], timeout=5) for _ in range(2)] if len(sys.argv) > 2 else []
    print("ready", flush=True)
    doing, offset, block = set(), 0, b"\\xab" * 65536
    while True:
        if select.select([sys.stdin], [], [], 0 if doing else None)[0]:
            word = sys.stdin.readline().strip()
            if word in ("", "quit"):
                break
            doing = set() if word == "idle" else doing | {word}
            print("ok", flush=True)
            continue
        if "disk" in doing:
            disk.write(offset, block)
            offset = (offset + len(block)) % (16 << 20)
        if "net" in doing:
            a, b = nics
            a.send(b.mac + a.mac + b"\\x88\\xb5" + bytes(500))
            assert b.recv(2) is not None
            b.send(a.mac + b.mac + b"\\x88\\xb5" + bytes(500))
            assert a.recv(2) is not None
""")


class Load:
    """LOAD, run on `bus` by `alacrity bus exec`."""

    def __init__(self, daemon, bus: str, disk: str = "-", switch: str | None = None) -> None:
        argv = [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--", sys.executable, "-c", LOAD,
                disk, *([switch] if switch else [])]
        self.proc = subprocess.Popen(argv, env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        hello = self.proc.stdout.readline().strip()
        if hello != "ready":
            self.close()
            raise AssertionError(f"the load did not start: {hello!r}")

    def do(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def ask_status(run_dir: Path) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(run_dir / "control.sock"))
        sock.sendall(b'{"op": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, "the gate closed the connection"
            data += chunk
    return json.loads(data)


# -- tmux

_sessions = itertools.count()


class Tmux:
    """A tmux server of our own (its own socket, no user config), one session of a fixed size."""

    def __init__(self, env: dict[str, str], width: int = 160, height: int = 40) -> None:
        self.base = ["tmux", "-f", "/dev/null", "-L", f"alacrity-test-{os.getpid()}-{next(_sessions)}"]
        self.env = env
        self.size = (width, height)

    def tmux(self, *args: str) -> str:
        out = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start(self, command: str) -> None:
        width, height = self.size
        # The pane stays after its process exits, so the screen it leaves can be read.
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), command,
                  ";", "set-option", "-t", "t", "remain-on-exit", "on")

    def screen(self, history: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t", *(["-S", "-"] if history else []))

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def exited(self) -> bool:
        """Whether the pane's process has exited (tmux does not always learn its status)."""
        return self.tmux("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "1"

    def wait_exit(self, last_words: str, timeout: float = 5.0) -> None:
        """Until the pane's process has exited and its last words are on the screen (tmux
        may see the exit before it has shown the last output). A dead pane's "Pane is dead"
        line scrolls the screen by one: the words are looked for in its history too."""
        try:
            wait_for(lambda: self.exited() and last_words in self.screen(history=True),
                     timeout=timeout, what=f"the pane's process to exit, saying {last_words!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane (exited: {self.exited()}):\n{self.screen(history=True)}") \
                from None

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux_env(daemon, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/install-deps installs it)")
    made: list[Tmux] = []

    def make() -> Tmux:
        t = Tmux({**daemon.env, "PYTHONPATH": str(ROOT / "src")})
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def top_command(tmp_path: Path, extra: str = "") -> str:
    """A shell in the pane: saves the terminal's modes, runs top, says how it ended and
    saves the modes again."""
    # The shell catches SIGINT (so it outlives a Ctrl-C); top, its child, starts with it at default.
    return (f"trap true INT; stty -g > {tmp_path}/before; {sys.executable} -m alacrity.cli top {extra}; "
            f"status=$?; stty -g > {tmp_path}/after; echo \"top exited $status\"")


def line_of(screen: str, name: str) -> str:
    for line in screen.splitlines():
        if line.split()[:1] == [name]:
            return line
    return ""


def iops(line: str) -> float | None:
    match = re.search(r"([\d.]+)([kMG]?) IOPS", line)
    if not match:
        return None
    return float(match.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[match.group(2)]


def port_rates(screen: str) -> list[float]:
    """frames/s of each port row."""
    rates = []
    for line in screen.splitlines():
        if "port" in line.split()[:3] and (match := re.search(r"([\d.]+)([kMG]?) f/s", line)):
            rates.append(float(match.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[match.group(2)])
    return rates


def test_top_shows_rates_live_sorts_and_quits_restoring_the_terminal(daemon, tmp_path, tmux_env):
    daemon.make_disk("disk0", "lab", tmp_path / "disk0.img")
    daemon.make_disk("disk1", "lab", tmp_path / "disk1.img")
    daemon.make_switch("lan0", ["lab"])
    with Load(daemon, "lab", "disk1", "lan0") as load:
        term = tmux_env()
        term.start(top_command(tmp_path))
        # The second frame has rates: all idle.
        wait_for(lambda: iops(line_of(term.screen(), "disk1")) == 0, what="disk1 at 0 IOPS")
        screen = term.screen()
        assert "BUSES / PEER" in screen and "[q]uit" in screen
        assert f"{load.proc.pid}(" in screen, screen  # the bus's member
        assert len(port_rates(screen)) == 2, screen  # the two ports, below lan0
        load.do("disk")
        load.do("net")

        def busy_screen() -> str | None:
            s = term.screen()
            rates = port_rates(s)
            return s if (iops(line_of(s, "disk1")) or 0) > 0 and len(rates) == 2 and min(rates) > 0 else None

        busy = wait_for(busy_screen, what="disk1's IOPS and both ports' frame rates to rise")
        print(f"busy:\n{busy}")
        assert "MB/s" in line_of(busy, "disk1") and not line_of(busy, "disk1").count(" 0.0 MB/s")
        assert iops(line_of(busy, "disk0")) == 0
        # Sorted by name, disk0 comes first; by rate (busiest first), the busy disk1 does.
        names = [line.split()[0] for line in busy.splitlines() if line.split()[:1] in (["disk0"], ["disk1"])]
        assert names == ["disk0", "disk1"]
        term.keys("r")

        def by_rate() -> bool:
            s = term.screen()
            order = [line.split()[0] for line in s.splitlines() if line.split()[:1] in (["disk0"], ["disk1"])]
            return order == ["disk1", "disk0"] and "descending" in s

        wait_for(by_rate, timeout=5, what="the rows sorted by rate")
        load.do("idle")
        wait_for(lambda: iops(line_of(term.screen(), "disk1")) == 0, what="disk1 back to 0 IOPS")
        term.keys("q")
        term.wait_exit("top exited")
    screen = term.screen(history=True)
    assert "top exited 0" in screen, screen
    assert "DEVICE" not in screen and "[q]uit" not in screen  # the alternate screen is gone
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()  # modes restored


def test_top_restores_the_terminal_on_ctrl_c(daemon, tmp_path, tmux_env):
    daemon.make_disk("disk0", "lab", tmp_path / "disk0.img")
    term = tmux_env()
    term.start(top_command(tmp_path))
    wait_for(lambda: "disk0" in term.screen(), what="top's first frame")
    term.keys("C-c")
    term.wait_exit("top exited")
    screen = term.screen(history=True)
    assert "top exited 130" in screen and "Traceback" not in screen
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()


def test_top_once_prints_one_plain_snapshot_with_rates_members_and_vms(daemon, tmp_path):
    daemon.make_disk("disk0", "lab", tmp_path / "disk0.img")
    daemon.make_disk("idle0", "lab", tmp_path / "idle0.img")
    daemon.make_switch("lan0", ["lab", "other"])
    # A process that looks like a VM to the daemon: QEMU's argv[0] and -name (no guest needed).
    fake_vm = subprocess.Popen(
        [sys.executable, "-m", "alacrity.cli", "bus", "exec", "other", "--", "bash", "-c",
         f"exec -a qemu-system-x86_64 {sys.executable} -c 'import time; time.sleep(60)' -name vm7"],
        env=daemon.env)
    try:
        with Load(daemon, "lab", "disk0") as load:
            load.do("disk")
            out = subprocess.run([sys.executable, "-m", "alacrity.cli", "top", "--once", "--interval", "0.5"],
                                 env=daemon.env, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            print(out.stdout)
            assert "\x1b" not in out.stdout  # plain text
            assert (iops(line_of(out.stdout, "disk0")) or 0) > 0
            assert iops(line_of(out.stdout, "idle0")) == 0
            assert line_of(out.stdout, "lan0").split()[2] == "lab,other"
            assert f"{load.proc.pid}(" in line_of(out.stdout, "lab")
            wait_for(lambda: "vm7(" in line_of(subprocess.run(
                [sys.executable, "-m", "alacrity.cli", "top", "--once", "--interval", "0"], env=daemon.env,
                capture_output=True, text=True, timeout=30).stdout, "other"), what="the VM on bus other")
            snap = ask_status(daemon.run_dir)["status"]
            other = next(b for b in snap["buses"] if b["name"] == "other")
            assert other["vms"] == [{"name": "vm7", "pid": fake_vm.pid}]
            disk = next(d for d in snap["devices"] if d["name"] == "disk0")
            assert disk["class"] == "blk" and disk["buses"] == ["lab"] and disk["counters"]["writes"] > 0
            assert disk["counters"]["connections"] == 1 and disk["error"] == ""
    finally:
        fake_vm.kill()
        fake_vm.wait()


def test_status_is_roots_alone(daemon, tmp_path):
    daemon.make_disk("disk0", "lab", tmp_path / "disk0.img")
    searchable_by_others(daemon.run_dir)
    ask = textwrap.dedent("""
        import json, socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(b'{"op": "status"}\\n')
        print(s.makefile().readline().strip())
    """)
    out = subprocess.run([*AS_NOBODY, PLAIN_PYTHON, "-c", ask, str(daemon.run_dir / "control.sock")],
                         capture_output=True, text=True, timeout=30)
    reply = json.loads(out.stdout)
    assert set(reply) == {"error"} and "root" in reply["error"], reply
    # The command itself says so in one line (it needs only the standard library to be refused).
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "src"),
           "ALACRITY_RUN_DIR": str(daemon.run_dir)}
    out = subprocess.run([*AS_NOBODY, PLAIN_PYTHON, "-m", "alacrity.cli", "top", "--once"], env=env,
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and out.stderr.count("\n") == 1 and "as root" in out.stderr, out.stderr
    assert "disk0" not in out.stderr


def test_top_says_when_there_is_no_daemon(tmp_path):
    env = {**os.environ, "ALACRITY_RUN_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "alacrity.cli", "top", "--once"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "alacrityd" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "alacrity.cli", "top"], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--once" in out.stderr


def test_top_help_teaches():
    out = subprocess.run([sys.executable, "-m", "alacrity.cli", "top", "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    for words in ("IOPS", "bits a second", "quit", "Ctrl-C", "--once", "root", "metrics.sock", "reverses"):
        assert words in out.stdout, words


def test_status_makes_no_thread_of_the_gate_wait(daemon, tmp_path):
    """A status request is answered off the gate's thread: other requests on other
    connections go on meanwhile, and requests after it on the same connection wait for it."""
    daemon.make_switch("lan0", ["lab"])
    daemon.make_disk("disk0", "lab", tmp_path / "disk0.img")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.run_dir / "control.sock"))
        sock.sendall(b'{"op": "status"}\n{"op": "whoami"}\n{"op": "status"}\n')
        stream = sock.makefile()
        replies = [json.loads(stream.readline()) for _ in range(3)]
    assert "status" in replies[0] and replies[1]["uid"] == 0 and "status" in replies[2]
