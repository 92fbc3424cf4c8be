"""The switch engine's native fast path: fastpath.c and its wake-up loop wakeup.c, compiled
with cffi (API mode).

`load()` builds it on first use through `alacrity.native_build` (gcc and the Python headers
are needed; cached by the hash of its sources in $XDG_CACHE_HOME/alacrity/native, else
~/.cache/alacrity/native, when that directory can be trusted; built in a child process).
Whatever goes wrong, `load()` raises `NativeUnavailable` with a one-line reason (and
remembers it: no second attempt).

The switch process loads it when it makes its engine, before it drops its privileges (the
cache may be where `nobody` cannot read; once loaded, nothing is read again).
`NativeEngine` (native/engine.py) is the engine that uses it.
"""

from __future__ import annotations

import os
import sys  # noqa: F401  (tests replace sys.executable through this module)
from typing import Any

from alacrity import native_build
from alacrity.native_build import NativeUnavailable, cache_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = native_build.NativeSpec("_alacrity_fastpath_", HERE, "fastpath.h", "fastpath.c", ("wakeup.c",))

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
        _loaded = native_build.load(SPEC)
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
    return SPEC.module_name()


def _build(name: str, outdir: str) -> str:
    return native_build.build(SPEC, name, outdir)


__all__ = ["NativeUnavailable", "available", "cache_dir", "load"]
