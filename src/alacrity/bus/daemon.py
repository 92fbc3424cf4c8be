"""alacrityd: the bus model with its store, the admin tree and the gate, in one process."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from alacrity.admin.tree import mount
from alacrity.bus.gate import Gate
from alacrity.bus.model import Model

log = logging.getLogger("alacrity.daemon")


@dataclass
class DaemonConfig:
    mountpoint: Path = Path("/run/alacrity")
    state_dir: Path = Path("/var/lib/alacrity")
    run_dir: Path = Path("/run/alacrityd")

    @property
    def database(self) -> Path:
        return self.state_dir / "config.db"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.stopped = threading.Event()

    def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.model = Model(cfg.database)
        self.gate = Gate(self.model, cfg.run_dir)
        self.gate.start()
        self.admin = mount(self.model, str(cfg.mountpoint))
        (cfg.run_dir / "alacrityd.pid").write_text(f"{os.getpid()}\n")
        log.info(
            "alacrityd %d: admin tree %s, sockets %s, configuration %s",
            os.getpid(),
            cfg.mountpoint,
            cfg.run_dir,
            cfg.database,
        )

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.admin.unmount()
        self.gate.stop()
        self.model.close()
        (self.config.run_dir / "alacrityd.pid").unlink(missing_ok=True)
        log.info("alacrityd stopped")

    def run(self) -> None:
        """Start, then serve until SIGTERM or SIGINT."""
        wake = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: wake.set())
        # Set before mounting: libfuse takes over any signal still at its default, and
        # its SIGHUP handler would unmount the admin tree under a running daemon.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.start()
        try:
            while not wake.wait(1.0):
                pass
        finally:
            self.stop()
