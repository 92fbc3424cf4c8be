"""User ids for the bus's unprivileged processes: switches, and jailed guests' QEMUs.

The administrator gives alacrityd a range (`--id-range START:COUNT`, default a block of
1000 ids above 900000). Each process it starts takes one id of its own, as uid and gid,
so no two running processes, and nothing outside the bus, share credentials: a
compromised switch cannot signal or ptrace another. An id is handed out only if no
process on the host runs with it, so a crashed process's leftovers never share it.

A switch's id is leased until the daemon releases it. A guest's is reserved for
`RESERVE_S` (`alacrity vm run` asks the gate for one, then starts its jail): after that,
the jailed QEMU running with it is what keeps it taken, and its exit frees it.
"""

from __future__ import annotations

import os
import re
import threading
import time

DEFAULT_START = 900000
DEFAULT_COUNT = 1000
#: How long an id given to `vm run` stays reserved while its jail starts.
RESERVE_S = 60.0


class IdsExhausted(Exception):
    """Every id of the range is in use."""


def parse_range(text: str) -> tuple[int, int]:
    """`START:COUNT` -> (start, count). Raises ValueError with what to write."""
    match = re.fullmatch(r"(\d{1,10}):(\d{1,7})", text.strip())
    if not match:
        raise ValueError(f"bad id range {text!r}: write START:COUNT, e.g. 900000:1000")
    start, count = int(match.group(1)), int(match.group(2))
    if start < 1000 or count < 1 or start + count > 0xFFFFFFFE:
        raise ValueError(f"id range {text!r}: START must be at least 1000, COUNT at least 1, "
                         "and the range below 4294967294")
    return start, count


def _uids_in_use() -> set[int]:
    """Real, effective, saved and filesystem uids of every process now on the host."""
    used: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        used.update(int(v) for v in line.split()[1:])
                        break
        except (OSError, ValueError):
            continue
    return used


class IdRange:
    """Leases ids from [start, start + count); `release` gives one back."""

    def __init__(self, start: int = DEFAULT_START, count: int = DEFAULT_COUNT) -> None:
        self.start, self.count = start, count
        self.leased: dict[int, float] = {}  # uid -> when the lease ends (inf: at release)
        self.lock = threading.Lock()

    def lease(self, reserve_s: float | None = None) -> int:
        """A free id, leased until `release` or, with `reserve_s`, for that long."""
        with self.lock:
            now, running = time.monotonic(), _uids_in_use()
            # A reservation ends early once a process runs with its id: from then on that
            # process holds the id, and its exit frees it at once.
            self.leased = {uid: end for uid, end in self.leased.items()
                           if end == float("inf") or (end > now and uid not in running)}
            in_use = running | set(self.leased)
            for uid in range(self.start, self.start + self.count):
                if uid not in in_use:
                    self.leased[uid] = now + reserve_s if reserve_s is not None else float("inf")
                    return uid
        raise IdsExhausted(f"all {self.count} ids from {self.start} are in use: give alacrityd a larger "
                           "--id-range")

    def release(self, uid: int) -> None:
        with self.lock:
            self.leased.pop(uid, None)


#: The daemon's range; alacrityd replaces it from its --id-range option at start.
unprivileged = IdRange()


def configure(start: int, count: int) -> None:
    global unprivileged
    unprivileged = IdRange(start, count)
