"""Watch a guest's serial console for the markers /init prints."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

READY = "ALACRITY-READY"
_EXIT = re.compile(r"ALACRITY-EXIT=(\d+)")
_TAIL = 64 * 1024


class ConsoleScanner:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()  # the console closed (QEMU exited)
        self.exit_status: int | None = None
        self._partial = b""
        self._tail = bytearray()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._tail += data
            del self._tail[:-_TAIL]
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace")
            if READY in line:
                self.ready.set()
            if m := _EXIT.search(line):
                self.exit_status = int(m.group(1))

    def tail(self, limit: int = 2000) -> str:
        with self._lock:
            return bytes(self._tail[-limit:]).decode(errors="replace")


def pump_stream(stream: BinaryIO, scanner: ConsoleScanner,
                echo: Callable[[bytes], None] | None) -> threading.Thread:
    """Copy a pipe to `echo` (our stdout) while scanning it."""

    def run() -> None:
        fd = stream.fileno()
        try:
            while chunk := os.read(fd, 65536):
                if echo is not None:
                    echo(chunk)
                scanner.feed(chunk)
        finally:
            scanner.done.set()

    thread = threading.Thread(target=run, name="vm-console", daemon=True)
    thread.start()
    return thread


def follow_file(path: Path, scanner: ConsoleScanner, alive: Callable[[], bool],
                echo: Callable[[bytes], None] | None = None, interval: float = 0.05) -> threading.Thread:
    """Tail a console log that QEMU writes itself, until QEMU has exited; each new chunk
    also goes to `echo` if given."""

    def run() -> None:
        pos = 0
        try:
            while True:
                running = alive()
                try:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        chunk = f.read()
                except FileNotFoundError:
                    chunk = b""
                if chunk:
                    pos += len(chunk)
                    if echo is not None:
                        echo(chunk)
                    scanner.feed(chunk)
                elif not running:
                    return
                else:
                    time.sleep(interval)
        finally:
            scanner.done.set()

    thread = threading.Thread(target=run, name="vm-console", daemon=True)
    thread.start()
    return thread
