"""The device-session interface: what the vhost-user layer asks of a device.

One `Session` serves one vhost-user connection. The backend state machine (backend.py)
maps protocol messages onto these hooks; device classes (alacrity.devices) and the
switch's ports implement them. The two verbs of a vbus device are here: `call` is the
control hooks (features, config space), `shm` is a ring being started, serviced and
stopped. Defined here, where it is called, so this layer never imports a device.
"""

from __future__ import annotations

from typing import ClassVar

from alacrity.virtio.device_queue import DeviceQueue


class Session:
    """One connection's view of a device. Subclasses override what their device needs."""

    #: virtio feature bits the device offers (the layer adds the transport's own).
    device_features: int = 0
    #: Rings the device has, and the largest size a driver may give each.
    num_queues: ClassVar[int] = 1
    max_queue_size: ClassVar[int] = 1024

    # -- call: control
    def set_features(self, features: int) -> None:
        """The driver accepted `features` (a subset of what was offered, transport bits included)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes `offset..offset+size` of the config space; shorter is padded with zeros.
        `offset` and `size` are bounded by the layer (at most 256)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote `data` at `offset` of the config space; ignored unless overridden."""

    def send_rarp(self, mac: bytes) -> None:
        """A migrated guest with MAC `mac` (6 bytes) now runs behind this connection: tell the
        network (SEND_RARP). The layer offers the RARP protocol feature only to sessions that
        override this. ProtocolError refuses the MAC and breaks the connection."""

    # -- shm: rings
    def start(self, index: int, queue: DeviceQueue) -> None:
        """Ring `index` was registered and enabled; `queue` is its device side."""

    def process(self, index: int, queue: DeviceQueue) -> int:
        """Service ring `index`: complete what is available; return how many requests.
        QueueError (a malformed ring) breaks the connection."""
        return 0

    def buffers_are_work(self, index: int) -> bool:
        """Whether buffers waiting in ring `index` are work in themselves (requests: blk,
        rng, a transmit ring). A receive ring's buffers are only room: its work is what the
        device has to say, announced by `doorbell`, so its worker sleeps with buffers
        waiting instead of spinning over them."""
        return True

    def doorbell(self, index: int) -> int | None:
        """An eventfd the device writes when ring `index` has work that no kick announces
        (bytes from the host for a receive ring); the ring's worker wakes on it as on a kick
        and reads it. None: the ring only has work when the driver kicks."""
        return None

    def stop(self, index: int) -> None:
        """Ring `index` stopped (its worker has gone or is going)."""

    def close(self) -> None:
        """The connection ended."""
