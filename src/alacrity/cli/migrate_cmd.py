"""`alacrity vm migrate NAME`: move a running VM into a new QEMU, live."""

from __future__ import annotations

import argparse
import sys
import time

from alacrity.cli.errors import UserError

EPILOG = """\
The VM keeps its name, its bus, its disks and its network: a new QEMU is started on the
same bus, the guest's memory and devices are copied to it while the guest runs, and the
old QEMU quits once the new one has taken over (a pause of well under a second). This is
how to restart QEMU under a running guest, for a new binary or new limits.

Only a VM started with 'vm run --detach' migrates, and only with devices QEMU can migrate:
QEMU 7.2's vhost-user-vsock and vhost-user-rng cannot, so a VM on a bus with a vsock or rng
device is refused before anything starts. A failed or cancelled migration leaves the VM
running where it was; the new QEMU holds the VM paused until the old one has sent it all,
so the guest never runs in both.

Across hosts, start the destination first; the disks must reach the same images (shared
storage). The destination takes only a source that shows its token, but the stream itself
is plain TCP: use it on a network you trust.

examples:
  alacrity vm migrate web1
  alacrity vm run --incoming tcp:0.0.0.0:4444 --detach --bus web --name web1   (on host B;
                                                         it prints the token to give host A)
  alacrity vm migrate web1 --to tcp:hostb:4444 --token TOKEN                   (on host A)
  alacrity vm migrate web1 --max-downtime 0.1
  alacrity vm migrate web1 --verify      (check that every page of memory arrived)
  alacrity vm migrate --cancel web1      (from another terminal)
"""


def add_parser(vm_sub: argparse._SubParsersAction) -> None:
    parser = vm_sub.add_parser("migrate", help="move a running VM into a new QEMU, live",
                               description="Move VM NAME, running, into a new QEMU on this host.",
                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--max-downtime", type=float, metavar="SECONDS",
                        help="the longest pause QEMU may choose for the final copy (QEMU's default: 0.3)")
    parser.add_argument("--to", metavar="tcp:HOST:PORT",
                        help="to another host, where 'alacrity vm run --incoming tcp:ADDR:PORT --detach "
                        "--bus B --name NAME' waits (its daemon has bus B with devices of the same names, "
                        "its disks reach the same images)")
    parser.add_argument("--token", help="with --to: the token 'vm run --incoming' printed there")
    parser.add_argument("--cancel", action="store_true", help="cancel NAME's migration in progress")
    parser.add_argument("--verify", action="store_true",
                        help="at the switch-over, while both QEMUs hold the VM paused, compare their guest "
                        "memory page by page and keep the VM where it was if a page differs (root or the "
                        "QEMU's user; this host only; adds 1-2 s of pause per GiB)")


def run(args: argparse.Namespace) -> int:
    from alacrity.vm.migrate import MigrationError, cancel, migrate

    if args.to and not args.token:
        raise UserError("--to needs --token: the one 'alacrity vm run --incoming' printed on the other host")
    if args.max_downtime is not None and not 0 < args.max_downtime <= 60:
        raise UserError(f"--max-downtime {args.max_downtime}: give seconds between 0 and 60, e.g. 0.3")
    try:
        if args.cancel:
            if not cancel(args.name):
                raise UserError(f"VM {args.name!r} is not migrating")
            print(f"cancelled the migration of {args.name}")
            return 0
        show, done = _display(args.name)
        verified: list[int] = []
        begun = time.monotonic()
        try:
            migrate(args.name, to=args.to, token=args.token or "", max_downtime_s=args.max_downtime,
                    on_progress=show, verify=verified.append if args.verify else None)
        finally:
            done()
    except MigrationError as exc:
        raise UserError(str(exc)) from None
    where = f" to {args.to}" if args.to else ""
    checked = f"; guest memory verified, {verified[0] >> 20} MiB equal" if verified else ""
    print(f"migrated {args.name}{where} in {time.monotonic() - begun:.1f} s{checked}")
    return 0


def _display(name: str):
    """(show, done) for QEMU's query-migrate answers: a live line on a terminal, nothing
    otherwise but the last figures."""
    last: dict = {}

    def summary(info: dict) -> str:
        ram = info.get("ram", {})
        mib = 1 << 20
        parts = [f"{info.get('status', '?')}",
                 f"RAM sent {ram.get('transferred', 0) / mib:.0f} MiB",
                 f"remaining {ram.get('remaining', 0) / mib:.0f} of {ram.get('total', 0) / mib:.0f} MiB",
                 f"dirtying {ram.get('dirty-pages-rate', 0)} pages/s"]
        if "expected-downtime" in info:
            parts.append(f"expected downtime {info['expected-downtime']} ms")
        if "downtime" in info:
            parts.append(f"downtime {info['downtime']} ms")
        if "total-time" in info and info.get("status") == "completed":
            parts.append(f"total {info['total-time']} ms")
        return ", ".join(parts)

    if not sys.stderr.isatty():
        def quiet(info: dict) -> None:
            last.update(info)

        def report() -> None:
            if last:
                print(f"{name}: {summary(last)}", file=sys.stderr)
        return quiet, report
    from rich.live import Live
    from rich.text import Text

    live = Live(Text(f"{name}: starting the new QEMU"), transient=False, refresh_per_second=8,
                console=None)
    live.start()

    def show(info: dict) -> None:
        last.update(info)
        live.update(Text(f"{name}: {summary(info)}"))

    return show, live.stop
