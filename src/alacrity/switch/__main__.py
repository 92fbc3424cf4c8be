"""`python -m alacrity.switch`: run one switch process (alacrityd starts one per switch device).

Started by root, it drops every privilege before it serves a frame: it keeps only
the control socket, and everything else it needs (vhost-user connections, guest
memory, eventfds, the tap) arrives later as file descriptors from the daemon.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import pwd
import signal
import socket
import sys

from alacrity.switch.coalesce import TX_DEFER_US, Bounds
from alacrity.switch.engines import ENGINE_ENV, ENGINE_KINDS
from alacrity.switch.process import DEFAULT_PREFIX, POLL_BUDGET_S, Switch
from alacrity.vhost_user import eventfd, sigbus

log = logging.getLogger("alacrity.switch")
_PR_SET_NO_NEW_PRIVS = 38
#: The default priority: the parent's. One run (bench/README.md, vm_net.py) with TCG guests
#: on a loaded 2-core host saw ping RTT fall from 1.46x the bridge's to 1.14x at nice -5;
#: one run is not enough to raise, by default, a process that guests feed above their own.
NICE = 0


def drop_privileges(user: str, uid: int | None = None) -> None:
    """Become `uid` (as uid and gid) or else `user`, with no supplementary groups and no
    way back (NO_NEW_PRIVS). Everything the process imports must be imported before
    this: the code may live where that user cannot read."""
    if os.geteuid() == 0:
        if uid is not None:
            gid = uid
        else:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise SystemExit(f"switch: no user {user!r}; pass --user with an existing one") from None
            uid, gid = entry.pw_uid, entry.pw_gid
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.chdir("/")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alacrity.switch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--control", help="path of a control socket to create and listen on")
    where.add_argument("--control-fd", type=int, help="an inherited, connected SOCK_SEQPACKET control socket")
    parser.add_argument("--user", default="nobody",
                        help="user to become after start-up, when started as root (default: nobody)")
    parser.add_argument("--uid", type=int,
                        help="become this uid and gid instead of --user (alacrityd gives each switch "
                             "its own, from its --id-range)")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--mac-prefix", default=DEFAULT_PREFIX, help="prefix of the MACs given to ports")
    parser.add_argument("--ageing", type=float, default=300.0, help="FDB ageing time in seconds")
    parser.add_argument("--offloads", action=argparse.BooleanOptionalAction, default=True,
                        help="offer CSUM and TSO4/6 to ports (default: on)")
    parser.add_argument("--poll-us", type=float, default=POLL_BUDGET_S * 1e6,
                        help="busy-poll budget after the last frame, in microseconds (the most)")
    parser.add_argument("--adaptive-poll", action=argparse.BooleanOptionalAction, default=True,
                        help="spin less (down to not at all) while peers come back later than the "
                             "budget, more while they come back within it (default: on)")
    parser.add_argument("--coalesce-us", type=float, default=0.0,
                        help="hold a port's interrupt up to this long while its frames come less than "
                             "--coalesce-quiet-us apart (0, the default: never)")
    parser.add_argument("--coalesce-frames", type=int, default=32,
                        help="...or until this many more frames reached that ring (default 32)")
    parser.add_argument("--coalesce-quiet-us", type=float, default=500.0,
                        help="an interrupt asked for this long after the last is sent at once (default 500)")
    parser.add_argument("--tx-defer-us", type=float, default=TX_DEFER_US,
                        help="let a port's TX interrupt wait up to this long for its driver to collect "
                             f"its sent buffers by itself (default {TX_DEFER_US:g}; 0: interrupt at once)")
    parser.add_argument("--nice", type=int, default=NICE,
                        help="scheduling priority, set before dropping privileges (default 0: the "
                             "parent's; -5 put the switch ahead of busy QEMUs in one measured run)")
    parser.add_argument("--engine", choices=ENGINE_KINDS, default=None,
                        help=f"forwarding engine (default: ${ENGINE_ENV}, else native; python if native "
                             "cannot be built)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s switch[%(process)d] %(levelname)s %(message)s")
    control = args.control
    if args.control_fd is not None:
        control = socket.socket(fileno=args.control_fd)
    try:
        switch = Switch(control, mtu=args.mtu, mac_prefix=args.mac_prefix, ageing_s=args.ageing,
                        offloads=args.offloads, poll_budget_s=args.poll_us * 1e-6, engine=args.engine,
                        adaptive_poll=args.adaptive_poll,
                        coalesce=Bounds(delay_us=args.coalesce_us, frames=args.coalesce_frames,
                                        quiet_us=args.coalesce_quiet_us, tx_defer_us=args.tx_defer_us))
    except ValueError as exc:
        parser.error(str(exc))
    sigbus.install()  # before dropping privileges: the build cache may be root's
    if args.nice:
        try:  # before dropping privileges: only root may raise a priority
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            log.warning("cannot set the switch's priority to %d: %s", args.nice, exc)
    drop_privileges(args.user, args.uid)
    log.info("serving as uid %d", os.getuid())

    def stop(*_: object) -> None:
        switch.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    eventfd.install_handler()
    try:
        switch.run()
    finally:
        switch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
