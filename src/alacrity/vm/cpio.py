"""A newc ("070701") cpio writer, so an initramfs needs neither root nor a cpio binary."""

from __future__ import annotations

import gzip
import stat
from pathlib import PurePosixPath
from typing import BinaryIO

_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes entries in order; parent directories are added on demand because the
    kernel's unpacker does not create them."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        name = str(PurePosixPath("/", name))[1:]
        if not name or name in self._names:
            return
        for parent in reversed(PurePosixPath(name).parents):
            p = str(parent)
            if p != "." and p not in self._names:
                self._names.add(p)
                self._emit(p, stat.S_IFDIR | 0o755, b"", (0, 0), 2)
        self._names.add(name)
        self._emit(name, mode, data, rdev, nlink)

    def _emit(self, name: str, mode: int, data: bytes, rdev: tuple[int, int], nlink: int) -> None:
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        )
        self._ino += 1
        raw = _MAGIC + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._out.write(raw + _pad4(len(raw)))
        self._out.write(data + _pad4(len(data)))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer; the caller owns the stream."""
        self._ino = 0
        self._emit(TRAILER, 0, b"", (0, 0), 1)


def open_gzip(path: str, level: int = 6) -> BinaryIO:
    """A gzip stream with a fixed mtime, so the same inputs give the same bytes."""
    return gzip.GzipFile(path, "wb", compresslevel=level, mtime=0)  # type: ignore[return-value]


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (name, mode, data); for tests and inspection."""
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode = fields[11], fields[6], fields[1]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == TRAILER:
            return out
        out.append((name, mode, body))
