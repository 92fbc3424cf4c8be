"""The guest agent (agent/agent.c), built as the image builds it and run as a real process
on the host, listening on a Unix socket instead of vsock: the same program and the same
sessions `alacrity vm exec` drives in a guest."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.agent import protocol
from alacrity.agent.build import AgentBuildError, build
from alacrity.agent.protocol import AgentError, Decoder, Exited, Failed, Output, Started
from alacrity.agent.session import CommandFailed, run
from tests.conftest import need

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    need(shutil.which("gcc") is not None, "no C compiler (gcc) to build the agent")
    where = tmp_path_factory.mktemp("agent")
    try:
        binary = build(where / "alacrity-agent")
    except AgentBuildError as exc:
        pytest.skip(str(exc))
    path = where / "agent.sock"
    proc = subprocess.Popen([str(binary), "--unix", str(path)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.02)
    try:
        yield path
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return sock


def execute(path: Path, argv, **kw):
    with connect(path) as sock:
        return run(sock, argv, env=kw.pop("env", ENV), timeout=kw.pop("timeout", 30), **kw)


def test_output_streams_status_env_and_cwd(agent, tmp_path):
    result = execute(agent, ["sh", "-c", 'echo "out $FOO"; pwd; echo err >&2; exit 3'],
                     env={**ENV, "FOO": "bar baz"}, cwd=str(tmp_path))
    assert (result.status, result.signal) == (3, 0)
    assert result.stdout == f"out bar baz\n{tmp_path}\n".encode()
    assert result.stderr == b"err\n"


def test_stdin_passes_through_both_ways_at_once(agent):
    data = os.urandom(3 << 20)  # more than either side buffers: both must keep moving
    result = execute(agent, ["cat"], stdin=data)
    assert result.status == 0 and result.stdout == data


def test_stdin_from_a_descriptor(agent):
    r, w = os.pipe()
    os.write(w, b"line one\nline two\n")
    os.close(w)
    try:
        result = execute(agent, ["wc", "-l"], stdin=r)
    finally:
        os.close(r)
    assert result.stdout.strip() == b"2"


def test_a_signal_gives_128_plus_n(agent):
    result = execute(agent, ["sh", "-c", "kill -9 $$"])
    assert (result.status, result.signal) == (137, 9)


def test_a_signal_frame_reaches_the_command(agent):
    with connect(agent) as sock:
        sock.sendall(protocol.exec_request(["sleep", "100"], ENV))
        decoder, events = Decoder(), []
        while not any(isinstance(e, Started) for e in events):
            events += decoder.feed(sock.recv(4096))
        sock.sendall(protocol.signal(signal.SIGTERM))
        while not any(isinstance(e, Exited) for e in events):
            events += decoder.feed(sock.recv(4096))
    assert events[-1] == Exited(signal.SIGTERM, 128 + signal.SIGTERM)


def test_a_terminal(agent):
    result = execute(agent, ["sh", "-c", "tty; test -t 0 && test -t 1 && echo both; stty size"], tty=True,
                     stdin=b"")
    lines = result.stdout.decode().replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/") and lines[1] == "both" and lines[2] == "24 80", lines
    assert result.status == 0


def test_a_command_that_cannot_start_says_why(agent):
    with pytest.raises(CommandFailed, match="cannot run no-such-command-here in /: No such file"):
        execute(agent, ["no-such-command-here"])
    with pytest.raises(CommandFailed, match="in /no/such/dir"):
        execute(agent, ["true"], cwd="/no/such/dir")


def test_sessions_run_at_once(agent):
    results, begun = [], time.monotonic()

    def one(n: int) -> None:
        results.append(execute(agent, ["sh", "-c", f"sleep 1; echo {n}"]).stdout)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [f"{n}\n".encode() for n in range(6)]
    assert time.monotonic() - begun < 4  # six 1 s sessions, not one after another


def test_a_host_that_goes_away_takes_its_command_with_it(agent, tmp_path):
    marker = tmp_path / "pid"
    with connect(agent) as sock:
        sock.sendall(protocol.exec_request(["sh", "-c", f"echo $$ > {marker}; exec sleep 100"], ENV))
        decoder = Decoder()
        while not any(isinstance(e, Started) for e in decoder.feed(sock.recv(4096))):
            pass
        while not marker.exists() or not marker.read_text().strip():
            time.sleep(0.02)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the command outlived its session"


@pytest.mark.parametrize("first", [
    protocol.frame(protocol.STDIN, b"not an exec"),
    protocol.frame(protocol.EXEC, b"\x00" * 15),  # shorter than its fixed part
    protocol.frame(protocol.EXEC, struct.pack("<IHHII", 0, 24, 80, 1, 0) + b"/\0true"),  # no NUL
    protocol.frame(protocol.EXEC, struct.pack("<IHHII", 0, 24, 80, 0, 0) + b"/\0"),  # no argv
    protocol.frame(protocol.EXEC, struct.pack("<IHHII", 0, 24, 80, 2**31, 0) + b"/\0true\0"),
    protocol.frame(protocol.EXEC, struct.pack("<IHHII", 6, 24, 80, 1, 0) + b"/\0true\0"),  # flags
    protocol.frame(protocol.EXEC, struct.pack("<IHHII", 0, 24, 80, 1, 0) + b"/\0true\0extra"),
])
def test_a_malformed_request_is_refused_and_the_agent_goes_on(agent, first):
    with connect(agent) as sock:
        sock.sendall(first)
        decoder, events = Decoder(), []
        while data := sock.recv(4096):
            events += decoder.feed(data)
    assert events and isinstance(events[0], Failed) and "well-formed EXEC" in events[0].reason
    assert execute(agent, ["echo", "still here"]).stdout == b"still here\n"


def test_an_oversized_frame_ends_only_its_session(agent):
    with connect(agent) as sock:
        sock.sendall(protocol.exec_request(["sleep", "100"], ENV))
        sock.sendall(struct.pack("<II", protocol.MAX_FRAME + 1, protocol.STDIN))
        sock.settimeout(10)
        rest = b""
        while data := sock.recv(4096):
            rest += data
    events = Decoder().feed(rest)
    assert events and isinstance(events[0], Started) and not any(isinstance(e, Exited) for e in events)
    assert execute(agent, ["echo", "ok"]).stdout == b"ok\n"


# -- the host side's decoder: the agent is inside the guest, so what it sends is checked

def test_the_decoder_refuses_what_an_agent_should_not_send():
    with pytest.raises(AgentError, match="before STARTED"):
        Decoder().feed(protocol.frame(protocol.STDOUT, b"x"))
    with pytest.raises(AgentError, match="frame of"):
        Decoder().feed(struct.pack("<II", protocol.MAX_FRAME + 1, protocol.STDOUT))
    started = protocol.frame(protocol.STARTED, struct.pack("<I", 7))
    with pytest.raises(AgentError, match="bad exit"):
        Decoder().feed(started + protocol.frame(protocol.EXITED, struct.pack("<II", 1, 99)))
    done = Decoder()
    done.feed(started + protocol.frame(protocol.EXITED, struct.pack("<II", 0, 0)))
    with pytest.raises(AgentError, match="after the session ended"):
        done.feed(protocol.frame(protocol.STDOUT, b"late"))
    cut = Decoder()
    cut.feed(started[:5])
    with pytest.raises(AgentError, match="ended before"):
        cut.end()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_the_decoder_never_fails_other_than_with_agent_error(data, step):
    decoder = Decoder()
    try:
        for start in range(0, len(data), step):
            for event in decoder.feed(data[start:start + step]):
                assert isinstance(event, Started | Output | Exited | Failed)
    except AgentError:
        pass


def test_requests_the_agent_would_refuse_are_refused_here():
    with pytest.raises(ValueError):
        protocol.exec_request([])
    with pytest.raises(ValueError, match="NUL"):
        protocol.exec_request(["echo", "a\0b"])
    with pytest.raises(ValueError, match="variable name"):
        protocol.exec_request(["true"], {"A=B": "c"})
    with pytest.raises(ValueError):
        protocol.signal(0)


def test_an_empty_stdin_is_ended_once():
    """Stdin from a file at its end (/dev/null): one end-of-input frame, then the host waits
    for the command instead of repeating it (the agent's side is this test, on a real
    socket pair)."""
    host, agent_side = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY)
    frames: list[tuple[int, bytes]] = []

    def agent_role():
        with agent_side:
            buf = b""
            deadline = time.monotonic() + 0.5  # time for a looping host to send many frames
            agent_side.settimeout(0.05)
            while time.monotonic() < deadline:
                try:
                    buf += agent_side.recv(1 << 16)
                except TimeoutError:
                    continue
            while len(buf) >= 8:
                length, kind = struct.unpack_from("<II", buf)
                frames.append((kind, buf[8 : 8 + length]))
                buf = buf[8 + length :]
            agent_side.sendall(protocol.frame(protocol.STARTED, struct.pack("<I", 1))
                               + protocol.frame(protocol.EXITED, struct.pack("<II", 0, 0)))

    thread = threading.Thread(target=agent_role)
    thread.start()
    try:
        with host:
            result = run(host, ["true"], env=ENV, stdin=null, timeout=10)
    finally:
        os.close(null)
        thread.join()
    assert result.status == 0
    assert [kind for kind, _ in frames] == [protocol.EXEC, protocol.STDIN]
    assert frames[1][1] == b""
