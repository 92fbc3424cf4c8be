"""Choosing the switch's forwarding engine: the Python reference (engine.py) or the
native fast path (native/engine.py), which builds on it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from alacrity.switch.engine import BATCH, Engine
from alacrity.switch.fdb import Fdb

log = logging.getLogger("alacrity.switch")

ENGINE_KINDS = ("native", "python")
#: The environment variable that picks the engine when the caller does not: native or python.
ENGINE_ENV = "ALACRITY_SWITCH_ENGINE"


def make_engine(fdb: Fdb | None = None, *, batch: int = BATCH, clock: Callable[[], float] = time.monotonic,
                kind: str | None = None, strict: bool = False) -> Engine:
    """The engine of `kind` (else $ALACRITY_SWITCH_ENGINE, else native): the native one builds
    and loads its C part here, so call this before dropping privileges. If it cannot be had,
    one line says why and the Python engine is returned (unless `strict`: NativeUnavailable)."""
    kind = kind or os.environ.get(ENGINE_ENV) or "native"
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown switch engine {kind!r} (use one of: {', '.join(ENGINE_KINDS)})")
    if kind == "native":
        from alacrity.switch.native import NativeUnavailable

        try:
            from alacrity.switch.native.engine import NativeEngine

            return NativeEngine(fdb, batch=batch, clock=clock)
        except NativeUnavailable as exc:
            if strict:
                raise
            log.warning("native switch engine unavailable, using the Python engine: %s", exc)
    return Engine(fdb, batch=batch, clock=clock)
