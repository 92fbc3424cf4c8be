"""The bus's counters in the Prometheus text format, for the tools people already run.

Each scrape is one snapshot (bus/status.py, the same one `alacrity top` reads), turned
into metric families with stable names and labels (`device`, `class`, `bus`, `port`):
docs/metrics.md lists every one. prometheus_client chooses the format from the Accept
header; the two that scrapers ask for (text 0.0.4 and OpenMetrics 1.0.0) are rendered
here, byte for byte as the library renders them (the test compares the two) in a third
of its time, and any other variant by the library. Nothing is registered in the
library's global registry.

The endpoint is plain HTTP (`GET /metrics`), accepted by a thread per listening socket
and served by a few kept threads: a Unix socket by default (RUN_DIR/metrics.sock, mode
0600: root only), and TCP addresses when asked (`alacrityd --metrics 127.0.0.1:9464`).
It is bounded: at most `MAX_SCRAPES` scrapes at once (more get 503 at once), a connection that does not send
its request or read its answer within `IO_TIMEOUT_S` is dropped, and a switch that does
not answer costs a scrape at most status.SLOW_WAIT_S (it then shows `alacrity_device_up 0`).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import UNDERSCORES
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.utils import floatToGoString

from alacrity.bus.status import Status
from alacrity.switch.port import COUNTERS as PORT_COUNTERS

log = logging.getLogger("alacrity.metrics")

METRICS_SOCKET = "metrics.sock"
MAX_SCRAPES = 4
IO_TIMEOUT_S = 5.0

#: Per-class counters with a name or a help text of their own; any other counter of a
#: class is served as alacrity_CLASS_COUNTER_total (docs/metrics.md).
CLASS_COUNTERS: dict[tuple[str, str], tuple[str, str]] = {
    ("blk", "reads"): ("alacrity_blk_reads", "Read requests completed."),
    ("blk", "writes"): ("alacrity_blk_writes", "Write requests completed."),
    ("blk", "flushes"): ("alacrity_blk_flushes", "Flush requests completed (each after an fdatasync)."),
    ("blk", "discards"): ("alacrity_blk_discards", "Discard and write-zeroes requests completed."),
    ("blk", "bytes_read"): ("alacrity_blk_read_bytes", "Bytes read from the image for clients."),
    ("blk", "bytes_written"): ("alacrity_blk_written_bytes", "Bytes written to the image by clients."),
    ("blk", "io_errors"): ("alacrity_blk_io_errors", "Requests that failed with an I/O error."),
    ("switch", "ports_opened"): ("alacrity_switch_ports_opened", "Ports handed to the switch process."),
    ("switch", "restarts"): ("alacrity_switch_restarts", "Times the switch process was restarted."),
    ("rng", "bytes"): ("alacrity_rng_bytes", "Random bytes given to clients."),
    ("rng", "requests"): ("alacrity_rng_requests", "Requests served."),
    ("rng", "throttled"): ("alacrity_rng_throttled", "Requests cut short by the rate limit."),
}
#: Device counters that are levels, not counts: served as gauges.
GAUGE_COUNTERS = {"console_count", "guest_count", "streams"}
#: Counters every device has, served as alacrity_device_* for all classes.
COMMON = ("connections", "errors")

PORT_HELP = {
    "rx_packets": "Frames delivered to the port's client.",
    "rx_bytes": "Bytes delivered to the port's client.",
    "rx_dropped": "Frames for the port dropped: no room in its receive ring, or the ring not running.",
    "rx_dropped_offload": "Frames for the port dropped: they needed an offload it did not negotiate.",
    "tx_packets": "Frames sent by the port's client.",
    "tx_bytes": "Bytes sent by the port's client.",
    "tx_dropped": "Frames from the port that went to no other port.",
    "tx_errors": "Frames from the port refused as malformed.",
    "kicks": "Notifications received from the port's client.",
    "interrupts": "Notifications sent to the port's client.",
}
SWITCH_TOTALS = {  # the switch's `stats` view: name -> (type, help)
    "ports": ("gauge", "Ports open on the switch, the uplink not counted."),
    "fdb_entries": ("gauge", "MAC addresses in the forwarding table."),
    "floods": ("counter", "Frames flooded to every port (unknown or broadcast destination)."),
    "batches": ("counter", "Forwarding batches run."),
    "sleeps": ("counter", "Times the switch went to sleep on its eventfds."),
    "wakeups": ("counter", "Times the switch was woken."),
    "fdb_evictions": ("counter", "Forwarding-table entries evicted to make room."),
}


@functools.lru_cache(maxsize=1024)
def _class_counter(cls: str, key: str) -> tuple[str, str, str]:
    """(kind, name, help) of a device counter that is not one of COMMON."""
    if key in GAUGE_COUNTERS:
        return "gauge", f"alacrity_{_name(cls)}_{_name(key)}", f"The {cls} device's {key}."
    metric, doc = CLASS_COUNTERS.get((cls, key), (f"alacrity_{_name(cls)}_{_name(key)}",
                                                  f"The {cls} device's {key} counter."))
    return "counter", metric, doc


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


@functools.lru_cache(maxsize=4096)
def _label_text(items: tuple[tuple[str, str], ...]) -> str:
    """`{k="v",...}` sorted by name and escaped as both text formats escape label values."""
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(items)) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


@dataclass
class Family:
    """One metric family: its samples as (label text, labels, value). Cheaper than the
    library's Metric objects, which are made from it only for the formats we do not
    render ourselves (`to_metric`)."""

    kind: str  # "counter", "gauge" or "info"
    name: str
    doc: str
    labelnames: tuple[str, ...]
    samples: list[tuple[str, tuple[tuple[str, str], ...], float]]

    def to_metric(self) -> Metric:
        make = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "info": InfoMetricFamily}
        family = make[self.kind](self.name, self.doc, labels=list(self.labelnames))
        for _, items, value in self.samples:
            values = [v for _, v in items[:len(self.labelnames)]]
            if self.kind == "info":
                family.add_metric(values, dict(items[len(self.labelnames):]))
            else:
                family.add_metric(values, value)
        return family


class Families:
    """Metric families by name, each made on first use."""

    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def _family(self, kind: str, name: str, doc: str, labels: dict[str, str]) -> Family:
        # The suffix a format adds is not part of the family's name (as in the library).
        name = name.removesuffix({"counter": "_total", "info": "_info"}.get(kind, "\0"))
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = Family(kind, name, doc, tuple(labels), [])
        return family

    def add(self, kind: str, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        items = tuple(labels.items())
        self._family(kind, name, doc, labels).samples.append((_label_text(items), items, value))

    def info(self, name: str, doc: str, labels: dict[str, str], values: dict[str, str]) -> None:
        items = tuple(labels.items()) + tuple(values.items())
        self._family("info", name, doc, labels).samples.append((_label_text(items), items, 1.0))


def families(snap: dict[str, Any]) -> Iterable[Family]:
    """The snapshot as metric families (docs/metrics.md)."""
    out = Families()
    for dev in snap["devices"]:
        name, cls = dev["name"], dev["class"]
        ident = {"device": name, "class": cls}
        counters: dict[str, int] = dev["counters"]
        out.add("gauge", "alacrity_device_up", "1 if the device's state could be read for this scrape, "
                "else 0 (a switch process not answering, a class not available).", ident,
                0 if dev["error"] else 1)
        out.add("gauge", "alacrity_device_connections", "Clients connected to the device now (for a "
                "switch: its ports, the uplink not counted).", ident, counters.get("connections", 0))
        out.add("counter", "alacrity_device_errors", "Connections the device broke for a protocol or "
                "guest error (the latest reason is devices/NAME/last_error).", ident,
                counters.get("errors", 0))
        for bus in dev["buses"]:
            out.add("gauge", "alacrity_bus_device", "1 for each device linked into each bus.",
                    {"bus": bus, "device": name, "class": cls}, 1)
        by_device = {"device": name}
        for key, value in counters.items():
            if key not in COMMON:
                out.add(*_class_counter(cls, key), by_device, value)
        if cls == "switch":
            _switch(out, name, dev["views"])
    for bus in snap["buses"]:
        label = {"bus": bus["name"]}
        out.add("gauge", "alacrity_bus_members", "Live processes admitted to the bus (their children "
                "are on it too).", label, len(bus["members"]))
        out.add("gauge", "alacrity_bus_devices", "Devices linked into the bus.", label, len(bus["devices"]))
        out.add("gauge", "alacrity_bus_vms", "QEMU VMs running below the bus's members.", label,
                len(bus["vms"]))
        for vm in bus["vms"]:
            out.info("alacrity_bus_vm", "One per VM running on the bus, with its name and QEMU's pid.",
                     label, {"vm": vm["name"], "pid": str(vm["pid"])})
    gate = snap.get("gate")
    if gate is not None:
        out.add("counter", "alacrity_gate_refusals", "Connections and requests the gate refused.", {},
                gate["refusals"])
        out.add("gauge", "alacrity_gate_control_connections", "Control-socket connections open now.", {},
                gate["control_connections"])
        out.add("gauge", "alacrity_gate_device_connections", "Device connections the daemon serves in its "
                "own threads now (switch ports are served by the switch processes).", {},
                gate["device_connections"])
    out.add("gauge", "alacrity_status_seconds", "How long this scrape's snapshot of the bus took.", {},
            snap["took_s"])
    daemon = snap["daemon"]
    out.add("gauge", "alacrity_daemon_uptime_seconds", "How long alacrityd has been serving.", {},
            daemon["uptime_s"])
    if "cpu_s" in daemon:
        out.add("counter", "alacrity_daemon_cpu_seconds", "CPU time alacrityd used (user and system, all "
                "its threads; its switch processes not counted).", {}, daemon["cpu_s"])
        out.add("gauge", "alacrity_daemon_resident_memory_bytes", "alacrityd's resident memory.", {},
                daemon["rss_bytes"])
        out.add("gauge", "alacrity_daemon_threads", "alacrityd's threads.", {}, daemon["threads"])
    return out.by_name.values()


def _switch(out: Families, device: str, views: dict[str, Any]) -> None:
    for port_id, port in sorted(views.get("ports", {}).items(), key=lambda kv: _port_key(kv[0])):
        labels = {"device": device, "port": port_id}
        for key in PORT_COUNTERS:
            if isinstance(port.get(key), int):
                out.add("counter", f"alacrity_switch_port_{key}", PORT_HELP.get(key, f"The port's {key}."),
                        labels, port[key])
        out.add("gauge", "alacrity_switch_port_running", "1 if both of the port's rings are running.",
                labels, 1 if port.get("running") else 0)
        out.info("alacrity_switch_port", "One per port: its label (device[pid N] of its client, or "
                 "device:tap for the uplink), its MAC and whether it is the uplink.", labels,
                 {"label": str(port.get("label", "")), "mac": str(port.get("mac", "")),
                  "uplink": "1" if port.get("uplink") else "0"})
    totals = views.get("stats", {})
    for key, (kind, doc) in SWITCH_TOTALS.items():
        if isinstance(totals.get(key), int):
            out.add(kind, f"alacrity_switch_{key}", doc, {"device": device}, totals[key])
    if "engine" in totals:
        out.info("alacrity_switch_engine", "The switch's forwarding engine (native or python).",
                 {"device": device}, {"engine": str(totals["engine"])})


def _port_key(port: str) -> tuple[int, str]:
    return (int(port), port) if port.isdigit() else (1 << 30, port)


# -- the two text formats

def render_text(fams: Iterable[Family]) -> bytes:
    """The Prometheus text format 0.0.4, byte for byte what prometheus_client's
    generate_latest makes of the same families (tests/test_metrics.py compares them),
    in a third of its time: the label text of each sample is made once and kept."""
    out: list[str] = []
    for f in fams:
        name, kind = f.name, f.kind
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name, kind = name + "_info", "gauge"
        doc = f.doc.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        out += [f"{name}{labels} {floatToGoString(value)}\n" for labels, _, value in f.samples]
    return "".join(out).encode()


def render_openmetrics(fams: Iterable[Family]) -> bytes:
    """OpenMetrics 1.0.0 (what Prometheus asks for first), byte for byte what
    prometheus_client's openmetrics.generate_latest makes of the same families."""
    out: list[str] = []
    for f in fams:
        sample = f.name + {"counter": "_total", "info": "_info"}.get(f.kind, "")
        out.append(f"# HELP {f.name} {_escape(f.doc)}\n# TYPE {f.name} {f.kind}\n")
        out += [f"{sample}{labels} {floatToGoString(value)}\n" for labels, _, value in f.samples]
    out.append("# EOF\n")
    return "".join(out).encode()


class _Families:
    """Families as a prometheus_client collector, for its own encoders."""

    def __init__(self, fams: Iterable[Family]) -> None:
        self.fams = fams

    def collect(self) -> Iterator[Metric]:
        return (f.to_metric() for f in self.fams)


def encode(accept: str, snap: dict[str, Any]) -> tuple[bytes, str]:
    """The snapshot in the format the Accept header chose (prometheus_client's own
    choice) and its content type. The library's default text format and OpenMetrics
    1.0.0 are rendered here; any other variant (an escaping that rewrites names) by the
    library itself."""
    encoder, content_type = choose_encoder(accept)
    fams = list(families(snap))
    options = getattr(encoder, "keywords", {})
    if options.get("escaping", UNDERSCORES) == UNDERSCORES:  # our names need no escaping
        func = getattr(encoder, "func", encoder)
        if func is generate_latest and not options:
            return render_text(fams), content_type
        if func is openmetrics_latest and options.get("version", "1.0.0") == "1.0.0":
            return render_openmetrics(fams), content_type
    return encoder(_Families(fams)), content_type  # type: ignore[arg-type]


# -- endpoints

@dataclass(frozen=True)
class Endpoint:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """`unix:PATH`, `HOST:PORT` or `[IPv6]:PORT`. Raises ValueError with what to write."""
    hint = "use unix:PATH, HOST:PORT (e.g. 127.0.0.1:9464) or [IPV6]:PORT"
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
            raise ValueError(f"--metrics {text}: give an absolute socket path of at most 107 bytes")
        return Endpoint("unix", path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--metrics {text}: {hint}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise ValueError(f"--metrics {text}: {hint}") from None
    return Endpoint("tcp", host=host, port=int(port_text))


def endpoints(specs: Iterable[str] | None, run_dir: Path) -> list[Endpoint]:
    """Where to serve: the default Unix socket unless a `unix:` one is given, plus every
    TCP address given; `off` alone serves nowhere."""
    specs = list(specs or ())
    if specs == ["off"]:
        return []
    chosen = [parse_endpoint(s) for s in specs]
    if not any(e.kind == "unix" for e in chosen):
        chosen.insert(0, Endpoint("unix", path=str(run_dir / METRICS_SOCKET)))
    return chosen


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = IO_TIMEOUT_S  # reading the request and writing the answer
    server_version = "alacrityd"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self._send(404, b"alacrityd serves GET /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body, content_type = encode(self.headers.get("Accept", ""),
                                        self.server.status.snapshot())  # type: ignore[attr-defined]
        except Exception as exc:
            log.exception("metrics: scrape failed")
            self._send(500, f"scrape failed: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, body, content_type)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _Bounded:
    """Mixed into the servers: scrapes are served by a few kept threads, at most
    MAX_SCRAPES at once over every endpoint; one more is answered 503 at once."""

    block_on_close = False
    request_queue_size = 32
    status: Status
    slots: threading.BoundedSemaphore
    workers: ThreadPoolExecutor

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Length: 0\r\n\r\n")
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            self.workers.submit(self._serve, request, client_address)
        except RuntimeError:  # stopping
            self.slots.release()
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a scrape connection failed", exc_info=True)


class _TcpServer(_Bounded, http.server.HTTPServer):
    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: it asks DNS for our name
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        path = self.server_address
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a daemon that died
        os.fchmod(self.socket.fileno(), 0o600)  # the socket file is made with this mode: root only
        self.socket.bind(path)
        os.chmod(path, 0o600)


class MetricsError(RuntimeError):
    """An endpoint could not be served (the address is in use, say)."""


class MetricsServer:
    """Serves `status` on each endpoint, each from a thread of its own."""

    def __init__(self, status: Status, where: list[Endpoint]) -> None:
        self.status = status
        self.where = where
        self.servers: list[tuple[Endpoint, socketserver.BaseServer]] = []
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self.workers = ThreadPoolExecutor(max_workers=MAX_SCRAPES, thread_name_prefix="metrics")

    def start(self) -> None:
        for endpoint in self.where:
            try:
                self.servers.append((endpoint, self._server(endpoint)))
            except OSError as exc:
                self.stop()
                raise MetricsError(f"cannot serve metrics on {endpoint}: {exc.strerror or exc}; "
                                   "give another address with --metrics, or --metrics off") from None
        for endpoint, server in self.servers:
            # A long poll: the loop wakes for connections, not to look at the clock (stop()
            # closes the socket under it, which wakes it).
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 60.0}, daemon=True,
                             name=f"metrics {endpoint}").start()
            log.info("metrics: serving GET /metrics on %s", endpoint)

    def _server(self, endpoint: Endpoint) -> socketserver.BaseServer:
        server: _TcpServer | _UnixServer
        if endpoint.kind == "unix":
            server = _UnixServer(endpoint.path, _Handler)
        else:
            make = _Tcp6Server if ":" in endpoint.host else _TcpServer
            server = make((endpoint.host, endpoint.port), _Handler)
        server.status, server.slots, server.workers = self.status, self.slots, self.workers
        return server

    def stop(self) -> None:
        for endpoint, server in self.servers:
            # shutdown() waits for serve_forever's loop to notice: not here. Closing the
            # socket wakes the loop, which then sees the request to stop.
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()
            if endpoint.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint.path)
        self.servers = []
        self.workers.shutdown(wait=False, cancel_futures=True)
