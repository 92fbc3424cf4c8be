"""`alacrity bus show` and `alacrity bus exec`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alacrity import client
from alacrity.cli.errors import UserError

ADMIN_TREE = Path(os.environ.get("ALACRITY_ADMIN", "/run/alacrity"))


def join(bus: str) -> None:
    """Make this process a member of `bus` (its children inherit it), unless it already is
    one: the gate admits root, and users and groups the bus's `users` attribute lists."""
    try:
        reply = client.ask(client.DEFAULT_RUN_DIR, {"op": "join", "bus": bus})
    except client.GateError as exc:
        raise UserError(str(exc)) from None
    if "error" in reply:
        raise UserError(reply["error"])


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
