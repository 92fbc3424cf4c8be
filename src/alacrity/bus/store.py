"""Persistence of the bus configuration in embedded SQLite.

Every admin change is one transaction in WAL mode with synchronous=FULL, so a
kill -9 or a power cut at any moment leaves either the previous or the new
configuration on disk, never a mix.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from alacrity.bus import peers

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    class TEXT,
    attrs TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS buses (name TEXT PRIMARY KEY, users TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS links (
    bus TEXT NOT NULL REFERENCES buses(name),
    link_name TEXT NOT NULL,
    device TEXT NOT NULL REFERENCES devices(name),
    PRIMARY KEY (bus, link_name),
    UNIQUE (bus, device)
);
CREATE TABLE IF NOT EXISTS members (
    bus TEXT NOT NULL REFERENCES buses(name),
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    ident INTEGER,
    PRIMARY KEY (pid, start_time)
);
"""


@dataclass
class StoredDevice:
    name: str
    class_name: str | None
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    devices: list[StoredDevice]
    buses: list[str]
    links: list[tuple[str, str, str]]  # (bus, link_name, device)
    members: list[tuple[str, int, int, int | None]]  # (bus, pid, start_time, pidfs inode)
    users: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)  # bus -> its users


class Store:
    """One SQLite connection shared by threads under a lock."""

    def __init__(self, path: str | os.PathLike[str], boot_id: str | None = None) -> None:
        self.path = os.fspath(path)
        self.lock = threading.RLock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as cur:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            columns = [row[1] for row in cur.execute("PRAGMA table_info(members)")]
            if "ident" not in columns:  # databases written before pidfs identities
                cur.execute("ALTER TABLE members ADD COLUMN ident INTEGER")
            columns = [row[1] for row in cur.execute("PRAGMA table_info(buses)")]
            if "users" not in columns:  # databases written before buses had users
                cur.execute("ALTER TABLE buses ADD COLUMN users TEXT NOT NULL DEFAULT '[]'")
            cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._forget_other_boots(peers.boot_id() if boot_id is None else boot_id)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """One atomic change: committed on success, rolled back on any exception."""
        with self.lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _forget_other_boots(self, boot: str) -> None:
        # Start times count from boot, so members recorded in another boot could
        # match unrelated processes now.
        with self.transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key='boot_id'").fetchone()
            if row is None or row[0] != boot:
                cur.execute("DELETE FROM members")
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot,))

    def load(self) -> Snapshot:
        with self.lock:
            cur = self.conn.cursor()
            devices = [
                StoredDevice(name, cls, json.loads(attrs))
                for name, cls, attrs in cur.execute("SELECT name, class, attrs FROM devices ORDER BY name")
            ]
            rows = list(cur.execute("SELECT name, users FROM buses ORDER BY name"))
            buses = [name for name, _ in rows]
            users = {name: [tuple(e) for e in json.loads(text)] for name, text in rows if text != "[]"}
            links = list(cur.execute("SELECT bus, link_name, device FROM links ORDER BY bus"))
            members = list(cur.execute("SELECT bus, pid, start_time, ident FROM members ORDER BY bus"))
        return Snapshot(devices, buses, links, members, users)  # type: ignore[arg-type]

    def add_device(self, name: str) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT INTO devices (name) VALUES (?)", (name,))

    def save_device(self, name: str, class_name: str | None, attrs: dict[str, str]) -> None:
        with self.transaction() as cur:
            cur.execute(
                "UPDATE devices SET class=?, attrs=? WHERE name=?",
                (class_name, json.dumps(attrs, sort_keys=True), name),
            )

    def remove_device(self, name: str) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM devices WHERE name=?", (name,))

    def add_bus(self, name: str) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT INTO buses (name) VALUES (?)", (name,))

    def remove_bus(self, name: str) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM members WHERE bus=?", (name,))
            cur.execute("DELETE FROM buses WHERE name=?", (name,))

    def save_users(self, bus: str, users: list[tuple[str, int, str]]) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE buses SET users=? WHERE name=?", (json.dumps(users), bus))

    def add_link(self, bus: str, link_name: str, device: str) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT INTO links VALUES (?, ?, ?)", (bus, link_name, device))

    def remove_link(self, bus: str, link_name: str) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM links WHERE bus=? AND link_name=?", (bus, link_name))

    def add_member(self, bus: str, pid: int, start_time: int, ident: int | None = None) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?)", (bus, pid, start_time, ident))

    def remove_members(self, tasks: list[tuple[int, int]]) -> None:
        with self.transaction() as cur:
            cur.executemany("DELETE FROM members WHERE pid=? AND start_time=?", tasks)

    def close(self) -> None:
        with self.lock:
            self.conn.close()
