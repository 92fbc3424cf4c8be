"""vm/memcheck.py (`vm migrate --verify`): the pages that differ between two guest memories,
found through /proc like a QEMU's memory backend (real memfds of this process)."""

from __future__ import annotations

import mmap
import os
import subprocess

import pytest

from alacrity.vm import migrate
from alacrity.vm.memcheck import CHUNK, MEMFD_LINK, PAGE, compare_guests, differing_pages, guest_memory_fd
from alacrity.vm.runtime import VmRecord, proc_start_time

SIZE = 3 * CHUNK + 5 * PAGE  # a tail shorter than a chunk


def memory(name: str = "guest", size: int = SIZE, fill: bytes = b"\xa5") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as view:
        view[:] = fill * size
    return fd


def poke(fd: int, offset: int, data: bytes) -> None:
    os.pwrite(fd, data, offset)


def test_only_the_pages_that_differ_are_named() -> None:
    a, b = memory(), memory()
    try:
        assert differing_pages(a, b) == []
        changed = [0, CHUNK - PAGE, CHUNK, 2 * CHUNK + 7 * PAGE, SIZE - PAGE]
        for page in changed:
            poke(b, page + 123, b"\x00")  # one byte inside each
        poke(b, CHUNK - 1, b"\x01\x02")  # two bytes across a chunk's (and a page's) end
        assert differing_pages(a, b) == sorted({*changed, CHUNK - PAGE, CHUNK})
        poke(b, 5 * PAGE, b"\xa5")  # the same byte again: no difference
        assert 5 * PAGE not in differing_pages(a, b)
    finally:
        os.close(a)
        os.close(b)


def test_memories_of_other_sizes_are_refused() -> None:
    a, b = memory(), memory(size=SIZE + 2 * PAGE)
    try:
        with pytest.raises(ValueError, match="bytes against"):
            differing_pages(a, b)
    finally:
        os.close(a)
        os.close(b)


def test_a_process_is_read_through_its_memory_backend() -> None:
    # This process holds a memfd named as QEMU names its guest memory: found through /proc.
    ours = memory(MEMFD_LINK.removeprefix("/memfd:"), fill=b"\x11")
    other = memory(fill=b"\x11")
    try:
        found = guest_memory_fd(os.getpid())
        try:
            assert os.fstat(found).st_size == SIZE and os.pread(found, 4, 0) == b"\x11" * 4
        finally:
            os.close(found)
        assert compare_guests(os.getpid(), os.getpid()) == (SIZE, [])
        poke(other, PAGE, b"\x00")
        assert differing_pages(ours, other) == [PAGE]
    finally:
        os.close(ours)
        os.close(other)


def test_a_process_without_guest_memory_is_refused() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(LookupError, match="not a QEMU"):
            guest_memory_fd(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another user's identity")
def test_verify_by_another_user_is_refused_before_the_move_starts() -> None:
    """A user who may not look into the QEMU's fds (here: nobody, against a root process)
    is told so by `vm migrate --verify` at once, not after the whole move."""
    ours = memory(MEMFD_LINK.removeprefix("/memfd:"))
    source = VmRecord(name="vm1", pid=os.getpid(), start_time=proc_start_time(os.getpid()), qmp="",
                      started=0.0, cmdline=[], console="", dir="")
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                guest_memory_fd(source.pid)
            except PermissionError:
                try:
                    migrate._check_memory_readable(source)
                except migrate.MigrationError as exc:
                    status = 0 if "run it as root" in str(exc) else 3
            else:
                status = 2
        finally:
            os._exit(status)
    try:
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "nobody read root's memory or was not told why"
        os.close(guest_memory_fd(source.pid))  # root may
        migrate._check_memory_readable(source)
    finally:
        os.close(ours)
