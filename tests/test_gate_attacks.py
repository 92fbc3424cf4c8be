"""Members and local users attack the gate: each route once found to cross a bus, stall the
gate or starve the daemon, replayed with real processes against a real alacrityd."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alacrity.bus import peers

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
#: The attackers' scripts need only the standard library, from a Python `nobody` can run.
PLAIN_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

#: A member opens its disk and does one read, N times; prints the median, min and max seconds.
TIMED_OPEN = textwrap.dedent("""
    import json, statistics, sys, time
    from alacrity import client
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.monotonic()
        with client.connect().open(sys.argv[2], timeout=10) as dev:
            dev.read(0, 4096)
        times.append(time.monotonic() - start)
    print(json.dumps({"median": statistics.median(times), "max": max(times)}))
""")


def timed_open(daemon, bus: str, disk: str, times: int = 5) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "alacrity.cli", "bus", "exec", bus, "--", sys.executable, "-c", TIMED_OPEN,
         str(times), disk],
        env=daemon.env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def daemon_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 1: a pid reused as a thread of a process under another bus's member

THREAD_HOST = textwrap.dedent("""
    import os, sys, threading, time
    # A child of the bus member: on "go" it starts a thread and prints the thread's id.
    if os.fork() == 0:
        for line in sys.stdin:
            t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
            t.start()
            print(t.native_id, flush=True)
        os._exit(0)
    os.wait()
""")

ATTACKER = textwrap.dedent("""
    import os, socket, sys
    from alacrity.vhost_user.messages import Req, encode
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])          # lands in the backlog: the gate is stopped
    if os.fork() == 0:                 # the child keeps the connection; the parent exits
        sys.stdin.readline()           # until the test has steered the parent's pid
        sock.settimeout(5)
        try:
            sock.sendall(encode(Req.GET_FEATURES))
            print("OPENED" if sock.recv(64) else "REFUSED", flush=True)
        except OSError as exc:
            print("REFUSED", exc, flush=True)
        os._exit(0)
    print(os.getpid(), flush=True)
    os._exit(0)
""")


def test_reused_pid_as_a_thread_of_another_bus_cannot_cross(daemon, tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        pytest.skip("needs root and ns_last_pid to steer pid reuse")
    daemon.make_disk("secret", "B", tmp_path / "secret.img")
    # A member of bus B with a child that makes threads on demand (as QEMU under vm run does).
    member = subprocess.Popen([sys.executable, "-c", THREAD_HOST], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        daemon.sh(f"echo {member.pid} > $A/buses/B/members")
        crossed = 0
        for _attempt in range(3):
            crossed += _one_thread_reuse_attempt(daemon, member)
        assert crossed == 0
        assert "refused device secret to unidentified peer" in daemon.log.read_text()
    finally:
        os.killpg(member.pid, signal.SIGKILL)
        member.wait()


def _one_thread_reuse_attempt(daemon, member: subprocess.Popen) -> int:
    socket_path = str(daemon.run_dir / "devices" / "secret.sock")
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # the gate is busy: accepts wait in the backlog
    try:
        attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, socket_path], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        old_pid = int(attacker.stdout.readline())
        attacker.wait()  # the connecting process is gone; its child holds the connection
        for _ in range(50):  # steer the freed pid to a new thread under the B member
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(old_pid - 1))
            member.stdin.write("go\n")
            member.stdin.flush()
            if int(member.stdout.readline()) == old_pid:
                break
        else:
            pytest.skip("could not make the kernel reuse the attacker's pid for a thread")
        assert peers.task(old_pid) is not None and not peers.is_process(old_pid)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    attacker.stdin.write("go\n")
    attacker.stdin.close()
    verdict = attacker.stdout.readline()
    assert verdict, "the attacker's child said nothing"
    return 1 if verdict.startswith("OPENED") else 0


# -- 7: starving the daemon

FLOOD_CONTROL = textwrap.dedent("""
    import socket, sys, time
    held, closed = [], 0
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sys.argv[1])
        except OSError:
            break
        held.append(s)
    time.sleep(1.0)
    for s in held:               # those the gate refused were closed at once: EOF
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
    print(len(held), closed, flush=True)
    sys.stdin.read()             # hold the rest until told
""")


def searchable_by_others(path: Path) -> None:
    """Let an unprivileged process reach the daemon's sockets, as under /run/alacrityd."""
    for directory in [path, *path.parents]:
        if directory == Path("/tmp"):
            break
        directory.chmod(directory.stat().st_mode | 0o001)


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_control_connections_are_capped_per_user(daemon, tmp_path):
    daemon.make_disk("d1", "A", tmp_path / "d1.img")
    searchable_by_others(daemon.run_dir)
    normal = timed_open(daemon, "A", "d1")
    threads_before, fds_before = _threads_and_fds(daemon.proc.pid)
    flood = subprocess.Popen([*AS_NOBODY, PLAIN_PYTHON, "-c", FLOOD_CONTROL,
                              str(daemon.run_dir / "control.sock"), "3000"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held, closed = map(int, flood.stdout.readline().split())
        assert held == 3000
        from alacrity.bus.gate import MAX_CONTROL_PER_UID
        assert closed == 3000 - MAX_CONTROL_PER_UID  # the rest were refused, not queued
        threads, fds = _threads_and_fds(daemon.proc.pid)
        assert threads <= threads_before + 2 and fds <= fds_before + MAX_CONTROL_PER_UID + 8
        under_attack = timed_open(daemon, "A", "d1")
    finally:
        flood.kill()
        flood.wait()
    print(f"member open: normal {normal['median'] * 1e3:.1f} ms, "
          f"under 3000 idle connections {under_attack['median'] * 1e3:.1f} ms")
    assert under_attack["median"] < max(2 * normal["median"], normal["median"] + 0.05)
    assert "control connections" in daemon.log.read_text()


FLOOD_FDS = textwrap.dedent("""
    import socket, sys
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        held.append(s)
    print(len(held), flush=True)
    sys.stdin.read()
""")


def test_accept_at_the_fd_limit_backs_off_instead_of_spinning(daemon, tmp_path):
    daemon.make_disk("d1", "A", tmp_path / "d1.img")
    pid = daemon.proc.pid
    _, fds = _threads_and_fds(pid)
    limit = fds + 40
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    # Root is not capped per uid: its connections run the daemon out of fds.
    flood = subprocess.Popen([sys.executable, "-c", FLOOD_FDS, str(daemon.run_dir / "control.sock"), "120"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert int(flood.stdout.readline()) == 120
        # At the limit, either accept() or the identity check that follows it runs out of fds.
        wait_for(lambda: "Too many open files" in daemon.log.read_text(), what="the daemon to run out of fds")
        before, start = daemon_cpu_s(pid), time.monotonic()
        time.sleep(1.0)
        share = (daemon_cpu_s(pid) - before) / (time.monotonic() - start)
        print(f"daemon CPU at the fd limit: {share * 100:.1f} % of a core")
        assert share < 0.3
    finally:
        flood.kill()
        flood.wait()
    # The idle ones are gone with their process: a member opens its disk again.
    assert timed_open(daemon, "A", "d1", times=1)["max"] < 5


#: A connect-and-close flood on a device socket, from the bottom of a process chain
#: DEPTH generations deep: each dash starts the next and waits for it.
DEEP_STEP = (
    'if [ "$DEPTH" -gt 0 ]; then DEPTH=$((DEPTH - 1)) dash -c "$STEP"; '
    'else exec "$PYTHON" -c "$FLOOD" "$SOCKET"; fi'
)

CONNECT_FLOOD = textwrap.dedent("""
    import socket, sys
    print("deep", flush=True)
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sys.argv[1])
            s.recv(1)
        except OSError:
            pass
        s.close()
""")


def test_a_deep_process_chain_costs_the_gate_little(daemon, tmp_path):
    daemon.make_disk("d1", "A", tmp_path / "d1.img")
    daemon.make_disk("d2", "B", tmp_path / "d2.img")
    searchable_by_others(daemon.run_dir)
    normal = timed_open(daemon, "A", "d1")
    env = {"PYTHON": PLAIN_PYTHON, "FLOOD": CONNECT_FLOOD, "DEPTH": "2000", "STEP": DEEP_STEP,
           "SOCKET": str(daemon.run_dir / "devices" / "d2.sock"), "PATH": os.environ["PATH"]}
    flood = subprocess.Popen([*AS_NOBODY, "dash", "-c", DEEP_STEP], env=env, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert flood.stdout.readline() == "deep\n"
        before, start = daemon_cpu_s(daemon.proc.pid), time.monotonic()
        under_attack = timed_open(daemon, "A", "d1")
        share = (daemon_cpu_s(daemon.proc.pid) - before) / (time.monotonic() - start)
    finally:
        os.killpg(flood.pid, signal.SIGKILL)
        flood.wait()
    print(f"member open: normal {normal['median'] * 1e3:.1f} ms, "
          f"under a connect flood from 2000 generations down {under_attack['median'] * 1e3:.1f} ms; "
          f"daemon CPU {share * 100:.0f} % of a core")
    assert under_attack["median"] < max(2 * normal["median"], normal["median"] + 0.05)


def test_membership_reaches_a_bounded_number_of_generations(daemon, tmp_path):
    daemon.make_disk("d1", "A", tmp_path / "d1.img")
    chain = textwrap.dedent("""
        import os, sys
        from alacrity import client
        for _ in range(int(sys.argv[1])):
            pid = os.fork()
            if pid:
                os.waitpid(pid, 0)
                os._exit(0)
        try:
            print(client.connect().name, flush=True)
        except client.GateError:
            print("refused", flush=True)
    """)
    shallow = daemon.in_bus("A", chain.replace("sys.argv[1]", "'10'"))
    assert shallow.stdout.strip() == "A"
    deep = daemon.in_bus("A", chain.replace("sys.argv[1]", "'100'"))
    assert deep.stdout.strip() == "refused"


# -- 9: hostile requests on the control socket

def test_a_deeply_nested_request_gets_an_error_and_the_gate_goes_on(daemon, tmp_path):
    daemon.make_disk("d1", "A", tmp_path / "d1.img")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.run_dir / "control.sock"))
        for request in (b"[" * 4000 + b"\n", b'{"op": ' * 500 + b"\n", b'{"op": 7}\n'):
            sock.sendall(request)
            assert "bad request" in json.loads(sock.makefile("rb").readline())["error"]
        sock.sendall(b'{"op": "whoami"}\n')
        assert json.loads(sock.makefile("rb").readline())["pid"] == os.getpid()
    assert timed_open(daemon, "A", "d1", times=1)["max"] < 5


# -- 2: a stalled switch must not stall the gate

HOLD_SWITCH_CONNECTIONS = textwrap.dedent("""
    import socket, sys
    from alacrity import client
    path = next(d.socket for d in client.connect().devices if d.name == sys.argv[1])
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        held.append(s)
    print("held", flush=True)
    sys.stdin.read()
""")


def _switch_pid(daemon, name: str) -> int | None:
    """The switch's pid; None while it has none, or is not answering (EIO)."""
    try:
        text = (daemon.admin / "devices" / name / "pid").read_text().strip()
    except OSError:
        return None
    return int(text) if text else None


def test_a_stalled_switch_costs_only_its_own_connections(daemon, tmp_path):
    daemon.make_switch("sw", ["A"])
    daemon.make_disk("d2", "B", tmp_path / "d2.img")
    daemon.make_switch("other", ["B"])
    normal = timed_open(daemon, "B", "d2")
    # Start both switch processes: each runs as a uid of its own.
    holder = subprocess.Popen([sys.executable, "-m", "alacrity.cli", "bus", "exec", "A", "--", sys.executable,
                               "-c", HOLD_SWITCH_CONNECTIONS, "sw", "1"],
                              env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    other = daemon.in_bus("B", "from alacrity import client; client.connect().open('other', timeout=5)")
    assert other.returncode == 0, other.stderr
    stalled = wait_for(lambda: _switch_pid(daemon, "sw"), what="the switch process")
    uids = {Path(f"/proc/{_switch_pid(daemon, n)}/status").read_text().split("Uid:")[1].split()[0]
            for n in ("sw", "other")}
    assert len(uids) == 2
    holder.kill()
    holder.wait()

    os.kill(stalled, signal.SIGSTOP)  # the switch stops answering its control socket
    attacker = subprocess.Popen([sys.executable, "-m", "alacrity.cli", "bus", "exec", "A", "--",
                                 sys.executable, "-c", HOLD_SWITCH_CONNECTIONS, "sw", "6"],
                                env=daemon.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline() == "held\n"
        under_attack = timed_open(daemon, "B", "d2")
        start = time.monotonic()
        stats = subprocess.run(["cat", str(daemon.admin / "devices/sw/stats")], capture_output=True,
                               text=True, timeout=30)
        stats_s = time.monotonic() - start
        print(f"member of another bus opens its disk: normal {normal['median'] * 1e3:.1f} ms, with a "
              f"stalled switch {under_attack['median'] * 1e3:.1f} ms; stats read failed in {stats_s:.1f} s")
        assert under_attack["max"] < 1.0
        assert stats.returncode != 0 and "Input/output error" in stats.stderr and stats_s < 3.0
        # The stalled switch is killed once a hand-over times out, and a new one serves.
        wait_for(lambda: "is not answering" in daemon.log.read_text(), timeout=20, what="the switch's end")
        wait_for(lambda: _switch_pid(daemon, "sw") not in (None, stalled), timeout=20, what="a new switch")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stalled, signal.SIGCONT)
        attacker.kill()
        attacker.wait()
