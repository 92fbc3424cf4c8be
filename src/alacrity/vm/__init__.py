"""Guests: the default image, QEMU launching, QMP control."""

from .accel import AccelChoice, choose_accel
from .image import GuestImage, build_image, default_image
from .machine import DEFAULT_MACHINE, MACHINES, virtio_device
from .qemu import VM, VmSpec, run_command
from .runtime import VmError, VmRecord, list_vms, stop_vm

__all__ = [
    "DEFAULT_MACHINE", "MACHINES", "VM", "AccelChoice", "GuestImage", "VmError", "VmRecord",
    "VmSpec", "build_image", "choose_accel", "default_image", "list_vms", "run_command",
    "stop_vm", "virtio_device",
]
