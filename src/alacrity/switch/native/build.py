"""Compile the native fast path with cffi (API mode). Run as a script, in its own process,
by `alacrity.switch.native.load()`:

    python build.py OUTDIR MODULE_NAME

Prints the path of the built extension module (inside OUTDIR) on its last line. Imports
nothing from alacrity, so it runs from any working directory."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]


def read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def main(argv: list[str]) -> int:
    from cffi import FFI

    outdir, module = argv
    ffi = FFI()
    ffi.cdef(read("fastpath.h"))
    ffi.set_source(module, read("fastpath.c"), include_dirs=[HERE], extra_compile_args=CFLAGS)
    print(ffi.compile(tmpdir=outdir, verbose=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
