"""`alacrity vm run | list | stop`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from alacrity import client
from alacrity.cli.bus_cmd import join
from alacrity.cli.errors import UserError
from alacrity.devices import Slot, device_class
from alacrity.virtio.net import check_mac
from alacrity.vm.machine import DEFAULT_MACHINE, machine
from alacrity.vm.qemu import VM, VmSpec, check_network, serial_chardev
from alacrity.vm.runtime import VmError, find_vm, list_vms, stop_vm


def dispatch(args: argparse.Namespace) -> int:
    if args.vm_command == "run":
        return run(args)
    if args.vm_command == "list":
        vms = list_vms()
        if not vms:
            print("no running VMs")
        for rec in vms:
            up = time.time() - rec.started
            who = f"uid {rec.jail_uid}" if rec.jail_uid is not None else "unjailed"
            print(f"{rec.name:20} pid {rec.pid:<8} {who:11} up {up:7.1f}s  console {rec.console}")
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


def attach(devices: list[client.DeviceInfo], vm_name: str, machine_name: str,
           macs: list[str]) -> tuple[list[list[str]], int]:
    """QEMU's arguments for each device on the bus, from its class, in the gate's order,
    and how many NICs they give. The given MACs go to the NICs in order; the rest are
    derived from the VM's and the device's names (stable across runs)."""
    transport = machine(machine_name).transport
    attached: list[list[str]] = []
    per_class: dict[str, int] = {}
    skipped: list[str] = []
    nics = 0
    for n, dev in enumerate(devices):
        try:
            cls = device_class(dev.device_class)
        except KeyError:
            skipped.append(dev.name)
            continue
        index = per_class.get(dev.device_class, 0)
        options = {"mac": macs[nics]} if cls.gives_nic and nics < len(macs) else {}
        args = cls.qemu_args(Slot(dev.name, dev.socket, transport, vm_name, f"d{n}", index, options))
        if not args:
            skipped.append(dev.name)
            continue
        per_class[dev.device_class] = index + 1
        nics += cls.gives_nic
        attached.append(args)
    if len(macs) > nics:
        raise UserError(f"{len(macs)} --mac given, but the bus has {nics} device(s) that give a NIC")
    if skipped:
        print(f"alacrity: not attaching devices VMs cannot use: {', '.join(skipped)}", file=sys.stderr)
    return attached, nics


#: How long `vm run --detach` waits for the guest's ready line.
DETACH_READY_S = 120.0


def jail_for(bus: client.Bus, no_jail: bool) -> int | None:
    """The uid the guest's jail runs as, or None with --no-jail: for root, one of
    alacrityd's range that the gate reserves; for a user, the user's own."""
    if no_jail:
        if os.geteuid() != 0:
            raise UserError("--no-jail runs QEMU as root, so only root may ask for it")
        print("alacrity: --no-jail: QEMU runs as root, with every capability, no seccomp filter, and "
              "the host's files, processes and network in view; for debugging only", file=sys.stderr)
        return None
    if os.geteuid() != 0:
        return os.getuid()  # the jail is made in a user namespace of the user's own
    try:
        return bus.lease_uid()
    except client.GateError as exc:
        raise UserError(f"cannot jail the guest: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.detach and args.no_jail:
        raise UserError("--detach needs the jail (a detached VM stays on the bus through its jailer): "
                        "leave out --no-jail")
    if args.detach and args.timeout:
        raise UserError("--timeout kills a VM that vm run waits for; a detached VM runs until "
                        "'alacrity vm stop NAME': leave out --timeout")
    if args.token and not args.incoming:
        raise UserError("--token goes with --incoming (the token a migration's source must show)")
    if args.incoming and not args.detach:
        raise UserError("--incoming makes the VM a migration's destination, which runs on detached: "
                        "add --detach")
    if args.detach and args.log:
        raise UserError("--detach logs the console in the VM's run directory ('alacrity vm list' shows "
                        "where): leave out --log")
    try:
        check_network(args.ip, args.gw)
        macs = [check_mac(mac) for mac in args.mac or ()]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    kernel, initrd = guest_files(args)
    join(args.bus)
    try:
        bus = client.connect()
        refused = bus.refusals()
    except client.GateError as exc:
        raise UserError(str(exc)) from None
    if refused:
        more = f" (and {len(refused) - 1} more device(s) refused)" if len(refused) > 1 else ""
        raise UserError(next(iter(refused.values())) + more)
    jail_uid = jail_for(bus, args.no_jail)
    name = args.name or f"{args.bus}-{os.getpid()}"
    devices, nics = attach(bus.devices, name, DEFAULT_MACHINE, macs)
    if args.cmd is None and serial_chardev(devices) is not None:  # a console device has ttyS0
        print(f"alacrity: the guest's console is on the bus: type into it with 'alacrity vm console {name}'",
              file=sys.stderr)
    if args.ip and not nics:
        raise UserError(f"--ip {args.ip}: bus {args.bus!r} has no switch device, so the guest has no eth0")
    spec = VmSpec(
        name=name,
        kernel=kernel,
        initrd=initrd,
        mem_mib=args.mem,
        cpus=args.cpus,
        cmd=args.cmd,
        append=args.append,
        console=args.log or "stdio",
        devices=devices,
        ip=args.ip,
        gw=args.gw,
        jail_uid=jail_uid,
        detach_bus=args.bus if args.detach else None,
        bus=args.bus,
        detach_control=str(bus.run_dir / "control.sock"),
        incoming=args.incoming is not None,
    )
    if spec.incoming and find_vm(name) is not None:
        raise UserError(f"a VM named {name!r} is already running here")
    vm = VM(spec)
    if vm.accel.accel != "kvm":
        print(f"alacrity: using TCG: {vm.accel.reason}", file=sys.stderr)
    # SIGTERM (e.g. from a supervisor) stops the guest like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    detached = False
    try:
        vm.start()
        if args.incoming:
            from alacrity.vm.migrate import new_token, receive

            receive(vm, args.incoming, args.token or new_token(),
                    lambda line: print(f"alacrity: {line}", file=sys.stderr, flush=True))
            detached = True
            print(name)
            return 0
        if args.detach:
            vm.wait_ready(DETACH_READY_S)
            detached = True
            print(name)
            return 0
        return vm.wait_exit(args.timeout or 10**9)
    except (VmError, TimeoutError) as exc:
        # A device that refused QEMU after the check (a race) makes QEMU fail with its own
        # words; the gate's reason is the one that helps.
        why = client.refusal(bus.run_dir)
        raise UserError(f"the gate refused the VM a device: {why}" if why else str(exc)) from None
    finally:
        if not detached:
            vm.kill()
