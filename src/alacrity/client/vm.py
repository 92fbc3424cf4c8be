"""A running VM's guest agent, from Python: run commands in it and move files in and out.

    from alacrity import client
    guest = client.vm("srv")                      # this process must be on srv's bus
    result = guest.exec(["uname", "-r"])          # Result(status, signal, stdout, stderr)
    guest.put("/tmp/data", b"...")
    data = guest.get("/etc/os-release")

The agent (agent/agent.c, in the default image) listens on vsock port AGENT_PORT; the
stream to it goes through a `vsock` device on the bus (client/vsock.py: the device's
gate socket, `CONNECT PORT VM`). Files move as the input of `cat > PATH` and the output
of `cat PATH`, directories as tar streams (`put_tree`, `get_tree`).
"""

from __future__ import annotations

import os
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from alacrity.agent.protocol import AGENT_PORT
from alacrity.agent.session import CommandFailed, Result, Sink, run

#: How long `exec` waits for the agent to answer (a VM that is still booting).
AGENT_WAIT_S = 30.0


class VmError(RuntimeError):
    """The VM's agent cannot be reached, or a file could not be moved; says what to do."""


class Guest:
    """The agent of VM `name`, through the vsock device at `device_socket`."""

    def __init__(self, name: str, device_socket: str, wait: float = AGENT_WAIT_S) -> None:
        self.name, self.device_socket, self.wait = name, device_socket, wait

    def _connect(self) -> socket.socket:
        from alacrity.client import vsock

        deadline = time.monotonic() + self.wait
        while True:
            try:
                sock, _ = vsock.connect(self.device_socket, AGENT_PORT, self.name)
                return sock
            except (OSError, vsock.VsockError) as exc:
                if time.monotonic() >= deadline:
                    raise VmError(f"the agent of VM {self.name} did not answer in {self.wait:g} s ({exc}): "
                                  "is the VM running the default image, and booted?") from None
                time.sleep(0.25)

    def exec(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str = "/",
             tty: bool = False, stdin: bytes | int = b"", sink: Sink | None = None,
             timeout: float | None = None, progress: Callable[[int], None] | None = None) -> Result:
        """Run `argv` in the guest; its Result (output collected unless `sink` is given).
        CommandFailed if the agent cannot start it."""
        env = {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", **(env or {})}
        with self._connect() as sock:
            return run(sock, argv, env=env, cwd=cwd, tty=tty, stdin=stdin, sink=sink, timeout=timeout,
                       progress=progress)

    def _check(self, result: Result, what: str) -> None:
        if result.status != 0:
            why = result.stderr.decode(errors="replace").strip() or f"exit status {result.status}"
            raise VmError(f"{what} in VM {self.name}: {why}")

    def put(self, path: str, data: bytes | int, mode: int = 0o644,
            progress: Callable[[int], None] | None = None) -> None:
        """Write the guest's file `path` from bytes or a file descriptor read to its end."""
        script = 'cat > "$1" && chmod "$2" "$1"'
        self._check(self.exec(["sh", "-c", script, "sh", path, f"{mode & 0o7777:o}"], stdin=data,
                              progress=progress), f"cannot write {path}")

    def get(self, path: str, sink: Callable[[bytes], None] | None = None) -> bytes:
        """The guest's file `path` (or, with `sink`, each piece of it as it comes)."""
        chunks: list[bytes] = []
        err = bytearray()

        def take(stream: int, data: bytes) -> None:
            if stream == 2:
                err.extend(data[:4096 - len(err)])
            elif sink is not None:
                sink(data)
            else:
                chunks.append(data)

        result = self.exec(["cat", "--", path], sink=take)
        result.stderr = bytes(err)
        self._check(result, f"cannot read {path}")
        return b"".join(chunks)

    def is_dir(self, path: str) -> bool:
        return self.exec(["test", "-d", path]).status == 0

    def put_tree(self, local: Path, directory: str) -> None:
        """Copy the host directory `local` into the guest's `directory` (as local's name)."""
        r, w = os.pipe()

        def pack() -> None:
            with os.fdopen(w, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
                tar.add(str(local), arcname=local.name)

        packer = threading.Thread(target=pack, daemon=True)
        packer.start()
        try:
            result = self.exec(["tar", "-x", "-f", "-", "-C", directory], stdin=r)
        finally:
            os.close(r)
            packer.join(5)
        self._check(result, f"cannot unpack into {directory}")

    def get_tree(self, path: str, local: Path) -> None:
        """Copy the guest's directory `path` into the host directory `local`. The tar
        stream comes from the guest: tarfile's "data" filter refuses absolute paths,
        escapes by .. or links, devices, and setuid bits."""
        parent, name = os.path.split(path.rstrip("/") or "/")
        r, w = os.pipe()
        failure: list[BaseException] = []

        def unpack() -> None:
            try:
                with os.fdopen(r, "rb") as src, tarfile.open(fileobj=src, mode="r|") as tar:
                    tar.extractall(str(local), filter="data")
            except BaseException as exc:  # reported below, after the session ends
                failure.append(exc)

        unpacker = threading.Thread(target=unpack, daemon=True)
        unpacker.start()
        try:
            result = self.exec(["tar", "-c", "-f", "-", "-C", parent or "/", name],
                               sink=lambda stream, data: _write_all(w, data) if stream == 1 else None)
        finally:
            os.close(w)
            unpacker.join(30)
        self._check(result, f"cannot pack {path}")
        if failure:
            raise VmError(f"refused the tar stream of {path} from VM {self.name}: {failure[0]}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def vm(name: str, run_dir: str | Path | None = None, wait: float = AGENT_WAIT_S) -> Guest:
    """The agent of VM `name`, through the first vsock device on this process's bus."""
    from alacrity import client

    bus = client.connect(run_dir)
    sockets = [d.socket for d in bus.devices if d.device_class == "vsock"]
    if not sockets:
        raise VmError(f"bus {bus.name} has no vsock device, so VM {name} has no agent channel: root adds "
                      f"one (mkdir devices/vs0; echo vsock > devices/vs0/type; ln -s ../../devices/vs0 "
                      f"buses/{bus.name}/vs0), then the VM is started again")
    return Guest(name, sockets[0], wait)


__all__ = ["AGENT_WAIT_S", "CommandFailed", "Guest", "Result", "VmError", "vm"]
