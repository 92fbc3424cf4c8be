"""Choose QEMU's accelerator: KVM where it can run a stock guest, TCG elsewhere."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str

    def qemu_args(self) -> list[str]:
        if self.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg", "-cpu", "max"]


def choose_accel(dev: str = "/dev/kvm", sys_module: str = "/sys/module") -> AccelChoice:
    forced = os.environ.get("ALACRITY_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"forced by ALACRITY_ACCEL={forced}")
    if forced:
        raise ValueError(f"ALACRITY_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return AccelChoice("tcg", f"{dev} not usable: {e.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return AccelChoice("tcg", f"KVM_GET_API_VERSION failed: {e.strerror}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return AccelChoice("tcg", f"unexpected KVM API version {version}")
    # kvm_pvm is a software (PVM) hypervisor that only runs specially built guests; when
    # it is loaded we cannot tell whether /dev/kvm is it, so stay safe and use TCG.
    if (Path(sys_module) / "kvm_pvm").exists():
        return AccelChoice(
            "tcg",
            "/dev/kvm is kvm_pvm (nested PVM), which cannot run a "
            "stock guest; set ALACRITY_ACCEL=kvm to override",
        )
    return AccelChoice("kvm", f"{dev} usable (API {version})")
