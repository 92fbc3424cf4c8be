"""The `alacrity` command (and `alacrityd`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from alacrity import __version__
from alacrity.cli.errors import UserError
from alacrity.errors import AdminError

EPILOG = """\
A bus is built with plain filesystem operations on the admin tree (as root):
  mkdir /run/alacrity/devices/disk0
  echo blk > /run/alacrity/devices/disk0/type
  echo /var/lib/alacrity/disk0.img > /run/alacrity/devices/disk0/path
  mkdir /run/alacrity/buses/lab
  ln -s ../../devices/disk0 /run/alacrity/buses/lab/disk0
then a VM joins it:
  alacrity vm run --bus lab --cmd 'cat /sys/block/vda/size'
"""

VM_RUN_EPILOG = """\
Each device on the bus is attached as its class says: a blk disk (vda, vdb, ...), a
switch as a virtio-net NIC (eth0, eth1, ... in the order 'alacrity bus show' lists them;
the guest configures eth0 from --ip/--gw), an rng as /dev/hwrng, a console device as the
serial console (kept by the bus: 'alacrity vm console NAME'). Two guests on one switch,
each on its own bus (a disk is written by one VM at a time unless its 'shared' is 1):
  alacrity vm run --bus lab1 --name a --ip 10.0.0.1/24 --cmd 'iperf3 -s -1'
  alacrity vm run --bus lab2 --name b --ip 10.0.0.2/24 --cmd 'iperf3 -c 10.0.0.1 -t 5'
(one switch in both buses: mkdir devices/lan0; echo switch > devices/lan0/type;
 ln -s ../../devices/lan0 buses/lab1/lan0; ln -s ../../devices/lan0 buses/lab2/lan0;
 scripts/tour does all of it)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alacrity",
        description="Alacrity: a virtual I/O bus for KVM virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alacrity {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser("daemon", help="run alacrityd, the bus daemon (root)")
    add_daemon_arguments(daemon)

    image = sub.add_parser("image", help="build the default guest (kernel + initramfs)")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser("build", help="fetch the Debian cloud kernel and build the initramfs")
    build.add_argument("--cache", type=Path, help="cache directory (default ~/.cache/alacrity)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")

    vm = sub.add_parser("vm", help="run and manage QEMU guests on a bus")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    run = vm_sub.add_parser(
        "run",
        help="boot a guest on a bus, with one vhost-user device per device on the bus",
        description="Join BUS, ask the gate for its devices, and boot QEMU with each of them "
        "attached as its class says. The guest's exit status (from --cmd) becomes ours.",
        epilog=VM_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--bus", required=True, help="the bus to join (admin tree: buses/BUS)")
    run.add_argument("--name", help="VM name for 'vm list'/'vm stop' (default: BUS-PID)")
    run.add_argument("--mem", type=int, default=512, metavar="MIB", help="guest memory (default 512)")
    run.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
    run.add_argument("--kernel", type=Path, help="kernel (default: the built default guest)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the built default guest)")
    run.add_argument("--cmd", help="shell command to run in the guest, then power off")
    run.add_argument("--log", type=Path, help="send the serial console to this file (with a console "
                     "device on the bus: QEMU's copy of what it sends there)")
    run.add_argument("--append", default="", help="extra kernel command line")
    run.add_argument("--timeout", type=float, default=0, help="kill the VM after this many seconds")
    run.add_argument("--detach", action="store_true",
                     help="boot the guest, wait until it is ready, print its name and leave it running: "
                     "its console goes to the bus's console device if it has one (alacrity vm console "
                     "NAME), and to a log in its run directory (shown by 'alacrity vm list'); stop it "
                     "with 'alacrity vm stop NAME'")
    run.add_argument("--incoming", metavar="tcp:ADDR:PORT",
                     help="do not boot: wait on ADDR:PORT for a running VM that 'alacrity vm migrate "
                     "NAME --to tcp:ADDR:PORT --token TOKEN' sends from another host, then run it here "
                     "(with --detach, the same --name, and a bus with devices of the same names); "
                     "TOKEN is printed, or given with --token")
    run.add_argument("--token", help="with --incoming: the secret the source must show (default: a "
                     "random one, printed)")
    run.add_argument("--no-jail", action="store_true",
                     help="run QEMU as root, unjailed, for debugging (root only). By default QEMU runs "
                     "as a uid of its own from alacrityd's --id-range, with no capabilities, "
                     "no_new_privs, QEMU's seccomp sandbox, its own mount, pid, ipc, uts and (empty) "
                     "network namespaces, and a root holding only what it needs (docs/vm.md)")
    net = run.add_argument_group("network (switch devices on the bus)")
    net.add_argument("--ip", metavar="ADDR/PREFIX",
                     help="address of eth0, the NIC on the bus's first switch (e.g. 10.0.0.2/24)")
    net.add_argument("--gw", metavar="ADDR", help="default route via ADDR (needs --ip)")
    net.add_argument("--mac", action="append", metavar="MAC",
                     help="MAC of the next NIC (repeat for eth1, ...); default: derived from --name, "
                     "random without one (locally administered, unicast)")
    vm_sub.add_parser("list", help="list running VMs")
    stop = vm_sub.add_parser("stop", help="power a VM off (then kill it)")
    stop.add_argument("name")
    from alacrity.cli import console_cmd, guest_cmd, migrate_cmd

    console_cmd.add_parser(vm_sub)
    guest_cmd.add_parsers(vm_sub)
    migrate_cmd.add_parser(vm_sub)

    bus = sub.add_parser("bus", help="see your bus through the gate, or run a command in a bus")
    bus_sub = bus.add_subparsers(dest="bus_command", required=True, metavar="ACTION")
    bus_sub.add_parser("show", help="the bus this process belongs to and its devices")
    exec_ = bus_sub.add_parser("exec", help="admit this process to BUS (root), then exec COMMAND")
    exec_.add_argument("bus")
    exec_.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND")

    from alacrity.cli import check_cmd

    check_cmd.add_parser(sub)
    from alacrity.cli import top_cmd

    top_cmd.add_parser(sub)
    return parser


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mount", type=Path, default=Path("/run/alacrity"), help="admin tree (FUSE)")
    parser.add_argument(
        "--state-dir", type=Path, default=Path("/var/lib/alacrity"), help="persistent configuration"
    )
    parser.add_argument("--run-dir", type=Path, default=Path("/run/alacrityd"), help="sockets")
    parser.add_argument(
        "--id-range", default="900000:1000", metavar="START:COUNT",
        help="uids (and gids) for the bus's unprivileged processes, one each: switches and "
        "jailed guests' QEMUs (default 900000:1000; no other user or service may use them)",
    )
    parser.add_argument(
        "--admin-group", metavar="GROUP",
        help="a group whose members may read the admin tree (default: root only)",
    )
    parser.add_argument(
        "--metrics", action="append", metavar="ADDR",
        help="serve Prometheus metrics (GET /metrics) on ADDR: HOST:PORT (e.g. 127.0.0.1:9464), "
        "[IPV6]:PORT or unix:PATH; repeat for several; 'off' for none (default: unix:RUN_DIR/"
        "metrics.sock, root only, always served unless another unix: is given; docs/metrics.md)",
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command == "daemon":
            return run_daemon(args)
        if args.command == "image":
            from alacrity.cli.image_cmd import image_build

            return image_build(args)
        if args.command == "vm" and args.vm_command == "console":
            from alacrity.cli import console_cmd

            return console_cmd.run(args)
        if args.command == "vm" and args.vm_command in ("exec", "cp"):
            from alacrity.cli import guest_cmd

            return guest_cmd.exec_(args) if args.vm_command == "exec" else guest_cmd.cp(args)
        if args.command == "vm" and args.vm_command == "migrate":
            from alacrity.cli import migrate_cmd

            return migrate_cmd.run(args)
        if args.command == "vm":
            from alacrity.cli import vm_cmd

            return vm_cmd.dispatch(args)
        if args.command == "bus":
            from alacrity.cli import bus_cmd

            return bus_cmd.dispatch(args)
        if args.command == "check":
            from alacrity.cli import check_cmd

            return check_cmd.run(args)
        if args.command == "top":
            from alacrity.cli import top_cmd

            return top_cmd.run(args)
    except (UserError, AdminError) as exc:
        print(f"alacrity: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run_daemon(args: argparse.Namespace) -> int:
    import grp

    from alacrity import ids
    from alacrity.daemon import Daemon, DaemonConfig

    try:
        id_range = ids.parse_range(args.id_range)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    admin_gid = None
    if args.admin_group:
        try:
            admin_gid = grp.getgrnam(args.admin_group).gr_gid
        except KeyError:
            why = f"no group {args.admin_group!r}: create it (groupadd) or drop --admin-group"
            raise UserError(why) from None
    from alacrity.bus import metrics

    try:
        metrics.endpoints(args.metrics, args.run_dir)  # checked before anything starts
        Daemon(DaemonConfig(args.mount, args.state_dir, args.run_dir, id_range, admin_gid,
                            metrics=tuple(args.metrics or ()))).run()
    except (ValueError, metrics.MetricsError) as exc:
        raise UserError(str(exc)) from None
    return 0


def daemon_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alacrityd", description="The Alacrity bus daemon.")
    add_daemon_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run_daemon(args)
    except UserError as exc:
        print(f"alacrityd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
