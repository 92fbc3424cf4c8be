"""Guest image, accelerator choice, and real QEMU guests under TCG (no mocks)."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alacrity.devices import Slot
from alacrity.devices.blk import BlkDevice
from alacrity.vm.accel import AccelChoice, choose_accel
from alacrity.vm.cpio import CpioWriter, read_newc
from alacrity.vm.image import GuestImage, default_image
from alacrity.vm.machine import virtio_device
from alacrity.vm.modules import parse_modules_dep, resolve
from alacrity.vm.qemu import QEMU, TCG_SAFE_MIGRATION, VM, VmSpec, build_command, qemu_version, ram_size
from alacrity.vm.qmp import QmpClient
from alacrity.vm.runtime import VmError, list_vms, stop_vm

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")


# --- unit tests ---------------------------------------------------------------------

def _sample_archive() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("bin/tool", b"abc", mode=0o755)
    w.symlink("bin/sh", "/bin/busybox")
    w.chardev("dev/console", 5, 1)
    w.directory("empty")
    w.close()
    return buf.getvalue()


def test_cpio_roundtrip_python() -> None:
    entries = {name: (mode, data) for name, mode, data in read_newc(_sample_archive())}
    assert list(entries) == ["bin", "bin/tool", "bin/sh", "dev", "dev/console", "empty"]
    assert entries["bin/tool"] == (0o100755, b"abc")
    assert entries["bin/sh"] == (0o120777, b"/bin/busybox")
    assert entries["dev/console"][0] == 0o020600
    assert entries["bin"][0] == 0o040755


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_readable_by_gnu_cpio() -> None:
    out = subprocess.run(["cpio", "-itv"], input=_sample_archive(), capture_output=True,
                         check=True).stdout.decode()
    lines = out.splitlines()
    assert [line.split()[-1] for line in lines if "->" not in line] == \
        ["bin", "bin/tool", "dev", "dev/console", "empty"]
    assert any("bin/sh -> /bin/busybox" in line for line in lines)
    assert any(line.startswith("crw") and "5," in line for line in lines)


def test_modules_in_dependency_order() -> None:
    table = parse_modules_dep(
        "kernel/a/virtio_pci.ko.xz: kernel/a/virtio.ko.xz kernel/a/virtio_ring.ko.xz\n"
        "kernel/a/virtio.ko.xz: kernel/a/virtio_ring.ko.xz\n"
        "kernel/a/virtio_ring.ko.xz:\n"
        "kernel/a/virtio_blk.ko.xz: kernel/a/virtio.ko.xz\n")
    assert resolve(table, ("virtio_pci", "virtio_blk", "absent")) == \
        ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]


def test_accel_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALACRITY_ACCEL", "tcg")
    assert choose_accel().accel == "tcg"
    monkeypatch.setenv("ALACRITY_ACCEL", "kvm")
    choice = choose_accel(dev="/nonexistent")
    assert choice.accel == "kvm" and "ALACRITY_ACCEL" in choice.reason
    monkeypatch.setenv("ALACRITY_ACCEL", "xen")
    with pytest.raises(ValueError):
        choose_accel()


def test_accel_detects_missing_kvm_and_pvm(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.delenv("ALACRITY_ACCEL", raising=False)
    assert choose_accel(dev=str(tmp_path / "kvm")).accel == "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        (tmp_path / "kvm_pvm").mkdir()
        choice = choose_accel(sys_module=str(tmp_path))
        assert choice.accel == "tcg" and "kvm_pvm" in choice.reason


def test_command_line_per_machine(tmp_path: Path) -> None:
    disk = BlkDevice.qemu_args(Slot("disk0", "/s,1.sock", "mmio", "t", "vu0", 0))
    assert disk == ["-chardev", "socket,id=vu0,path=/s,,1.sock,reconnect=1",
                    "-device", "vhost-user-blk,chardev=vu0,num-queues=1"]
    spec = VmSpec("t", Path("k"), Path("i"), cmd="exit 7", devices=[disk],
                  accel="tcg", console=tmp_path / "log", machine="microvm")
    vm = VM(spec)
    args = build_command(spec, tmp_path, vm.accel)
    assert "vhost-user-blk,chardev=vu0,num-queues=1" in args
    assert "virtio-mmio.force-legacy=false" in args
    append = args[args.index("-append") + 1]
    assert "tsc_early_khz=" in append
    assert f"alacrity.cmd={base64.b64encode(b'exit 7').decode()}" in append
    ram = args[args.index("-m") + 1]
    assert f"memory-backend-memfd,id=mem,size={ram},share=on" in args
    if qemu_version() < TCG_SAFE_MIGRATION:  # not a multiple of 64 pages: qemu.TCG_RAM_PAD_KIB
        kib = int(ram.removesuffix("K"))
        assert ram.endswith("K") and kib >= 512 * 1024 and kib * 1024 % (64 * 4096) != 0, ram
    else:
        assert ram == "512M"
    assert ram_size(512, AccelChoice("kvm", "KVM logs dirty pages itself")) == "512M"
    assert "vhost-user-blk-pci,chardev=vu0,num-queues=1" in BlkDevice.qemu_args(
        Slot("disk0", "/s.sock", "pci", "t", "vu0", 0))
    assert virtio_device("virtio-net", "pc", netdev="n0", vectors=0) == \
        ["-device", "virtio-net-pci,netdev=n0,vectors=0"]
    assert virtio_device("virtio-net", "microvm", netdev="n0", vectors=0) == \
        ["-device", "virtio-net-device,netdev=n0"]
    spec.cmd = "x" * 2000
    with pytest.raises(VmError):
        build_command(spec, tmp_path, vm.accel)


# --- real guests ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def image() -> GuestImage:
    return default_image(progress=False)


def test_initramfs_contents(image: GuestImage) -> None:
    entries = {n: (m, d) for n, m, d in read_newc(gzip.decompress(image.initrd.read_bytes()))}
    assert entries["dev/console"][0] & 0o170000 == 0o020000
    assert entries["init"][1].startswith(b"#!/bin/busybox sh")
    mods = entries["etc/alacrity/modules"][1].decode().split()
    assert mods.index("virtio_ring") < mods.index("virtio") < mods.index("virtio_pci")
    assert mods.index("virtio") < mods.index("virtio_blk")
    for name in ("virtio_pci", "virtio_blk", "virtio_net"):
        assert name in mods
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"


@pytest.fixture
def make_vm(image: GuestImage, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., VM]]:
    monkeypatch.setenv("ALACRITY_VM_DIR", str(tmp_path / "vms"))
    monkeypatch.setenv("ALACRITY_ACCEL", "tcg")
    started: list[VM] = []

    def make(name: str, **kw: object) -> VM:
        kw.setdefault("console", tmp_path / f"{name}.log")
        vm = VM(VmSpec(name, image.kernel, image.initrd, **kw))  # type: ignore[arg-type]
        started.append(vm)
        return vm.start()

    yield make
    for vm in started:
        vm.kill()  # kills QEMU's own process group


@pytest.mark.vm
@needs_qemu
def test_boots_to_ready_and_answers_qmp(make_vm: Callable[..., VM]) -> None:
    vm = make_vm("ready")
    vm.wait_ready(120)
    with QmpClient(vm.qmp_path) as qmp:
        assert qmp.execute("query-status")["status"] == "running"
    vm.stop()
    assert vm.proc is not None and vm.proc.returncode == 0  # clean ACPI poweroff


@pytest.mark.vm
@needs_qemu
def test_exit_status_passes_through_stdio_console(make_vm: Callable[..., VM],
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    vm = make_vm("exit7", cmd="echo guest says hi; exit 7", console="stdio")
    assert vm.wait_exit(120) == 7
    out = capfd.readouterr().out
    assert "ALACRITY-READY" in out and "guest says hi" in out


@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("machine", ["microvm", "pc"])
def test_virtio_blk_write_reaches_host_file(make_vm: Callable[..., VM], tmp_path: Path,
                                            machine: str) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    cmd = "printf 'ALACRITY%.0s' $(seq 64) | dd of=/dev/vda bs=512 seek=1 count=1 conv=fsync"
    vm = make_vm(f"blk-{machine}", machine=machine, cmd=cmd, devices=[
        ["-drive", f"file={disk},if=none,id=d0,format=raw"],
        virtio_device("virtio-blk", machine, drive="d0")])
    assert vm.wait_exit(120) == 0
    data = disk.read_bytes()
    assert data[512:1024] == b"ALACRITY" * 64
    assert data[:512] == bytes(512)


@pytest.mark.vm
@needs_qemu
def test_list_and_stop_by_name(make_vm: Callable[..., VM]) -> None:
    vm = make_vm("lister", cmd="sleep 600")
    vm.wait_ready(120)
    assert [r.name for r in list_vms()] == ["lister"]
    with pytest.raises(VmError):
        make_vm("lister", cmd="true")
    assert stop_vm("lister")
    assert vm.proc is not None
    vm.proc.wait(10)
    assert not Path(f"/proc/{vm.proc.pid}").exists()
    assert list_vms() == []
    assert not stop_vm("lister")
