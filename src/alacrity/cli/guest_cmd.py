"""`alacrity vm exec` and `alacrity vm cp`: commands and files through a VM's guest agent."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

from alacrity.cli.bus_cmd import join
from alacrity.cli.errors import UserError

EXEC_EPILOG = """\
The VM needs a vsock device on its bus (the agent's channel) and the default image (it
runs the agent). stdin is passed through; the exit status is the command's (128+N when
signal N ended it). Examples:
  alacrity vm exec srv -- uname -a
  alacrity vm exec srv -e LANG=C -w /tmp -- sh -c 'ls | wc -l'
  alacrity vm exec -t srv -- sh                 # a shell on a terminal
  tar c dir | alacrity vm exec srv -- tar x -C /root
"""

CP_EPILOG = """\
One side is NAME:/PATH, a path in VM NAME's guest; directories are copied whole (as tar
streams), into DST if it is a directory:
  alacrity vm cp ./config.json srv:/etc/app/
  alacrity vm cp srv:/var/log ./logs
"""
_GUEST_PATH = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):(/.*)")
#: Files larger than this show a progress bar (on a terminal).
PROGRESS_FROM = 1 << 20


def _exec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--tty", action="store_true", help="give the command a terminal (for a shell)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
    parser.add_argument("-w", "--workdir", default="/", metavar="DIR", help="working directory (default /)")
    parser.add_argument("--wait", type=float, default=30.0, metavar="S",
                        help="how long to wait for the agent to answer, for a VM still booting (default 30)")


def add_parsers(vm_sub: argparse._SubParsersAction) -> None:
    ex = vm_sub.add_parser("exec", help="run a command in a running VM (through its guest agent)",
                           usage="alacrity vm exec [OPTIONS] NAME [OPTIONS] -- COMMAND [ARGS]",
                           epilog=EXEC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _exec_options(ex)
    ex.add_argument("name", help="the VM (as 'alacrity vm list' shows it)")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS]")
    cp = vm_sub.add_parser("cp", help="copy files or directories into or out of a running VM",
                           epilog=CP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("src", help="a host path, or NAME:/PATH in the VM")
    cp.add_argument("dst", help="a host path, or NAME:/PATH in the VM")
    cp.add_argument("--wait", type=float, default=30.0, metavar="S", help="how long to wait for the agent")


def _guest(name: str, wait: float):
    """The agent of VM `name`, after joining its bus (as vm run did)."""
    from alacrity.client.vm import VmError, vm
    from alacrity.vm.runtime import find_vm

    rec = find_vm(name)
    if rec is None:
        raise UserError(f"no running VM named {name!r} (see 'alacrity vm list')")
    if rec.bus:
        join(rec.bus)
    try:
        return vm(name, wait=wait)
    except (VmError, PermissionError) as exc:
        raise UserError(str(exc)) from None


@contextlib.contextmanager
def _raw(enabled: bool) -> Iterator[None]:
    """Our terminal in raw mode while the command has one, restored whatever happens."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _write(stream: int, data: bytes) -> None:
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
    out.write(data)
    out.flush()


def exec_(args: argparse.Namespace) -> int:
    from alacrity.agent.protocol import AgentError
    from alacrity.client.vm import CommandFailed, VmError

    argv = args.argv
    if "--" in argv:  # options may follow NAME too, up to the "--"
        cut = argv.index("--")
        more = argparse.ArgumentParser(prog=f"alacrity vm exec {args.name}", add_help=False)
        _exec_options(more)
        try:
            more.parse_args(argv[:cut], namespace=args)
        except SystemExit:
            raise UserError(f"unknown options before --: {' '.join(argv[:cut])} (see alacrity vm exec "
                            "--help)") from None
        argv = argv[cut + 1:]
    if not argv:
        raise UserError("give a command: alacrity vm exec NAME -- COMMAND [ARGS]")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"-e {item}: write NAME=VALUE")
        env[key] = value
    guest = _guest(args.name, args.wait)
    terminal = args.tty and os.isatty(0)
    if terminal:
        env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    try:
        with _raw(terminal):
            result = guest.exec(argv, env=env, cwd=args.workdir, tty=args.tty, stdin=0, sink=_write)
    except CommandFailed as exc:
        print(f"alacrity: {exc}", file=sys.stderr)
        return 127 if "No such file" in str(exc) else 126
    except VmError as exc:
        raise UserError(str(exc)) from None
    except AgentError as exc:
        raise UserError(f"VM {args.name}: {exc}") from None
    return result.status


def _progress(total: int, what: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update, finish) for a bar on stderr, or no-ops off a terminal or for small files."""
    if total < PROGRESS_FROM or not sys.stderr.isatty():
        return (lambda done: None), (lambda: None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    task = bar.add_task(what, total=total)
    bar.start()
    return (lambda done: bar.update(task, completed=done)), bar.stop


def cp(args: argparse.Namespace) -> int:
    from alacrity.client.vm import VmError

    src, dst = _GUEST_PATH.fullmatch(args.src), _GUEST_PATH.fullmatch(args.dst)
    if bool(src) == bool(dst):
        raise UserError("give one side as NAME:/PATH (a path in the VM) and the other as a host path")
    try:
        if dst:
            _put(Path(args.src), dst.group(1), dst.group(2), args.wait)
        else:
            assert src is not None
            _get(src.group(1), src.group(2), Path(args.dst), args.wait)
    except VmError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # a host file we cannot read or write
        raise UserError(f"{exc.filename or args.dst}: {exc.strerror or exc}") from None
    return 0


def _put(local: Path, name: str, path: str, wait: float) -> None:
    if not local.exists():
        raise UserError(f"{local}: no such file or directory")
    guest = _guest(name, wait)
    into_dir = path.endswith("/") or guest.is_dir(path)
    if local.is_dir():
        if not into_dir:
            raise UserError(f"{name}:{path} is not a directory in the VM: copy {local} into an existing one")
        guest.put_tree(local, path)
        return
    target = f"{path.rstrip('/')}/{local.name}" if into_dir else path
    size = local.stat().st_size
    update, finish = _progress(size, f"{local.name} -> {name}")
    with open(local, "rb") as f:
        try:
            guest.put(target, f.fileno(), mode=local.stat().st_mode, progress=update)
        finally:
            finish()


def _get(name: str, path: str, local: Path, wait: float) -> None:
    guest = _guest(name, wait)
    if guest.is_dir(path):
        local.mkdir(parents=True, exist_ok=True)
        guest.get_tree(path, local)
        return
    target = local / Path(path).name if local.is_dir() else local
    partial = target.with_name(f".{target.name}.partial")
    # Written beside the target and renamed at the end: a failed copy leaves nothing half-written.
    try:
        with open(partial, "wb") as out:
            guest.get(path, sink=out.write)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
