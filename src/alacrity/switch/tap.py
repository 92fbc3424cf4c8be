"""A tap device as a switch port: the uplink that joins the host's network stack to the segment.

`open_tap()` is the privileged half, run by the root daemon: it opens (or creates) the
tap with a virtio-net header on every frame and offloads on, sets the link up and returns
the fd, which the daemon hands to the unprivileged switch. `TapPort` is the switch's
side: an engine port without rings. The engine reads frames from the fd (each read is a
12-byte virtio_net_hdr_v1 and one frame, which may be a 64 KiB TSO frame or carry a
partial checksum, since the kernel may hand those over) and forwards them like TX chains;
frames to the host are written to the fd. Nothing here blocks: a full tap queue is a
counted drop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct

from alacrity.switch.port import Port
from alacrity.virtio import net as vn
from alacrity.virtio.features import F_VERSION_1, bit

log = logging.getLogger("alacrity.switch")

TUN_PATH = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFNAMSIZ = 16

#: The offloads the kernel may hand us (TUNSETOFFLOAD); it accepts all of them from us.
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
#: What a tap port has "negotiated": 12-byte headers, checksum and TSO offloads both ways.
TAP_FEATURES = (
    bit(F_VERSION_1) | bit(vn.F_MRG_RXBUF)
    | bit(vn.F_CSUM) | bit(vn.F_GUEST_CSUM)
    | bit(vn.F_HOST_TSO4) | bit(vn.F_HOST_TSO6)
    | bit(vn.F_GUEST_TSO4) | bit(vn.F_GUEST_TSO6) | bit(vn.F_GUEST_ECN)
)
#: One read: the header and the largest frame the kernel can give (with room to spare,
#: so that an oversized frame shows as too long rather than truncated).
READ_SIZE = vn.HEADER_SIZE + vn.MAX_GSO_FRAME + 4096
#: write() errors that lose one frame and say nothing about the fd: link down (EIO), a frame
#: the kernel refused (EINVAL), no memory or queue room.
_WRITE_DROPS = frozenset((errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE))

_HINTS = {
    errno.EBUSY: " (in use by another process)",
    errno.EINVAL: " (a device of that name exists and is not a tap, or has other queue flags)",
    errno.EPERM: " (needs CAP_NET_ADMIN, or the tap belongs to another user)",
    errno.ENOENT: " (no /dev/net/tun: is the tun module loaded?)",
}


def _ifreq(name: bytes, fmt: str = "", *values: int) -> bytes:
    """A 40-byte struct ifreq: the name, then the union (`fmt` values, zero-padded)."""
    return struct.pack("16s", name) + struct.pack(fmt, *values).ljust(24, b"\0")


def open_tap(name: str, *, mtu: int | None = None) -> int:
    """Open tap `name` (attaching to an existing tap, or making one that lives while the fd
    is open), set it up for the switch and bring its link up; returns a non-blocking,
    close-on-exec fd. Errors are OSErrors that name the tap."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or any(c <= 32 or c >= 127 for c in raw):
        raise OSError(errno.EINVAL, f"tap {name!r}: not an interface name (1 to 15 printable characters)")
    if mtu is not None and not 68 <= mtu <= 65535:
        raise OSError(errno.EINVAL, f"tap {name!r}: MTU {mtu} out of range (68 to 65535)")
    step = f"open {TUN_PATH}"
    fd = -1
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        step = "TUNSETIFF"
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(raw, "H", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        step = "TUNSETVNETHDRSZ"
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vn.HEADER_SIZE))
        step = "TUNSETOFFLOAD"
        fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if mtu is not None:
                step = f"set MTU {mtu}"
                fcntl.ioctl(sock, SIOCSIFMTU, _ifreq(raw, "i", mtu))
            step = "set the link up"
            flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(raw)), 16)[0]
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(raw, "H", flags | IFF_UP))
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        code = exc.errno or errno.EIO
        hint = _HINTS.get(code, "") if step in ("TUNSETIFF", f"open {TUN_PATH}") else ""
        raise OSError(code, f"tap {name!r}: {step}: {exc.strerror or exc}{hint}") from None
    return fd


class TapPort(Port):
    """A switch port over a tap fd from `open_tap()` (the port owns the fd: `close()` closes it).

    `read()` and `write()` are what the engine uses; `fileno()` is for the process loop to
    poll while idle (readable = frames to forward: run the engine)."""

    def __init__(self, port_id: int, fd: int, *, mtu: int = 1500, label: str = "", mac: bytes = b"") -> None:
        super().__init__(port_id, mac=mac, mtu=mtu, features=TAP_FEATURES, label=label or f"tap{port_id}")
        self.fd = fd
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self._into = [self.buf]
        self.closed = False
        self.changed = True  # for the process loop, as on a VhostPort
        self.write_errors = 0

    def fileno(self) -> int:
        return self.fd

    def kick_fds(self) -> list[int]:
        return []

    def service_socket(self, max_messages: int = 64) -> bool:
        """Nothing to service: a readable tap means frames, which the engine reads."""
        return not self.closed

    def read(self) -> int | None:
        """Read one header and frame into `buf`; its length, or None if nothing is queued."""
        try:
            return os.readv(self.fd, self._into)
        except BlockingIOError:
            return None

    def write(self, header: bytes, segs: list) -> bool:
        """Queue one frame to the host; False if the kernel dropped it (a full queue, link down)."""
        try:
            os.writev(self.fd, [header, *segs])
        except OSError as exc:
            if exc.errno not in _WRITE_DROPS:
                raise
            if exc.errno != errno.EAGAIN:
                self.write_errors += 1
                if self.write_errors <= 10 or self.write_errors % 1000 == 0:
                    log.info("%s: frame to the host dropped (%d so far): %s", self.label,
                             self.write_errors, exc)
            return False
        return True

    def signal(self, index: int) -> None:
        pass  # no rings, no interrupts

    def fail(self, reason: str) -> None:
        self.broken = self.broken or reason

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rx = self.tx = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


__all__ = ["TAP_FEATURES", "TapPort", "open_tap"]
