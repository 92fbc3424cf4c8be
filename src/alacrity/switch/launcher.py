"""Start and stop one switch process (`python -m alacrity.switch`), the daemon's side of it.

The daemon starts one per switch device, as a uid of its own leased from the daemon's
id range (`alacrity.ids`), and talks to it over a socketpair (`Control`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from typing import IO

from alacrity import ids
from alacrity.switch.coalesce import COALESCE_FRAMES, COALESCE_US, TX_DEFER_US
from alacrity.switch.control import DEFAULT_PREFIX, Control

log = logging.getLogger("alacrity.switch")


class SwitchProcess:
    """One running `python -m alacrity.switch`, reached over a socketpair, as a uid of
    its own leased from the daemon's id range (`alacrity.ids`)."""

    def __init__(self, name: str, *, mtu: int = 1500, mac_prefix: str = DEFAULT_PREFIX,
                 ageing_s: float = 300.0, offloads: bool = True, log_file: IO[bytes] | None = None,
                 timeout: float = 5.0, poll_us: float | None = None,
                 adaptive_poll: bool | None = None, coalesce_us: float = COALESCE_US,
                 coalesce_frames: int = COALESCE_FRAMES, tx_defer_us: float = TX_DEFER_US,
                 nice: int | None = None) -> None:
        self.id_range = ids.unprivileged
        self.uid: int | None = self.id_range.lease()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "alacrity.switch", "--control-fd", str(theirs.fileno()),
                "--uid", str(self.uid), "--mtu", str(mtu), "--mac-prefix", mac_prefix,
                "--ageing", str(ageing_s), "--offloads" if offloads else "--no-offloads",
                "--coalesce-us", str(coalesce_us), "--coalesce-frames", str(coalesce_frames),
                "--tx-defer-us", str(tx_defer_us)]
        if poll_us is not None:  # else the switch's own default (benchmarks try others)
            argv += ["--poll-us", str(poll_us)]
        if adaptive_poll is not None:
            argv.append("--adaptive-poll" if adaptive_poll else "--no-adaptive-poll")
        if nice is not None:  # else the switch's own default (benchmarks try others)
            argv += ["--nice", str(nice)]
        try:
            # Without `log_file`, its log lines go where the daemon's go.
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=log_file)
        except BaseException:
            self.release_id()
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = Control(ours, timeout=timeout)
        self.started = time.monotonic()
        log.info("switch %s: process %d started as uid %d", name, self.proc.pid, self.uid)

    def release_id(self) -> None:
        """Give the uid back; only once the process is gone."""
        if self.uid is not None:
            self.id_range.release(self.uid)
            self.uid = None

    def stop(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self.control.request({"op": "quit"})
        self.control.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.release_id()
