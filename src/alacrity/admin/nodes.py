"""What each path of the admin tree is: a directory, a file, or a link, and how to
read and write it. The FUSE layer (`tree.py`) adds permissions and errno mapping.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from alacrity.bus.model import Model
from alacrity.devices.base import Device
from alacrity.errors import AdminError, invalid

BUS_FILES = ("members", "users", "devices", "state", "connections")
TOP = ("classes", "devices", "buses")


@dataclass
class Node:
    kind: str  # "dir", "file" or "link"
    read: Callable[[], str | bytes] = lambda: ""  # file content (text or bytes), or link target
    write: Callable[[str], None] | None = None  # None: read-only
    entries: Callable[[], list[str]] = list  # directory listing

    @property
    def writable(self) -> bool:
        return self.write is not None


class Missing(Exception):
    """The path names nothing (ENOENT)."""


def _lines(items: list[str]) -> str:
    return "".join(f"{item}\n" for item in items)


def _strip_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def resolve(model: Model, path: str) -> Node:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return Node("dir", entries=lambda: list(TOP))
    top, rest = parts[0], parts[1:]
    if top == "classes":
        return _class_node(model, rest)
    if top == "devices":
        return _device_node(model, rest)
    if top == "buses":
        return _bus_node(model, rest)
    raise Missing(path)


def _class_node(model: Model, rest: list[str]) -> Node:
    if not rest:
        return Node("dir", entries=lambda: sorted(model.classes))
    cls = model.classes.get(rest[0])
    if cls is None or len(rest) > 2:
        raise Missing(rest[0])
    if len(rest) == 1:
        return Node("dir", entries=lambda: ["attributes", "summary"])
    if rest[1] == "attributes":
        return Node(
            "file",
            read=lambda: _lines([f"{a.name} {a.default or '-'} {a.doc}" for a in cls.attributes]),
        )
    if rest[1] == "summary":
        return Node("file", read=lambda: f"{cls.summary}\n")
    raise Missing(rest[1])


def _device_node(model: Model, rest: list[str]) -> Node:
    if not rest:
        return Node("dir", entries=model.device_names)
    try:
        entry = model.device(rest[0])
    except AdminError:
        raise Missing(rest[0]) from None
    name = entry.name

    def files() -> dict[str, Node]:
        found: dict[str, Node] = {}
        dev = entry.instance
        if dev is not None:
            for key in dev.state():
                found[key] = Node("file", read=lambda k=key: f"{dev.state().get(k, '')}\n")
            for key, view in dev.views().items():
                if isinstance(view, dict):
                    found[key] = Node("dir", entries=lambda k=key: sorted(_view_dir(dev, k), key=_natural))
                else:
                    found[key] = Node("file", read=lambda k=key: str(dev.views().get(k, "")))
            for attr in dev.attributes:
                found[attr.name] = Node(
                    "file",
                    read=lambda a=attr.name: f"{dev.texts.get(a, '')}\n",
                    write=lambda text, a=attr.name: model.set_attribute(name, a, _strip_newline(text)),
                )
        found["buses"] = Node("file", read=lambda: _lines(model.buses_of_device(name)))
        found["type"] = Node(
            "file",
            read=lambda: f"{entry.class_name}\n" if entry.class_name else "",
            write=lambda text: model.set_type(name, text.strip()),
        )
        return found

    if len(rest) == 1:
        return Node("dir", entries=lambda: sorted(files()))
    if len(rest) == 2 and rest[1] in (found := files()):
        return found[rest[1]]
    if len(rest) == 3 and entry.instance is not None:
        dev = entry.instance
        if rest[2] in _view_dir(dev, rest[1]):
            return Node("file", read=lambda: _view_file(_view_dir(dev, rest[1]).get(rest[2], "")))
    raise Missing(rest[-1])


def _view_dir(dev: Device, name: str) -> dict[str, str]:
    view = dev.views().get(name)
    return view if isinstance(view, dict) else {}


def _view_file(value: object) -> str | bytes:
    """A file of a view directory: text, bytes, or a callable giving either when the file
    is opened (a console's log is copied only for whoever reads it)."""
    content = value() if callable(value) else value
    return content if isinstance(content, bytes) else str(content)


def _natural(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 62, name)


def _bus_node(model: Model, rest: list[str]) -> Node:
    if not rest:
        return Node("dir", entries=model.bus_names)
    bus = rest[0]
    try:
        links = model.links(bus)
    except AdminError:
        raise Missing(bus) from None
    if len(rest) == 1:
        return Node("dir", entries=lambda: [*BUS_FILES, *sorted(model.links(bus))])
    if len(rest) > 2:
        raise Missing(rest[-1])
    leaf = rest[1]
    if leaf == "members":
        return Node(
            "file",
            read=lambda: _lines([str(p) for p in model.members(bus)]),
            write=lambda text: write_members(model, bus, text),
        )
    if leaf == "users":
        return Node("file", read=lambda: model.users(bus), write=lambda text: model.set_users(bus, text))
    if leaf == "devices":
        return Node("file", read=lambda: _lines(sorted(model.links(bus).values())))
    if leaf == "state":
        return Node(
            "file",
            read=lambda: _lines([f"{k} {v}" for k, v in sorted(bus_counters(model, bus).items())]),
        )
    if leaf == "connections":
        return Node("file", read=lambda: f"{bus_counters(model, bus).get('connections', 0)}\n")
    if leaf in links:
        return Node("link", read=lambda: f"../../devices/{links[leaf]}")
    raise Missing(leaf)


def bus_counters(model: Model, bus: str) -> dict[str, int]:
    """The bus's devices' counters summed, plus how many devices and members it has."""
    total: dict[str, int] = {"connections": 0, "errors": 0}
    devices = model.devices_of_bus(bus)
    for _, dev in devices:
        for key, value in dev.counters.items():
            total[key] = total.get(key, 0) + value
    total["devices"] = len(devices)
    total["members"] = len(model.members(bus))
    return total


def write_members(model: Model, bus: str, text: str) -> None:
    """`PID` admits, `-PID` expels; several may be given, one per line or space-separated."""
    words = text.split()
    if not words:
        raise invalid(f"write a pid to buses/{bus}/members to admit it, or -PID to expel it")
    for word in words:
        expel = word.startswith("-")
        digits = word[1:] if expel else word
        # isdigit() takes any script's digits ("\u0663" is 3): only ASCII decimal names a pid.
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10 or int(digits) <= 0:
            raise AdminError(errno.EINVAL, f"not a pid: {word!r} (write PID to admit, -PID to expel)")
        if not expel and int(digits) == os.getpid():
            raise invalid(f"pid {digits} is alacrityd itself; admit the process that should join")
        if expel:
            model.expel(bus, int(digits))
        else:
            model.admit(bus, int(digits))
