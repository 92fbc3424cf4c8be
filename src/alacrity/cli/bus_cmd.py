"""`alacrity bus show` and `alacrity bus exec`."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from alacrity import client
from alacrity.cli.errors import UserError

ADMIN_TREE = Path(os.environ.get("ALACRITY_ADMIN", "/run/alacrity"))


def join(bus: str, pid: int | None = None) -> None:
    """Make `pid` (default: this process) a member of `bus`, unless it already is one."""
    pid = pid or os.getpid()
    try:
        current = client.ask(client.DEFAULT_RUN_DIR, {"op": "whoami"}).get("bus")
    except client.GateError as exc:
        raise UserError(str(exc)) from None
    if current == bus:
        return
    if current is not None:
        raise UserError(f"this process is already in bus {current!r}; a task belongs to one bus")
    members = ADMIN_TREE / "buses" / bus / "members"
    try:
        members.write_text(f"{pid}\n")
    except FileNotFoundError:
        raise UserError(f"no bus {bus!r}: root creates it with 'mkdir {ADMIN_TREE}/buses/{bus}'") from None
    except PermissionError:
        raise UserError(f"only root may join bus {bus!r}; ask root to 'echo {pid} > {members}'") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise UserError(f"this process already belongs to another bus ({exc.strerror})") from None
        raise UserError(f"cannot join bus {bus!r}: {exc.strerror}") from None


def dispatch(args: argparse.Namespace) -> int:
    if args.bus_command == "show":
        try:
            bus = client.connect()
        except client.GateError as exc:
            raise UserError(str(exc)) from None
        print(f"bus {bus.name}")
        for dev in bus.devices:
            attrs = " ".join(f"{k}={v}" for k, v in sorted(dev.attributes.items()) if v)
            print(f"  {dev.name:16} {dev.device_class:6} {dev.socket}  {attrs}")
        return 0
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("give a command to run: alacrity bus exec BUS -- COMMAND [ARGS]")
    join(args.bus)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]}: {exc.strerror}") from None
    return 0  # not reached
