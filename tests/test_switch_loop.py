"""The switch's wake-up loop in C (switch/native/wakeup.c) against the Python loop it stands
in for (Switch._step): the same spin policy, and a real switch process that serves real
NetClients through it: frames, kicks and interrupts counted, control requests and signals
answered while it sleeps."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alacrity.client.net import NetError
from alacrity.switch import native
from alacrity.switch.native import engine as native_engine
from alacrity.switch.process import POLL_MIN_S, Switch
from tests.test_switch_process import Rig, frame, rig_with_loop

pytestmark = pytest.mark.skipif(not native.available(), reason="the native fast path cannot be built here")


@pytest.fixture(params=["native", "python"])
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from rig_with_loop(tmp_path, monkeypatch, request.param)


def test_the_reasons_sw_run_gives_are_the_ones_python_reads():
    _ffi, lib = native.load()
    names = ("IO", "EINTR", "TIMEOUT", "PUNT", "FAULTS", "CALL", "SIGNALS", "ERROR")
    assert [getattr(native_engine, f"RUN_{n}") for n in names] == [getattr(lib, f"SW_RUN_{n}") for n in names]


@settings(max_examples=200, deadline=None)
@given(budget_us=st.integers(0, 1000), gaps_us=st.lists(st.integers(0, 3000), max_size=40))
def test_the_native_spin_adapts_as_the_python_one_does(tmp_path_factory, budget_us: int, gaps_us: list[int]):
    ffi, lib = native.load()
    control = str(tmp_path_factory.mktemp("adapt") / "ctl")
    switch = Switch(control, poll_budget_s=budget_us / 1e6, engine="python")
    try:
        w = ffi.new("struct sw_wait *")
        w.budget_ns, w.min_ns, w.spin_ns = budget_us * 1000, int(POLL_MIN_S * 1e9), budget_us * 1000
        for gap in gaps_us:
            switch._adapt_poll(gap / 1e6)
            lib.sw_adapt(w, gap * 1000)
            # C halves whole nanoseconds: rounding apart, the same spin
            assert w.spin_ns == pytest.approx(switch.poll_s * 1e9, rel=1e-3, abs=2), (gap, switch.poll_s)
    finally:
        switch.close()


def test_frames_kicks_and_interrupts_through_either_loop(rig: Rig, request: pytest.FixtureRequest):
    """Frames 2 ms apart, so that the switch sleeps between them: each arrives, the sleeps
    end in kicks, and each frame costs the receiver the interrupt it asked for, no more.
    The native loop is the one that served them, without handing back to Python per frame,
    unless Python's was asked for."""
    a, b = rig.client(), rig.client()
    b.send(frame(b"\xff" * 6, b.mac, b"hello"))
    assert a.recv(5) is not None
    time.sleep(0.01)  # past the TX interrupt deferral: B's send is decided before we count
    before = rig.ctl.stats()
    for i in range(40):
        b.driver.rxq.enable_interrupts()
        a.send(frame(b.mac, a.mac, i.to_bytes(4, "big")))
        assert b.recv(5) == frame(b.mac, a.mac, i.to_bytes(4, "big"))
        time.sleep(0.002)
    after = rig.ctl.stats()
    ports = {p["mac"]: p for p in after["ports"]}
    ports_before = {p["mac"]: p for p in before["ports"]}
    sender, receiver = (a.mac.hex(":"), b.mac.hex(":"))
    assert ports[sender]["tx_packets"] - ports_before[sender]["tx_packets"] == 40
    assert ports[receiver]["rx_packets"] - ports_before[receiver]["rx_packets"] == 40
    assert ports[sender]["kicks"] - ports_before[sender]["kicks"] >= 20
    assert ports[receiver]["interrupts"] - ports_before[receiver]["interrupts"] == 40
    assert after["stats"]["sleeps"] - before["stats"]["sleeps"] >= 20
    runs = after["stats"]["native_loop_runs"]
    if "native" in request.node.callspec.id:
        # frames alone never hand the loop back to Python (the stats requests do)
        assert 0 < runs - before["stats"]["native_loop_runs"] <= 5
    else:
        assert runs == 0


def test_a_sender_hears_of_its_sent_frame_within_the_deferral_bound(rig: Rig):
    """The switch's default TX interrupt deferral (1 ms), through either loop: a sender that
    asks for a TX interrupt and does not collect its buffer by itself gets it once the
    deferral ends, while its frame reached the receiver at once. Measured: send to TX
    interrupt, with the loop asleep when it falls due (it must wake for it)."""
    a, b = rig.client(), rig.client()
    b.send(frame(b"\xff" * 6, b.mac, b"hello"))
    assert a.recv(5) is not None
    tx_call = a.tx.call
    took = []
    for i in range(10):
        time.sleep(0.01)
        a.driver.reap_tx()
        a.driver.txq.enable_interrupts()
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(tx_call)
        sent = time.monotonic()
        a.send(frame(b.mac, a.mac, i.to_bytes(4, "big")))
        assert b.recv(5) == frame(b.mac, a.mac, i.to_bytes(4, "big"))
        received = time.monotonic()
        readable, _, _ = select.select([tx_call], [], [], 1.0)
        took.append((received - sent, time.monotonic() - sent))
        assert readable, f"frame {i}: no TX interrupt within 1 s"
    stats = rig.ctl.stats()["stats"]
    took.sort(key=lambda t: t[1])
    print(f"send to receipt median {took[5][0] * 1e3:.2f} ms; send to TX interrupt median "
          f"{took[5][1] * 1e3:.2f} ms, max {took[-1][1] * 1e3:.2f} ms")
    assert stats["tx_decisions_deferred"] >= 10
    assert took[0][1] >= 0.0009  # deferred, not sent at once...
    assert took[5][1] < 0.001 + 0.02  # ...and sent at the bound (plus waking a process on a busy host)


def test_control_and_signals_are_answered_while_the_native_loop_sleeps(tmp_path: Path):
    """The loop sleeps in C with its ports idle: a stats request is answered at once, and
    SIGTERM stops the switch at once (the signal's wake-up fd ends the sleep)."""
    rig = Rig(tmp_path)
    try:
        a, b = rig.client(), rig.client()
        a.send(frame(b.mac, a.mac, b"wake"))
        assert b.recv(5) is not None
        time.sleep(0.3)  # long past any spin: asleep in sw_run
        runs = rig.ctl.stats()["stats"]["native_loop_runs"]
        assert runs > 0
        took = []
        for _ in range(5):
            start = time.monotonic()
            rig.ctl.stats(timeout=2)
            took.append(time.monotonic() - start)
        assert sorted(took)[2] < 0.1, took
        assert_sigterm_stops_it_at_once(rig)
    finally:
        rig.close()


def assert_sigterm_stops_it_at_once(rig: Rig) -> None:
    start = time.monotonic()
    os.kill(rig.proc.pid, signal.SIGTERM)
    assert rig.proc.wait(5) == 0
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("gap_s", [0.0, 0.002], ids=["never-idle", "frames-2ms-apart"])
def test_sigterm_stops_a_busy_switch_at_once(tmp_path: Path, gap_s: float):
    """Frames without a pause: the native loop never sleeps. Frames 2 ms apart: it sleeps
    and wakes on every kick, never for long. Either way a signal that came while C forwarded
    (its handler only sets a flag for Python) must reach the loop: through the wake-up fd it
    watches with the sockets. SIGTERM stops it at once."""
    rig = Rig(tmp_path)
    stop = threading.Event()
    try:
        a, b = rig.client(), rig.client()
        a.send(frame(b.mac, a.mac, b"learn"))
        assert b.recv(5) is not None

        def flood() -> None:
            with contextlib.suppress(NetError):  # the switch goes while it sends
                while not stop.is_set():
                    a.send_batch(frame(b.mac, a.mac, b"x" * 60) for _ in range(1 if gap_s else 64))
                    time.sleep(gap_s)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        rig.wait_for(lambda: rig.ports()[a.mac.hex(":")]["tx_packets"] > (200 if gap_s else 5000))
        assert_sigterm_stops_it_at_once(rig)
    finally:
        stop.set()
        rig.close()
