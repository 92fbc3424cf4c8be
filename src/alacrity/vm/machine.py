"""QEMU machine types and the arguments that differ between them."""

from __future__ import annotations

from dataclasses import dataclass


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
# QEMU 7.2 names most virtio-mmio models KIND-device, but not these.
_MMIO_NAMES = {k: k for k in ("vhost-user-blk", "vhost-user-scsi", "vhost-user-rng",
                              "vhost-user-input", "vhost-user-gpu")}
# Fastest to ALACRITY-READY under TCG (microvm 2.3 s, q35 2.4 s, pc 2.5 s; docs/vm.md).
DEFAULT_MACHINE = "microvm"


def machine(name: str) -> Machine:
    try:
        return MACHINES[name]
    except KeyError:
        raise ValueError(f"unknown machine type {name!r}; one of {', '.join(MACHINES)}") from None


def virtio_device(kind: str, machine_name: str, **props: str | int) -> list[str]:
    """`-device` arguments for a virtio device on this machine's transport, e.g.
    virtio_device("vhost-user-blk", "pc", chardev="vu0", num_queues=1). Properties with
    underscores are written with dashes; PCI-only ones (vectors) are dropped on mmio."""
    m = machine(machine_name)
    model = f"{kind}-pci" if m.transport == "pci" else _MMIO_NAMES.get(kind, f"{kind}-device")
    parts = [model]
    for key, value in props.items():
        if m.transport != "pci" and key in ("vectors", "addr", "bus"):
            continue
        parts.append(f"{key.replace('_', '-')}={value}")
    return ["-device", ",".join(parts)]
