"""One agent session over a connected stream socket: the I/O edge around protocol.py.

`run()` sends a command with its stdin given as bytes or read from a file descriptor
(the CLI passes its own stdin through), hands each piece of output to `sink` as it
arrives, and returns how the command ended. Stdin is sent while output is read, so
neither side can fill the other's buffers and wait forever; a deadline bounds it all.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alacrity.agent import protocol
from alacrity.agent.protocol import AgentError, Exited, Failed, Output, Started

Sink = Callable[[int, bytes], None]


@dataclass
class Result:
    status: int  # the exit status, 128 + N for signal N
    signal: int  # the signal that killed it, or 0
    stdout: bytes = b""
    stderr: bytes = b""


class CommandFailed(Exception):
    """The agent could not start the command (its reason is the message)."""


def run(sock: socket.socket, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str = "/",
        tty: bool = False, stdin: bytes | int = b"", sink: Sink | None = None,
        timeout: float | None = None, on_start: Callable[[int], None] | None = None,
        progress: Callable[[int], None] | None = None) -> Result:
    """Run `argv` through the agent on `sock`. `stdin` is bytes, or a file descriptor read
    until its end (`progress` hears how many bytes of it so far). Output goes to
    `sink(stream, data)` (1 stdout, 2 stderr) if given, else it is collected in the
    Result. TimeoutError past `timeout` seconds."""
    fed = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    decoder = protocol.Decoder()
    out = bytearray(protocol.exec_request(argv, env, cwd, tty))
    collected = {1: bytearray(), 2: bytearray()}
    feed_fd = stdin if isinstance(stdin, int) else None
    if isinstance(stdin, bytes):
        for chunk in protocol.stdin(stdin):
            out += chunk
        out += protocol.stdin_end()
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    feeding = False  # feed_fd is watched only while what we owe the agent is small
    always_ready = False
    ended: Exited | None = None
    try:
        while ended is None:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise TimeoutError(f"{argv[0]} did not finish in {timeout:g} s")
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
            if feed_fd is not None and feeding != (len(out) < protocol.STDIN_CHUNK):
                feeding = not feeding
                if feeding and not always_ready:
                    try:
                        sel.register(feed_fd, selectors.EVENT_READ)
                    except PermissionError:  # a regular file or /dev/null: epoll refuses them
                        always_ready = True
                elif not always_ready:
                    sel.unregister(feed_fd)
            if feeding and always_ready:  # read a chunk each turn, without waiting on it
                fed, at_end = _feed(feed_fd, out, fed, progress)
                if at_end:
                    feed_fd, feeding = None, False
                wait = 0
            for key, events in sel.select(wait):
                if key.fileobj is sock and events & selectors.EVENT_WRITE and out:
                    try:
                        del out[:sock.send(out)]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        # The session ended (the command exited without reading all of its
                        # stdin): what is left is not wanted; its end is still to be read.
                        out.clear()
                        if feed_fd is not None and feeding and not always_ready:
                            sel.unregister(feed_fd)
                        feed_fd, feeding = None, False
                if key.fileobj is sock and events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        decoder.end()
                    for event in decoder.feed(data):
                        if isinstance(event, Failed):
                            raise CommandFailed(event.reason)
                        if isinstance(event, Started) and on_start is not None:
                            on_start(event.pid)
                        elif isinstance(event, Output):
                            if sink is not None:
                                sink(event.stream, event.data)
                            else:
                                collected[event.stream] += event.data
                        elif isinstance(event, Exited):
                            ended = event
                elif key.fileobj == feed_fd and feed_fd is not None:
                    fed, at_end = _feed(feed_fd, out, fed, progress)
                    if at_end:
                        sel.unregister(feed_fd)
                        feed_fd, feeding = None, False
    finally:
        sel.close()
    return Result(ended.status, ended.signal, bytes(collected[1]), bytes(collected[2]))


def _feed(fd: int, out: bytearray, fed: int,
          progress: Callable[[int], None] | None) -> tuple[int, bool]:
    """One chunk of stdin from `fd` into `out`: the bytes fed so far, and whether its end
    was reached (end of input is then queued too)."""
    data = os.read(fd, protocol.STDIN_CHUNK)
    out += protocol.frame(protocol.STDIN, data) if data else protocol.stdin_end()
    fed += len(data)
    if progress is not None:
        progress(fed)
    return fed, not data


__all__ = ["AgentError", "CommandFailed", "Result", "run"]
