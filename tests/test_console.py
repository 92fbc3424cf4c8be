"""The console class: guests' serial consoles kept by the bus.

In-process tests drive a ConsoleDevice over socketpairs (who is a QEMU is injected);
the protocol parser and the ring get hypothesis; the rest boots real TCG guests whose
ttyS0 is a chardev socket to the device, through the daemon's gate."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.client.console import ConsoleClient
from alacrity.devices import console as con
from alacrity.devices.console import ConsoleDevice, PeerKind
from alacrity.devices.console_ring import (
    MAX_HELLO,
    NAME_RE,
    ConsoleRefused,
    Hello,
    HelloError,
    HelloReader,
    Ring,
    format_hello,
    parse_hello,
    parse_reply,
    qemu_name,
    safe_name,
)

# ---------------------------------------------------------------- sans-I/O parts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=3000), st.integers(0, 5000)), max_size=40),
       st.integers(1, 4096))
def test_ring_holds_the_newest_bytes_at_their_positions(ops, size) -> None:
    """Writes (bytes) and resizes (ints) against a model: the whole stream, cut."""
    ring, stream, start = Ring(size), bytearray(), 0
    for op in ops:
        if isinstance(op, int):
            size = max(op, 1)
            ring = ring.resized(size)
            start = max(start, len(stream) - size)
        else:
            lost = ring.write(op)
            stream += op
            new_start = max(start, len(stream) - size)
            assert lost == new_start - start
            start = new_start
        assert (ring.start, ring.head) == (start, len(stream))
        assert ring.snapshot() == stream[start:]
        assert len(ring.buf) <= size
        if len(stream) > start:
            pos = (start + len(stream)) // 2
            got = ring.read(pos, 100)
            assert got and stream[pos:].startswith(got)
        assert ring.read(start - 5) == ring.read(start)  # clamped to what is held


hellos = st.builds(Hello, st.sampled_from(["ATTACH", "FOLLOW"]), st.from_regex(NAME_RE, fullmatch=True),
                   st.one_of(st.none(), st.integers(0, 10**12 - 1)))


@given(hellos, st.binary(max_size=50), st.lists(st.integers(1, 40), max_size=8))
def test_a_request_line_round_trips_in_any_pieces(hello, rest, cuts) -> None:
    data, reader, got = format_hello(hello) + rest, HelloReader(), None
    for cut in [*cuts, len(format_hello(hello)) + len(rest)]:
        piece, data = data[:cut], data[cut:]
        if got is None:
            got = reader.feed(piece)
            if got is not None:
                rest = got[1] + data  # what came after the line is the writer's first keys
                break
    assert got is not None and got[0] == hello and got[1] + data == rest


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_the_request_parser_refuses_garbage_cleanly(pieces) -> None:
    """Any bytes: a request, a wait for more (never past MAX_HELLO), or HelloError."""
    reader = HelloReader()
    for piece in pieces:
        try:
            got = reader.feed(piece)
        except HelloError:
            return
        if got is not None:
            assert got[0].verb in ("ATTACH", "FOLLOW") and NAME_RE.fullmatch(got[0].name)
            return
        assert len(reader.buf) <= MAX_HELLO


@given(st.binary(max_size=300))
def test_the_reply_parser_refuses_garbage_cleanly(line) -> None:
    try:
        reply = parse_reply(line)
    except (ConsoleRefused, HelloError):
        return
    assert reply.start >= 0


@given(st.text(max_size=100))
def test_any_vm_name_becomes_a_safe_file_name_or_none(name) -> None:
    safe = safe_name(name)
    assert safe is None or (NAME_RE.fullmatch(safe) and safe not in (".", ".."))


def test_qemu_names() -> None:
    assert qemu_name(["qemu-system-x86_64", "-name", "vm1", "-m", "512"]) == "vm1"
    assert qemu_name(["q", "-name", "guest=a,,b,debug-threads=on"]) == "a,b"
    assert qemu_name(["q", "-name", "x,process=y"]) == "x"
    assert qemu_name(["q", "-name", "a", "-name", "b"]) == "b"
    assert qemu_name(["q", "-m", "1"]) is None and qemu_name(["q", "-name"]) is None
    assert safe_name("../etc/passwd") == "_._etc_passwd" and safe_name("") is None
    assert safe_name("a b/c") == "a_b_c" and safe_name("-x") == "_x"
    for bad in (b"ATTACH", b"ATTACH ../x", b"FOLLOW a 12x", b"DELETE a", b"FOLLOW a 1 2", b"FOLLOW \xff"):
        with pytest.raises(HelloError):
            parse_hello(bad)


# ---------------------------------------------------------------- the device in-process


class Bench:
    """A ConsoleDevice whose peers are socketpairs; `kinds` says who each fake pid is."""

    def __init__(self, log_size: str = "64K") -> None:
        self.dev = ConsoleDevice("con0")
        self.dev.set_attribute("log_size", log_size)
        self.kinds: dict[int, PeerKind] = {}
        self.dev.identify = lambda sock, pid: self.kinds[pid]
        self.next_pid = 10**7
        self.socks: list[socket.socket] = []

    def connect(self, kind: PeerKind) -> tuple[socket.socket, int]:
        ours, theirs = socket.socketpair()
        self.next_pid += 1
        self.kinds[self.next_pid] = kind
        self.dev.adopt(theirs, self.next_pid, "test")
        self.socks.append(ours)
        return ours, self.next_pid

    def qemu(self, vm: str, uid: int = 0) -> socket.socket:
        sock, _ = self.connect(PeerKind(uid, vm))
        wait_until(lambda: vm in self.dev.consoles and self.dev.consoles[vm].stream is not None, 5, vm)
        return sock

    def open(self, vm: str, mode: str = "follow", backlog: int | None = None, uid: int = 0) -> ConsoleClient:
        sock, _ = self.connect(PeerKind(uid, None))
        return ConsoleClient(sock, vm, mode, backlog)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.dev.destroy()


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.close()


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_until(con_: ConsoleClient, needle: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        data = con_.read(timeout=max(0.0, deadline - time.monotonic()))
        if not data:
            raise AssertionError(f"{needle!r} never came; got {got[-300:]!r}")
        got += data
    return got


def test_follow_attach_type_and_the_end_in_process(bench) -> None:
    qemu = bench.qemu("vm1")
    qemu.sendall(b"booting\r\n")
    wait_until(lambda: bench.dev.log_of("vm1") == b"booting\r\n", 5, "the log")
    follower = bench.open("vm1", backlog=None)
    assert follower.live and read_until(follower, b"booting") == b"booting\r\n"
    writer = bench.open("vm1", "attach", backlog=0)
    with pytest.raises(ConsoleRefused, match="already has a writer"):
        bench.open("vm1", "attach")
    writer.write(b"ls\r")
    qemu.settimeout(5)
    assert qemu.recv(100) == b"ls\r"
    qemu.sendall(b"ls\r\nfile\r\n")
    assert read_until(writer, b"file") == b"ls\r\nfile\r\n"
    assert read_until(follower, b"file").endswith(b"file\r\n")
    with pytest.raises(PermissionError):
        follower.write(b"x")
    qemu.sendall(b"bye\r\n")
    qemu.close()  # the VM ended: clients get the rest, then the end
    assert read_until(follower, b"bye").endswith(b"bye\r\n") and follower.read(timeout=5) == b""
    assert bench.dev.log_of("vm1").endswith(b"bye\r\n")
    later = bench.open("vm1", backlog=None)  # the log outlives the VM
    assert not later.live and read_until(later, b"bye") == bench.dev.log_of("vm1")
    assert later.read(timeout=5) == b""
    c = bench.dev.counters
    assert c["bytes_in"] == len(bench.dev.log_of("vm1")) and c["typed"] == 3 and c["console_count"] == 1


client_streams = st.lists(st.tuples(st.one_of(st.none(), hellos), st.binary(max_size=600),
                                    st.booleans()), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(client_streams)
def test_hostile_clients_never_hurt_the_console(clients) -> None:
    """Clients send anything, with or without a request line first, and leave or stay:
    the VM's output keeps flowing to a well-behaved follower, and nothing breaks."""
    b = Bench()
    try:
        qemu = b.qemu("vm1")
        good = b.open("vm1", backlog=0)
        socks = []
        for hello, junk, leave in clients:
            sock, _ = b.connect(PeerKind(0, None))
            with contextlib.suppress(OSError):
                sock.sendall((format_hello(hello) if hello else b"") + junk)
                if leave:
                    sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
        qemu.sendall(b"still-here\r\n")
        assert read_until(good, b"still-here").endswith(b"still-here\r\n")
        assert b.dev.counters["errors"] == 0 and all(t.is_alive() for t in b.dev.threads)
        assert b.dev.consoles["vm1"].stream is not None
    finally:
        b.close()


def test_refusals_in_process(bench, monkeypatch) -> None:
    bench.qemu("vm1", uid=1000)
    with pytest.raises(ConsoleRefused, match="no console nope"):
        bench.open("nope")
    with pytest.raises(ConsoleRefused, match="not yours"):
        bench.open("vm1", uid=1001)
    bench.open("vm1", uid=1000).close()  # its owner may, and root
    bench.open("vm1", uid=0).close()
    sock, _ = bench.connect(PeerKind(1000, None))
    sock.sendall(b"HELLO there\n")
    sock.settimeout(5)
    assert sock.recv(200).startswith(b"ERR send 'ATTACH VM'")
    assert sock.recv(10) == b""
    monkeypatch.setattr(con, "HELLO_TIMEOUT_S", 0.2)
    silent, _ = bench.connect(PeerKind(1000, None))
    silent.settimeout(5)
    assert silent.recv(10) == b""  # said nothing: closed
    # A second QEMU with a live VM's name is refused; the first one keeps its console.
    bench.connect(PeerKind(1000, "vm1"))
    wait_until(lambda: bench.dev.counters["refused"] >= 3, 5, "the refusal")
    assert bench.dev.consoles["vm1"].stream is not None


def test_clients_per_uid_are_capped(bench, monkeypatch) -> None:
    monkeypatch.setattr(con, "MAX_CLIENTS_PER_UID", 3)
    bench.qemu("vm1", uid=1000)
    held = [bench.open("vm1", uid=1000) for _ in range(3)]
    with pytest.raises(ConsoleRefused, match="uid 1000 has 3 clients"):
        bench.open("vm1", uid=1000)
    bench.open("vm1", uid=0).close()  # root is not capped
    for c in held:
        c.close()
    wait_until(lambda: len(bench.dev.clients) == 0, 5, "the clients to go")
    bench.open("vm1", uid=1000).close()


def test_a_new_vm_of_the_same_name_and_owner_continues_the_log(bench) -> None:
    first = bench.qemu("vm1", uid=5)
    first.sendall(b"one\n")
    wait_until(lambda: bench.dev.log_of("vm1") == b"one\n", 5, "the log")
    session = bench.dev.consoles["vm1"].session
    first.close()
    wait_until(lambda: bench.dev.consoles["vm1"].stream is None, 5, "the end")
    bench.qemu("vm1", uid=5).sendall(b"two\n")
    wait_until(lambda: bench.dev.log_of("vm1") == b"one\ntwo\n", 5, "the log")
    assert bench.dev.consoles["vm1"].session == session


def test_log_size_changes_keep_the_newest_bytes(bench) -> None:
    qemu = bench.qemu("vm1")
    qemu.sendall(bytes(range(256)) * 400)
    wait_until(lambda: bench.dev.counters["bytes_in"] == 102400, 5, "the bytes")
    assert bench.dev.log_of("vm1") == (bytes(range(256)) * 400)[-65536:]
    bench.dev.set_attribute("log_size", "4K")
    assert bench.dev.log_of("vm1") == (bytes(range(256)) * 400)[-4096:]
    for bad in ("0", "4095", "65M", "1T", "x", "-1"):
        with pytest.raises(Exception, match="log_size"):
            bench.dev.set_attribute("log_size", bad)


def vm_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_a_client_that_never_reads_costs_nothing_and_slows_nothing(bench) -> None:
    """QEMU's stream is drained at full speed while a follower sits on a full socket:
    it is moved past what the log overwrote, and that is counted. A follower that
    reads, but slower than the flood, skips too, and catches up with the newest bytes."""
    qemu = bench.qemu("vm1")
    stuck = bench.open("vm1", backlog=None)  # never reads
    reader = bench.open("vm1", backlog=0)
    total, chunk = 64 << 20, os.urandom(1 << 16)
    tail = bytearray()

    def drain() -> None:
        while data := reader.read(1 << 20, timeout=2):
            tail.extend(data)
            del tail[: -len(chunk)]

    thread = threading.Thread(target=drain)
    thread.start()
    before = vm_rss_kib(os.getpid())
    started = time.monotonic()
    for _ in range(total // len(chunk)):
        qemu.sendall(chunk)
    sent_s = time.monotonic() - started
    thread.join(30)
    grew_mib = (vm_rss_kib(os.getpid()) - before) / 1024
    print(f"64 MiB through the device in {sent_s:.2f} s; RSS grew {grew_mib:.1f} MiB; "
          f"dropped {bench.dev.counters['dropped']}")
    assert bytes(tail) == chunk  # the reader has the newest bytes
    assert bench.dev.counters["bytes_in"] == total
    assert bench.dev.counters["dropped"] > total - (4 << 20)  # the stuck one missed nearly all
    assert len(bench.dev.consoles["vm1"].ring.buf) == 65536
    assert grew_mib < 16
    stuck.close()


# ---------------------------------------------------------------- real guests

CLI = [sys.executable, "-m", "alacrity.cli"]


def make_console(daemon, name: str, bus: str, log_size: str | None = None) -> None:
    size = f"echo {log_size} > $A/devices/{name}/log_size" if log_size else ""
    daemon.sh(f"""
        mkdir $A/devices/{name}
        echo console > $A/devices/{name}/type
        {size}
        mkdir -p $A/buses/{bus}
        ln -s ../../devices/{name} $A/buses/{bus}/{name}
    """)


def start_vm(daemon, bus: str, name: str, image, log: Path, cmd: str | None = None,
             append: str = "") -> subprocess.Popen:
    argv = [*CLI, "vm", "run", "--bus", bus, "--name", name, "--log", str(log),
            "--kernel", str(image.kernel), "--initrd", str(image.initrd), "--timeout", "300"]
    if cmd is not None:
        argv += ["--cmd", cmd]
    if append:
        argv += ["--append", append]
    return subprocess.Popen(argv, env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen):
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def console_log(daemon, device: str, vm: str) -> bytes:
    try:
        return (daemon.admin / "devices" / device / "consoles" / vm).read_bytes()
    except FileNotFoundError:
        return b""


def counter(daemon, device: str, what: str) -> int:
    return int((daemon.admin / "devices" / device / what).read_text())


def file_has(path: Path, text: bytes) -> bool:
    return path.exists() and text in path.read_bytes()


def follow(daemon, vm: str, out: Path, **kw) -> subprocess.Popen:
    """`alacrity vm console VM --follow --backlog all`, its output to `out`."""
    with open(out, "wb") as stdout:
        return subprocess.Popen([*CLI, "vm", "console", vm, "--follow", "--backlog", "all"], env=daemon.env,
                                stdout=stdout, start_new_session=True, **kw)


class Terminal:
    """`alacrity vm console ARGS` on a pseudo-terminal, as a person would run it."""

    def __init__(self, daemon, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([*CLI, "vm", "console", *args], env=daemon.env, stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, needle: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"{needle!r} never appeared; the terminal shows:\n{self.seen[-2000:]!r}")
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                raise AssertionError(f"{needle!r} never appeared; exited {self.proc.poll()}:\n"
                                     f"{self.seen[-2000:]!r}") from None
        return self.seen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> int:
        try:
            status = self.proc.wait(15)
            while select.select([self.master], [], [], 0.2)[0]:  # what it wrote last
                self.seen += os.read(self.master, 65536)
        except OSError:
            pass  # EIO: all read
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            os.close(self.master)
        return status


@pytest.mark.vm
def test_the_boot_log_is_in_the_device_and_vm_run_still_sees_the_markers(daemon, tmp_path, guest_image):
    make_console(daemon, "con0", "b1")
    log = tmp_path / "vm1.log"
    status, out = finish(start_vm(daemon, "b1", "vm1", guest_image, log, cmd="echo hi-$((40+2))",
                                  append="loglevel=7"))
    assert status == 0, out
    kept = console_log(daemon, "con0", "vm1")
    assert kept.startswith(b"[    0.000000] Linux version"), kept[:300]  # from the kernel's first line
    assert b"hi-42\r\n" in kept and b"ALACRITY-EXIT=0" in kept
    assert kept == log.read_bytes()  # QEMU's own log of the chardev: the same bytes
    assert counter(daemon, "con0", "bytes_in") == len(kept)
    assert os.listdir(daemon.admin / "devices/con0/consoles") == ["vm1"]
    assert counter(daemon, "con0", "connections") == 0  # the VM is gone, its log stays
    assert "QEMU pid" in daemon.log.read_text() and "send buffer stays narrow" not in daemon.log.read_text()


@pytest.mark.vm
def test_attach_type_detach_attach_again_while_two_follow(daemon, tmp_path, guest_image):
    make_console(daemon, "con0", "b1")
    log = tmp_path / "vm1.log"
    vm = start_vm(daemon, "b1", "vm1", guest_image, log)  # no --cmd: a shell on the console
    followers: list[subprocess.Popen] = []
    with reaped(vm):
        wait_until(lambda: file_has(log, b"ALACRITY-READY"), 60, "the guest")
        # Two watchers, from the start of the log; root finds the VM's bus by itself.
        outs = [tmp_path / f"follow{i}.out" for i in range(2)]
        for out in outs:
            followers.append(follow(daemon, "vm1", out, stderr=subprocess.PIPE))
        with reaped(*followers):
            for out in outs:
                wait_until(lambda o=out: file_has(o, b"ALACRITY-READY"), 30, "a follower")
            term = Terminal(daemon, "vm1")
            term.expect(b"Ctrl-] detaches")
            term.type(b"echo first-$((6*7))\r")
            term.expect(b"first-42")
            # One writer at a time.
            second = subprocess.run([*CLI, "vm", "console", "vm1"], env=daemon.env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=30)
            assert second.returncode == 2 and "already has a writer" in second.stderr, second.stderr
            term.type(b"\x1d")
            assert term.close() == 0 and b"detached" in term.seen
            term = Terminal(daemon, "vm1", "--bus", "b1")  # root may also name the bus
            term.expect(b"Ctrl-] detaches")
            term.type(b"i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); done; echo again-$((7*7))\r")
            term.expect(b"again-49")
            term.type(b"\x1d")
            assert term.close() == 0
            # The VM ends: the followers get the rest, then exit by themselves.
            stop = subprocess.run([*CLI, "vm", "stop", "vm1"], env=daemon.env, capture_output=True)
            assert stop.returncode == 0
            for follower in followers:
                assert follower.wait(30) == 0, follower.stderr.read().decode()
                assert follower.stderr.read() == b""  # the VM's end is no news
        seen = [out.read_bytes() for out in outs]
        assert seen[0] == seen[1], "two followers saw different bytes"
        assert b"first-42" in seen[0] and b"line-299\r\nagain-49" in seen[0]
        assert seen[0] == console_log(daemon, "con0", "vm1")  # everything, from the first byte
        assert counter(daemon, "con0", "typed") > 60


FLOOD = "yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 | head -c {n}"
TIMED = "read t0 r < /proc/uptime; {what}; read t1 r < /proc/uptime; echo; echo \"took $t0 $t1\""


def guest_seconds(log: bytes) -> float:
    t0, t1 = map(float, re.search(rb"took ([\d.]+) ([\d.]+)", log).groups())
    return t1 - t0


@pytest.mark.vm
def test_a_flooding_guest_nobody_watches_runs_at_file_speed(daemon, tmp_path, guest_image):
    """10 MB (100 MB takes minutes under TCG's UART), with nobody attached, against the
    same guest writing a plain file chardev. QEMU's UART sends each byte in a sendmsg of
    its own (1.3 us on a Unix socket, against 0.25 us for a write to a file, plus its log
    file), so the socket costs about 2x by itself; nobody's reading costs nothing more."""
    n = 10_000_000
    make_console(daemon, "con0", "b1", log_size="256K")
    daemon.sh("mkdir $A/buses/plain")
    cmd = TIMED.format(what=FLOOD.format(n=n))
    plain_log, bus_log = tmp_path / "plain.log", tmp_path / "bus.log"
    status, out = finish(start_vm(daemon, "plain", "vm0", guest_image, plain_log, cmd=cmd))
    assert status == 0, out
    status, out = finish(start_vm(daemon, "b1", "vm1", guest_image, bus_log, cmd=cmd))
    assert status == 0, out
    plain_s, bus_s = guest_seconds(plain_log.read_bytes()), guest_seconds(bus_log.read_bytes())
    print(f"{n / 1e6:.0f} MB to the console: file chardev {plain_s:.2f} s, console device {bus_s:.2f} s "
          f"({bus_s / plain_s:.2f}x); dropped {counter(daemon, 'con0', 'dropped')}")
    assert bus_s < 3 * plain_s
    kept, full = console_log(daemon, "con0", "vm1"), bus_log.read_bytes()
    got = counter(daemon, "con0", "bytes_in")
    # The newest log_size bytes, whole: the flood's lines (the last one cut by head -c),
    # then the end of the guest.
    assert len(kept) == 256 << 10 and kept.endswith(full[-300:])
    line = FLOOD.split()[1].encode() + b"\r\n"
    body = kept[kept.index(b"\r\n") + 2 : kept.index(b"took")]
    assert re.fullmatch(rb"(%s)*[0-9a-zA-Z]*\r\n" % re.escape(line), body), "the log lost or mangled bytes"
    # QEMU logs a byte twice when the socket was full and it had to retry: it was rare
    # enough to count (the daemon fell 15 ms behind), and never lost a byte for the device.
    print(f"QEMU retried {len(full) - got} bytes")
    assert 0 <= len(full) - got <= 64
    assert counter(daemon, "con0", "dropped") == got - len(kept)  # overwritten, unread


NEVER_READS = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(sys.argv[1])
s.sendall(b"FOLLOW vm1 all\\n")
print("connected", flush=True)
time.sleep(600)
"""


@pytest.mark.vm
def test_a_follower_that_never_reads_costs_the_daemon_bounded_memory(daemon, tmp_path, guest_image):
    make_console(daemon, "con0", "b1")
    log = tmp_path / "vm1.log"
    n = 6_000_000
    cmd = "sleep 1; " + TIMED.format(what=FLOOD.format(n=n))
    vm = start_vm(daemon, "b1", "vm1", guest_image, log, cmd=cmd)
    sock = daemon.run_dir / "devices/con0.sock"
    with reaped(vm):
        wait_until(lambda: bool(console_log(daemon, "con0", "vm1")), 60, "the console")
        argv = [*CLI, "bus", "exec", "b1", "--", sys.executable, "-c", NEVER_READS, str(sock)]
        stuck = subprocess.Popen(argv, env=daemon.env, stdout=subprocess.PIPE, start_new_session=True)
        with reaped(stuck):
            assert stuck.stdout.readline() == b"connected\n"
            before = peak = vm_rss_kib(daemon.proc.pid)
            while vm.poll() is None:
                peak = max(peak, vm_rss_kib(daemon.proc.pid))
                time.sleep(0.05)
            status, out = finish(vm)
            assert status == 0, out
            assert stuck.poll() is None
            seconds = guest_seconds(log.read_bytes())
            print(f"daemon RSS {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB while {n / 1e6:.0f} MB "
                  f"passed a follower that never reads ({seconds:.1f} s in the guest); "
                  f"dropped {counter(daemon, 'con0', 'dropped')}")
            assert (peak - before) / 1024 < 8  # a 1 MiB log; nothing buffered per follower
            assert counter(daemon, "con0", "dropped") > n - (2 << 20)


TICKS = "i=0; while [ $i -lt 40 ]; do echo tick-$i; i=$((i+1)); sleep 0.2; done"


@pytest.mark.vm
def test_the_console_survives_a_daemon_kill9_mid_boot(daemon, tmp_path, guest_image):
    make_console(daemon, "con0", "b1")
    log, follow_out = tmp_path / "vm1.log", tmp_path / "follow.out"
    vm = start_vm(daemon, "b1", "vm1", guest_image, log, cmd=TICKS, append="loglevel=7")
    with reaped(vm):
        wait_until(lambda: bool(console_log(daemon, "con0", "vm1")), 60, "the console")
        follower = follow(daemon, "vm1", follow_out, stderr=subprocess.PIPE)
        with reaped(follower):
            wait_until(lambda: file_has(follow_out, b"Linux version"), 30, "the follower")
            assert not file_has(log, b"ALACRITY-READY"), "the guest booted before the kill"
            daemon.kill9()
            time.sleep(1.0)
            daemon.start()
            status, out = finish(vm)
            assert status == 0, out
            assert follower.wait(30) == 0, follower.stderr.read().decode()
            notes = follower.stderr.read().decode()
        after = console_log(daemon, "con0", "vm1")  # the new daemon's log: from its restart on
        assert b"tick-39" in after and b"ALACRITY-EXIT=0" in after and b"Linux version" not in after
        full = log.read_bytes()
        assert full.count(b"Linux version") == 1  # one boot: the guest was not restarted
        assert full.endswith(after)
        followed = follow_out.read_bytes()
        assert b"Linux version" in followed and followed.endswith(after), notes
        assert "the daemon restarted" in notes, notes
        assert daemon.log.read_text().count("QEMU pid") >= 2


OPEN_CON0 = """
import json, os, socket, sys
from alacrity.client.console import ConsoleClient, ConsoleError, ConsoleRefused
if len(sys.argv) > 2:
    os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    with ConsoleClient(s, "vm1", "follow", None) as c:
        print(json.dumps({"got": c.read(timeout=5).decode(errors="replace")}))
except (ConsoleError, ConsoleRefused) as exc:
    print(json.dumps({"refused": str(exc)}))
"""


@pytest.mark.vm
def test_another_bus_and_another_user_cannot_open_the_console(daemon, tmp_path, guest_image):
    make_console(daemon, "con0", "b1")
    make_console(daemon, "con1", "b2")
    sock = str(daemon.run_dir / "devices/con0.sock")
    vm = start_vm(daemon, "b1", "vm1", guest_image, tmp_path / "vm1.log")  # an interactive guest
    with reaped(vm):
        wait_until(lambda: file_has(tmp_path / "vm1.log", b"ALACRITY-READY"), 60, "the guest")

        def in_bus(bus: str, *args: str) -> str:
            argv = [*CLI, "bus", "exec", bus, "--", sys.executable, "-c", OPEN_CON0, sock, *args]
            out = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return out.stdout

        assert "ALACRITY-READY" in in_bus("b1")  # a member, as root
        assert "closed the connection before answering" in in_bus("b2")  # the gate refuses
        # A member, but not the VM's user (reaching the socket through a link, as pytest's
        # temporary directories are root's alone).
        with tempfile.TemporaryDirectory(dir="/tmp") as public:
            os.chmod(public, 0o755)
            os.link(os.path.realpath(sock), f"{public}/con0.sock")
            sock = f"{public}/con0.sock"
            assert "not yours" in in_bus("b1", "65534")
        sock = str(daemon.run_dir / "devices/con0.sock")
        # A VM of b2 has its console on b2's device, and cannot reach b1's.
        status, out = finish(start_vm(daemon, "b2", "vm2", guest_image, tmp_path / "vm2.log", cmd="echo two"))
        assert status == 0, out
        assert os.listdir(daemon.admin / "devices/con1/consoles") == ["vm2"]
        # A QEMU on b2 pointed at b1's console by hand is turned away by the gate; its
        # guest runs on (its serial output goes nowhere but its own log).
        code = f"""
import sys
from alacrity.vm.image import default_image
from alacrity.vm.qemu import VM, VmSpec
img = default_image(progress=False)
spec = VmSpec(name="intruder", kernel=img.kernel, initrd=img.initrd, cmd="echo intruding",
              console=sys.argv[1], devices=[["-chardev", "socket,id=c,path={sock},reconnect=1",
                                             "-serial", "chardev:c"]])
vm = VM(spec)
vm.start()
print("status", vm.wait_exit(120))
"""
        argv = [*CLI, "bus", "exec", "b2", "--", sys.executable, "-c", code, str(tmp_path / "x.log")]
        out = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=180)
        assert "status 0" in out.stdout, out.stdout + out.stderr
        assert sorted(os.listdir(daemon.admin / "devices/con0/consoles")) == ["vm1"]
        assert "refused device con0" in daemon.log.read_text()
        assert counter(daemon, "con0", "refused") >= 1  # the non-owner


def test_log_size_is_checked_at_the_write(daemon):
    make_console(daemon, "con0", "b1")
    for bad in ("0", "100", "4095", "65M", "1G", "x", "-1"):
        assert daemon.sh(f"echo {bad} > $A/devices/con0/log_size", check=False).returncode != 0, bad
    assert (daemon.admin / "devices/con0/log_size").read_text().strip() == "1M"
    daemon.sh("echo 4K > $A/devices/con0/log_size")
    assert (daemon.admin / "devices/con0/log_size").read_text().strip() == "4K"
    assert "log_size" in (daemon.admin / "classes/console/attributes").read_text()
