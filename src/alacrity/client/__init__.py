"""The north side for host processes: join the conversation through the gate and
drive a device yourself. `connect()` asks the control socket which devices your
bus has; `Bus.open(name)` connects to one and returns its driver.

    from alacrity import client
    bus = client.connect()
    with bus.open("disk0") as dev:
        dev.write(0, b"x" * 4096); dev.flush(); dev.read(0, 4096)
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alacrity.client.blk import BlkClient, BlkError
from alacrity.client.net import NetClient, NetError
from alacrity.vhost_user.messages import ProtocolError

__all__ = ["Bus", "DeviceInfo", "GateError", "BlkClient", "BlkError", "NetClient", "NetError", "connect",
           "DEFAULT_RUN_DIR"]

DRIVERS: dict[str, Any] = {"blk": BlkClient, "switch": NetClient}
DEFAULT_RUN_DIR = Path(os.environ.get("ALACRITY_RUN_DIR", "/run/alacrityd"))


class GateError(PermissionError):
    """The gate refused: not a member, or the device is not on our bus."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    device: str
    device_class: str
    socket: str
    attributes: dict[str, str] = field(default_factory=dict)


def ask(run_dir: Path, request: dict) -> dict:
    path = run_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise GateError(f"no alacrityd at {path}: start it with 'alacrityd'") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline()
    if not line:
        raise GateError("alacrityd closed the control connection")
    return json.loads(line)


@dataclass
class Bus:
    name: str
    devices: list[DeviceInfo]

    def device(self, name: str) -> DeviceInfo:
        for info in self.devices:
            if name in (info.name, info.device):
                return info
        known = ", ".join(d.name for d in self.devices) or "none"
        raise GateError(f"bus {self.name} has no device {name!r} (it has: {known})")

    def open(self, name: str, **options: Any) -> Any:
        """Connect to device `name`: a `BlkClient` for a blk device, a `NetClient` (a new
        port) for a switch. `options` go to the client's constructor."""
        info = self.device(name)
        driver = DRIVERS.get(info.device_class)
        if driver is None:
            known = ", ".join(DRIVERS)
            raise GateError(f"device {name} is a {info.device_class}; this client drives: {known}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(info.socket)
            return driver(sock, **options)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise GateError(f"device {name}: refused by the gate or the device ({exc})") from None


def connect(run_dir: str | os.PathLike[str] | None = None) -> Bus:
    """Ask the gate for our bus's devices. Raises GateError if we are in no bus."""
    reply = ask(Path(run_dir) if run_dir else DEFAULT_RUN_DIR, {"op": "devices"})
    if "error" in reply:
        raise GateError(reply["error"])
    devices = [
        DeviceInfo(d["name"], d["device"], d["class"], d["socket"], d.get("attributes", {}))
        for d in reply["devices"]
    ]
    return Bus(reply["bus"], devices)
