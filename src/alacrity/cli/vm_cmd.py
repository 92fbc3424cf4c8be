"""`alacrity vm run | list | stop`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from alacrity import client
from alacrity.cli.bus_cmd import join
from alacrity.cli.main import UserError
from alacrity.vm.qemu import VM, NetAttachment, VmSpec, check_mac, check_network, local_mac
from alacrity.vm.runtime import VmError, list_vms, stop_vm


def dispatch(args: argparse.Namespace) -> int:
    if args.vm_command == "run":
        return run(args)
    if args.vm_command == "list":
        vms = list_vms()
        if not vms:
            print("no running VMs")
        for rec in vms:
            up = time.time() - rec.started
            print(f"{rec.name:20} pid {rec.pid:<8} up {up:7.1f}s  console {rec.console}")
        return 0
    if not stop_vm(args.name):
        raise UserError(f"no running VM named {args.name!r} (see 'alacrity vm list')")
    print(f"stopped {args.name}")
    return 0


def guest_files(args: argparse.Namespace) -> tuple:
    if args.kernel and args.initrd:
        return args.kernel, args.initrd
    if args.kernel or args.initrd:
        raise UserError("give both --kernel and --initrd, or neither for the default guest")
    from alacrity.vm.image import ImageError, default_image

    try:
        image = default_image()
    except ImageError as exc:
        raise UserError(str(exc)) from None
    return image.kernel, image.initrd


def nic_attachments(switches: list[client.DeviceInfo], macs: list[str],
                    name: str | None) -> list[NetAttachment]:
    """One NIC per switch device, in the gate's order: the given MACs first, then MACs
    derived from the VM's name (stable across runs), or random ones without a name."""
    if len(macs) > len(switches):
        raise UserError(f"{len(macs)} --mac given, but the bus has {len(switches)} switch device(s)")
    return [
        NetAttachment(dev.socket, macs[i] if i < len(macs)
                      else local_mac(f"{name}/{dev.name}" if name else None))
        for i, dev in enumerate(switches)
    ]


def run(args: argparse.Namespace) -> int:
    try:
        check_network(args.ip, args.gw)
        macs = [check_mac(mac) for mac in args.mac or ()]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    kernel, initrd = guest_files(args)
    join(args.bus)
    try:
        bus = client.connect()
    except client.GateError as exc:
        raise UserError(str(exc)) from None
    disks = [dev.socket for dev in bus.devices if dev.device_class == "blk"]
    nics = nic_attachments([dev for dev in bus.devices if dev.device_class == "switch"], macs, args.name)
    if args.ip and not nics:
        raise UserError(f"--ip {args.ip}: bus {args.bus!r} has no switch device, so the guest has no eth0")
    others = [dev.name for dev in bus.devices if dev.device_class not in ("blk", "switch")]
    if others:
        print(f"alacrity: not attaching devices of other classes: {', '.join(others)}", file=sys.stderr)
    spec = VmSpec(
        name=args.name or f"{args.bus}-{os.getpid()}",
        kernel=kernel,
        initrd=initrd,
        mem_mib=args.mem,
        cpus=args.cpus,
        cmd=args.cmd,
        append=args.append,
        console=args.log or "stdio",
        vhost_user_blk=disks,
        nics=nics,
        ip=args.ip,
        gw=args.gw,
    )
    vm = VM(spec)
    if vm.accel.accel != "kvm":
        print(f"alacrity: using TCG: {vm.accel.reason}", file=sys.stderr)
    # SIGTERM (e.g. from a supervisor) stops the guest like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        vm.start()
        return vm.wait_exit(args.timeout or 10**9)
    except (VmError, TimeoutError) as exc:
        raise UserError(str(exc)) from None
    finally:
        vm.kill()
