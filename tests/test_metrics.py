"""The daemon's Prometheus endpoint, scraped and parsed with prometheus_client's own parser,
over its Unix socket and over TCP, while a real process on the bus writes a disk and two
NetClient ports exchange frames through a switch."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alacrity.bus import metrics
from tests.conftest import Daemon, fuse_available, need
from tests.test_gate_attacks import AS_NOBODY, PLAIN_PYTHON, searchable_by_others
from tests.test_top import Load, ask_status, wait_for

DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """An alacrityd serving metrics on its default Unix socket and on 127.0.0.1:PORT."""
    need(fuse_available(), "FUSE is not available (/dev/fuse or fusermount3 missing)")
    need(os.geteuid() == 0, "alacrityd needs root")
    port = free_port()
    d = Daemon(tmp_path, args=["--metrics", f"127.0.0.1:{port}"])
    d.start()
    d.port = port  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.stop()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def get_unix(path: Path, timeout: float = 10.0) -> tuple[int, str, str]:
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type", ""), reply.read().decode()
    finally:
        conn.close()


def get_tcp(port: int, timeout: float = 10.0) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, "", ""


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample, by (name, labels), read by the library's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(daemon, over: str) -> dict[tuple[str, frozenset], float]:
    status, content_type, text = (get_unix(daemon.run_dir / "metrics.sock") if over == "unix"
                                  else get_tcp(daemon.port))
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    return parse(text)


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def ports_of(samples, device: str) -> list[str]:
    return sorted({dict(labels)["port"] for name, labels in samples
                   if name == "alacrity_switch_port_rx_packets_total" and dict(labels)["device"] == device})


def test_counters_rise_per_device_and_per_port_over_unix_and_tcp(served, tmp_path):
    served.make_disk("disk0", "lab", tmp_path / "disk0.img")
    served.make_switch("lan0", ["lab"])
    with Load(served, "lab", "disk0", "lan0") as load:
        before = {over: scrape(served, over) for over in ("unix", "tcp")}
        load.do("disk")
        load.do("net")
        time.sleep(1.5)
        load.do("idle")
        after = {over: scrape(served, over) for over in ("unix", "tcp")}
        for over in ("unix", "tcp"):
            b, a = before[over], after[over]
            for name in ("alacrity_blk_writes_total", "alacrity_blk_written_bytes_total"):
                assert value(a, name, device="disk0") > value(b, name, device="disk0"), (over, name)
            reads = "alacrity_blk_reads_total"
            assert value(a, reads, device="disk0") == value(b, reads, device="disk0")
            assert value(a, "alacrity_device_connections", device="disk0", **{"class": "blk"}) == 1
            assert value(a, "alacrity_device_connections", device="lan0", **{"class": "switch"}) == 2
            assert value(a, "alacrity_device_errors_total", device="disk0", **{"class": "blk"}) == 0
            assert value(a, "alacrity_device_up", device="lan0", **{"class": "switch"}) == 1
            assert value(a, "alacrity_bus_members", bus="lab") == 1
            assert value(a, "alacrity_bus_devices", bus="lab") == 2
            assert value(a, "alacrity_bus_device", bus="lab", device="lan0", **{"class": "switch"}) == 1
            ports = ports_of(a, "lan0")
            assert len(ports) == 2, ports
            for port in ports:
                for name in ("alacrity_switch_port_rx_packets_total", "alacrity_switch_port_tx_packets_total",
                             "alacrity_switch_port_rx_bytes_total", "alacrity_switch_port_tx_bytes_total"):
                    rose = value(a, name, device="lan0", port=port) > value(b, name, device="lan0", port=port)
                    assert rose, (over, name, port)
                assert value(a, "alacrity_switch_port_running", device="lan0", port=port) == 1
            print(over, {name: v for (name, labels), v in a.items() if "lan0" in str(labels) or
                         "disk0" in str(labels)})
        # Frames go from each port to the other: what one sent, the other received.
        a = after["unix"]
        p1, p2 = ports_of(a, "lan0")
        assert value(a, "alacrity_switch_port_tx_packets_total", device="lan0", port=p1) == \
            value(a, "alacrity_switch_port_rx_packets_total", device="lan0", port=p2)
    documented = DOCS.read_text()
    missing = sorted({n for n, _ in a if n.startswith("alacrity_") and f"`{n}`" not in documented})
    assert not missing, f"document these in docs/metrics.md: {missing}"


def test_the_unix_socket_is_roots_alone(served):
    path = served.run_dir / "metrics.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    searchable_by_others(served.run_dir)
    knock = textwrap.dedent("""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sys.argv[1])
            print("connected")
        except PermissionError:
            print("refused")
    """)
    out = subprocess.run([*AS_NOBODY, PLAIN_PYTHON, "-c", knock, str(path)], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "refused", out


def test_a_hung_switch_costs_a_scrape_a_bounded_wait(served, tmp_path):
    served.make_disk("disk0", "lab", tmp_path / "disk0.img")
    served.make_switch("lan0", ["lab"])
    with Load(served, "lab", "disk0", "lan0"):
        pid = int((served.admin / "devices/lan0/pid").read_text())
        assert value(scrape(served, "unix"), "alacrity_device_up", device="lan0", **{"class": "switch"}) == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.3)  # past the switch's stats cache
            # Scrapes at once: the bounded ones wait for the switch at most status.SLOW_WAIT_S, the
            # ones beyond the cap are turned away at once; the gate goes on answering meanwhile.
            results: list[tuple[int, float]] = []

            def one() -> None:
                start = time.monotonic()
                code = get_tcp(served.port)[0]
                results.append((code, time.monotonic() - start))

            threads = [threading.Thread(target=one) for _ in range(metrics.MAX_SCRAPES + 2)]
            for t in threads:
                t.start()
            start = time.monotonic()
            asked: dict = {}

            def status() -> None:
                begun = time.monotonic()
                asked["snap"] = ask_status(served.run_dir)["status"]
                asked["took"] = time.monotonic() - begun

            asking = threading.Thread(target=status)
            asking.start()
            time.sleep(0.2)
            with socket.socket(socket.AF_UNIX) as sock:  # the gate answers others meanwhile
                sock.settimeout(10)
                begun = time.monotonic()
                sock.connect(str(served.run_dir / "control.sock"))
                sock.sendall(b'{"op": "whoami"}\n')
                whoami = json.loads(sock.makefile().readline())
                whoami_took = time.monotonic() - begun
            asking.join(10)
            for t in threads:
                t.join(10)
            took = time.monotonic() - start
            print(f"with the switch stopped: scrapes (status, s) {sorted(results)}; status "
                  f"{asked['took']:.2f} s; whoami meanwhile {whoami_took * 1e3:.1f} ms")
            assert whoami["uid"] == 0 and whoami_took < 0.5 and asked["took"] < 4.0
            codes = sorted(code for code, _ in results)
            assert codes.count(200) >= 1 and set(codes) <= {200, 503}
            assert max(t for _, t in results) < 4.0 and took < 6.0
            snap = asked["snap"]
            lan0 = next(d for d in snap["devices"] if d["name"] == "lan0")
            assert "not answering" in lan0["error"] or "not answering" in lan0.get("last_error", ""), lan0
            samples = scrape(served, "unix")
            assert value(samples, "alacrity_device_up", device="lan0", **{"class": "switch"}) == 0
            assert value(samples, "alacrity_device_up", device="disk0", **{"class": "blk"}) == 1
            assert value(samples, "alacrity_blk_writes_total", device="disk0") is not None
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: value(scrape(served, "unix"), "alacrity_device_up", device="lan0",
                               **{"class": "switch"}) == 1, what="the switch to answer again")


def test_metrics_addresses_are_checked(tmp_path):
    for good, kind in (("127.0.0.1:9464", "tcp"), ("[::1]:9464", "tcp"), ("localhost:1", "tcp"),
                       ("unix:/run/x.sock", "unix")):
        assert metrics.parse_endpoint(good).kind == kind
    for bad in ("9464", "127.0.0.1", "127.0.0.1:99999", "unix:relative", "host name:1", "http://x:1"):
        with pytest.raises(ValueError):
            metrics.parse_endpoint(bad)
    run = tmp_path / "run"
    assert [str(e) for e in metrics.endpoints(None, run)] == [f"unix:{run}/metrics.sock"]
    assert [str(e) for e in metrics.endpoints(["127.0.0.1:1"], run)] == [f"unix:{run}/metrics.sock",
                                                                         "127.0.0.1:1"]
    assert [str(e) for e in metrics.endpoints(["unix:/x.sock"], run)] == ["unix:/x.sock"]
    assert metrics.endpoints(["off"], run) == []
    out = subprocess.run([sys.executable, "-m", "alacrity.cli", "daemon", "--run-dir", str(run),
                          "--metrics", "nowhere"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "HOST:PORT" in out.stderr, out.stderr


def test_an_address_in_use_stops_the_daemon_with_one_line(tmp_path):
    need(os.geteuid() == 0, "alacrityd needs root")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "alacrity.cli", "daemon", "--mount", str(tmp_path / "admin"),
                "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
                "--metrics", f"127.0.0.1:{port}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert re.search(rf"cannot serve metrics on 127.0.0.1:{port}: .*in use", last), out.stderr
    with contextlib.suppress(FileNotFoundError):
        assert not (tmp_path / "run" / "alacrityd.pid").exists()


def test_every_metric_in_the_docs_is_served_or_known():
    """docs/metrics.md names no metric the code does not make."""
    documented = set(re.findall(r"`(alacrity_[a-z_]+)", DOCS.read_text()))
    source = Path(metrics.__file__).read_text()
    known = set(re.findall(r'"(alacrity_[a-z_]+)', source))
    known |= {f"alacrity_switch_port_{c}" for c in metrics.PORT_COUNTERS}
    known |= {f"alacrity_switch_{k}" for k in metrics.SWITCH_TOTALS}
    stray = sorted(n for n in documented if n.removesuffix("_total").removesuffix("_info") not in known
                   and not n.endswith("_"))
    assert not stray, f"documented but not made: {stray}"


def tricky_snapshot() -> dict:
    """A snapshot with every kind of family and label values that need escaping."""
    port = {key: 7 * i + 1_234_567_890 * (i % 2) for i, key in enumerate(metrics.PORT_COUNTERS)}
    return {
        "devices": [
            {"name": "disk0", "class": "blk", "buses": ["lab", "b\"2"], "error": "",
             "counters": {"connections": 1, "errors": 0, "reads": 12, "bytes_read": 10**12,
                          "odd-key": 3, "console_count": 2}, "views": {}},
            {"name": 'we\\ird"\nname', "class": "rng", "buses": [], "error": "gone",
             "counters": {"bytes": 0.5, "requests_total": 4}, "views": {}},
            {"name": "lan0", "class": "switch", "buses": ["lab"], "error": "", "counters": {},
             "views": {"ports": {"10": {**port, "running": 1, "label": "lan0[pid 5]",
                                        "mac": "52:54:00:00:00:01"},
                                 "uplink": {**port, "uplink": 1, "label": "lan0:tap", "mac": "é"},
                                 "2": {"rx_packets": 0}},
                       "stats": {"ports": 2, "fdb_entries": 3, "floods": 10**7, "engine": "native"}}},
        ],
        "buses": [{"name": "lab", "devices": {"disk0": "disk0"}, "members": [1, 2],
                   "vms": [{"name": "vm\"1", "pid": 99}]}],
        "gate": {"refusals": 1, "control_connections": 2, "device_connections": 3},
        "took_s": 0.001234,
        "daemon": {"uptime_s": 12345678.9, "cpu_s": 1.5, "rss_bytes": 2**31, "threads": 9},
    }


@pytest.mark.parametrize(("accept", "ours"), [
    ("", True),
    ("text/plain;version=0.0.4", True),
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),  # what Prometheus 2 and 3 send
    ("application/openmetrics-text", True),
    ("text/plain;version=1.0.0;escaping=allow-utf-8", False),
    ("application/openmetrics-text;version=1.0.0;escaping=dots", False),
])
def test_our_renderers_match_the_librarys_byte_for_byte(accept, ours, monkeypatch):
    """Each format as prometheus_client's own encoder makes it from the same families,
    and the library's parser reads our text back to the same values. The formats
    scrapers ask for are rendered by us (the library's objects are never made)."""
    from prometheus_client.exposition import choose_encoder

    snap = tricky_snapshot()
    with monkeypatch.context() as patched:
        if ours:
            patched.setattr(metrics.Family, "to_metric", None)
        body, content_type = metrics.encode(accept, snap)
    encoder, expected_type = choose_encoder(accept)
    assert content_type == expected_type
    assert body == encoder(metrics._Families(list(metrics.families(snap))))
    if content_type.startswith("text/plain; version=0.0.4"):
        parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(body.decode()) for s in family.samples}
        assert parsed[("alacrity_blk_read_bytes_total", (("device", "disk0"),))] == 10**12
        assert parsed[("alacrity_device_up", (("class", "rng"), ("device", 'we\\ird"\nname')))] == 0
        assert parsed[("alacrity_bus_vm_info", (("bus", "lab"), ("pid", "99"), ("vm", 'vm"1')))] == 1
