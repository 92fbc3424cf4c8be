"""The native engine (switch/native): the engine scenarios of test_switch_engine,
test_switch_offload and test_switch_tap run again with NativeEngine, and a differential
test drives a Python engine and a native engine over identical in-memory rings with random
traffic, RX shortages, hostile descriptors and headers, and dirty logging switched on and off
(logs too small for the guest included): used rings, buffer contents, dirty logs, counters,
FDB, signals and broken-port reasons must stay identical, step by step. A second
one does the same with GSO and NEEDS_CSUM frames between ports that negotiated the offloads
(which C forwards whole) and ports that did not, believable and hostile (lying hdr_len,
gso_size, csum_start/offset, cut frames, wrong IP versions, ethertypes and protocols)."""

from __future__ import annotations

import logging
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alacrity.switch import engines as engine_module
from alacrity.switch import native
from alacrity.switch.coalesce import Bounds
from alacrity.switch.engine import Engine
from alacrity.switch.engines import make_engine
from alacrity.switch.fdb import Fdb
from alacrity.vhost_user.dirty_log import DirtyLog
from alacrity.virtio import net as vn
from alacrity.virtio.device_queue import DeviceQueue
from alacrity.virtio.features import F_VERSION_1, bit
from alacrity.virtio.ring import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueError

try:
    native.load()
except native.NativeUnavailable as exc:
    pytest.skip(f"the native engine cannot be built here: {exc}", allow_module_level=True)

from alacrity.switch.native.engine import NativeEngine, NativeFdb  # noqa: E402
from tests import test_switch_engine, test_switch_offload, test_switch_process, test_switch_tap  # noqa: E402
from tests.test_switch_engine import BASE_FEATURES, BROADCAST, Clock, Host, frame, make  # noqa: E402
from tests.test_switch_offload import ACK, CWR, PSH, TSO_RX, TSO_TX, build_tcp  # noqa: E402

# -- the scenarios of the Python engine's tests, with NativeEngine
_SCENARIOS = [
    *(getattr(test_switch_engine, n) for n in dir(test_switch_engine) if n.startswith("test_")),
    *(getattr(test_switch_offload, n) for n in dir(test_switch_offload) if n.startswith("test_engine_")),
    *(getattr(test_switch_tap, n) for n in dir(test_switch_tap)
      if n.startswith("test_") and "open_tap" not in n and "made_tap" not in n),
]
for _test in _SCENARIOS:
    globals()[f"{_test.__name__}_native"] = _test
fake_tap = test_switch_tap.fake_tap
rig_factory = test_switch_tap.rig_factory
netns = test_switch_tap.netns


@pytest.fixture(autouse=True, scope="module")
def _native_everywhere():
    """The imported scenarios build their engines with NativeEngine."""
    saved = test_switch_engine.ENGINE, test_switch_tap.Engine
    test_switch_engine.ENGINE = test_switch_tap.Engine = NativeEngine
    try:
        yield
    finally:
        test_switch_engine.ENGINE, test_switch_tap.Engine = saved


# -- the native path is the one taken
def test_common_case_stays_in_c():
    engine, (a, b, c), _ = make(3, queue_size=128)
    assert isinstance(engine, NativeEngine)
    engine.batch = 64  # (the default is 128: 100 frames show a batch split in two)
    b.send(a.mac, b"two")
    a.send(b.mac, b"one")
    assert engine.poll_once() == 2
    for i in range(100):
        a.send(b.mac, i.to_bytes(2, "big") * 30)
    assert [engine.poll_once(), engine.poll_once(), engine.poll_once()] == [64, 36, 0]  # batches of 64 a port
    assert engine.punts == 0 and engine.native_frames == 102 and engine.batches == 3
    got = b.received()
    assert got[1:] == [frame(b.mac, a.mac, i.to_bytes(2, "big") * 30) for i in range(100)]
    assert len(a.received()) == 1 and len(c.received()) == 1
    assert (a.port.tx_packets, b.port.rx_packets, b.port.rx_bytes) == (101, 101, 17 + 100 * 74)
    assert engine.floods == 1 and len(engine.fdb) == 2


def test_offload_conversion_is_punted_in_order():
    """A partial checksum for a receiver without GUEST_CSUM goes through Python, between frames
    that C forwards: the receiver gets them all, in order."""
    engine, (a, b), _ = make(2, features=BASE_FEATURES | bit(vn.F_CSUM))
    b.send(a.mac)
    engine.poll_once()
    a.received()
    partial = vn.NetHeader(vn.HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 6).pack()
    for i in range(9):
        a.send(b.mac, bytes([i]) * 40, header=partial if i % 3 == 1 else None)
    assert engine.poll_once() == 9
    got = b.received()
    assert [f[14] for f in got] == list(range(9))
    assert engine.punts == 3 and engine.completed == 3


@pytest.mark.parametrize("v6", [False, True])
def test_gso_frames_go_whole_in_c(v6: bool):
    """TSO frames to receivers that took TSO stay in C (header as sent, frame whole over
    mergeable buffers, 64 KiB included); to a receiver without TSO they are cut in Python."""
    engine, _, _ = make(0)
    sender = Host(1, features=TSO_TX | TSO_RX, queue_size=64, tx_slot=70000)
    tso = Host(2, features=TSO_TX | TSO_RX, queue_size=128)
    plain = Host(3, queue_size=128)
    for h in (sender, tso, plain):
        engine.add_port(h.port)
    tso.send(sender.mac)
    plain.send(sender.mac)
    engine.poll_once()
    for h in (sender, tso, plain):
        h.received()
    sizes = [3000, 20000, 65000] if not v6 else [3000, 20000, 64990]
    built = [build_tcp(bytes([i]) * n, v6=v6, seq=i, src=sender.mac, dst=tso.mac)
             for i, n in enumerate(sizes)]
    for b in built:
        sender.send_raw(b.frame, b.packed(1448, hdr_len=b.payload_at))
    assert engine.poll_once() == len(built)
    assert engine.punts == 0 and engine.native_frames == 2 + len(built)
    got = tso.received_with_headers()
    assert [f for _, f in got] == [b.frame for b in built]
    assert [h.pack()[:10] for h, _ in got] == [b.packed(1448, hdr_len=b.payload_at)[:10] for b in built]
    assert tso.port.rx_packets == 1 + len(built)  # (and the flooded frame from `plain`)
    assert tso.port.rx_bytes == 19 + sum(len(b.frame) for b in built)
    cut = build_tcp(bytes(5000), v6=v6, src=sender.mac, dst=plain.mac)
    sender.send_raw(cut.frame, cut.packed(1400))
    assert engine.poll_once() == 1
    assert engine.punts == 1 and engine.segmented == 1 and len(plain.received()) == 4


def test_gso_frame_over_64k_breaks_the_sender_in_both_engines():
    for kind in (Engine, NativeEngine):
        engine = kind(Fdb())
        sender = Host(1, features=TSO_TX, queue_size=16, tx_slot=70000)
        tso = Host(2, features=TSO_RX, queue_size=128)
        for h in (sender, tso):
            engine.add_port(h.port)
        b = build_tcp(bytes(60000), src=sender.mac, dst=tso.mac)
        sender.send_raw(b.frame + bytes(vn.MAX_GSO_FRAME + 1 - len(b.frame)), b.packed(1448))  # 1 too many
        engine.poll_once()
        assert [(p.id, p.broken) for p in engine.take_broken()] == [
            (1, f"TX: gso_size 1448 for a frame of {vn.MAX_GSO_FRAME + 1} bytes")]
        assert tso.received() == []


def test_replaced_ring_is_followed():
    """A new DeviceQueue (a re-sent memory table) is picked up where the old one stopped."""
    engine, (a, b), _ = make(2)
    b.send(a.mac)
    a.send(b.mac, b"before")
    engine.poll_once()
    assert b.received()[-1].endswith(b"before")
    old = b.port.rx
    b.port.rx = DeviceQueue(old.memory, old.size, old.desc, old.avail, old.used, event_idx=True,
                            last_avail=old.last_avail)
    a.send(b.mac, b"after")
    engine.poll_once()
    assert b.received() == [frame(b.mac, a.mac, b"after")]


def test_python_only_ports_mix_with_native_ones():
    """A port whose memory C cannot map (no `regions`) is served by the Python path, both ways."""
    engine, (a, b), _ = make(2)
    c = Host(3)
    del c.mem.regions
    engine.add_port(c.port)
    for x, y in ((a, c), (c, b), (b, a), (a, c)):
        x.send(y.mac, x.mac)
        engine.poll_once()
    assert [f[14:] for f in c.received()] == [a.mac, a.mac]
    assert [f[14:] for f in b.received()] == [a.mac, c.mac]
    assert [f[14:] for f in a.received()] == [c.mac, b.mac]
    assert engine.broken == [] and engine.native_frames == 1 and engine.punts == 2  # C: b -> a


def test_removed_port_is_forgotten():
    engine, (a, b, c), _ = make(3)
    b.send(a.mac)
    c.send(a.mac)
    engine.poll_once()
    engine.remove_port(2)
    assert {e.port for e in engine.fdb.entries(engine.clock())} == {3}
    c.received()
    a.send(b.mac)  # unknown again: flooded to c only
    engine.poll_once()
    assert len(c.received()) == 1


# -- selection and the build
def test_make_engine_picks_by_argument_and_environment(monkeypatch):
    assert type(make_engine(kind="python")) is Engine
    assert type(make_engine(kind="native")) is NativeEngine
    monkeypatch.setenv(engine_module.ENGINE_ENV, "python")
    assert type(make_engine()) is Engine
    monkeypatch.setenv(engine_module.ENGINE_ENV, "native")
    assert type(make_engine()) is NativeEngine
    monkeypatch.delenv(engine_module.ENGINE_ENV)
    assert type(make_engine()) is NativeEngine
    with pytest.raises(ValueError, match="unknown switch engine"):
        make_engine(kind="fast")


def test_unavailable_native_engine_falls_back_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", "build failed: gcc: not found")
    with caplog.at_level(logging.WARNING, logger="alacrity.switch"):
        engine = make_engine(kind="native")
    assert type(engine) is Engine
    assert [r.getMessage() for r in caplog.records] == [
        "native switch engine unavailable, using the Python engine: build failed: gcc: not found"]
    with pytest.raises(native.NativeUnavailable):
        make_engine(kind="native", strict=True)


def test_build_failure_is_one_line(monkeypatch, tmp_path):
    """A build that fails says why in one line (and a cache nobody else may write is used)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == str(tmp_path / "alacrity" / "native")
    os.chmod(tmp_path / "alacrity" / "native", 0o777)
    assert native.cache_dir() is None  # writable by others: not trusted
    monkeypatch.setattr(native.sys, "executable", "/bin/false")
    with pytest.raises(native.NativeUnavailable, match="^build failed: ") as info:
        native._build("x", str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["native", "python"])
def test_switch_process_runs_the_engine_it_is_told(kind, monkeypatch, tmp_path):
    monkeypatch.setenv(engine_module.ENGINE_ENV, kind)
    rig = test_switch_process.Rig(tmp_path)
    try:
        a, b = rig.client(), rig.client()
        test_switch_process.exchange(a, b, 100)
        stats = rig.ctl.stats()
        assert stats["stats"]["engine"] == kind
        assert sorted((p["tx_packets"], p["rx_packets"]) for p in stats["ports"]) == [(100, 100), (100, 100)]
    finally:
        rig.close()


def test_built_module_is_cached_by_source_hash():
    name = native.module_name()
    cache = native.cache_dir()
    assert cache is not None and name.startswith("_alacrity_fastpath_")
    assert any(f.startswith(name) for f in os.listdir(cache))


# -- the FDB: NativeFdb against Fdb
# -- the FDB: NativeFdb against Fdb
FDB_OPS = st.lists(st.one_of(
    st.tuples(st.just("learn"), st.integers(0, 7), st.integers(1, 3)),
    st.tuples(st.just("lookup"), st.integers(0, 7)),
    st.tuples(st.just("tick"), st.floats(0, 6)),
    st.tuples(st.just("forget"), st.integers(1, 3)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("ageing"), st.sampled_from([1.0, 5.0, 300.0])),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=FDB_OPS, max_entries=st.integers(1, 5))
def test_native_fdb_matches_fdb(ops, max_entries):
    macs = [bytes([2 * (i % 3) + (i == 7), 0, 0, 0, 0, i]) for i in range(8)]  # 7 is a group address
    ref, nat = Fdb(ageing_s=5.0, max_entries=max_entries), NativeFdb(ageing_s=5.0, max_entries=max_entries)
    now = 0.0
    for op in ops:
        if op[0] == "learn":
            ref.learn(macs[op[1]], op[2], now)
            nat.learn(macs[op[1]], op[2], now)
        elif op[0] == "lookup":
            assert ref.lookup(macs[op[1]], now) == nat.lookup(macs[op[1]], now)
        elif op[0] == "tick":
            now += op[1]
        elif op[0] == "forget":
            ref.forget_port(op[1])
            nat.forget_port(op[1])
        elif op[0] == "expire":
            ref.expire(now)
            nat.expire(now)
        else:
            ref.ageing_s = nat.ageing_s = op[1]
        assert list(ref.table.items()) == list(nat.table.items())
        assert (len(ref), ref.moves, ref.evictions) == (len(nat), nat.moves, nat.evictions)
    assert ref.entries(now) == nat.entries(now)
    again = NativeFdb.from_fdb(ref)
    assert list(again.table.items()) == list(ref.table.items()) and again.evictions == ref.evictions


# -- the differential test
CSUM_TX = BASE_FEATURES | bit(vn.F_CSUM)
CONFIGS = {
    "mrg": dict(features=BASE_FEATURES),
    "mrg-small": dict(features=BASE_FEATURES, rx_buffer=256),
    "no-mrg": dict(features=bit(F_VERSION_1), rx_buffer=1024),
    "legacy": dict(features=0, rx_buffer=2048),  # 10-byte headers
    "csum": dict(features=CSUM_TX | bit(vn.F_GUEST_CSUM)),
    "csum-tx": dict(features=CSUM_TX),  # sends partial checksums, takes only complete ones
    "tso-tx": dict(features=TSO_TX, tx_slot=8192),
    "tso-rx": dict(features=TSO_RX, rx_buffer=512),
    "indirect": dict(features=BASE_FEATURES, indirect=True),
    "python-only": dict(features=BASE_FEATURES, python_only=True),
    "mtu-1000": dict(features=BASE_FEATURES, mtu=1000),
    # GSO both ways, as two Linux guests negotiate it (iperf3 between VMs is all TSO frames)
    "tso": dict(features=TSO_TX | TSO_RX, tx_slot=8192),
    "tso-ecn": dict(features=TSO_TX | TSO_RX | bit(vn.F_GUEST_ECN), tx_slot=8192),
    "tso4-rx": dict(features=BASE_FEATURES | bit(vn.F_GUEST_CSUM) | bit(vn.F_GUEST_TSO4), rx_buffer=1024),
    "tso-no-mrg": dict(features=bit(F_VERSION_1) | (TSO_TX | TSO_RX) & ~bit(vn.F_MRG_RXBUF),
                       rx_buffer=4096, tx_slot=8192),
    "tso-legacy": dict(features=(TSO_TX | TSO_RX) & ~(bit(vn.F_MRG_RXBUF) | bit(F_VERSION_1)),
                       rx_buffer=4096, tx_slot=8192),  # 10-byte headers
    "ufo": dict(features=TSO_TX | TSO_RX | bit(vn.F_HOST_UFO) | bit(vn.F_GUEST_UFO), tx_slot=8192),
}
#: TSO frames, believable and not: what check_header and parse_gso accept must go whole to the
#: receivers that took the offload (in C), and everything else must come out as Python has it.
TSO_HEADERS = ["tso", "tso", "tso6", "tso6-ext", "tso-vlan", "tso-ecn", "tso-hdr-len", "tso-mss-20",
               "tso6-long-ext", "tso-poke", "tso-poke", "tso-hdr-len-over", "tso-gso-size-big",
               "tso-gso-size-zero", "tso-csum-start", "tso-csum-offset", "tso-short", "tso-tiny",
               "tso-no-payload", "tso-no-needs-csum", "tso-udp", "tso-type", "tso6-as-v4", "tso-fragment",
               "tso-proto", "tso-ihl", "tso-doff", "tso-v6-type-on-v4", "tso-ethertype", "tso6-proto",
               "tso-version", "tso6-version", "tso-qinq"]
HEADERS = ["zero"] * 6 + ["valid", "valid", "junk", "csum", "csum", "csum", "csum-far", "flags", "hdr-len",
                         "gso-size", "gso-lie", *TSO_HEADERS]
TX_SHAPES = ["one", "one", "split", "indirect"]
RX_SHAPES = ["one", "one", "split", "readable-first", "tiny", "indirect", "write-then-read", "header-split"]
EVIL_TX = ["addr", "next", "loop", "indirect", "indirect-len", "writable", "avail-jump", "head"]
EVIL_RX = ["avail-jump", "addr", "head", "loop"]


class World:
    def __init__(self, kind: type[Engine], configs: list[str], batch: int, max_entries: int,
                 coalesce: Bounds | None = None, tx_defer_s: float = 0.0) -> None:
        self.clock = Clock()
        self.engine = kind(Fdb(ageing_s=10, max_entries=max_entries), batch=batch, clock=self.clock)
        if coalesce is not None:
            self.engine.coalescer.bounds = coalesce
        self.engine.tx_defer_s = tx_defer_s
        self.hosts: list[Host] = []
        for i, name in enumerate(configs):
            cfg = dict(CONFIGS[name])
            indirect = cfg.pop("indirect", False)
            python_only = cfg.pop("python_only", False)
            h = Host(i + 1, queue_size=16, stock=False, **cfg)
            if indirect:
                h.port.rx.indirect = h.port.tx.indirect = True
            if python_only:
                del h.mem.regions
            h.queues = (h.port.rx, h.port.tx)
            h.log = DirtyLog(memoryview(bytearray((len(h.mem.buf) >> 15) + 2)))
            self.engine.add_port(h.port)
            self.hosts.append(h)
        self.broken: list[tuple[int, str]] = []
        for h in self.hosts:
            stock(h, 16, "one")

    def state(self) -> dict:
        e = self.engine
        return {
            "counters": [h.port.counters() for h in self.hosts],
            "broken": [h.port.broken for h in self.hosts],
            "queues": [(q.last_avail, q.used_idx, q.signalled_used, q.requests)
                       for h in self.hosts for q in h.queues],
            "signals": [h.signals for h in self.hosts],
            "engine": (e.floods, e.batches, e.completed, e.segmented, list(e.ports), self.broken),
            "fdb": (list(e.fdb.table.items()), e.fdb.moves, e.fdb.evictions),
            "coalescing": (e.coalescer.held(), e.coalescer.held_total, e.coalescer.saved,
                           e.coalescer.useless),
            "tx deferral": (e.tx_decisions(), e.next_decision()),
        }


def stock(h: Host, count: int, shape: str) -> None:
    d = h.driver
    q = d.rxq
    size = d.rx_buffer
    for _ in range(count):
        if len(q.free) < 2:
            break
        slot = q.free[-1]
        base = d.rx_base + slot * size
        indirect = None
        if shape == "split":
            bufs = [(base, size // 3, True), (base + size // 3, size - size // 3, True)]
        elif shape == "readable-first":
            bufs = [(base, 8, False), (base + 8, size - 8, True)]
        elif shape == "tiny":
            bufs = [(base, 60, True)]
        elif shape == "header-split":  # the virtio-net header over two buffers (C's slower path)
            bufs = [(base, 5, True), (base + 5, size - 5, True)]
        elif shape == "write-then-read":
            bufs = [(base, size // 2, True), (base + size // 2, size // 2, False)]
        elif shape == "indirect":
            table = base + size - 32
            half = (size - 32) // 2
            indirect = [(base, half, DESC_F_WRITE | DESC_F_NEXT, 1),
                        (base + half, size - 32 - half, DESC_F_WRITE, 0)]
            bufs = [(table, 32, False)]
        else:
            bufs = [(base, size, True)]
        q.add(bufs, slot)
        if indirect is not None:
            _make_indirect(d.area, q, table, indirect)
    q.publish()


def _make_indirect(area, q, table: int, entries: list) -> None:
    for i, (addr, length, flags, nxt) in enumerate(entries):
        DESC.pack_into(area, table + 16 * i, addr, length, flags, nxt)
    head = q.avail_ring.head((q.avail_idx - 1) % q.size)
    DESC.pack_into(q.desc, 16 * head, table, 16 * len(entries), DESC_F_INDIRECT, 0)


def tx_header(kind: str, hs: int, length: int) -> bytes:
    fields = {
        "zero": (0, 0, 0, 0, 0, 0), "valid": (2, 0, 0, 0, 0, 0), "csum": (1, 0, 0, 0, 14, 6),
        "csum-far": (1, 0, 0, 0, length, 0), "flags": (4, 0, 0, 0, 0, 0),
        "hdr-len": (0, 0, length + 1, 0, 0, 0), "gso-size": (0, 0, 0, 100, 0, 0),
        "gso-lie": (1, 1, 54, 1448, 34, 16), "junk": (0, 0, 10, 0, 777, 888),
    }[kind]
    return vn.HEADER.pack(*fields, 7) if hs == 12 else vn.LEGACY_HEADER.pack(*fields)


def tso_frame(kind: str, size: int, src: bytes, dst: bytes, hs: int) -> bytes:
    """A virtio-net header (`hs` bytes) and a TSO frame of the variant `kind`, lies included."""
    v6 = kind.startswith("tso6")
    kind_vlan = kind in ("tso-vlan", "tso-qinq")
    flags = ACK | PSH | (CWR if kind == "tso-ecn" else 0)
    built = build_tcp(bytes(range(256)) * (size // 256 + 1), v6=v6, ext=kind == "tso6-ext",
                      vlan=kind_vlan, src=src, dst=dst, flags=flags)
    f = bytearray(built.frame)
    fields = list(built.header(600))
    l3, l4 = built.l3, built.l4
    if kind == "tso-ecn":
        fields[1] |= vn.GSO_ECN
    elif kind == "tso-hdr-len":
        fields[2] = 10  # a lie Python lets through (only a hint): it goes as sent
    elif kind == "tso-mss-20":
        fields[3] = 20  # believable, not cut: whole to TSO receivers, a counted drop for others
    elif kind == "tso6-long-ext":  # a hop-by-hop header of 240 bytes: past the C copy of the headers
        ext = bytes([6, 29, 1, 236]) + bytes(236)
        f[l3 + 6] = 0
        f[l4:l4] = ext
        fields[4] += len(ext)
    elif kind == "tso-poke":  # one header byte changed
        at = 12 + size % 120
        f[at] ^= size // 120 % 255 + 1
    elif kind == "tso-hdr-len-over":
        fields[2] = len(f)
    elif kind == "tso-gso-size-big":
        fields[3] = len(f)
    elif kind == "tso-gso-size-zero":
        fields[3] = 0
    elif kind == "tso-csum-start":
        fields[4] += 2
    elif kind == "tso-csum-offset":
        fields[5] = 6
    elif kind in ("tso-short", "tso-tiny", "tso-no-payload"):
        # GSO on a frame cut inside its TCP header, its IP header, or before its payload, with
        # hdr_len and gso_size that check_header believes: parse_gso must find the lie
        del f[l4 + 10 if kind == "tso-short" else 20 if kind == "tso-tiny" else built.payload_at :]
        fields[2], fields[3] = 14, 8
    elif kind == "tso-no-needs-csum":
        fields[0] = 0
    elif kind == "tso-udp":
        fields[1] = vn.GSO_UDP
    elif kind == "tso-type":
        fields[1] = 5
    elif kind == "tso6-as-v4":
        fields[1] = vn.GSO_TCPV4
    elif kind == "tso-v6-type-on-v4":
        fields[1] = vn.GSO_TCPV6
    elif kind == "tso-fragment":
        f[l3 + 6] |= 0x20
    elif kind == "tso-proto":
        f[l3 + 9] = 17
    elif kind == "tso6-proto":
        f[l3 + 6] = 17
    elif kind in ("tso-version", "tso6-version"):
        f[l3] = 0x65 if kind == "tso-version" else 0x45
    elif kind == "tso-qinq":  # a believable 802.1ad tag
        f[12:14] = b"\x88\xa8"
    elif kind == "tso-ethertype":  # an IPv4 header behind another ethertype
        f[12:14] = b"\x88\xb5"
    elif kind == "tso-ihl":
        f[l3] = 0x4F
    elif kind == "tso-doff":
        f[l4 + 12] = 0xF0
    header = vn.HEADER.pack(*fields, 0) if hs == 12 else vn.LEGACY_HEADER.pack(*fields)
    return header + bytes(f)


def put_tx(h: Host, data: bytes, shape: str, cuts: list[int]) -> bool:
    d = h.driver
    if not d.tx_free:
        d.reap_tx()
    if not d.tx_free or len(data) > d.tx_slot - 64:
        return False
    slot = d.tx_free[-1]
    base = d.tx_base + slot * d.tx_slot
    d.area[base : base + len(data)] = data
    points = sorted({min(c, len(data)) for c in cuts})[:3] if shape != "one" else []
    edges = [0, *points, len(data)]
    pieces = [(base + a, b - a) for a, b in zip(edges, edges[1:], strict=False)]
    if shape == "indirect":
        table = base + d.tx_slot - 64
        last = len(pieces) - 1
        entries = [(a, n, DESC_F_NEXT if i < last else 0, i + 1) for i, (a, n) in enumerate(pieces)]
        if len(d.txq.free) < 1:
            return False
        d.tx_free.pop()
        d.txq.add([(table, 16 * len(entries), False)], slot)
        _make_indirect(d.area, d.txq, table, entries)
    else:
        if len(d.txq.free) < len(pieces):
            return False
        d.tx_free.pop()
        d.txq.add([(a, n, False) for a, n in pieces], slot)
    d.txq.publish()
    return True


def evil(h: Host, ring: str, kind: str) -> None:
    """Make the next chain (or the ring) of `h`'s `ring` hostile."""
    d = h.driver
    q = d.txq if ring == "tx" else d.rxq
    if kind == "avail-jump":
        struct.pack_into("<H", q.avail, 2, (q.avail_idx + 1000) & 0xFFFF)
        return
    before = q.avail_idx
    if ring == "tx":
        put_tx(h, bytes(h.port.hdr_size) + frame(BROADCAST, h.mac, b"evil"), "one", [])
    else:
        stock(h, 1, "one")
    if q.avail_idx == before:
        return
    head = q.avail_ring.head((q.avail_idx - 1) % q.size)
    addr, length, flags, nxt = DESC.unpack_from(q.desc, 16 * head)
    if kind == "addr":
        addr = 1 << 40
    elif kind == "next":
        flags, nxt = flags | DESC_F_NEXT, 1000
    elif kind == "loop":
        flags, nxt = flags | DESC_F_NEXT, head
    elif kind == "indirect":
        flags |= DESC_F_INDIRECT
    elif kind == "indirect-len":
        flags, length = DESC_F_INDIRECT, 17
    elif kind == "writable":
        flags |= DESC_F_WRITE
    elif kind == "head":
        q.avail_ring.set_head((q.avail_idx - 1) % q.size, 5000)
        return
    DESC.pack_into(q.desc, 16 * head, addr, length, flags, nxt)


def apply(world: World, op: tuple):
    """Do `op` in `world`; what it returned, or the exception it raised, to compare."""
    hosts, engine = world.hosts, world.engine
    try:
        kind = op[0]
        if kind == "poll":
            work = engine.poll_once()
            world.broken += [(p.id, p.broken) for p in engine.take_broken()]
            return work
        if kind == "tick":
            world.clock.now += op[1]
            return None
        h = hosts[op[1] % len(hosts)]
        if kind == "send":
            _, _, dst_kind, src_kind, size, hdr, shape, cuts = op
            n = len(hosts)
            dst = (hosts[dst_kind].mac if dst_kind < n else BROADCAST if dst_kind == n
                   else b"\x02\xee\0\0\0\x01" if dst_kind == n + 1 else b"\x01\0\x5e\0\0\x01")
            src = [h.mac, b"\x02\x77\0\0\0\x01", b"\x02\x77\0\0\0\x02", b"\x03\0\0\0\0\x01"][src_kind]
            if hdr.startswith("tso"):
                raw = tso_frame(hdr, size, src, dst, h.port.hdr_size)
            else:
                body = frame(dst, src, bytes([size % 251]) * size)[: size + 2 if size < 12 else None]
                raw = tx_header(hdr, h.port.hdr_size, len(body)) + body
            if shape == "indirect" and not h.queues[1].indirect:
                shape = "split"  # (an indirect chain where it was not negotiated is an evil-tx op)
            return put_tx(h, raw, shape, cuts)
        if kind == "tso-send":  # a TSO frame of a kind, then mangled: bytes poked, cut, fields changed
            _, _, dst_kind, size, variant, shape, cuts, pokes, cut, changes = op
            dst = hosts[dst_kind].mac if dst_kind < len(hosts) else BROADCAST
            raw = bytearray(tso_frame(variant, size, h.mac, dst, h.port.hdr_size))
            hs = h.port.hdr_size
            for at, value in pokes:
                if hs + at < len(raw):
                    raw[hs + at] = value
            del raw[hs + cut :]
            fields = list(vn.LEGACY_HEADER.unpack_from(raw))
            for index, value in changes.items():
                fields[index] = value & (0xFF if index < 2 else 0xFFFF)
            vn.LEGACY_HEADER.pack_into(raw, 0, *fields)
            if shape == "indirect" and not h.queues[1].indirect:
                shape = "split"
            return put_tx(h, bytes(raw), shape, cuts)
        if kind == "burst":
            _, _, dst_kind, count, size = op
            dst = hosts[dst_kind].mac if dst_kind < len(hosts) else BROADCAST
            return [put_tx(h, bytes(h.port.hdr_size) + frame(dst, h.mac, bytes([i]) * size), "one", [])
                    for i in range(count)]
        if kind == "reap":
            _, _, count, shape = op
            got = h.driver.rxq.completed()
            h.driver.reap_tx()
            stock(h, count, "split" if shape == "indirect" and not h.queues[0].indirect else shape)
            return got
        if kind == "evil-tx":
            return evil(h, "tx", op[2])
        if kind == "evil-rx":
            return evil(h, "rx", op[2])
        if kind == "notify":
            return h.driver.rxq.enable_interrupts()
        if kind == "log":
            return set_log(h, op[2])
    except (QueueError, ValueError, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(op)


def set_log(h: Host, mode: str) -> None:
    """Dirty logging on `h`'s rings: buffers and used rings ("on"), buffers only ("data"), none
    ("off"); "small": into a log of one byte (8 pages), too small for most RX buffers;
    "skewed": the used rings logged past the memory, each index on a page of its own (a log
    address need not be the ring's, QEMU's spec says), so that a missed mark shows."""
    view = h.log.view[:1] if mode.startswith("small") else h.log.view
    log = None if mode == "off" else DirtyLog(view)
    beyond = (len(h.mem.buf) + 4095) >> 12
    for i, (queue, lay) in enumerate(zip(h.queues, (h.driver.rx_layout, h.driver.tx_layout), strict=True)):
        used = lay.used if mode in ("on", "small") else None
        queue.set_log(log, ((beyond + 2 + 3 * i) << 12) - 4 if mode == "skewed" else used)


HOST, DST = st.integers(0, 3), st.integers(0, 6)
GOOD_SEND = st.tuples(st.just("send"), HOST, st.integers(0, 4), st.just(0), st.integers(0, 1504),
                      st.just("zero"), st.just("one"), st.just([]))
ANY_SEND = st.tuples(
    st.just("send"), HOST, DST, st.sampled_from([0, 0, 0, 1, 2, 3]),
    st.one_of(st.integers(0, 64), st.integers(0, 1504), st.sampled_from([1500, 1504, 1505, 1600])),
    st.sampled_from(HEADERS), st.sampled_from(TX_SHAPES), st.lists(st.integers(0, 40), max_size=3))
BURST = st.tuples(st.just("burst"), HOST, st.integers(0, 4), st.integers(1, 20), st.integers(0, 1504))
POLL = st.tuples(st.just("poll"))
LOG = st.tuples(st.just("log"), HOST,
                st.sampled_from(["on", "on", "skewed", "skewed", "data", "off", "small", "small-data"]))
REAP = st.tuples(st.just("reap"), st.integers(0, 3), st.integers(0, 16), st.sampled_from(RX_SHAPES))
OPS = st.lists(st.one_of(
    GOOD_SEND, GOOD_SEND, GOOD_SEND, ANY_SEND, ANY_SEND, BURST, POLL, POLL, POLL, REAP, REAP,
    st.tuples(st.just("tick"), st.sampled_from([0.5, 3.0, 11.0, 40e-6, 150e-6])),
    st.tuples(st.just("notify"), st.integers(0, 3)),
    st.tuples(st.just("evil-tx"), st.integers(0, 3), st.sampled_from(EVIL_TX)),
    st.tuples(st.just("evil-rx"), st.integers(0, 3), st.sampled_from(EVIL_RX)),
    LOG,
), min_size=5, max_size=60)
NICE_OPS = st.lists(st.one_of(GOOD_SEND, GOOD_SEND, BURST, POLL, POLL, REAP, LOG,
                              st.tuples(st.just("tick"), st.sampled_from([3.0, 60e-6]))),
                    min_size=5, max_size=60)
#: Coalescing as the differential test runs it: short bounds, so that ticks cross them.
COALESCING = Bounds(delay_us=100, frames=3, quiet_us=1000)
TX_DEFER_S = 100e-6  # the TX interrupt deferral, the same way (and a quarter of a 16-entry ring: 4)


TSO_CONFIGS = ["tso", "tso", "tso", "tso-ecn", "tso-ecn", "tso4-rx", "tso-no-mrg", "tso-legacy", "ufo",
               "tso-rx", "csum"]
TSO_SEND = st.tuples(
    st.just("tso-send"), HOST, st.integers(0, 4), st.integers(0, 6000), st.sampled_from(TSO_HEADERS),
    st.sampled_from(TX_SHAPES), st.lists(st.integers(0, 120), max_size=3),
    st.one_of(st.just([]), st.lists(st.tuples(st.integers(12, 140), st.integers(0, 255)), max_size=2)),
    st.one_of(st.just(8000), st.just(8000), st.integers(0, 200)),
    st.one_of(st.just({}), st.dictionaries(st.integers(0, 5), st.one_of(
        st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 10, 16, 34, 54, 600]), st.integers(0, 0xFFFF)),
        max_size=2)))
GOOD_TSO_SEND = st.tuples(
    st.just("tso-send"), HOST, st.integers(0, 3), st.integers(600, 6000),  # longer than gso_size 600
    st.sampled_from(["tso", "tso6", "tso6-ext", "tso-vlan", "tso-qinq", "tso-ecn", "tso-hdr-len",
                     "tso-mss-20"]),
    st.sampled_from(TX_SHAPES), st.lists(st.integers(0, 120), max_size=3), st.just([]), st.just(8000),
    st.just({}))
TSO_OPS = st.lists(st.one_of(
    st.one_of(GOOD_TSO_SEND, POLL),
    st.one_of(TSO_SEND, GOOD_SEND, BURST, POLL, REAP, LOG, st.tuples(st.just("notify"), st.integers(0, 3))),
    st.one_of(st.tuples(st.just("evil-tx"), st.integers(0, 3), st.sampled_from(EVIL_TX)),
              st.tuples(st.just("evil-rx"), st.integers(0, 3), st.sampled_from(EVIL_RX))),
), min_size=10, max_size=50)


def assert_in_order(world: World, step: int, op: tuple) -> None:
    """VIRTIO_F_IN_ORDER, which the switch offers: every ring of a port that still works has
    used its buffers in the order they were made available (the entries whose avail slot the
    driver has not reused yet)."""
    for h in world.hosts:
        if h.port.broken is not None:
            continue
        for q in h.queues:
            if q is None:
                continue
            used, avail, size = q.used_idx, q.avail_ring.idx, q.size
            start = max(used - size, avail - size, 0)
            for k in range(start, used):
                head, _written = q.used_ring.element(k % size)
                assert head == q.avail_ring.head(k % size), (
                    f"step {step} {op}: port {h.port.id} used entry {k} is {head}, "
                    f"made available as {q.avail_ring.head(k % size)}")


def assert_same(py: World, nat: World, step: int, op: tuple) -> None:
    assert_in_order(py, step, op)
    assert_in_order(nat, step, op)
    for i, (a, b) in enumerate(zip(py.hosts, nat.hosts, strict=True)):
        if a.mem.buf != b.mem.buf:
            at = next(k for k in range(len(a.mem.buf)) if a.mem.buf[k] != b.mem.buf[k])
            raise AssertionError(f"step {step} {op}: host {i + 1} memory differs from byte {at:#x}")
        assert a.log.view == b.log.view, f"step {step} {op}: host {i + 1} dirty log differs"
    sp, sn = py.state(), nat.state()
    for key in sp:
        assert sp[key] == sn[key], f"step {step} {op}: {key} differs"


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs=st.lists(st.sampled_from(sorted(CONFIGS)), min_size=2, max_size=4),
       batch=st.sampled_from([64, 64, 3]), max_entries=st.sampled_from([4096, 2]),
       ops=st.one_of(OPS, NICE_OPS), coalesce=st.sampled_from([None, None, COALESCING]),
       tx_defer_s=st.sampled_from([0.0, TX_DEFER_S, TX_DEFER_S]))
def test_native_engine_matches_the_python_engine(configs, batch, max_entries, ops, coalesce, tx_defer_s):
    py = World(Engine, configs, batch, max_entries, coalesce, tx_defer_s)
    nat = World(NativeEngine, configs, batch, max_entries, coalesce, tx_defer_s)
    assert_same(py, nat, 0, ("start",))
    for step, op in enumerate([*ops, ("poll",)], 1):
        assert apply(py, op) == apply(nat, op), f"step {step} {op}: results differ"
        assert_same(py, nat, step, op)
    e = nat.engine
    event(f"native frames: {'0' if not e.native_frames else '1-9' if e.native_frames < 10 else '10+'}")
    event(f"punts: {'0' if not e.punts else '1-9' if e.punts < 10 else '10+'}")
    event(f"broken ports: {len(nat.broken)}")
    event(f"rx dropped: {bool(sum(h.port.rx_dropped for h in nat.hosts))}")
    event(f"dirty log marked: {any(any(h.log.view) for h in nat.hosts)}")
    event(f"broken by the dirty log: {any('dirty log' in str(reason) for _, reason in nat.broken)}")
    event(f"interrupts held: {'0' if not e.coalescer.held_total else '1+'}")
    deferred, unneeded = e.tx_decisions()
    event(f"TX decisions deferred: {'0' if not deferred else '1+'}, unneeded: {bool(unneeded)}")


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs=st.lists(st.sampled_from(TSO_CONFIGS), min_size=2, max_size=4),
       batch=st.sampled_from([64, 3]), ops=TSO_OPS)
def test_native_engine_matches_the_python_engine_on_offload_frames(configs, batch, ops):
    """GSO and NEEDS_CSUM frames, believable and hostile, between ports that negotiated the
    offloads (so C forwards them whole) and ports that did not (Python converts them)."""
    py = World(Engine, configs, batch, 4096)
    nat = World(NativeEngine, configs, batch, 4096)
    n = len(configs)
    learn = [op for i in range(n) for op in (("burst", i, n, 1, 60), ("poll",))]  # every MAC known
    learn += [("reap", i, 16, "one") for i in range(n)]
    for step, op in enumerate([*learn, *ops, ("poll",)], 1):
        assert apply(py, op) == apply(nat, op), f"step {step} {op}: results differ"
        assert_same(py, nat, step, op)
    e = nat.engine
    gso = e.native_gso_frames
    event(f"GSO frames forwarded by C: {'0' if not gso else '1-4' if gso < 5 else '5+'}")
    event(f"punts: {'0' if not e.punts else '1-9' if e.punts < 10 else '10+'}")
    event(f"broken ports: {len(nat.broken)}")
