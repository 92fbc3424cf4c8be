"""The bus model: device classes, devices, buses, links and members.

Every change is checked, then written to the store in one transaction, then applied
in memory, so the configuration on disk always matches what the daemon serves.
Refusals raise `AdminError` with the errno the admin tree returns to the writer.

Detaching a device (`unlink`) only stops new connections from that bus: sessions
already open keep running until the client disconnects, as an unplugged cable does
not reach into a guest's driver.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from alacrity.bus import peers
from alacrity.bus import users as users_attr
from alacrity.bus.store import Store
from alacrity.devices import CLASSES
from alacrity.devices.base import Device
from alacrity.errors import AdminError, busy, invalid, not_found

log = logging.getLogger("alacrity.bus")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

Listener = Callable[[str, str], None]


@dataclass
class DeviceEntry:
    """A device as the model holds it. `instance` is None until a type is set
    (or when the stored class is no longer available)."""

    name: str
    class_name: str = ""
    instance: Device | None = None
    # Only the attributes written by an admin are stored, so devices left at a
    # default follow the class when its default changes.
    texts: dict[str, str] = field(default_factory=dict)


class Member(NamedTuple):
    start_time: int
    ident: int | None  # pidfs inode, where the kernel has pidfs

    def is_task(self, task: peers.Task) -> bool:
        if self.start_time != task.start_time:
            return False
        return self.ident is None or peers.ident(task.pid) in (None, self.ident)


@dataclass
class BusEntry:
    name: str
    links: dict[str, str] = field(default_factory=dict)  # link name -> device name
    members: dict[int, Member] = field(default_factory=dict)  # by pid
    users: list[users_attr.Entry] = field(default_factory=list)  # who may join by themselves


def check_name(kind: str, name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise invalid(f"bad {kind} name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -, not starting with _ . -")


class Model:
    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        classes: dict[str, type[Device]] | None = None,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.classes: dict[str, type[Device]] = dict(CLASSES if classes is None else classes)
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self._devices: dict[str, DeviceEntry] = {}
        self._buses: dict[str, BusEntry] = {}
        self._load()

    # ---- loading and plumbing

    def _load(self) -> None:
        snap = self.store.load()
        for stored in snap.devices:
            entry = DeviceEntry(stored.name, stored.class_name or "")
            self._devices[stored.name] = entry
            if not stored.class_name:
                continue
            cls = self.classes.get(stored.class_name)
            if cls is None:
                log.error(
                    "device %s: class %r is not available; it stays inert",
                    stored.name,
                    stored.class_name,
                )
                entry.texts = dict(stored.attrs)
                continue
            entry.instance = cls(stored.name)
            for attr, text in stored.attrs.items():
                try:
                    entry.instance.set_attribute(attr, text)
                    entry.texts[attr] = text
                except AdminError as exc:
                    log.error("device %s: stored %s=%r dropped: %s", stored.name, attr, text, exc)
        for name in snap.buses:
            self._buses[name] = BusEntry(name)
        for bus, link_name, device in snap.links:
            self._buses[bus].links[link_name] = device
        for bus, pid, start, ident in snap.members:
            self._buses[bus].members[pid] = Member(start, ident)
        for bus, entries in snap.users.items():
            self._buses[bus].users = list(entries)

    def _save(self, write: Callable[[], None]) -> None:
        try:
            write()
        except sqlite3.Error as exc:
            log.error("configuration store failed: %s", exc)
            raise AdminError(
                errno.EIO,
                f"could not save the configuration ({exc}); check the disk holding the database",
            ) from None

    def _notify(self, events: list[tuple[str, str]]) -> None:
        for event, name in events:
            for fn in list(self.listeners):
                try:
                    fn(event, name)
                except Exception:
                    log.exception("listener %r failed on %s %s", fn, event, name)

    def _device(self, name: str) -> DeviceEntry:
        entry = self._devices.get(name)
        if entry is None:
            raise not_found(f"no device {name!r}: mkdir devices/{name} first")
        return entry

    def _bus(self, name: str) -> BusEntry:
        entry = self._buses.get(name)
        if entry is None:
            raise not_found(f"no bus {name!r}: mkdir buses/{name} first")
        return entry

    def close(self) -> None:
        with self.lock:
            for entry in self._devices.values():
                if entry.instance is not None:
                    entry.instance.destroy()
            self.store.close()

    # ---- devices

    def device_names(self) -> list[str]:
        with self.lock:
            return sorted(self._devices)

    def device(self, name: str) -> DeviceEntry:
        with self.lock:
            return self._device(name)

    def mkdir_device(self, name: str) -> None:
        with self.lock:
            check_name("device", name)
            if name in self._devices:
                raise AdminError(errno.EEXIST, f"device {name!r} already exists")
            self._save(lambda: self.store.add_device(name))
            self._devices[name] = DeviceEntry(name)

    def set_type(self, name: str, class_name: str) -> None:
        with self.lock:
            entry = self._device(name)
            if not class_name:
                raise invalid(
                    f"write a class name to devices/{name}/type, one of: " + " ".join(sorted(self.classes))
                )
            if entry.class_name:
                raise busy(
                    f"device {name!r} is already of type {entry.class_name!r}; "
                    f"rmdir devices/{name} and mkdir it again to change it"
                )
            cls = self.classes.get(class_name)
            if cls is None:
                raise not_found(f"no device class {class_name!r}; classes: " + " ".join(sorted(self.classes)))
            instance = cls(name)
            self._save(lambda: self.store.save_device(name, class_name, {}))
            entry.class_name, entry.instance, entry.texts = class_name, instance, {}
        self._notify([("device_typed", name)])

    def set_attribute(self, name: str, attr: str, text: str) -> None:
        with self.lock:
            entry = self._device(name)
            device = entry.instance
            if device is None:
                if entry.class_name:
                    raise not_found(f"device {name!r}: class {entry.class_name!r} is not available")
                raise not_found(f"device {name!r} has no type: write a class to devices/{name}/type first")
            device.attribute(attr)
            checked = dict(device.values)
        # Unlocked: the check may stat a path into a FUSE filesystem, even the admin tree,
        # whose handlers take this lock.
        device.precheck(attr, text)
        with self.lock:
            if self._devices.get(name) is not entry or device.values != checked:
                raise busy(f"devices/{name} changed while {attr} was being checked; write it again")
            old = (dict(device.values), dict(device.texts))
            device.set_attribute(attr, text)
            texts = {**entry.texts, attr: device.texts[attr]}
            try:
                self._save(lambda: self.store.save_device(name, entry.class_name, texts))
            except AdminError:
                device.values, device.texts = old
                raise
            entry.texts = texts
        self._notify([("device_changed", name)])

    def rmdir_device(self, name: str) -> None:
        with self.lock:
            entry = self._device(name)
            attached = self._buses_of(name)
            if attached:
                raise busy(
                    f"device {name!r} is attached to bus(es) {', '.join(attached)}: "
                    "rm its links under buses/ first"
                )
            if entry.instance is not None and entry.instance.in_use():
                raise busy(f"device {name!r} has open connections; stop its clients first")
            self._save(lambda: self.store.remove_device(name))
            del self._devices[name]
        if entry.instance is not None:
            try:
                entry.instance.destroy()
            except Exception:
                log.exception("device %s: destroy failed", name)
        self._notify([("device_removed", name)])

    def buses_of_device(self, name: str) -> list[str]:
        with self.lock:
            self._device(name)
            return self._buses_of(name)

    def _buses_of(self, device: str) -> list[str]:
        return sorted(b.name for b in self._buses.values() if device in b.links.values())

    # ---- buses and links

    def bus_names(self) -> list[str]:
        with self.lock:
            return sorted(self._buses)

    def mkdir_bus(self, name: str) -> None:
        with self.lock:
            check_name("bus", name)
            if name in self._buses:
                raise AdminError(errno.EEXIST, f"bus {name!r} already exists")
            self._save(lambda: self.store.add_bus(name))
            self._buses[name] = BusEntry(name)
        self._notify([("bus_changed", name)])

    def rmdir_bus(self, name: str) -> None:
        with self.lock:
            bus = self._bus(name)
            if bus.links:
                raise busy(
                    f"bus {name!r} still has devices ({', '.join(sorted(bus.links))}): "
                    f"rm them from buses/{name}/ first"
                )
            if self._live_members(bus):
                raise busy(
                    f"bus {name!r} still has live members: "
                    f"echo -PID > buses/{name}/members for each, or stop them"
                )
            self._save(lambda: self.store.remove_bus(name))
            del self._buses[name]
        self._notify([("bus_changed", name)])

    def links(self, bus: str) -> dict[str, str]:
        """Link name -> device name."""
        with self.lock:
            return dict(self._bus(bus).links)

    def link(self, bus: str, link_name: str, target_path: str, mountpoint: str | None = None) -> None:
        """Attach the device `target_path` names (symlink text, relative to
        buses/BUS/ or absolute under `mountpoint`) as `link_name`."""
        with self.lock:
            entry = self._bus(bus)
            check_name("link", link_name)
            device = self._resolve(bus, target_path, mountpoint)
            dev = self._device(device)
            if dev.instance is None:
                raise invalid(
                    f"device {device!r} has no usable type: write a class to devices/{device}/type first"
                )
            if link_name in entry.links:
                raise AdminError(errno.EEXIST, f"buses/{bus}/{link_name} already exists")
            if device in entry.links.values():
                raise AdminError(errno.EEXIST, f"device {device!r} is already on bus {bus!r}")
            self._save(lambda: self.store.add_link(bus, link_name, device))
            entry.links[link_name] = device
        self._notify([("bus_changed", bus)])

    @staticmethod
    def _resolve(bus: str, target: str, mountpoint: str | None) -> str:
        if target.startswith("/"):
            if mountpoint is not None:
                root = posixpath.normpath(mountpoint)
                full = posixpath.normpath(target)
                if not full.startswith(root.rstrip("/") + "/"):
                    raise invalid(f"link target {target!r} is outside {root}")
                rel = posixpath.relpath(full, root)
            else:
                rel = posixpath.normpath(target).lstrip("/")
                idx = rel.rfind("devices/")
                rel = rel[idx:] if idx >= 0 else rel
        else:
            rel = posixpath.normpath(posixpath.join("buses", bus, target))
        parts = rel.split("/")
        if len(parts) != 2 or parts[0] != "devices":
            raise invalid(f"link target {target!r} is not a device: use ../../devices/NAME")
        return parts[1]

    def unlink(self, bus: str, link_name: str) -> None:
        """Detach; open sessions continue, new connections from this bus are refused."""
        with self.lock:
            entry = self._bus(bus)
            if link_name not in entry.links:
                raise not_found(f"no link buses/{bus}/{link_name}")
            self._save(lambda: self.store.remove_link(bus, link_name))
            del entry.links[link_name]
        self._notify([("bus_changed", bus)])

    def devices_of_bus(self, bus: str) -> list[tuple[str, Device]]:
        with self.lock:
            entry = self._bus(bus)
            return [
                (link, dev.instance)
                for link, name in sorted(entry.links.items())
                if (dev := self._devices.get(name)) is not None and dev.instance is not None
            ]

    # ---- who may join

    def users(self, bus: str) -> str:
        with self.lock:
            return users_attr.render(self._bus(bus).users)

    def set_users(self, bus: str, text: str) -> None:
        """Replace the bus's `users` (names resolved now, outside the lock: NSS may be slow)."""
        entries = users_attr.parse(text, f"buses/{bus}/users")
        with self.lock:
            entry = self._bus(bus)
            self._save(lambda: self.store.save_users(bus, entries))
            entry.users = entries
        self._notify([("bus_changed", bus)])

    def may_join(self, bus: str, uid: int, gids: tuple[int, ...]) -> bool:
        with self.lock:
            return uid == 0 or users_attr.allows(self._bus(bus).users, uid, gids)

    # ---- members

    def admit(self, bus: str, pid: int, own: bool = False) -> None:
        """Make `pid` a member of `bus`. A process on the bus through an ancestor is left
        as it is, unless `own`: then it becomes a member itself, and stays one when that
        ancestor exits (a detached VM's jailer)."""
        with self.lock:
            entry = self._bus(bus)
            task = peers.task(pid)
            if task is None or not peers.is_process(pid):
                raise AdminError(errno.ESRCH, f"no process {pid} (a thread id is not a process)")
            if pid == 1:
                raise invalid("pid 1 would put every process on the bus; admit a child of it")
            current = self._bus_of_chain_locked(peers.ancestry(pid))
            if current == bus and (not own or pid in entry.members):
                return
            if current is not None and current != bus:
                raise busy(
                    f"process {pid} already belongs to bus {current!r}: "
                    f"echo -{pid} > buses/{current}/members first"
                )
            member = Member(task.start_time, peers.ident(pid))
            self._save(lambda: self.store.add_member(bus, pid, *member))
            entry.members[pid] = member
        self._notify([("bus_changed", bus)])

    def expel(self, bus: str, pid: int) -> None:
        with self.lock:
            entry = self._bus(bus)
            if pid not in entry.members:
                raise not_found(f"process {pid} is not a member of bus {bus!r}")
            start = entry.members[pid].start_time
            self._save(lambda: self.store.remove_members([(pid, start)]))
            del entry.members[pid]
        self._notify([("bus_changed", bus)])

    def members(self, bus: str) -> list[int]:
        """Live member pids recorded on `bus` (not their inheriting children)."""
        with self.lock:
            return sorted(self._live_members(self._bus(bus)))

    def bus_of(self, pid: int) -> str | None:
        """The bus of the task running as `pid`: its own or its nearest ancestor's."""
        return self.bus_of_chain(peers.ancestry(pid))

    def bus_of_chain(self, chain: tuple[peers.Task, ...] | list[peers.Task]) -> str | None:
        """The bus of the first task in `chain` (a task and its ancestors, nearest first)
        that is a recorded member; None if none is."""
        with self.lock:
            return self._bus_of_chain_locked(chain)

    def _bus_of_chain_locked(self, chain: tuple[peers.Task, ...] | list[peers.Task]) -> str | None:
        for task in chain:
            for bus in self._buses.values():
                member = bus.members.get(task.pid)
                if member is None:
                    continue
                if member.is_task(task):
                    return bus.name
                self._prune(bus)  # the pid was reused: that member is gone
        return None

    def _live_members(self, bus: BusEntry) -> list[int]:
        self._prune(bus)
        return list(bus.members)

    def _prune(self, bus: BusEntry) -> None:
        dead = [(pid, m.start_time) for pid, m in bus.members.items() if not peers.alive(pid, *m)]
        if not dead:
            return
        try:
            self.store.remove_members(dead)
        except sqlite3.Error as exc:
            log.error("could not prune dead members of %s: %s", bus.name, exc)
            return
        for pid, _ in dead:
            del bus.members[pid]
