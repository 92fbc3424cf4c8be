"""QEMU machine types and the arguments that differ between them."""

from __future__ import annotations

from dataclasses import dataclass

from alacrity.devices.base import qemu_device


@dataclass(frozen=True)
class Machine:
    name: str
    options: str  # appended to `-machine NAME,`
    transport: str  # "pci" or "mmio": picks the -pci or -device flavour of virtio devices
    globals_: tuple[str, ...] = ()
    append: str = ""


MACHINES: dict[str, Machine] = {
    "pc": Machine("pc", "", "pci"),
    "q35": Machine("q35", "", "pci"),
    # No PCI and no firmware tables to walk; the cloud kernel finds the virtio-mmio
    # devices through ACPI. Without tsc_early_khz the kernel can hang calibrating the TSC.
    "microvm": Machine("microvm", "acpi=on", "mmio",
                       ("virtio-mmio.force-legacy=false",), "tsc_early_khz=2445000"),
}
# Fastest to ALACRITY-READY under TCG (microvm 2.3 s, q35 2.4 s, pc 2.5 s; docs/vm.md).
DEFAULT_MACHINE = "microvm"


def machine(name: str) -> Machine:
    try:
        return MACHINES[name]
    except KeyError:
        raise ValueError(f"unknown machine type {name!r}; one of {', '.join(MACHINES)}") from None


def virtio_device(kind: str, machine_name: str, **props: str | int) -> list[str]:
    """`-device` arguments for a virtio device on this machine's transport, e.g.
    virtio_device("vhost-user-blk", "pc", chardev="vu0", num_queues=1)."""
    return qemu_device(kind, machine(machine_name).transport, **props)
