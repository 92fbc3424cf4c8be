"""A snapshot of the whole bus, for root's eyes: what `alacrity top` shows (through the
gate's root-only `{"op": "status"}`) and what the metrics endpoint serves (bus/metrics.py).

Per device: its class, its buses, its counters (the numbers of `state()`), the rest of
its state as text, its last error, and its tables from `views()` (a switch's ports, one
`key value` table per port, and its totals). Per bus: its links, its live members and
the VMs running below them (QEMU processes with `-name`, found by walking the members'
children in /proc). Everything is plain JSON.

Most devices answer from memory. A device whose class overrides `state()` or `views()`
may have to ask someone else (a switch asks its own process, with a 1 s timeout); those
are asked in a small pool of threads, at most one request in flight per device, and a
snapshot waits for them at most `SLOW_WAIT_S`: a hung switch shows as not answering
instead of holding up the snapshot, the gate or a scrape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from alacrity.bus.model import Model
from alacrity.devices.base import Device, qemu_name_of
from alacrity.errors import AdminError

log = logging.getLogger("alacrity.status")

#: How long a snapshot waits for devices that answer from elsewhere (a switch's process).
SLOW_WAIT_S = 1.5
#: Threads that ask such devices: enough for several hung switches at once.
SLOW_WORKERS = 4
#: The process tree below a bus's members is walked this deep, visiting at most this many.
VM_DEPTH = 4
VM_VISITS = 64


def _value(text: str) -> int | float | str:
    """A view's value as a number where it is one."""
    if text.removeprefix("-").isdigit():
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    return number if number == number else text  # not NaN


def _table(text: str) -> dict[str, int | float | str] | None:
    """`key value` lines (a switch port's file) as a dict; None if the text is not that."""
    table: dict[str, int | float | str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, rest = line.partition(" ")
        if not key:
            return None
        table[key] = _value(rest.strip())
    return table


def _may_block(device: Device) -> bool:
    cls = type(device)
    return cls.state is not Device.state or cls.views is not Device.views


def sample(device: Device) -> dict[str, Any]:
    """One device's counters, state, last error and tables, read now."""
    entry: dict[str, Any] = {"counters": {}, "state": {}, "last_error": "", "views": {}, "error": ""}
    try:
        state = device.state()  # first: it may bring the counters up to date (a switch's)
        views = device.views()
    except (AdminError, OSError, RuntimeError, ValueError) as exc:
        entry["error"] = getattr(exc, "message", None) or str(exc)
        state, views = {}, {}
    with device.lock:
        entry["counters"] = dict(device.counters)
        entry["last_error"] = device.last_error
    for key, text in state.items():
        if key != "last_error" and key not in entry["counters"]:
            entry["state"][key] = text
    for name, view in views.items():
        if isinstance(view, dict):  # a directory: keep the files that are key-value text
            files = {f: t for f, v in view.items() if isinstance(v, str) and (t := _table(v)) is not None}
            if files:
                entry["views"][name] = files
        elif isinstance(view, str) and all(len(line.split()) == 2 for line in view.splitlines() if line):
            entry["views"][name] = _table(view)  # e.g. a switch's totals (its fdb is not kept)
    entry["sampled"] = time.monotonic()
    return entry


class Status:
    """Makes snapshots of `model`; `gate` (optional) adds its own counters."""

    def __init__(self, model: Model, gate: Any = None) -> None:
        self.model = model
        self.gate = gate
        self.started = time.monotonic()
        self.pool = ThreadPoolExecutor(max_workers=SLOW_WORKERS, thread_name_prefix="status-device")
        self.makers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="status")
        self.lock = threading.Lock()
        self.inflight: dict[str, tuple[Device, Future[dict[str, Any]]]] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.makers.shutdown(wait=False, cancel_futures=True)

    def make_reply(self, done: Callable[[bytes], None]) -> None:
        """Make a snapshot in a thread of ours (threads kept, not made per request) and
        give `done` the gate's reply line for it, `{"status": ...}` or `{"error": ...}`."""
        self.makers.submit(self._reply, done)

    def _reply(self, done: Callable[[bytes], None]) -> None:
        try:
            reply: dict[str, Any] = {"status": self.snapshot()}
        except Exception as exc:  # never leave the asker waiting
            log.exception("status snapshot failed")
            reply = {"error": f"status failed: {exc}"}
        done(json.dumps(reply).encode() + b"\n")

    def _ask(self, device: Device) -> Future[dict[str, Any]]:
        """The device's sample in the pool; a request still in flight is shared, not repeated."""
        with self.lock:
            current = self.inflight.get(device.name)
            if current is not None and current[0] is device and not current[1].done():
                return current[1]
            future = self.pool.submit(sample, device)
            self.inflight[device.name] = (device, future)
            return future

    def snapshot(self) -> dict[str, Any]:
        begun = time.monotonic()
        devices: list[tuple[str, str, Device | None]] = []
        for name in self.model.device_names():
            with contextlib.suppress(AdminError):  # removed meanwhile
                entry = self.model.device(name)
                devices.append((name, entry.class_name, entry.instance))
        buses_of: dict[str, list[str]] = {}
        buses: list[dict[str, Any]] = []
        for bus in self.model.bus_names():
            try:
                links = self.model.links(bus)
                members = self.model.members(bus)
            except AdminError:
                continue
            for device in sorted(set(links.values())):
                buses_of.setdefault(device, []).append(bus)
            buses.append({"name": bus, "devices": links, "members": [_member(pid) for pid in members],
                          "vms": _vms_below(members)})
        pending = {name: self._ask(dev) for name, _, dev in devices if dev is not None and _may_block(dev)}
        out: list[dict[str, Any]] = []
        for name, class_name, dev in devices:
            if dev is None:
                entry = {"counters": {}, "state": {}, "last_error": "", "views": {},
                         "error": f"class {class_name!r} is not available" if class_name else "no type",
                         "sampled": time.monotonic()}
            elif name in pending:
                try:
                    entry = pending[name].result(timeout=max(0.0, begun + SLOW_WAIT_S - time.monotonic()))
                except TimeoutError:
                    entry = sample_quietly(dev, f"{class_name} {name} is not answering (waited "
                                                f"{SLOW_WAIT_S:g} s)")
                except Exception as exc:  # a device's own bug must not cost the whole snapshot
                    entry = sample_quietly(dev, f"{type(exc).__name__}: {exc}")
            else:
                entry = sample(dev)
            out.append({"name": name, "class": class_name, "buses": buses_of.get(name, []), **entry})
        snap: dict[str, Any] = {
            "daemon": {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3), **_own()},
            "devices": out,
            "buses": buses,
            "took_s": round(time.monotonic() - begun, 6),
        }
        if self.gate is not None:
            snap["gate"] = {"refusals": self.gate.refusals, "control_connections": len(self.gate.controls),
                            "device_connections": len(self.gate.connections)}
        return snap


def sample_quietly(device: Device, error: str) -> dict[str, Any]:
    """What the daemon knows of a device that did not answer in time."""
    with device.lock:
        counters, last_error = dict(device.counters), device.last_error
    return {"counters": counters, "state": {}, "last_error": last_error, "views": {}, "error": error,
            "sampled": time.monotonic()}


# -- the daemon itself, members and VMs, from /proc

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _own() -> dict[str, Any]:
    """The daemon's CPU time (user + system, all threads), resident memory and threads."""
    fields = _read("/proc/self/stat", 4096).rpartition(b")")[2].split()
    if len(fields) < 22:
        return {}
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / _TICK, "rss_bytes": int(fields[21]) * _PAGE,
            "threads": int(fields[17])}


def _read(path: str, limit: int = 65536) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""


def _member(pid: int) -> dict[str, Any]:
    return {"pid": pid, "command": _read(f"/proc/{pid}/comm", 64).decode(errors="replace").strip()}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids[:64]:
        found += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children", 16384).split()]
    return found


def vm_name(pid: int) -> str | None:
    """The name of the QEMU running as `pid` (its `-name`), or None if it is not one."""
    name = qemu_name_of(pid)
    if name is None:
        return None
    return name if name.isprintable() and len(name) <= 64 else "?"


def _vms_below(members: list[int]) -> list[dict[str, Any]]:
    """QEMU processes among the members and their descendants (not below a QEMU)."""
    vms: list[dict[str, Any]] = []
    seen: set[int] = set()
    level = list(members)
    for _ in range(VM_DEPTH + 1):
        following: list[int] = []
        for pid in level:
            if pid in seen or len(seen) >= VM_VISITS:
                continue
            seen.add(pid)
            name = vm_name(pid)
            if name is not None:
                vms.append({"name": name, "pid": pid})
            else:
                following += _children(pid)
        level = following
    return sorted(vms, key=lambda vm: (vm["name"], vm["pid"]))
