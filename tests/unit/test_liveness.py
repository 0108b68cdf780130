"""Liveness parts on their own: heartbeat arithmetic, the stall detector (fake and real
sockets), the health verdicts, the systemd notify protocol, and the ``health:`` settings.

The subprocess tests (systemd notify socket, SIGSTOP, /healthz) are in
tests/sim/test_liveness.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import ConfigError, HealthConfig, load_file, parse
from exporter.runtime.liveness import (
    Heartbeat,
    Liveness,
    LivenessCollector,
    Stall,
    StallDetector,
    WatchedReader,
    fionread,
)
from exporter.runtime.sd_notify import Notifier, watchdog_interval
from tests.support.procs import REPO

# --- heartbeat --------------------------------------------------------------------------------


def test_heartbeat_recent_max_forgets_after_the_window() -> None:
    hb = Heartbeat(window=10.0, interval=0.25)
    hb.record(100.0, 0.001)
    hb.record(101.0, 7.5)
    hb.record(102.0, 0.002)
    assert hb.recent_max(105.0) == (7.5, 101.0)
    assert hb.last(105.0) == 0.002
    assert hb.recent_max(111.5)[0] == 0.002  # 7.5 s at t=101 is older than 10 s
    assert hb.recent_max(200.0)[0] == 0.0


async def test_heartbeat_measures_a_blocked_loop() -> None:
    """A synchronous block of the loop (what a blocking call in a handler does) is measured."""
    hb = Heartbeat(window=10.0, interval=0.01)
    loop = asyncio.get_running_loop()
    beat = asyncio.create_task(hb.beat(loop))
    await asyncio.sleep(0)  # the heartbeat is now sleeping
    t0 = loop.time()
    while loop.time() - t0 < 0.3:  # block the loop for 0.3 s
        pass
    assert hb.pending(loop.time()) >= 0.28  # visible before the heartbeat runs again
    lag = await beat
    assert 0.28 <= lag < 1.0
    assert hb.recent_max(loop.time())[0] >= lag  # (no next beat: the lag keeps growing)


async def test_a_heartbeat_that_stopped_reads_as_lag_not_health() -> None:
    hb = Heartbeat(window=10.0, interval=0.01)
    loop = asyncio.get_running_loop()
    assert hb.pending(loop.time() + 100) == 0.0  # not started: nothing to say
    await hb.beat(loop)
    dead = asyncio.create_task(hb.beat(loop))
    await asyncio.sleep(0)
    dead.cancel()  # the heartbeat task is gone (a bug, a cancellation)
    with contextlib.suppress(asyncio.CancelledError):
        await dead
    assert hb.last(loop.time() + 100) > 99
    assert hb.recent_max(loop.time() + 100)[0] > 99


# --- stall detector ---------------------------------------------------------------------------


class _Pending:
    """Bytes waiting per fd, set by the test."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def __call__(self, fd: int) -> int:
        return self.bytes.get(fd, 0)


def test_stall_needs_waiting_bytes_and_no_progress_for_the_whole_threshold() -> None:
    pending = _Pending()
    det = StallDetector(10.0, pending)
    s = object()
    assert det.check(0.0, [WatchedReader("vm", s, 5, 7)]) == []
    pending.bytes[7] = 4096
    assert det.check(1.0, [WatchedReader("vm", s, 5, 7)]) == []  # waiting starts now, not at t=0
    assert det.check(10.9, [WatchedReader("vm", s, 5, 7)]) == []
    assert det.check(11.0, [WatchedReader("vm", s, 5, 7)]) == [Stall("vm", 4096, 10.0)]
    # One line read: progress, the clock starts over at the next check that sees bytes waiting.
    assert det.check(12.0, [WatchedReader("vm", s, 6, 7)]) == []
    assert det.check(13.0, [WatchedReader("vm", s, 6, 7)]) == []
    assert det.check(22.9, [WatchedReader("vm", s, 6, 7)]) == []
    assert det.check(23.0, [WatchedReader("vm", s, 6, 7)]) == [Stall("vm", 4096, 10.0)]


def test_quiet_reader_on_quiet_socket_is_not_stalled() -> None:
    det = StallDetector(1.0, _Pending())
    s = object()
    for t in range(100):
        assert det.check(float(t), [WatchedReader("idle", s, 3, 9)]) == []


def test_data_just_arrived_after_long_silence_is_not_a_stall() -> None:
    pending = _Pending()
    det = StallDetector(5.0, pending)
    s = object()
    for t in range(60):
        det.check(float(t), [WatchedReader("vm", s, 3, 9)])
    pending.bytes[9] = 100  # an event arrives after a silent minute
    assert det.check(60.0, [WatchedReader("vm", s, 3, 9)]) == []
    pending.bytes[9] = 0  # and is read
    assert det.check(61.0, [WatchedReader("vm", s, 4, 9)]) == []


def test_new_session_or_drained_socket_starts_over() -> None:
    pending = _Pending()
    pending.bytes[9] = 1
    det = StallDetector(2.0, pending)
    a, b = object(), object()
    det.check(0.0, [WatchedReader("vm", a, 3, 9)])
    det.check(1.0, [WatchedReader("vm", a, 3, 9)])
    assert det.check(2.0, [WatchedReader("vm", b, 3, 9)]) == []  # reconnected, same line count
    det.check(3.0, [WatchedReader("vm", b, 3, 9)])
    pending.bytes[9] = 0
    assert det.check(4.0, [WatchedReader("vm", b, 3, 9)]) == []
    pending.bytes[9] = 1
    assert det.check(5.0, [WatchedReader("vm", b, 3, 9)]) == []
    # A session that is gone is forgotten.
    det.check(6.0, [])
    assert det.check(100.0, [WatchedReader("vm", b, 3, 9)]) == []


def test_two_sessions_with_the_same_vm_name_are_told_apart() -> None:
    pending = _Pending()
    pending.bytes = {1: 10, 2: 10}
    det = StallDetector(2.0, pending)
    a, b = object(), object()
    for t in range(5):  # a progresses (its line count is t), b does not
        stalls = det.check(float(t), [WatchedReader("dup", a, t, 1), WatchedReader("dup", b, 7, 2)])
    assert stalls == [Stall("dup", 10, 3.0)]


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_fionread_on_a_real_socket(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = socket_pair
    assert fionread(b.fileno()) == 0
    a.sendall(b"x" * 1000)
    assert fionread(b.fileno()) == 1000
    b.recv(400)
    assert fionread(b.fileno()) == 600
    fd = b.fileno()
    b.close()
    assert fionread(fd) == 0  # a closed fd is not an error


def test_detector_with_real_kernel_buffer(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    """The default ``pending_bytes`` is the kernel's: a peer writes, nobody reads."""
    a, b = socket_pair
    det = StallDetector(2.0)
    s = object()
    det.check(0.0, [WatchedReader("vm", s, 1, b.fileno())])
    a.sendall(b'{"event": "BLOCK_IO_ERROR"}\n' * 100)
    det.check(1.0, [WatchedReader("vm", s, 1, b.fileno())])
    assert det.check(3.0, [WatchedReader("vm", s, 1, b.fileno())]) == [Stall("vm", 2800, 2.0)]


# --- health verdicts --------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _liveness(sources: list[WatchedReader] | None = None) -> tuple[Liveness, _Clock]:
    clock = _Clock()
    lv = Liveness(HealthConfig(5.0, 10.0, 10.0), lambda: sources or [], clock)
    return lv, clock


def test_problem_remembers_a_lag_for_the_window_problem_now_does_not() -> None:
    lv, clock = _liveness()
    assert lv.problem() is None and lv.problem_now() is None
    lv.heartbeat.record(clock.now, 7.0)  # the loop was blocked 7 s
    assert lv.problem() == "event loop lagged 7s (limit 5s) 0s ago"
    assert lv.problem_now() == "event loop lagging 7s (limit 5s)"
    clock.now += 0.25
    lv.heartbeat.record(clock.now, 0.001)  # the next heartbeat is on time
    assert lv.problem_now() is None  # the watchdog pings again at once
    clock.now += 9.0
    assert lv.problem() == "event loop lagged 7s (limit 5s) 9s ago"  # /healthz remembers
    clock.now += 1.0
    assert lv.problem() is None
    assert next(iter(LivenessCollector(lv).collect())).samples[0].value == 0.001  # the gauge too


def test_lag_just_at_the_limit_is_healthy() -> None:
    lv, clock = _liveness()
    lv.heartbeat.record(clock.now, 5.0)
    assert lv.problem() is None and lv.problem_now() is None


def test_stall_reason_is_one_line_naming_the_vm() -> None:
    lv, _ = _liveness()
    lv.stalled = [Stall("web1", 65536, 12.3), Stall("db2", 10, 30.0)]
    assert (
        lv.problem() == "QMP reader stalled: vm=db2 has 10 bytes waiting, no line read for 30s (and 1 more)"
    )
    assert lv.problem_now() == lv.problem()


def test_collector_family() -> None:
    lv, clock = _liveness()
    lv.heartbeat.record(clock.now, 0.5)
    (fam,) = list(LivenessCollector(lv).collect())
    assert fam.name == "qemu_exporter_event_loop_lag_seconds" and fam.type == "gauge"
    assert [s.value for s in fam.samples] == [0.5]


async def test_a_stopped_loop_is_a_blind_interval_before_and_after_its_heartbeat() -> None:
    """The loop blocked 1 s (what SIGSTOP does, shorter): `loop_blind` reports the gap while
    the heartbeat is still overdue (a tick or a scrape may run first after a stop), then the
    completed gap, in wall-clock time; `on_gap` is told once, with the lag's length."""
    gaps: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()
    wall_offset = 1_700_000_000.0 - loop.time()
    lv = Liveness(HealthConfig(5.0, 10.0, 10.0), list, loop.time, lambda: loop.time() + wall_offset)
    lv.on_gap = lambda s, e: gaps.append((s, e))
    assert lv.loop_blind() is None
    task = asyncio.create_task(lv.run())
    await asyncio.sleep(0.05)  # the heartbeat sleeps
    t0 = loop.time()
    while loop.time() - t0 < 1.0:
        pass
    ongoing = lv.loop_blind()  # the heartbeat was due 0.25 s after it slept: 0.8 s late
    assert ongoing is not None and ongoing[1] - ongoing[0] >= 1.0
    assert abs(ongoing[1] - (loop.time() + wall_offset)) < 0.05 and gaps == []
    await asyncio.sleep(0.05)  # the heartbeat runs: the gap is complete
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ((start, end),) = gaps
    assert 0.75 <= end - start < 1.0
    done = lv.loop_blind()
    assert done is not None and done[0] <= start and done[1] == end  # from the beat before


# --- systemd notify ---------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({}) is None


def _receiver(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_notify_to_a_path_socket(short_tmp: Path) -> None:
    path = str(short_tmp / "notify")
    with _receiver(path) as rx:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        assert n.enabled and n.watchdog_interval == 1.0
        assert n.notify("READY=1", "STATUS=listening")
        assert rx.recv(4096) == b"READY=1\nSTATUS=listening"
        n.close()


def test_notify_to_an_abstract_socket() -> None:
    name = f"qih-notify-test-{os.getpid()}"
    with _receiver(b"\0" + name.encode()) as rx:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify("WATCHDOG=1")
        assert rx.recv(4096) == b"WATCHDOG=1"
        n.close()


def test_notify_without_systemd_or_with_systemd_gone(short_tmp: Path) -> None:
    assert not Notifier({}).enabled and not Notifier({}).notify("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1"}).enabled is False
    n = Notifier({"NOTIFY_SOCKET": str(short_tmp / "nobody-listens")})
    assert n.notify("WATCHDOG=1") is False  # logged once, never raised
    assert n.notify("WATCHDOG=1") is False
    n.close()


# --- configuration ----------------------------------------------------------------------------


def test_health_config_defaults_and_file(tmp_path: Path) -> None:
    assert parse(None, "x").health == HealthConfig(5.0, 10.0, 10.0)
    p = tmp_path / "c.yml"
    p.write_text(
        "health: {max_loop_lag_seconds: 2, loop_lag_window_seconds: 30, reader_stall_seconds: 0.5}\n"
    )
    assert load_file(str(p)).health == HealthConfig(2.0, 30.0, 0.5)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ("health: {max_loop_lag_seconds: 0}", "health.max_loop_lag_seconds"),
        ("health: {loop_lag_window_seconds: soon}", "health.loop_lag_window_seconds"),
        ("health: {reader_stall_seconds: -1}", "health.reader_stall_seconds"),
        ("health: {reader_stall: 1}", "health.reader_stall"),
        ("health: 5", "health"),
    ],
)
def test_bad_health_config_names_file_and_key(tmp_path: Path, doc: str, key: str) -> None:
    p = tmp_path / "bad.yml"
    p.write_text(doc + "\n")
    with pytest.raises(ConfigError) as exc:
        load_file(str(p))
    assert str(exc.value).startswith(f"{p}: {key}: ")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "arg", ["--health.max-loop-lag=0", "--health.loop-lag-window=soon", "--health.reader-stall=nan"]
)
def test_bad_health_flag_one_line_exit_2(arg: str) -> None:
    r = _cli(arg)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and arg.split("=")[0] in r.stderr and "Traceback" not in r.stderr


def test_bad_health_key_in_file_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("health: {max_loop_lag_seconds: fast}\n")
    r = _cli(f"--config.file={p}")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"qemu-iohang-exporter: {p}: health.max_loop_lag_seconds: expected a number of seconds, got string 'fast'"
    )


def test_flags_override_file(tmp_path: Path) -> None:
    from exporter.cli import build_parser, resolve

    p = tmp_path / "c.yml"
    p.write_text("health: {max_loop_lag_seconds: 2, reader_stall_seconds: 3}\n")
    cfg = resolve(build_parser().parse_args([f"--config.file={p}", "--health.reader-stall=7.5"]))
    assert cfg.health == HealthConfig(2.0, 10.0, 7.5)
