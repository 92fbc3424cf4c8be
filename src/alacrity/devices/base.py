"""What every device class is: declared admin attributes, read-only state, how a VM
attaches it, and the client driver that drives it from a process.

A device class is a subclass of `Device` in a module of its own, listed in
`alacrity.devices.CLASSES`. The admin tree shows its `attributes` as files; the gate
asks `open()` for a `Session` (alacrity.vhost_user.session) per accepted connection, and
the vhost-user layer maps protocol messages onto that session's hooks. See
docs/devices.md for a walk through the smallest class, `rng`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from alacrity.devices.console_ring import qemu_name
from alacrity.errors import AdminError, busy, invalid
from alacrity.vhost_user.session import Session

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: off_t is a signed 64-bit integer: no file can be larger than this.
MAX_SIZE = (1 << 63) - 1

_reserved: tuple[str, ...] = ()
#: The most of a process's /proc/PID/cmdline we read.
MAX_CMDLINE = 1 << 20


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


def qemu_name_of(pid: int) -> str | None:
    """The `-name` of the QEMU running as `pid`, as its command line gives it; None if `pid`
    is not a QEMU started with one. The command line is the process's own to write: a
    hint for messages and views, never an identity."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read(MAX_CMDLINE)
    except OSError:
        return None
    argv = [arg.decode(errors="replace") for arg in data.rstrip(b"\0").split(b"\0")]
    if not os.path.basename(argv[0]).startswith("qemu"):
        return None
    return qemu_name(argv)


def holder(pid: int) -> str:
    """Who `pid` is, for a message: "VM NAME (pid N)" for a QEMU started with -name,
    else "pid N"."""
    name = qemu_name_of(pid)
    if name and name.isprintable() and len(name) <= 64:
        return f"VM {name} (pid {pid})"
    return f"pid {pid}"


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


# QEMU 7.2 names most virtio-mmio models KIND-device, but not these.
_MMIO_NAMES = {k: k for k in ("vhost-user-blk", "vhost-user-scsi", "vhost-user-rng",
                              "vhost-user-input", "vhost-user-gpu")}


def qemu_device(kind: str, transport: str, **props: str | int) -> list[str]:
    """`-device` arguments for virtio device `kind` on a transport ("pci" or "mmio"), e.g.
    qemu_device("vhost-user-blk", "pci", chardev="vu0", num_queues=1). Properties with
    underscores are written with dashes; PCI-only ones (vectors) are dropped on mmio."""
    model = f"{kind}-pci" if transport == "pci" else _MMIO_NAMES.get(kind, f"{kind}-device")
    parts = [model]
    for key, value in props.items():
        if transport != "pci" and key in ("vectors", "addr", "bus"):
            continue
        parts.append(f"{key.replace('_', '-')}={value}")
    return ["-device", ",".join(parts)]


def chardev_socket(ident: str, path: str, reconnect: bool = True) -> list[str]:
    """A chardev that connects to the gate's socket `path`, as vhost-user needs. QEMU
    connects before the guest starts; reconnect=1 matters if the socket is absent (QEMU
    then retries every second) or the backend restarts. QEMU 7.2's simpler vhost-user
    devices (rng, vsock) do not wait for a reconnecting chardev: they need reconnect=False."""
    option = f"socket,id={ident},path={path.replace(',', ',,')}"
    return ["-chardev", option + (",reconnect=1" if reconnect else "")]


@dataclass(frozen=True)
class Slot:
    """One device of a bus, as a VM attaches it: what a class needs to write QEMU's arguments."""

    device: str  # the device's name on the bus
    socket: str  # the gate's socket for it
    transport: str  # "mmio" (QEMU's microvm machine) or "pci" (pc, q35)
    vm: str  # the VM's name
    id: str  # unique among the VM's devices: use it for chardev and netdev ids
    index: int  # among the VM's devices of this class, from 0
    options: dict[str, str] = field(default_factory=dict)  # per-VM choices, e.g. "mac"


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


#: Admitted connections a device that adopts them may have waiting; beyond this the gate
#: is told EAGAIN rather than wait on the device.
HANDOVER_QUEUE = 64


class Handovers:
    """The bounded queue from the gate to a device that adopts connections (`adopt()`):
    `put` never waits, and the device's own thread `get`s until the queue is closed."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "switch lan0", for messages
        self.closed = False
        self.queue: queue.Queue[tuple[socket.socket, int, str] | None] = queue.Queue(HANDOVER_QUEUE)

    def put(self, sock: socket.socket, peer_pid: int, label: str) -> None:
        """Queue an admitted connection; it is ours from here, also on failure (AdminError)."""
        if self.closed:
            sock.close()
            raise AdminError(errno.ENODEV, f"{self.what} is being removed")
        try:
            self.queue.put_nowait((sock, peer_pid, label))
        except queue.Full:
            sock.close()
            raise AdminError(errno.EAGAIN, f"{self.what} has {HANDOVER_QUEUE} connections waiting; "
                             "try again") from None

    def get(self) -> tuple[socket.socket, int, str] | None:
        """The next connection; None once the queue is closed."""
        return self.queue.get()

    def close(self, wake: bool) -> None:
        """Take no more, close those waiting, and (`wake`: a thread gets from us) end `get`."""
        self.closed = True
        with contextlib.suppress(queue.Empty):
            while (item := self.queue.get_nowait()) is not None:
                item[0].close()
        if wake:
            self.queue.put_nowait(None)


class Device:
    """Base of every device class: named attributes plus runtime counters."""

    class_name: ClassVar[str] = ""
    attributes: ClassVar[tuple[Attribute, ...]] = ()
    summary: ClassVar[str] = ""
    #: True: the gate hands each admitted connection to `adopt()` (the device serves it
    #: elsewhere, e.g. in its own process) instead of serving `open()`'s session itself.
    adopts_connections: ClassVar[bool] = False
    #: The virtio device id the guest sees (virtio spec, "Device Types").
    virtio_id: ClassVar[int] = 0
    #: The driver a host process uses (`alacrity.client`), as "module:Class"; "" for none.
    client_driver: ClassVar[str] = ""
    #: True if a VM gets a NIC from it (then `alacrity vm run --ip` configures eth0).
    gives_nic: ClassVar[bool] = False

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        """QEMU's arguments that attach this device to a VM ([] : VMs do not attach it)."""
        return []

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
        directory of file texts (e.g. a switch's ports/). A directory's file may also be
        bytes, or a callable returning text or bytes, called when the file is opened
        (a console's log)."""
        return {}

    def count(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + amount

    def record_error(self, reason: str) -> None:
        with self.lock:
            self.counters["errors"] += 1
            self.last_error = reason

    def refusal(self, peer_pid: int, peer_uid: int | None = None) -> str | None:
        """Why `open()` (or `adopt()`) would refuse `peer_pid` or a child of it right now,
        in one line that says what to do; None if it would not. From the device's state
        only (no files, no waiting): the gate asks this for `alacrity vm run` before QEMU
        starts."""
        return None

    def open(self, peer_pid: int, peer_uid: int | None = None) -> Session:
        """A client on one of the device's buses connected: make its session. `peer_uid`
        is the uid the gate read from the socket at connect time (None: unknown).
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
