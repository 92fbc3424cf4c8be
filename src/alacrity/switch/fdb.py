"""The forwarding database: which port each learned MAC address was last seen on.

Entries age out after `ageing_s` seconds without traffic from that address; the table
holds at most `max_entries`, so a port spraying random source addresses evicts only
the oldest entries and cannot grow the switch's memory."""

from __future__ import annotations

from dataclasses import dataclass

from alacrity.virtio.net import mac_text


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    port: int
    age_s: float


class Fdb:
    def __init__(self, *, ageing_s: float = 300.0, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("an FDB needs room for at least one entry")
        self.ageing_s = ageing_s
        self.max_entries = max_entries
        # mac -> [port, last seen]; a list so that a refresh is one store, not a new object.
        self.table: dict[bytes, list] = {}
        self.moves = 0
        self.evictions = 0

    def learn(self, mac: bytes, port: int, now: float) -> None:
        """`mac` was the source of a frame from `port` at `now`. Group addresses are not learned."""
        entry = self.table.get(mac)
        if entry is not None:
            if entry[0] != port:
                entry[0] = port
                self.moves += 1
            entry[1] = now
            return
        if mac[0] & 1:
            return
        if len(self.table) >= self.max_entries:
            self._make_room(now)
        self.table[mac] = [port, now]

    def _make_room(self, now: float) -> None:
        self.expire(now)
        while len(self.table) >= self.max_entries:
            # Insertion order: the first entry is the one learned longest ago.
            del self.table[next(iter(self.table))]
            self.evictions += 1

    def lookup(self, mac: bytes, now: float) -> int | None:
        entry = self.table.get(mac)
        if entry is None:
            return None
        if now - entry[1] > self.ageing_s:
            del self.table[mac]
            return None
        return entry[0]

    def forget_port(self, port: int) -> None:
        for mac in [m for m, e in self.table.items() if e[0] == port]:
            del self.table[mac]

    def expire(self, now: float) -> None:
        for mac in [m for m, e in self.table.items() if now - e[1] > self.ageing_s]:
            del self.table[mac]

    def entries(self, now: float) -> list[FdbEntry]:
        """The live entries, for the `fdb` view."""
        self.expire(now)
        return [FdbEntry(mac_text(m), e[0], round(now - e[1], 3)) for m, e in sorted(self.table.items())]

    def __len__(self) -> int:
        return len(self.table)
