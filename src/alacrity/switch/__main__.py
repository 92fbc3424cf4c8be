"""`python -m alacrity.switch --control SOCK`: run one switch process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from alacrity.switch.process import DEFAULT_PREFIX, POLL_BUDGET_S, Switch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alacrity.switch", description=__doc__)
    parser.add_argument("--control", required=True, help="path of the control socket to create")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--mac-prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--ageing", type=float, default=300.0, help="FDB ageing time in seconds")
    parser.add_argument("--offloads", action="store_true", help="offer CSUM and TSO4/6 (passed through)")
    parser.add_argument("--poll-us", type=float, default=POLL_BUDGET_S * 1e6,
                        help="busy-poll budget after the last frame, in microseconds")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s switch[%(process)d] %(levelname)s %(message)s")
    switch = Switch(args.control, mtu=args.mtu, mac_prefix=args.mac_prefix, ageing_s=args.ageing,
                    offloads=args.offloads, poll_budget_s=args.poll_us * 1e-6)

    def stop(*_: object) -> None:
        switch.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        switch.run()
    finally:
        switch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
