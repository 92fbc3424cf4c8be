"""virtio feature bits and device status values (virtio 1.1, section 6 and per-device)."""

F_NOTIFY_ON_EMPTY = 24
RING_F_INDIRECT_DESC = 28
RING_F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_IN_ORDER = 35  # the device uses buffers in the order they were made available

STATUS_DEVICE_NEEDS_RESET = 0x40


def bit(n: int) -> int:
    return 1 << n


def has(features: int, n: int) -> bool:
    return bool(features >> n & 1)
