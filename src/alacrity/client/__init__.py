"""The north side for host processes: join the conversation through the gate and
drive a device yourself. `connect()` asks the control socket which devices your
bus has; `Bus.open(name)` connects to one and returns its driver.

    from alacrity import client
    bus = client.connect()
    with bus.open("disk0") as dev:
        dev.write(0, b"x" * 4096); dev.flush(); dev.read(0, 4096)
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alacrity.client.blk import BlkClient, BlkError
from alacrity.client.net import NetClient, NetError
from alacrity.devices import CLASSES
from alacrity.vhost_user.messages import ProtocolError

__all__ = ["Bus", "DeviceInfo", "GateError", "BlkClient", "BlkError", "NetClient", "NetError", "connect",
           "vm", "DEFAULT_RUN_DIR"]

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
    run_dir: Path = DEFAULT_RUN_DIR

    def device(self, name: str) -> DeviceInfo:
        for info in self.devices:
            if name in (info.name, info.device):
                return info
        known = ", ".join(d.name for d in self.devices) or "none"
        raise GateError(f"bus {self.name} has no device {name!r} (it has: {known})")

    def refusals(self) -> dict[str, str]:
        """Devices the gate would turn this process (or its children) away from now, with
        its reason: asked before a VM starts, so the user reads why, not QEMU's errors."""
        reply = ask(self.run_dir, {"op": "check"})
        if "error" in reply:
            raise GateError(reply["error"])
        return {d["name"]: d["refusal"] for d in reply.get("devices", []) if d.get("refusal")}

    def lease_uid(self) -> int:
        """A uid of the daemon's unprivileged range for a guest's jail (root only), reserved
        for a minute: the jailed QEMU running with it keeps it taken after that."""
        reply = ask(self.run_dir, {"op": "lease"})
        if "error" in reply:
            raise GateError(reply["error"])
        return int(reply["uid"])

    def open(self, name: str, **options: Any) -> Any:
        """Connect to device `name`: a `BlkClient` for a blk device, a `NetClient` (a new
        port) for a switch. `options` go to the client's constructor."""
        info = self.device(name)
        driver = driver_of(info.device_class)
        if driver is None:
            raise GateError(f"device {name} is a {info.device_class}, which has no client driver")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(info.socket)
            return driver(sock, **options)
        except (OSError, ProtocolError) as exc:
            sock.close()
            why = refusal(self.run_dir, info.device)
            if why:
                raise GateError(f"device {name}: {why}") from None
            raise GateError(f"device {name}: refused by the gate or the device ({exc})") from None


def refusal(run_dir: Path, device: str | None = None, within_s: float = 10.0) -> str | None:
    """The gate's reason for its latest refusal of this process or one of its children
    (for `device`, if given), if it refused one in the last `within_s` seconds."""
    try:
        reply = ask(run_dir, {"op": "refusals"})
    except (GateError, OSError, ValueError):
        return None
    for entry in reversed(reply.get("refusals", [])):
        recent = entry.get("age_s", within_s) < within_s
        if recent and (device is None or entry.get("what") == f"device {device}"):
            return str(entry.get("why"))
    return None


def driver_of(class_name: str) -> Any:
    """The client driver a device class declares (`Device.client_driver`), or None."""
    cls = CLASSES.get(class_name)
    if cls is None or not cls.client_driver:
        return None
    module, _, attr = cls.client_driver.partition(":")
    return getattr(importlib.import_module(module), attr)


def connect(run_dir: str | os.PathLike[str] | None = None) -> Bus:
    """Ask the gate for our bus's devices. Raises GateError if we are in no bus."""
    where = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    reply = ask(where, {"op": "devices"})
    if "error" in reply:
        raise GateError(reply["error"])
    devices = [
        DeviceInfo(d["name"], d["device"], d["class"], d["socket"], d.get("attributes", {}))
        for d in reply["devices"]
    ]
    return Bus(reply["bus"], devices, where)


def vm(name: str, run_dir: str | os.PathLike[str] | None = None) -> Any:
    """The guest agent of running VM `name` (client/vm.py: exec, put, get), through a vsock
    device on this process's bus."""
    from alacrity.client.vm import vm as guest

    return guest(name, run_dir)
