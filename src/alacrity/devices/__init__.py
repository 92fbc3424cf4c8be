"""Device classes, one module each. `CLASSES` is the registry: the bus model offers these
classes, `alacrity vm run` asks them how QEMU attaches their devices, and the client asks
them for their driver. A new class is a module here and one entry below."""

from alacrity.devices.base import Device, Slot
from alacrity.devices.blk import BlkDevice
from alacrity.devices.console import ConsoleDevice
from alacrity.devices.rng import RngDevice
from alacrity.devices.switch import SwitchDevice
from alacrity.devices.vsock import VsockDevice

CLASSES: dict[str, type[Device]] = {cls.class_name: cls for cls in (BlkDevice, SwitchDevice, RngDevice,
                                                                     ConsoleDevice, VsockDevice)}

__all__ = ["CLASSES", "Device", "Slot", "device_class"]


def device_class(name: str) -> type[Device]:
    """The class registered as `name`. KeyError names the classes there are."""
    try:
        return CLASSES[name]
    except KeyError:
        raise KeyError(f"no device class {name!r} (there are: {', '.join(CLASSES)})") from None
