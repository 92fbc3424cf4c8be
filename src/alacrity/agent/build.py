"""Compile the guest agent: a small static program, so the guest needs no libraries."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path

SOURCE = "agent.c"
CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror"]


class AgentBuildError(RuntimeError):
    """The agent could not be compiled; the message says what to install."""


def source() -> bytes:
    return resources.files("alacrity.agent").joinpath(SOURCE).read_bytes()


def recipe() -> str:
    """What the built agent depends on, for the image's cache key."""
    return hashlib.sha256(source() + " ".join(CFLAGS).encode()).hexdigest()[:16]


def build(out: Path) -> Path:
    """Compile the agent to `out` (a file path). AgentBuildError if that cannot be done."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise AgentBuildError("the guest agent needs a C compiler: apt-get install gcc libc6-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_name(SOURCE)
    src.write_bytes(source())
    done = subprocess.run([compiler, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True,
                          timeout=300)
    src.unlink(missing_ok=True)
    if done.returncode != 0:
        raise AgentBuildError(f"cannot compile the guest agent (apt-get install gcc libc6-dev gives a "
                              f"static C library): {done.stderr.strip()[-500:]}")
    return out
