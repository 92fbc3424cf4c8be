"""Device classes, one module each. `CLASSES` is the registry the bus model offers."""

from alacrity.devices.base import Device
from alacrity.devices.blk import BlkDevice
from alacrity.devices.switch import SwitchDevice

CLASSES: dict[str, type[Device]] = {cls.class_name: cls for cls in (BlkDevice, SwitchDevice)}
