"""C modules compiled with cffi (API mode) at first use, cached by the hash of their sources.

A `NativeSpec` names a module's C declarations (a header, given to cffi's cdef) and its
source. `load(spec)` builds it (gcc and the Python headers are needed) into a cache
directory keyed by the hash of its sources, this file, the Python and the cffi version
($XDG_CACHE_HOME/alacrity/native, else ~/.cache/alacrity/native), and loads it. A cache
directory is used only if it and every directory above it belong to us or to root and
nobody else can write to them (we dlopen what is there, as root); otherwise the module is
built in a private temporary directory each time. The build runs in a child process (this
file run as a script), so that compiler output and failures stay out of ours. Whatever goes
wrong, `load()` raises `NativeUnavailable` with a one-line reason; callers remember it and
do not try again.

Users: the switch's fast path (switch/native), the SIGBUS guard (vhost_user/sigbus.py) and
the dirty log's bit setter (vhost_user/dirty_log.py); the last two load through `Once`.
Run as a script (`python -P native_build.py OUTDIR MODULE DIR CDEF SOURCE`), this file imports
nothing from alacrity, so it runs from any working directory, and prints the path of the
built extension module (inside OUTDIR) on its last line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BUILD_TIMEOUT_S = 300
CFLAGS = ["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]


class NativeUnavailable(RuntimeError):
    """A native module cannot be built or loaded here (the message says why, in one line)."""


class Once:
    """A native module a process loads at most once: `get()` returns what `loader` gave, or
    raises NativeUnavailable with the reason the first attempt failed (no second attempt;
    `on_failure` hears it once)."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]],
                 on_failure: Callable[[NativeUnavailable], None] | None = None) -> None:
        self._loader = loader
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self.loaded: tuple[Any, Any] | None = None
        self.failed: NativeUnavailable | None = None

    def get(self) -> tuple[Any, Any]:
        if self.loaded is not None:
            return self.loaded
        with self._lock:
            if self.loaded is None:
                if self.failed is not None:
                    # a new one each time: raising one instance again grows its traceback
                    raise type(self.failed)(*self.failed.args)
                try:
                    self.loaded = self._loader()
                except NativeUnavailable as exc:
                    self.failed = exc
                    if self._on_failure is not None:
                        self._on_failure(exc)
                    raise
            return self.loaded


@dataclass(frozen=True)
class NativeSpec:
    """A C module: `cdef` (declarations for cffi) and `source`, files in `directory`, which is
    also on the include path, and `more_sources` compiled beside it (each its own translation
    unit); the built module is named `prefix` + a hash of all of them."""

    prefix: str
    directory: str
    cdef: str
    source: str
    more_sources: tuple[str, ...] = ()

    def module_name(self) -> str:
        import cffi

        digest = hashlib.sha256()
        names = (self.cdef, self.source, *self.more_sources)
        for path in (*(os.path.join(self.directory, name) for name in names), os.path.abspath(__file__)):
            with open(path, "rb") as f:
                digest.update(f.read())
        digest.update(f"{sys.version}|{sys.platform}|{cffi.__version__}".encode())
        return self.prefix + digest.hexdigest()[:16]


def load(spec: NativeSpec) -> tuple[Any, Any]:
    """(ffi, lib) of `spec`'s module, built if need be. Raises NativeUnavailable."""
    try:
        name = spec.module_name()
    except ImportError:
        raise NativeUnavailable("cffi is not installed") from None
    except OSError as exc:
        raise NativeUnavailable(f"cannot read the sources: {exc}") from None
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    cache = cache_dir()
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="alacrity-native-") as tmp:
            return _import(name, build(spec, name, tmp))  # loaded: the file may go
    path = os.path.join(cache, name + suffix)
    if _trusted(path):
        try:
            return _import(name, path)
        except NativeUnavailable:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a broken cached build: build it again
    try:
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
            built = build(spec, name, tmp)
            os.chmod(built, 0o755)
            os.replace(built, path)  # atomic: concurrent builders each install a whole file
    except OSError:  # a cache we may read but not write (root's, say)
        with tempfile.TemporaryDirectory(prefix="alacrity-native-") as tmp:
            return _import(name, build(spec, name, tmp))
    return _import(name, path)


def cache_dir() -> str | None:
    """The cache directory (its real path), made if need be; None if it cannot be made or trusted."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(os.path.abspath(base), "alacrity", "native")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    path = os.path.realpath(path)  # we load from the path we checked, whatever links change
    euid = os.geteuid()
    here = path
    while True:
        try:
            st = os.stat(here)
        except OSError:
            return None
        if st.st_uid not in (euid, 0):
            return None
        # Only a root-owned sticky directory above ours (/tmp) may be writable by others.
        if st.st_mode & 0o022 and (here == path or st.st_uid != 0 or not st.st_mode & stat.S_ISVTX):
            return None
        parent = os.path.dirname(here)
        if parent == here:
            return path
        here = parent


def _trusted(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


def build(spec: NativeSpec, name: str, outdir: str) -> str:
    """Build `spec` as module `name` in `outdir`, in a child process; the path of the module."""
    # -P: not this file's directory first on sys.path, where a module could shadow the stdlib's
    argv = [sys.executable, "-P", os.path.abspath(__file__), outdir, name, spec.directory, spec.cdef,
            spec.source, *spec.more_sources]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=outdir)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"build failed: {exc}") from None
    if done.returncode != 0:
        raise NativeUnavailable(f"build failed: {_reason(done.stdout + done.stderr)}")
    lines = done.stdout.strip().splitlines()
    built = lines[-1].strip() if lines else ""
    if not os.path.isfile(built) or os.path.dirname(os.path.abspath(built)) != os.path.abspath(outdir):
        raise NativeUnavailable(f"build made no module ({built!r})")
    return built


def _reason(output: str) -> str:
    """The most telling line of a failed build's output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for key in ("error:", "Error:", "Error", "error"):
        for line in lines:
            if key in line:
                return line[:300]
    return lines[-1][:300] if lines else "no output"


def _import(name: str, path: str) -> tuple[Any, Any]:
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no loader for {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise NativeUnavailable(f"cannot load {path}: {exc}") from None
    return module.ffi, module.lib


def _main(argv: list[str]) -> int:
    """The child process of `build()`: OUTDIR MODULE DIR CDEF SOURCE [MORE_SOURCES...]."""
    from cffi import FFI

    outdir, module, directory, cdef, source, *more = argv

    def read(name: str) -> str:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read()

    ffi = FFI()
    ffi.cdef(read(cdef))
    ffi.set_source(module, read(source), include_dirs=[directory], extra_compile_args=CFLAGS,
                   sources=[os.path.join(directory, name) for name in more])
    print(ffi.compile(tmpdir=outdir, verbose=False))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
