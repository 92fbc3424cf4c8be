"""The switch device: one Ethernet segment, served by its own unprivileged process.

A switch is a top-level device, so one switch may be linked into several buses.
Every connection the gate admits to it becomes a new port: the daemon hands the
accepted socket to the switch process (`alacrity.switch`) and keeps nothing of
it. Frames never pass through the daemon.

The device may touch: its switch process (start, control socket, restart after a
crash, stop), and the tap device it opens as root for the uplink and hands over.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import threading
import time
from typing import Any

from alacrity import ids
from alacrity.devices.base import Attribute, Device, Handovers, Slot, chardev_socket, parse_text, qemu_device
from alacrity.errors import AdminError
from alacrity.switch.coalesce import COALESCE_FRAMES, COALESCE_US, TX_DEFER_US, Bounds
from alacrity.switch.control import DEFAULT_PREFIX
from alacrity.switch.launcher import SwitchProcess
from alacrity.virtio.net import check_mac, local_mac

log = logging.getLogger("alacrity.devices.switch")

STATS_CACHE_S = 0.2
#: How long the admin tree waits for a switch's view before it fails the read with EIO.
STATS_TIMEOUT_S = 1.0
RESTART_DELAYS_S = (0.2, 1.0, 5.0, 30.0)  # after the 1st, 2nd, 3rd, further crashes in a row
STABLE_S = 30.0  # a process that ran this long resets the crash count


def _parse_mtu(text: str) -> int:
    value = int(text)
    if not 68 <= value <= 65535 - 14 - 4:
        raise ValueError(f"mtu {value} out of range (68 to 65517)")
    return value


def _parse_ifname(text: str) -> str:
    name = parse_text(15)(text)
    if name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise ValueError(f"{name!r} is not an interface name (letters, digits, _ . -; at most 15)")
    return name


def _parse_prefix(text: str) -> str:
    value = text.strip().lower()
    parts = value.split(":")
    if not 1 <= len(parts) <= 5 or not all(re.fullmatch(r"[0-9a-f]{2}", p) for p in parts):
        raise ValueError(f"{text!r}: give 1 to 5 bytes like 02:a1:ac")
    if int(parts[0], 16) & 1:
        raise ValueError(f"{text!r} is a multicast prefix; the first byte must be even (e.g. 02)")
    return value


def _parse_coalesce_us(text: str) -> float:
    return Bounds(delay_us=float(text)).delay_us  # its range, checked now, not at the next start


def _parse_coalesce_frames(text: str) -> int:
    return Bounds(frames=int(text)).frames


def _parse_tx_defer_us(text: str) -> float:
    return Bounds(tx_defer_us=float(text)).tx_defer_us


def _parse_seconds(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 86400:
        raise ValueError(f"{value} s out of range (1 to 86400)")
    return value


class SwitchDevice(Device):
    class_name = "switch"
    summary = (
        "an Ethernet segment: every open is a vhost-user-net port; frames move between ports "
        "in an unprivileged switch process, and to the host through an optional tap uplink"
    )
    adopts_connections = True
    attributes = (
        Attribute("mtu", _parse_mtu, "1500", "largest IP packet on the segment (not while ports are open)"),
        Attribute("uplink", _parse_ifname, "",
                  "name of a tap device joining the host to the segment (made if missing); empty: none",
                  live=True),
        Attribute("mac_prefix", _parse_prefix, DEFAULT_PREFIX,
                  "first bytes of the MAC given to each new port (not while ports are open)"),
        Attribute("learning_ageing_s", _parse_seconds, "300", "seconds a learned MAC address is kept",
                  live=True),
        Attribute("coalesce_us", _parse_coalesce_us, str(COALESCE_US),
                  "longest a port's interrupt is held while its frames come close together (0: never)",
                  live=True),
        Attribute("coalesce_frames", _parse_coalesce_frames, str(COALESCE_FRAMES),
                  "...or until this many more frames reached that port's ring", live=True),
        Attribute("tx_defer_us", _parse_tx_defer_us, str(TX_DEFER_US),
                  "longest a port's TX interrupt waits for its driver to collect its sent buffers by "
                  "itself (0: interrupt at once)", live=True),
    )
    virtio_id = 1
    client_driver = "alacrity.client.net:NetClient"
    gives_nic = True

    @classmethod
    def qemu_args(cls, slot: Slot) -> list[str]:
        """A virtio-net NIC whose backend is a new port. Its MAC: the VM's --mac for this
        NIC, else one derived from the VM's and the switch's names (stable across runs)."""
        mac = check_mac(slot.options.get("mac") or local_mac(f"{slot.vm}/{slot.device}"))
        return [*chardev_socket(slot.id, slot.socket),
                "-netdev", f"vhost-user,id={slot.id},chardev={slot.id}",
                # vectors=0 (PCI only): QEMU 7.2 under TCG crashes with MSI-X on vhost-user net.
                *qemu_device("virtio-net", slot.transport, netdev=slot.id, mac=mac, vectors=0)]

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.counters.update({"ports_opened": 0, "restarts": 0})
        self.process: SwitchProcess | None = None
        self.process_lock = threading.RLock()
        self.tap_fd: int | None = None  # kept here too, so the tap outlives a switch crash
        self.destroyed = False
        self.crashes = 0
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self.handovers = Handovers(f"switch {name}")
        self.handover_thread: threading.Thread | None = None

    # -- the process
    def _start(self) -> SwitchProcess:
        with self.process_lock:
            if self.process is not None and self.process.proc.poll() is None:
                return self.process
            if self.destroyed:
                raise AdminError(errno.ENODEV, f"switch {self.name} is being removed")
            v = self.values
            try:
                process = SwitchProcess(self.name, mtu=v["mtu"], mac_prefix=v["mac_prefix"],
                                        ageing_s=v["learning_ageing_s"], coalesce_us=v["coalesce_us"],
                                        coalesce_frames=v["coalesce_frames"], tx_defer_us=v["tx_defer_us"])
            except (OSError, ids.IdsExhausted) as exc:
                raise AdminError(errno.EIO, f"switch {self.name}: cannot start its process: {exc}") from None
            self.process = process
            self._stats_at = 0.0
            if self.tap_fd is not None:
                process.control.request({"op": "add_uplink", "label": f"{self.name}:{v['uplink']}"},
                                        (self.tap_fd,))
            threading.Thread(target=self._watch, args=(process,), name=f"switch {self.name}",
                             daemon=True).start()
            return process

    def _watch(self, process: SwitchProcess) -> None:
        """Restart the process if it dies while it is still wanted."""
        status = process.proc.wait()
        process.release_id()
        with self.process_lock:
            if self.process is not process or self.destroyed:
                return
            self.process = None
            process.control.close()
            ran = time.monotonic() - process.started
            self.crashes = 1 if ran > STABLE_S else self.crashes + 1
            reason = f"switch process {process.proc.pid} died (status {status}); its ports are gone"
            log.error("switch %s: %s", self.name, reason)
            self.record_error(reason)
        delay = RESTART_DELAYS_S[min(self.crashes, len(RESTART_DELAYS_S)) - 1]
        time.sleep(delay)
        with self.process_lock:
            if self.process is None and not self.destroyed:
                self.count("restarts")
                try:
                    self._start()
                except (AdminError, OSError, RuntimeError) as exc:
                    log.error("switch %s: restart failed: %s", self.name, exc)

    def _running(self) -> SwitchProcess | None:
        with self.process_lock:
            if self.process is not None and self.process.proc.poll() is None:
                return self.process
            return None

    def _stop(self) -> None:
        with self.process_lock:
            process, self.process = self.process, None
        if process is not None:
            process.stop()
            log.info("switch %s: process %d stopped", self.name, process.proc.pid)

    # -- connections
    def adopt(self, sock: socket.socket, peer_pid: int, label: str) -> None:
        """Queue the connection for the hand-over thread; never waits on the switch."""
        self.handovers.put(sock, peer_pid, label)
        with self.process_lock:
            if self.handover_thread is None:
                self.handover_thread = threading.Thread(target=self._hand_over, daemon=True,
                                                        name=f"switch {self.name} hand-over")
                self.handover_thread.start()

    def _hand_over(self) -> None:
        while (item := self.handovers.get()) is not None:
            sock, peer_pid, label = item
            process: SwitchProcess | None = None
            with sock:
                try:
                    process = self._start()
                    process.control.add_port(sock.fileno(), label=label, peer_pid=peer_pid)
                except TimeoutError as exc:
                    if process is not None:
                        self._hung(process, f"did not take {label}: {exc}")
                    continue
                except (AdminError, OSError, RuntimeError, ValueError) as exc:
                    reason = f"switch {self.name} did not take {label}: {exc}"
                    log.warning("%s", reason)
                    self.record_error(reason)
                    continue
            self.count("ports_opened")
            self._stats_at = 0.0

    def _hung(self, process: SwitchProcess, why: str) -> None:
        """A switch that stops answering is killed; the watcher starts a new one."""
        reason = f"switch process {process.proc.pid} is not answering ({why}): killed"
        log.error("switch %s: %s", self.name, reason)
        self.record_error(reason)
        with contextlib.suppress(OSError):
            process.proc.kill()

    def in_use(self) -> bool:
        return bool(self.stats()["ports"])

    def stats(self) -> dict[str, Any]:
        """The switch process's view (ports, fdb, stats), at most STATS_CACHE_S old."""
        process = self._running()
        if process is None:
            return {"ports": [], "fdb": [], "stats": {}, "removed": []}
        now = time.monotonic()
        if now - self._stats_at > STATS_CACHE_S:
            try:
                self._stats = process.control.stats(timeout=STATS_TIMEOUT_S)
            except (OSError, RuntimeError, ValueError) as exc:
                raise AdminError(errno.EIO, f"switch {self.name} is not answering: {exc}") from None
            self._stats_at = now
        return self._stats

    def state(self) -> dict[str, str]:
        stats = self.stats()
        ports = [p for p in stats["ports"] if not p.get("uplink")]
        with self.lock:
            self.counters["connections"] = len(ports)
        shown = super().state()
        process = self._running()
        shown["pid"] = str(process.proc.pid if process else "")
        return shown

    def views(self) -> dict[str, str | dict[str, str]]:
        stats = self.stats()
        ports = {
            str(p["port"]): "".join(f"{k} {_text(v)}\n" for k, v in p.items() if k != "port")
            for p in stats["ports"]
        }
        fdb = "".join(f"{e['mac']} port {e['port']} age {e['age_s']:.1f}\n" for e in stats["fdb"])
        totals = "".join(f"{k} {v}\n" for k, v in sorted(stats["stats"].items()))
        return {"ports": ports, "fdb": fdb, "stats": totals}

    # -- attributes
    def set_attribute(self, name: str, text: str) -> None:
        values, texts = dict(self.values), dict(self.texts)
        super().set_attribute(name, text)
        try:
            self._apply(name)
        except (OSError, RuntimeError, ValueError) as exc:
            self.values, self.texts = values, texts
            raise AdminError(getattr(exc, "errno", None) or errno.EIO, f"{self.name}/{name}: {exc}") from None

    def _apply(self, name: str) -> None:
        if name == "uplink":
            self._set_uplink(self.values["uplink"])
        elif name == "learning_ageing_s":
            process = self._running()
            if process is not None:
                process.control.request({"op": "set", "ageing_s": self.values["learning_ageing_s"]})
        elif name in ("coalesce_us", "coalesce_frames", "tx_defer_us"):
            process = self._running()
            if process is not None:
                process.control.request({"op": "set", name: self.values[name]})
        elif name in ("mtu", "mac_prefix") and self._running() is not None:
            # No ports are open (these are not live): start afresh with the new value.
            self._stop()
            if self.tap_fd is not None:
                self._start()

    def _set_uplink(self, tap: str) -> None:
        from alacrity.switch.tap import open_tap  # the privileged half, in the daemon

        with self.process_lock:
            new_fd = open_tap(tap, mtu=self.values["mtu"]) if tap else None
            old_fd, self.tap_fd = self.tap_fd, new_fd
            process = self._running()
            try:
                if new_fd is not None:
                    if process is None:
                        self._start()  # hands the uplink over itself
                    else:
                        label = f"{self.name}:{tap}"
                        process.control.request({"op": "add_uplink", "label": label}, (new_fd,))
                elif process is not None:
                    process.control.request({"op": "remove_uplink"})
            except BaseException:
                self.tap_fd = old_fd
                if new_fd is not None:
                    os.close(new_fd)
                raise
            if old_fd is not None:
                os.close(old_fd)
        log.info("switch %s: uplink %s", self.name, tap or "none")

    def destroy(self) -> None:
        self.destroyed = True
        self.handovers.close(wake=self.handover_thread is not None)
        self._stop()
        if self.tap_fd is not None:
            os.close(self.tap_fd)
            self.tap_fd = None


def _text(value: object) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
