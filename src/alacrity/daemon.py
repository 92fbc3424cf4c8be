"""alacrityd: the bus model with its store, the admin tree and the gate, in one process."""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from alacrity import ids
from alacrity.admin.tree import mount
from alacrity.bus import metrics
from alacrity.bus.gate import Gate
from alacrity.bus.model import Model
from alacrity.devices.base import reserve_paths
from alacrity.errors import AdminError
from alacrity.vhost_user import eventfd, keeper, sigbus

log = logging.getLogger("alacrity.daemon")


@dataclass
class DaemonConfig:
    mountpoint: Path = Path("/run/alacrity")
    state_dir: Path = Path("/var/lib/alacrity")
    run_dir: Path = Path("/run/alacrityd")
    id_range: tuple[int, int] = (ids.DEFAULT_START, ids.DEFAULT_COUNT)
    admin_gid: int | None = None  # a group that may read the admin tree, besides root
    metrics: tuple[str, ...] = ()  # --metrics: unix:PATH, HOST:PORT or off (bus/metrics.py)

    @property
    def database(self) -> Path:
        return self.state_dir / "config.db"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.stopped = threading.Event()

    def start(self) -> None:
        cfg = self.config
        _raise_fd_limit()
        ids.configure(*cfg.id_range)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.model = Model(cfg.database)
        self.gate = Gate(self.model, cfg.run_dir)
        self.gate.start()
        self.metrics = metrics.MetricsServer(self.gate.status, metrics.endpoints(cfg.metrics, cfg.run_dir))
        self.metrics.start()
        self.admin = mount(self.model, str(cfg.mountpoint), admin_gid=cfg.admin_gid)
        # No image may be the daemon's own: its tree, its sockets, its database.
        db = str(cfg.database)
        reserve_paths(cfg.mountpoint, cfg.run_dir, db, f"{db}-journal", f"{db}-wal", f"{db}-shm")
        self._resume(keeper.configure(cfg.run_dir))
        (cfg.run_dir / "alacrityd.pid").write_text(f"{os.getpid()}\n")
        log.info(
            "alacrityd %d: admin tree %s, sockets %s, configuration %s",
            os.getpid(),
            cfg.mountpoint,
            cfg.run_dir,
            cfg.database,
        )

    def _resume(self, taken: list[keeper.Kept]) -> None:
        """Connections an earlier daemon's keeper held through its crash go back to their
        devices; one whose device is gone is closed."""
        for kept in taken:
            name = kept.meta.get("device")
            try:
                instance = self.model.device(name).instance if isinstance(name, str) else None
            except AdminError:  # no such device any more
                instance = None
            if instance is not None and hasattr(instance, "resume"):
                instance.resume(kept)
                continue
            log.warning("keeper: %s: device %s is gone; closing", kept.meta.get("label"), name)
            kept.sock.close()
            for _, fds in kept.messages:
                for fd in fds:
                    os.close(fd)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.admin.unmount()
        self.metrics.stop()
        self.gate.stop()
        self.model.close()
        kept = keeper.current()
        if kept is not None:
            kept.bye()
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
        eventfd.install_handler()
        sigbus.install()  # a peer that truncates its memory must not kill us (vhost_user/sigbus.py)
        self.start()
        try:
            while not wake.wait(1.0):
                pass
        finally:
            self.stop()


def _raise_fd_limit() -> None:
    """Every connection and guest memory region costs the daemon fds: take all we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
