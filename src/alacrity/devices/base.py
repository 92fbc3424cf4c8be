"""What every device class is: declared admin attributes, read-only state, and the two verbs.

A device class is a subclass of `Device` registered in `alacrity.devices.CLASSES`.
The admin tree shows its `attributes` as files; the vhost-user layer opens a
`Session` per accepted connection and maps protocol messages onto the verbs:
`call()` for synchronous control and `shm()` when a ring is registered.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from alacrity.errors import AdminError, busy, invalid

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: off_t is a signed 64-bit integer: no file can be larger than this.
MAX_SIZE = (1 << 63) - 1

_reserved: tuple[str, ...] = ()


def reserve_paths(*dirs: str | os.PathLike[str]) -> None:
    """Mark the daemon's own directories (admin mountpoint, run dir, state dir): no
    image may live under them. Only each parent is resolved, as the last component
    may be the admin tree's FUSE mount, which must not be looked at."""
    global _reserved
    for entry in dirs:
        path = os.path.abspath(os.fspath(entry))
        parent, leaf = os.path.split(path)
        for form in (path, os.path.join(os.path.realpath(parent), leaf)):
            if form not in _reserved:
                _reserved = (*_reserved, form)


def reserved_paths() -> tuple[str, ...]:
    """The directories `reserve_paths` marked, absolute and normalized."""
    return _reserved


def parse_size(text: str) -> int:
    """`4096`, `512M`, `8G` (binary units) -> bytes, at most MAX_SIZE."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix, e.g. 1G)")
    digits, unit = match.group(1), _SIZE_UNITS[match.group(2).lower()]
    # Bound the digits before int(): thousands of them are slow to convert, and too large anyway.
    value = int(digits) * unit if len(digits) <= 20 else MAX_SIZE + 1
    if value > MAX_SIZE:
        raise ValueError(f"size {text.strip()} is too large: at most {MAX_SIZE} bytes (2^63-1)")
    return value


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "y", "yes", "true", "on"):
        return True
    if value in ("0", "n", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1 or 0)")


def parse_text(limit: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if len(value.encode()) > limit or "\n" in value:
            raise ValueError(f"too long or multi-line (at most {limit} bytes)")
        return value

    return parse


@dataclass(frozen=True)
class Attribute:
    """An admin attribute: a file under devices/NAME/ that root may write.

    `parse` turns the written text into a value or raises ValueError (EINVAL).
    `live` attributes may change while the device is in use; others fail with EBUSY.
    """

    name: str
    parse: Callable[[str], Any]
    default: str
    doc: str
    live: bool = False


class Session:
    """One client connection's view of a device (one vhost-user connection).

    The vhost-user layer calls these; subclasses implement the device's behaviour.
    """

    #: virtio feature bits the device offers (without transport bits the layer adds).
    device_features: int = 0
    num_queues: int = 1
    max_queue_size: int = 1024

    def call(self, func: str, data: bytes) -> bytes:
        """Synchronous control: "get_config" (data = 8-byte offset+size), "set_config",
        "set_features" (data = 8-byte little-endian feature word)."""
        raise NotImplementedError

    def shm(self, index: int, queue: Any) -> None:
        """Ring `index` was registered and started; `queue` is its device-side virtqueue."""

    def process(self, index: int, queue: Any) -> int:
        """Service ring `index`: complete what is available; return the number of requests."""
        raise NotImplementedError

    def close(self) -> None:
        """The connection ended."""


class Device:
    """Base of every device class: named attributes plus runtime counters."""

    class_name: ClassVar[str] = ""
    attributes: ClassVar[tuple[Attribute, ...]] = ()
    summary: ClassVar[str] = ""
    #: True: the gate hands each admitted connection to `adopt()` (the device serves it
    #: elsewhere, e.g. in its own process) instead of serving `open()`'s session itself.
    adopts_connections: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.values: dict[str, Any] = {a.name: a.parse(a.default) for a in self.attributes}
        self.texts: dict[str, str] = {a.name: a.default for a in self.attributes}
        self.counters: dict[str, int] = {"connections": 0, "errors": 0}
        self.last_error = ""

    @classmethod
    def attribute(cls, name: str) -> Attribute:
        for attr in cls.attributes:
            if attr.name == name:
                return attr
        raise AdminError(2, f"{cls.class_name} devices have no attribute {name!r}")

    def parse(self, name: str, text: str) -> Any:
        """The value `text` gives attribute `name`. Raises AdminError (EINVAL, ENOENT)."""
        try:
            return self.attribute(name).parse(text)
        except ValueError as exc:
            raise invalid(f"{self.name}/{name}: {exc}") from None

    def set_attribute(self, name: str, text: str) -> None:
        """Validate and store one attribute. Raises AdminError (EINVAL, EBUSY, ENOENT)."""
        value = self.parse(name, text)
        if not self.attribute(name).live and self.in_use():
            raise busy(f"{self.name}/{name} cannot change while the device is in use")
        self.check(name, value)
        self.values[name] = value
        self.texts[name] = text.strip()

    def precheck(self, name: str, text: str) -> None:
        """Class-specific validation that touches the filesystem (stat, open, create),
        called before the model takes its lock: a path may lead into a FUSE
        filesystem, even the admin tree, whose server needs that lock. Raise AdminError."""

    def check(self, name: str, value: Any) -> None:
        """Class-specific validation of one new value, under the model lock: no
        filesystem access here (that goes in `precheck`). Raise AdminError."""

    def in_use(self) -> bool:
        return self.counters["connections"] > 0

    def state(self) -> dict[str, str]:
        """Read-only state shown by the admin tree."""
        shown = {k: str(v) for k, v in self.counters.items()}
        shown["last_error"] = self.last_error
        return shown

    def views(self) -> dict[str, str | dict[str, str]]:
        """Read-only views beyond `state()`: a name maps to a file's text, or to a
        directory of file texts (e.g. a switch's ports/)."""
        return {}

    def count(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + amount

    def record_error(self, reason: str) -> None:
        with self.lock:
            self.counters["errors"] += 1
            self.last_error = reason

    def open(self, peer_pid: int) -> Session:
        """A client on one of the device's buses connected: make its session.
        Raise AdminError (EBUSY) to refuse, e.g. a second writer of a disk."""
        raise NotImplementedError

    def adopt(self, sock: socket.socket, peer_pid: int, label: str) -> None:
        """Take over an admitted connection (only if `adopts_connections`). The device
        owns `sock` from here, also on failure. Raise AdminError to refuse."""
        sock.close()
        raise NotImplementedError

    def release(self, session: Session) -> None:
        """The session's connection ended."""

    def destroy(self) -> None:
        """The device is being removed (rmdir) or the daemon is stopping."""
