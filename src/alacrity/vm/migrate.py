"""Live migration of a running VM into a new QEMU (`alacrity vm migrate`), on this host or
another one (`migrate --to tcp:HOST:PORT` into `vm run --incoming tcp:ADDR:PORT` there).

The destination is the same VM started again from its record (same spec, jail uid and
bus) with `-incoming defer`: it connects to the bus's devices at once, and the disks let it
in as their next writer (devices/blk.py). The migration stream runs over a socket pair
whose ends go to the two QEMUs through QMP `getfd`: their jails share no path and no
network. The devices log what they write into guest memory while it runs
(vhost_user/dirty_log.py), so QEMU resends those pages. The destination holds the VM
paused once it has loaded it (`-S`): only when the source reports "completed" (paused, its
state sent) and the destination holds the VM is the destination told to resume it; then
the source is told to quit and the VM's record names the destination. So the VM never runs
in both: a migration that fails or is cancelled (`cancel`), or a destination that dies
before it resumed the VM, leaves the source running, with logging off, and the destination
killed. Only a destination that dies while it is told to resume leaves the source paused,
as the VM may have run there.

Across hosts the stream is a TCP connection made by the two CLIs (a jailed QEMU has no
network) and handed to each QEMU the same way; the destination's daemon must have a bus of
the same name with devices of the same names, and its disks must reach the same images.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from . import jail
from .memcheck import compare_guests, guest_memory_fd
from .qemu import VM, VmSpec, chardev_sockets, spec_from_fields
from .qmp import QmpClient, QmpError
from .runtime import VmError, VmRecord, find_vm, is_alive, kill_group, write_record

#: How often the source is asked for its progress (and shows it).
PROGRESS_S = 0.25
#: How often the destination is asked whether it holds the VM: the guest, paused, waits
#: for this at the switch-over.
POLL_S = 0.005
DESTINATION_READY_S = 60.0
#: Across hosts the CLIs first compare the VMs' devices, so that a destination without one
#: is refused before anything stops: one line each way, then QEMU's stream.
HELLO = "ALACRITY-MIGRATE 1 "
HELLO_S = 10.0


class MigrationError(VmError):
    pass


def _qmp(path: str, command: str, arguments: dict[str, Any] | None = None, fds: list[int] | None = None,
         timeout: float = 10.0) -> Any:
    with QmpClient(path, timeout=timeout) as qmp:
        return qmp.execute(command, arguments, fds)


def source_of(name: str) -> VmRecord:
    """The running VM `name`, if it can migrate: MigrationError saying why not."""
    rec = find_vm(name)
    if rec is None:
        raise MigrationError(f"no running VM named {name!r} (see 'alacrity vm list')")
    if not rec.detached or rec.spec is None:
        raise MigrationError(f"VM {name!r} was not started with 'vm run --detach': only a detached VM "
                             "migrates (its 'vm run' would end with its first QEMU)")
    try:
        info = _qmp(rec.qmp, "query-migrate")
    except (OSError, QmpError, TimeoutError) as exc:
        raise MigrationError(f"VM {name!r} does not answer on QMP ({rec.qmp}): {exc}") from None
    if info.get("status") in ("setup", "active", "pre-switchover", "device", "cancelling"):
        raise MigrationError(f"VM {name!r} is migrating already: 'alacrity vm migrate --cancel {name}' "
                             "stops that")
    if reasons := info.get("blocked-reasons"):
        raise MigrationError(f"QEMU cannot migrate VM {name!r}: " + "; ".join(dict.fromkeys(reasons)))
    return rec


def parse_tcp(uri: str) -> tuple[str, int]:
    """("HOST", PORT) of tcp:HOST:PORT (tcp:[V6]:PORT); ValueError saying what is wrong."""
    if not uri.startswith("tcp:"):
        raise ValueError(f"{uri}: give tcp:HOST:PORT")
    host, _, port = uri[4:].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{uri}: give tcp:HOST:PORT, e.g. tcp:10.0.0.2:4444")
    return host, int(port)


def device_list(spec: VmSpec) -> list[str]:
    """The VM's devices as QEMU sees them: `driver@device` (the bus device behind each
    vhost-user socket), sorted."""
    found = []
    for extra in spec.devices:
        drivers = [v.split(",")[0] for o, v in zip(extra, extra[1:], strict=False) if o == "-device"]
        sockets = [Path(p).name.removesuffix(".sock") for p in chardev_sockets(extra).values()]
        found += [f"{d}@{s}" for d in drivers for s in sockets] or drivers
    return sorted(found)


def _hello_line(sock: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk or len(line) > 65536:
            raise MigrationError("the other side closed the connection before saying what it is")
        line += chunk
    return line.decode(errors="replace").rstrip("\n")


def migrate(name: str, *, to: str | None = None, token: str = "", max_downtime_s: float | None = None,
            on_progress: Callable[[dict], None] | None = None, timeout_s: float = 3600.0,
            verify: Callable[[int], None] | None = None) -> VmRecord | None:
    """Move VM `name` into a new QEMU: here (its new record), or `to` tcp:HOST:PORT where
    `vm run --incoming` waits with `token` (None: it runs there now). MigrationError if it
    did not move (the source then runs on). `verify` (here only): compare both QEMUs' guest
    memory at the switch-over, refuse the move if a page differs, else call `verify` with
    the bytes compared."""
    if to is not None and verify is not None:
        raise MigrationError("--verify compares the two QEMUs' memory on one host: drop it with --to")
    source = source_of(name)
    if verify is not None:
        _check_memory_readable(source)
    if to is not None:
        return _migrate_away(source, to, token, max_downtime_s, on_progress, time.monotonic() + timeout_s)
    home = Path(source.dir)
    spec = spec_from_fields(source.spec or {})
    generation = 1 + max((int(p.name[1:]) for p in home.glob("m[0-9]*") if p.name[1:].isdigit()), default=0)
    dest = VM(replace(spec, run_dir=home / f"m{generation}", incoming=True))
    try:
        dest.start()
        _wait_incoming(dest)
        ours, theirs = socket.socketpair()
        with ours, theirs, watch_incoming(dest.qmp_path) as watch:
            watch.execute("getfd", {"fdname": "migration"}, [theirs.fileno()])
            watch.execute("migrate-incoming", {"uri": "fd:migration"})
            if max_downtime_s is not None:
                _qmp(source.qmp, "migrate-set-parameters", {"downtime-limit": int(max_downtime_s * 1000)})
            _qmp(source.qmp, "getfd", {"fdname": "migration"}, [ours.fileno()])
            _qmp(source.qmp, "migrate", {"uri": "fd:migration"})
            ours.close()
            theirs.close()
            follow(source.qmp, watch, partial(_check_alive, dest), on_progress,
                   time.monotonic() + timeout_s)
            if verify is not None:
                verify(_verify_memory(source, dest))
    except BaseException as exc:
        dest.kill()
        shutil.rmtree(dest.run_dir, ignore_errors=True)
        resumed = _resume_source(source)
        if isinstance(exc, (QmpError, OSError, TimeoutError, MigrationError)):
            where = "the VM runs on where it was" if resumed else _not_resumed(source)
            raise MigrationError(f"migration of {name!r} did not complete: {_reason(exc)}; {where}") from None
        raise
    try:
        _resume(dest)
    except MigrationError as exc:  # the VM surely did not run there
        diagnostics = dest._diagnostics()
        dest.kill()
        shutil.rmtree(dest.run_dir, ignore_errors=True)
        where = "the VM runs on where it was" if _resume_source(source) else _not_resumed(source)
        raise MigrationError(f"migration of {name!r} did not complete: {exc}; {where}{diagnostics}") from None
    except (OSError, TimeoutError) as exc:
        diagnostics = dest._diagnostics()
        dest.kill()
        shutil.rmtree(dest.run_dir, ignore_errors=True)
        raise MigrationError(
            f"migration of {name!r} failed: the destination QEMU was told to resume the VM and did not "
            f"answer ({_reason(exc)}); the VM may have run there, so the source QEMU holds it paused as it "
            f"was at the switch-over, and is not resumed: 'alacrity vm stop {name}' ends it{diagnostics}") \
            from None
    return _promote(source, dest)


def _source_pid(source: VmRecord) -> int | None:
    # The record's pid is the source's only while its start time still matches (is_alive).
    if not is_alive(source):
        return None
    return jail.jailed_pid(source.pid) if source.jail_uid is not None else source.pid


def _unreadable(exc: Exception) -> MigrationError:
    """Why --verify could not read a QEMU's memory (vm/memcheck.py's errors), in one line."""
    if isinstance(exc, PermissionError):
        return MigrationError("--verify reads the QEMUs' memory through /proc: run it as root (or as "
                              "the user its QEMU runs as)")
    return MigrationError(f"--verify could not compare the QEMUs' memory: {exc}")


def _check_memory_readable(source: VmRecord) -> None:
    """Refuse --verify before anything starts if the source's memory cannot be read (the
    destination QEMU runs as the same user), rather than after the whole move."""
    pid = _source_pid(source)
    if pid is None:
        raise MigrationError(f"VM {source.name!r} stopped")
    try:
        os.close(guest_memory_fd(pid))
    except (LookupError, OSError) as exc:
        raise _unreadable(exc) from None


def _verify_memory(source: VmRecord, dest: VM) -> int:
    """Both QEMUs hold the VM paused, the source having sent it all: their guest memory
    must be equal (vm/memcheck.py). The bytes compared; MigrationError if a page differs."""
    source_pid, dest_pid = _source_pid(source), dest.qemu_pid()
    if source_pid is None or dest_pid is None:
        raise MigrationError("--verify: a QEMU went away before its memory was compared")
    try:
        size, pages = compare_guests(source_pid, dest_pid)
    except (LookupError, ValueError, OSError) as exc:
        raise _unreadable(exc) from None
    if pages:
        shown = ", ".join(hex(p) for p in pages[:8]) + (", ..." if len(pages) > 8 else "")
        raise MigrationError(f"--verify: {len(pages)} page(s) of guest memory differ between the QEMUs "
                             f"at the switch-over (at {shown}): the migration lost stores")
    return size


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (ConnectionError, FileNotFoundError)):
        return "its QEMU went away"
    return str(exc)


def _resume(dest: VM) -> None:
    """The destination runs the VM from here on. MigrationError if it surely does not (it
    went away before it was told, or refused); OSError or TimeoutError if it may."""
    qmp = QmpClient(str(dest.qmp_path), timeout=10.0)
    try:
        qmp.connect()
    except (OSError, QmpError, TimeoutError):
        qmp.close()
        raise MigrationError("the destination QEMU went away before it was told to resume the VM") from None
    with qmp:
        try:
            qmp.execute("cont")
        except QmpError as exc:
            raise MigrationError(f"the destination QEMU did not resume the VM: {exc}") from None


def _resume_source(source: VmRecord, *, resume_completed: bool = True) -> bool:
    """After a failed migration: the source runs the VM again. A source that is still
    migrating is cancelled (QEMU resumes it); one that completed, paused with its state sent,
    is resumed if `resume_completed` (no destination can be running it); False if it cannot be."""
    try:
        with QmpClient(source.qmp, timeout=10.0) as qmp:
            if qmp.execute("query-migrate").get("status") in ("setup", "active", "pre-switchover", "device"):
                qmp.execute("migrate_cancel")
            deadline = time.monotonic() + DESTINATION_READY_S
            while True:
                status = qmp.execute("query-status").get("status")
                if status == "running":
                    return True
                if status == "postmigrate" and resume_completed:
                    qmp.execute("cont")
                elif time.monotonic() > deadline:
                    return False
                time.sleep(POLL_S)
    except (QmpError, OSError, TimeoutError):
        return False


def _not_resumed(source: VmRecord) -> str:
    return (f"the source QEMU did not resume the VM either; see 'alacrity vm list' and "
            f"'alacrity vm stop {source.name}'")


def _migrate_away(source: VmRecord, to: str, token: str, max_downtime_s: float | None,
                  on_progress: Callable[[dict], None] | None, deadline: float) -> None:
    try:
        host, port = parse_tcp(to)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    try:
        stream = socket.create_connection((host, port), timeout=HELLO_S)
        stream.sendall((HELLO + json.dumps({"name": source.name, "token": token, "devices": device_list(
            spec_from_fields(source.spec or {}))}) + "\n").encode())
        answer = _hello_line(stream)
    except OSError as exc:
        raise MigrationError(f"cannot reach {to}: {exc.strerror or exc} (is 'alacrity vm run --incoming "
                             f"{to}' waiting there?)") from None
    if answer != "OK":
        stream.close()
        raise MigrationError(f"{to} refused the VM, which runs on here: {answer.removeprefix('ERR ')}")
    try:
        with stream:
            if max_downtime_s is not None:
                _qmp(source.qmp, "migrate-set-parameters", {"downtime-limit": int(max_downtime_s * 1000)})
            _qmp(source.qmp, "getfd", {"fdname": "migration"}, [stream.fileno()])
            _qmp(source.qmp, "migrate", {"uri": "fd:migration"})
        follow(source.qmp, None, None, on_progress, deadline)
    except BaseException as exc:
        # Not a source that completed: the destination may run the VM already.
        resumed = _resume_source(source, resume_completed=False)
        if isinstance(exc, (QmpError, OSError, TimeoutError, MigrationError)):
            where = "the VM runs on here" if resumed else _not_resumed(source)
            raise MigrationError(f"migration of {source.name!r} to {to} did not complete: {_reason(exc)}; "
                                 f"{where}") from None
        raise
    _retire(source)
    shutil.rmtree(source.dir, ignore_errors=True)


def new_token() -> str:
    """What the source must show (`vm migrate --token`): whoever else reaches the port could
    otherwise hand this QEMU a VM of their own, with the bus's devices."""
    return secrets.token_hex(12)


def receive(vm: VM, listen: str, token: str, on_progress: Callable[[str], None] | None = None,
            wait_s: float = 600.0) -> None:
    """Make `vm` (started with `incoming`) the destination of a migration from another
    host: listen on tcp:ADDR:PORT for the source's `vm migrate --to` with `token`, take the
    stream, and return once the VM runs here. MigrationError (the caller kills `vm`) otherwise."""
    try:
        host, port = parse_tcp(listen)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    _wait_incoming(vm)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            raise MigrationError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        listener.listen(1)
        listener.settimeout(wait_s)
        if on_progress is not None:
            on_progress(f"waiting on {listen} for 'alacrity vm migrate {vm.spec.name} --to tcp:THIS-HOST:"
                        f"{port} --token {token}'")
        try:
            stream, peer = listener.accept()
        except TimeoutError:
            raise MigrationError(f"no migration arrived on {listen} in {wait_s:g} s") from None
    try:
        with stream, watch_incoming(vm.qmp_path) as watch:
            _check_hello(stream, vm, token)
            watch.execute("getfd", {"fdname": "migration"}, [stream.fileno()])
            watch.execute("migrate-incoming", {"uri": "fd:migration"})
            stream.close()
            if on_progress is not None:
                on_progress(f"receiving from {peer[0]}")
            while (incoming := _incoming(watch, PROGRESS_S)) != "completed":
                if incoming == "failed":  # QEMU exits, too
                    raise MigrationError(f"the migration failed{vm._diagnostics()}")
                if vm.proc is None or vm.proc.poll() is not None:
                    raise MigrationError(f"the migration failed: QEMU exited{vm._diagnostics()}")
            watch.execute("cont")  # it was held paused (-S) once it had the whole VM
    except (QmpError, OSError, TimeoutError) as exc:
        raise MigrationError(f"the migration failed: {_reason(exc)}{vm._diagnostics()}") from None


def _check_hello(stream: socket.socket, vm: VM, token: str) -> None:
    """The source's line: our token, the same VM name and devices as ours, or both sides are
    told why not."""
    stream.settimeout(HELLO_S)
    line = _hello_line(stream)
    try:
        offer = json.loads(line.removeprefix(HELLO)) if line.startswith(HELLO) else None
    except ValueError:
        offer = None
    ours = device_list(vm.spec)
    if not isinstance(offer, dict):
        why = "not an alacrity migration"
    elif not hmac.compare_digest(str(offer.get("token", "")).encode(), token.encode()):
        why = "wrong --token (vm run --incoming printed the right one)"
    elif offer.get("name") != vm.spec.name:
        why = f"VM {offer.get('name')!r} arrived, this side waits for {vm.spec.name!r}: give vm run --name"
    elif offer.get("devices") != ours:
        theirs = offer.get("devices")
        why = (f"the VM has devices {', '.join(map(str, theirs or [])) or 'none'}, but bus {vm.spec.bus!r} "
               f"here gives {', '.join(ours) or 'none'}: make the same devices on the bus here")
    else:
        stream.sendall(b"OK\n")
        stream.settimeout(None)
        return
    with contextlib.suppress(OSError):
        stream.sendall(f"ERR {why}\n".encode())
    raise MigrationError(f"refused the migration: {why}")


def _wait_incoming(dest: VM) -> None:
    """Until the destination QEMU answers QMP, waiting for the VM's state."""
    deadline = time.monotonic() + DESTINATION_READY_S
    while True:
        if dest.proc is None or dest.proc.poll() is not None:
            raise MigrationError(f"the destination QEMU exited at start{dest._diagnostics()}")
        with contextlib.suppress(OSError, QmpError, TimeoutError):
            if _qmp(str(dest.qmp_path), "query-status", timeout=2.0).get("status") == "inmigrate":
                return
        if time.monotonic() > deadline:
            raise MigrationError(f"the destination QEMU did not start in {DESTINATION_READY_S:g} s")
        time.sleep(0.1)


def follow(source_qmp: str, watch: QmpClient | None, check_dest: Callable[[], None] | None,
           on_progress: Callable[[dict], None] | None, deadline: float) -> None:
    """Until the source (QMP socket `source_qmp`) says completed and the destination, if
    `watch` (from `watch_incoming`) is given, holds the whole VM, paused; then the caller
    tells it to run (`cont`). MigrationError if the migration fails or is cancelled;
    `check_dest` raises if the destination died.

    The source is asked every PROGRESS_S, on a connection of its own each time: QEMU's QMP
    socket serves one client at a time, and `vm migrate --cancel` or `vm stop` must get
    in. The destination is ours alone (no record names it yet): its MIGRATION events come
    on `watch`, held open, and the guest, paused, waits for nothing else."""
    asked, loaded = 0.0, False
    while True:
        now = time.monotonic()
        if loaded or now - asked >= PROGRESS_S:
            asked = now
            info = _qmp(source_qmp, "query-migrate")
            status = info.get("status", "")
            if on_progress is not None:
                on_progress(info)
            if status == "completed" and (watch is None or loaded):
                return
            if status in ("failed", "cancelled"):  # "cancelling" is on its way to "cancelled"
                why = info.get("error-desc")
                raise MigrationError(f"QEMU reports the migration {status}"
                                     + (f" ({why})" if why else ""))
        if check_dest is not None:
            check_dest()
        if now > deadline:
            raise TimeoutError("the migration did not complete in time")
        if watch is None:
            time.sleep(PROGRESS_S)
        elif loaded:
            time.sleep(POLL_S)  # the source marks itself completed a moment after
        elif (incoming := _incoming(watch, PROGRESS_S)) == "completed":
            loaded = True
        elif incoming == "failed":
            # Most often the source stopped sending (cancelled, failed): its reason is the one
            # to give, once it has noticed.
            _source_failure(source_qmp, time.monotonic() + 2.0)
            raise MigrationError("the destination QEMU could not load the VM")


def watch_incoming(qmp_path: str | Path) -> QmpClient:
    """A connection to an incoming QEMU (started `-incoming defer -S`) that hears its
    MIGRATION events: give it `migrate-incoming` on this connection."""
    qmp = QmpClient(str(qmp_path), timeout=10.0).connect()
    try:
        qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    except BaseException:
        qmp.close()
        raise
    return qmp


def _check_alive(dest: VM) -> None:
    if dest.proc is None or dest.proc.poll() is not None:
        raise MigrationError(f"the destination QEMU died during the migration{dest._diagnostics()}")


def _incoming(watch: QmpClient, timeout: float) -> str | None:
    """The incoming QEMU's migration status if it said, within `timeout` s, that it
    completed (it holds the whole VM, paused by -S) or failed; else None."""
    event = watch.next_event(timeout)
    if event is None or event.get("event") != "MIGRATION":
        return None
    status = event.get("data", {}).get("status")
    return status if status in ("completed", "failed") else None


def _source_failure(source_qmp: str, deadline: float) -> None:
    """MigrationError with the source's reason, if it reports one by `deadline`."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, QmpError, TimeoutError):
            info = _qmp(source_qmp, "query-migrate")
            status = info.get("status")
            if status in ("failed", "cancelled"):
                why = info.get("error-desc")
                raise MigrationError(f"QEMU reports the migration {status}" + (f" ({why})" if why else ""))
        time.sleep(PROGRESS_S / 5)


def _promote(source: VmRecord, dest: VM) -> VmRecord:
    """The destination runs the VM: the record says so, the source quits and its files go."""
    assert dest.record is not None
    record = replace(dest.record, dir=source.dir, started=source.started)
    write_record(record)
    (dest.run_dir / "vm.json").unlink(missing_ok=True)
    _retire(source)
    old = Path(source.home or source.dir)
    if old == Path(source.dir):  # the VM's first QEMU kept its files beside the record
        for leftover in ("qemu", "root", "qemu.log"):
            path = old / leftover
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)
    return record


def _retire(source: VmRecord) -> None:
    """The source QEMU, paused with its state sent, quits."""
    with contextlib.suppress(OSError, QmpError, TimeoutError):
        _qmp(source.qmp, "quit", timeout=2.0)
    deadline = time.monotonic() + 5
    while is_alive(source) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_group(source)


def cancel(name: str) -> bool:
    """Cancel VM `name`'s migration; False if none was running. The `vm migrate` that
    started it sees the cancellation, kills the destination and says so."""
    rec = find_vm(name)
    if rec is None:
        raise MigrationError(f"no running VM named {name!r} (see 'alacrity vm list')")
    status = _qmp(rec.qmp, "query-migrate").get("status")
    if status not in ("setup", "active", "pre-switchover", "device"):
        return False
    _qmp(rec.qmp, "migrate_cancel")
    return True
