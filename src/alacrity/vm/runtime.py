"""Per-VM runtime directories: where `vm list` and `vm stop` find running VMs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .qmp import QmpClient

RECORD = "vm.json"


class VmError(RuntimeError):
    pass


@dataclass
class VmRecord:
    name: str
    pid: int
    start_time: int  # /proc/PID/stat field 22, so a reused pid is not taken for ours
    qmp: str
    started: float
    cmdline: list[str]
    console: str
    dir: str
    jail_uid: int | None = None  # the uid of the jailed QEMU; None: unjailed
    bus: str = ""  # the bus it was started on
    detached: bool = False  # `vm run --detach`: nobody waits for it
    spec: dict | None = None  # how to start it again elsewhere (`vm migrate`): VmSpec's fields
    home: str = ""  # where its QEMU's files are (`dir`, or a migration's subdirectory of it)


def runtime_root() -> Path:
    if env := os.environ.get("ALACRITY_VM_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/alacrity-vms")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/alacrity-{os.geteuid()}"
    return Path(base) / "alacrity-vms"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, threads, start time) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[17]), int(fields[19])


def proc_start_time(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[2] if st else None


def is_alive(rec: VmRecord) -> bool:
    """QEMU is running. Its main thread can exit (state Z) while other threads still
    tear down, so a zombie counts as alive until it is down to one thread."""
    st = _proc_stat(rec.pid)
    return st is not None and st[2] == rec.start_time and not (st[0] in "ZX" and st[1] <= 1)


def _same_process(rec: VmRecord) -> bool:
    # Until reaped, even a zombie keeps its pid, so signalling its group is safe.
    st = _proc_stat(rec.pid)
    return st is not None and st[2] == rec.start_time


def write_record(rec: VmRecord) -> None:
    path = Path(rec.dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=1) + "\n")
    os.replace(tmp, path)


def read_record(vm_dir: Path) -> VmRecord | None:
    try:
        return VmRecord(**json.loads((vm_dir / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_vms(root: Path | None = None, prune: bool = True) -> list[VmRecord]:
    """Running VMs; directories of dead ones are removed when `prune`."""
    root = root or runtime_root()
    found: list[VmRecord] = []
    if not root.is_dir():
        return found
    for vm_dir in sorted(root.iterdir()):
        rec = read_record(vm_dir)
        if rec is not None and is_alive(rec):
            found.append(rec)
        elif prune and rec is not None:
            shutil.rmtree(vm_dir, ignore_errors=True)
    return found


def find_vm(name: str, root: Path | None = None) -> VmRecord | None:
    """A running VM by name (its directory may be elsewhere if the spec said so)."""
    return next((rec for rec in list_vms(root, prune=False) if rec.name == name), None)


def stop_vm(name: str, grace: float = 5.0, root: Path | None = None) -> bool:
    """Stop a VM by name; False if it was not running."""
    rec = find_vm(name, root)
    if rec is None:
        return False
    stop_record(rec, grace)
    shutil.rmtree(rec.dir, ignore_errors=True)
    return True


def stop_record(rec: VmRecord, grace: float = 5.0) -> None:
    """Ask the guest to power down for `grace` seconds, then QEMU to quit, then kill
    QEMU's process group whatever happened."""
    try:
        if _qmp(rec, "system_powerdown") and _wait_gone(rec, time.monotonic() + grace):
            return
        if _qmp(rec, "quit"):
            _wait_gone(rec, time.monotonic() + 2.0)
    finally:
        kill_group(rec)


def _qmp(rec: VmRecord, command: str) -> bool:
    try:
        with QmpClient(rec.qmp, timeout=2.0) as qmp:
            qmp.execute(command)
        return True
    except (OSError, ValueError, RuntimeError):
        # `quit` may close the socket before its reply arrives.
        return command == "quit"


def kill_group(rec: VmRecord) -> None:
    # QEMU leads its own session, so its pid is its process group.
    if _same_process(rec):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
    _wait_gone(rec, time.monotonic() + 5.0)


def _wait_gone(rec: VmRecord, deadline: float) -> bool:
    while is_alive(rec):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
