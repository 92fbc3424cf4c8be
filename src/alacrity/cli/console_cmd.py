"""`alacrity vm console NAME`: type into a VM's console on the bus, or follow it.

The console lives in the bus's console device; this process reaches it through the
device's socket, so it must be on the VM's bus (the gate checks): run it inside the bus
(`alacrity bus exec BUS -- alacrity vm console NAME`), or as root, which joins the VM's
bus itself (`--bus BUS`, or found from the VM's record). A non-root member may open only
consoles of VMs its own uid runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import select
import sys
import termios
import time
import tty

from alacrity import client
from alacrity.cli.bus_cmd import ADMIN_TREE, join
from alacrity.cli.errors import UserError
from alacrity.client.console import ConsoleClient, ConsoleRefused
from alacrity.vm.qemu import serial_chardev
from alacrity.vm.runtime import find_vm

DETACH = b"\x1d"  # Ctrl-]
ATTACH_BACKLOG = 4096
RETRY_S = 0.5

DESCRIPTION = """\
Attach to the serial console of VM NAME, kept by the console device of its bus: what
you type goes to the guest (one writer at a time), Ctrl-] detaches. --follow watches
without typing; any number may follow at once. The guest never waits for a watcher: one
that falls behind skips what the log overwrote (counted in devices/DEV/dropped).
If the daemon restarts, the console comes back by itself (the guest keeps running).
"""


def add_parser(vm_sub: argparse._SubParsersAction) -> None:
    p = vm_sub.add_parser("console", help="type into a VM's console (Ctrl-] detaches), or --follow it",
                          description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the VM (its --name; its console is named after it)")
    p.add_argument("--follow", action="store_true", help="watch only, without typing")
    p.add_argument("--backlog", metavar="BYTES|all",
                   help=f"how much of the log to show first (default {ATTACH_BACKLOG}; all: all it keeps)")
    p.add_argument("--device", help="the console device (default: the bus's first console device)")
    p.add_argument("--bus", help="join BUS first (root only; default: the bus this process is in, or "
                   "for root the bus of the VM's console device)")
    p.add_argument("--reconnect", type=float, default=30.0, metavar="SECONDS",
                   help="keep trying this long when the connection is lost (default 30; 0: give up)")


def run(args: argparse.Namespace) -> int:
    backlog = _backlog(args.backlog)
    bus = _bus(args)
    device = _device(bus, args.device)
    mode = "follow" if args.follow else "attach"
    try:
        con = bus.open(device.name, vm=args.name, mode=mode, backlog=backlog)
    except (client.GateError, ConsoleRefused, OSError, ValueError) as exc:
        raise UserError(f"console {args.name} on {device.name}: {exc}") from None
    while True:
        detached = _attach(con) if mode == "attach" else _follow(con)
        con.close()
        if detached:
            _note("detached")
            return 0
        if not con.live:
            return 0  # the VM had ended: the device sent what it kept, and closed
        if args.reconnect <= 0:
            raise UserError(f"the console of {args.name} went away")
        con = _resume(bus, device, con, args.reconnect)


def _backlog(text: str | None) -> int | None:
    if text is None:
        return ATTACH_BACKLOG
    if text == "all":
        return None
    if text.isdigit():
        return int(text)
    raise UserError(f"--backlog {text}: give a number of bytes or 'all'")


def _bus(args: argparse.Namespace) -> client.Bus:
    if args.bus:
        join(args.bus)
    try:
        return client.connect()
    except client.GateError as exc:
        bus = None if args.bus or os.geteuid() != 0 else _bus_of_vm(args.name)
        if bus is None:
            raise UserError(f"{exc}\nrun this on the VM's bus: 'alacrity bus exec BUS -- alacrity vm console "
                            f"{args.name}', or as root with --bus BUS") from None
    join(bus)
    return client.connect()


def _bus_of_vm(name: str) -> str | None:
    """As root, for a VM started on this host: a bus with the device its serial port is on."""
    rec = find_vm(name)
    chardev = serial_chardev([rec.cmdline]) if rec is not None else None
    if rec is None or chardev is None:
        return None
    prefix = f"socket,id={chardev},"
    paths = [m.group(1).replace(",,", ",") for opt in rec.cmdline if opt.startswith(prefix)
             if (m := re.search(r",path=((?:[^,]|,,)*)", opt))]
    if not paths:
        return None
    device = os.path.basename(paths[0]).removesuffix(".sock")
    with contextlib.suppress(OSError):
        for bus in sorted(os.listdir(ADMIN_TREE / "buses")):
            for link in (ADMIN_TREE / "buses" / bus).iterdir():
                if link.is_symlink() and os.path.basename(os.readlink(link)) == device:
                    return bus
    return None


def _device(bus: client.Bus, name: str | None) -> client.DeviceInfo:
    consoles = [d for d in bus.devices if client.driver_of(d.device_class) is ConsoleClient]
    if name is not None:
        try:
            info = bus.device(name)
        except client.GateError as exc:
            raise UserError(str(exc)) from None
        if info not in consoles:
            raise UserError(f"device {name} on bus {bus.name} is a {info.device_class}, not a console")
        return info
    if not consoles:
        raise UserError(f"bus {bus.name} has no console device (root: mkdir devices/con0; echo console > "
                        f"devices/con0/type; ln -s ../../devices/con0 buses/{bus.name}/con0)")
    return consoles[0]


def _resume(bus: client.Bus, device: client.DeviceInfo, old: ConsoleClient, within_s: float) -> ConsoleClient:
    """Reconnect after the connection was lost (the daemon restarted), carrying on where
    we were: in the same log after the last byte we had, or in a new log (a new daemon)
    from its start."""
    deadline = time.monotonic() + within_s
    for attempt in itertools.count():
        try:
            con = bus.open(device.name, vm=old.vm, mode=old.mode, backlog=None)
            break
        except (client.GateError, ConsoleRefused, OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"console {old.vm} on {device.name}: gave up reconnecting: {exc}") from None
            if attempt == 0:  # not just the VM's end, which the first attempt would have found
                _note(f"the console of {old.vm} went away ({exc}); reconnecting")
            time.sleep(RETRY_S)
    if con.session != old.session:
        _note("reconnected: the daemon restarted, and its log of the console starts again")
        return con
    skip = old.pos - con.pos  # the replay's bytes we already have
    if skip < 0:
        _note(f"reconnected: {-skip} bytes were overwritten meanwhile")
    while skip > 0 and (data := con.read(min(skip, 65536))):
        skip -= len(data)
    return con


def _follow(con: ConsoleClient) -> bool:
    out = sys.stdout.buffer
    while data := con.read():
        out.write(data)
        out.flush()
    return False


def _attach(con: ConsoleClient) -> bool:
    """Relay the terminal to the console until Ctrl-] or the end of input (True), or
    until the connection ends (False)."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys typed already go to the guest
    _note(f"attached to the console of {con.vm}; Ctrl-] detaches")
    out = sys.stdout.buffer
    try:
        while True:
            ready = select.select([con, fd], [], [])[0]
            if con in ready:
                data = con.read()
                if not data:
                    return False
                out.write(data)
                out.flush()
            if fd in ready:
                keys = os.read(fd, 4096)
                before, detach, _ = keys.partition(DETACH)
                if before:
                    con.write(before)
                if detach or not keys:
                    return True
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _note(text: str) -> None:
    print(f"\r\n[alacrity: {text}]\r", file=sys.stderr, flush=True)
