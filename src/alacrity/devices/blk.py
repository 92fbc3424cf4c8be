"""virtio-blk over a raw image file."""

from __future__ import annotations

import os
from typing import Any

from alacrity.devices.base import Attribute, Device, Session, parse_bool, parse_size, parse_text
from alacrity.errors import invalid


def _parse_path(text: str) -> str:
    path = parse_text(4096)(text)
    if path and not os.path.isabs(path):
        raise ValueError(f"path must be absolute, got {path!r}")
    return path


class BlkDevice(Device):
    class_name = "blk"
    summary = "virtio-blk disk backed by a raw image file (created sparse at `size` if absent)"
    attributes = (
        Attribute("path", _parse_path, "", "absolute path of the raw image file"),
        Attribute("size", parse_size, "1G", "size used when the image is created (K/M/G/T)"),
        Attribute("readonly", parse_bool, "0", "1: the guest's writes fail with IOERR"),
        Attribute("shared", parse_bool, "0", "1: several clients may write at once"),
        Attribute("serial", parse_text(20), "", "ID string returned by GET_ID (default: name)"),
    )

    def check(self, name: str, value: Any) -> None:
        if name == "size" and value <= 0:
            raise invalid(f"{self.name}/size must be positive")

    def open(self, peer_pid: int) -> Session:
        raise NotImplementedError
