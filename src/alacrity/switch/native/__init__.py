"""The switch engine's native fast path: fastpath.c, compiled with cffi (API mode).

`load()` builds it on first use (gcc and the Python headers are needed) into a cache
directory keyed by the hash of its sources, the Python and the cffi version
($XDG_CACHE_HOME/alacrity/native, else ~/.cache/alacrity/native), and loads it. A cache
directory is used only if it and every directory above it belong to us or to root and
nobody else can write to them (we dlopen what is there, as root); otherwise the module is
built in a private temporary directory each time. The build runs in a child process, so
that compiler output and failures stay out of ours. Whatever goes wrong, `load()` raises
`NativeUnavailable` with a one-line reason (and remembers it: no second attempt).

The switch process loads it when it makes its engine, before it drops its privileges (the
cache may be where `nobody` cannot read; once loaded, nothing is read again).
`NativeEngine` (native/engine.py) is the engine that uses it.
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("fastpath.h", "fastpath.c", "build.py")
BUILD_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """The native fast path cannot be built or loaded here (the message says why, in one line)."""


_loaded: tuple[Any, Any] | None = None
_failed: str | None = None


def load() -> tuple[Any, Any]:
    """(ffi, lib) of the native fast path, built if need be. Raises NativeUnavailable."""
    global _loaded, _failed
    if _loaded is not None:
        return _loaded
    if _failed is not None:
        raise NativeUnavailable(_failed)
    try:
        _loaded = _load()
    except NativeUnavailable as exc:
        _failed = str(exc)
        raise
    return _loaded


def available() -> bool:
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def module_name() -> str:
    import cffi

    digest = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    digest.update(f"{sys.version}|{sys.platform}|{cffi.__version__}".encode())
    return "_alacrity_fastpath_" + digest.hexdigest()[:16]


def _load() -> tuple[Any, Any]:
    try:
        name = module_name()
    except ImportError:
        raise NativeUnavailable("cffi is not installed") from None
    except OSError as exc:
        raise NativeUnavailable(f"cannot read the sources: {exc}") from None
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    cache = cache_dir()
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="alacrity-native-") as tmp:
            return _import(name, _build(name, tmp))  # loaded: the file may go
    path = os.path.join(cache, name + suffix)
    if _trusted(path):
        try:
            return _import(name, path)
        except NativeUnavailable:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a broken cached build: build it again
    try:
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
            built = _build(name, tmp)
            os.chmod(built, 0o755)
            os.replace(built, path)  # atomic: concurrent builders each install a whole file
    except OSError:  # a cache we may read but not write (root's, say)
        with tempfile.TemporaryDirectory(prefix="alacrity-native-") as tmp:
            return _import(name, _build(name, tmp))
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


def _build(name: str, outdir: str) -> str:
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, "build.py"), outdir, name],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=outdir)
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


__all__ = ["NativeUnavailable", "available", "load"]
