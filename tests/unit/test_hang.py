"""Unit tests for exporter.hang: the pure per-disk hang state machine.

Everything is synthetic and clock-free: event sequences follow domain.md section 3 (one
``BLOCK_IO_ERROR`` per failed attempt of every in-flight request, attempts every
``retry_interval`` plus the failing IO's own time, ``report`` once ``retry_timeout`` has passed,
then one ``report`` per failing guest IO, and *nothing* on recovery).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from exporter.hang.machine import DEFAULT_MARGIN_S, DiskHangTracker
from exporter.hang.outcome import CompletedHang, HangOutcome

R, T, V = HangOutcome.RECOVERED, HangOutcome.TIMED_OUT, HangOutcome.VM_GONE
T0 = 1_700_000_000.0  # a realistic Unix time: float precision matters at this magnitude


# --------------------------------------------------------------------------- simulator


@dataclass
class Outage:
    """A storage outage on a retry-policy disk, as QEMU reports it over QMP."""

    down: float  # link drops (relative seconds)
    up: float  # link returns
    interval: float = 1.0
    timeout: float = 10.0
    inflight: int = 1  # requests held by QEMU; each failed attempt of each emits one event
    io_fail_s: float = 0.0  # time a failing IO takes (dead links: seconds)
    guest_io_hz: float = 20.0  # looping guest: new IOs per second once errors are reported
    ok_ops_hz: float = 100.0  # successful IOs per second while storage works
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        start = self.down
        t = self.down
        k = 0
        timed_out = False
        while t < self.up:
            if self.timeout > 0 and t - start >= self.timeout:
                timed_out = True
                break
            for j in range(self.inflight):
                self.events.append((t + j * 1e-4, "err", "retry"))
            k += 1
            # QEMU re-arms the timer after the failed attempt; timer jitter of a millisecond.
            t = self.down + k * (self.interval + self.io_fail_s) + 0.001 * k
        if timed_out:
            # Every held request is reported at once, then each new guest IO fails at once.
            for j in range(self.inflight):
                self.events.append((t + j * 1e-4, "err", "report"))
            step = 1.0 / self.guest_io_hz
            u = t + step
            while u < self.up:
                self.events.append((u, "err", "report"))
                u += step
        self.first_ok = t  # first attempt at or after `up` succeeds (nothing emitted)


def feed(
    tr: DiskHangTracker,
    events: list[tuple[float, str, str]],
    until: float,
    *,
    tick: float = 0.5,
    blockstats: tuple[float, Outage] | None = None,
    observe: list[tuple[float, bool, bool, float, float]] | None = None,
) -> None:
    """Feed relative-time events (plus advance() every `tick` s and optional blockstats every
    `blockstats[0]` s computed from the outage) to the tracker, in time order."""
    timeline: list[tuple[float, int, str, str]] = [(ts, 1, k, a) for ts, k, a in events]
    n = int(until / tick)
    timeline += [(i * tick, 2, "tick", "") for i in range(n + 1)]
    if blockstats is not None:
        period, _ = blockstats
        m = int(until / period)
        timeline += [(i * period + 0.01, 0, "stats", "") for i in range(m + 1)]
    timeline.sort()
    for ts, _, kind, arg in timeline:
        at = T0 + ts
        if kind == "err":
            tr.on_io_error(at, arg)
        elif kind == "stop":
            tr.on_stop(at)
        elif kind == "resume":
            tr.on_resume(at)
        elif kind == "gone":
            tr.on_vm_gone(at)
        elif kind == "stats":
            assert blockstats is not None
            tr.on_blockstats(at, ok_ops_at(blockstats[1], ts))
        else:
            tr.advance(at)
            if observe is not None:
                observe.append((ts, tr.hanging, tr.failing, tr.duration(at), tr.hang_seconds_total(at)))


def ok_ops_at(out: Outage, ts: float) -> int:
    """Successful operations counter: grows while storage works, flat during the outage."""
    if ts < out.down:
        return int(ts * out.ok_ops_hz)
    if ts < out.first_ok:
        return int(out.down * out.ok_ops_hz)
    return int((out.down + ts - out.first_ok) * out.ok_ops_hz) + 1


def only(tr: DiskHangTracker) -> CompletedHang:
    done = tr.drain_completed()
    assert len(done) == 1, done
    return done[0]


def totals(tr: DiskHangTracker) -> tuple[int, int, int]:
    h = tr.hangs_total
    return h[R], h[T], h[V]


# --------------------------------------------------------------------------- basics


def test_outcome_values_and_initial_state() -> None:
    assert [o.value for o in HangOutcome] == ["recovered", "timed_out", "vm_gone"]
    tr = DiskHangTracker(1.0, 10.0)
    assert dict(tr.hangs_total) == {R: 0, T: 0, V: 0}
    assert not tr.hanging and not tr.failing and not tr.paused
    assert tr.hang_start is None and tr.deadline is None and tr.last_error is None
    assert tr.duration(T0) == 0.0
    assert tr.hang_seconds_total(T0) == 0.0
    assert tr.drain_completed() == []
    assert tr.margin_s == DEFAULT_MARGIN_S
    assert tr.expected_spacing == 1.0 + DEFAULT_MARGIN_S


def test_hangs_total_is_read_only() -> None:
    tr = DiskHangTracker()
    with pytest.raises(TypeError):
        tr.hangs_total[R] = 5  # type: ignore[index]


@pytest.mark.parametrize(
    "args", [(-1.0, 0.0), (1.0, -1.0), (math.nan, 0.0), (1.0, math.inf), (1.0, 0.0, -0.1)]
)
def test_constructor_rejects_bad_policy(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        DiskHangTracker(*args)


def test_rejects_non_finite_timestamps_and_bad_ops() -> None:
    tr = DiskHangTracker()
    calls: tuple[Callable[[], None], ...] = (
        lambda: tr.on_io_error(math.nan, "retry"),
        lambda: tr.on_stop(math.inf),
        lambda: tr.on_resume(-math.inf),
        lambda: tr.on_vm_gone(math.nan),
        lambda: tr.advance(math.nan),
        lambda: tr.on_blockstats(T0, -1),
        lambda: tr.on_blockstats(T0, True),
        lambda: tr.on_blockstats(math.nan, 1),
        lambda: tr.set_policy(-1, 0),
    )
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert not tr.hanging


def test_first_retry_starts_hang_with_event_timestamp() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    tr.on_io_error(T0 + 3.25, "retry")
    assert tr.hanging and not tr.failing
    assert tr.hang_start == T0 + 3.25
    assert tr.deadline == T0 + 13.25
    assert tr.last_error == T0 + 3.25
    assert tr.duration(T0 + 5.25) == pytest.approx(2.0)
    # A `now` behind the latest event never gives a negative duration.
    assert tr.duration(T0) >= 0.0


@pytest.mark.parametrize("action", ["ignore", "bogus", "RETRY", ""])
def test_ignore_and_unknown_actions_do_nothing(action: str) -> None:
    tr = DiskHangTracker()
    for i in range(10):
        tr.on_io_error(T0 + i, action)
    assert not tr.hanging and not tr.failing
    assert totals(tr) == (0, 0, 0)


def test_ignore_during_a_hang_neither_ends_nor_extends_it() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 1.5, "ignore")
    assert tr.last_error == T0
    tr.advance(T0 + 2.01)
    assert not tr.hanging
    assert only(tr).end == pytest.approx(T0 + 1.0)


# --------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("inflight", [1, 4, 64])
@pytest.mark.parametrize("io_fail_s", [0.0, 0.3])
def test_acceptance_link_down_7s_recovers(inflight: int, io_fail_s: float) -> None:
    tr = DiskHangTracker(1.0, 10.0)
    out = Outage(down=5.0, up=12.0, interval=1.0, timeout=10.0, inflight=inflight, io_fail_s=io_fail_s)
    obs: list[tuple[float, bool, bool, float, float]] = []
    feed(tr, out.events, until=30.0, observe=obs)
    assert totals(tr) == (1, 0, 0)
    h = only(tr)
    assert h.outcome is R
    assert h.start == T0 + 5.0
    assert h.duration == pytest.approx(7.0, abs=1.5)
    assert not tr.hanging and not tr.failing
    # Hanging throughout the outage, never failing, and the hang is seen ended soon after.
    for ts, hanging, failing, _, _ in obs:
        assert not failing
        if 5.0 <= ts < 12.0:
            assert hanging, ts
        if ts > 12.0 + 1.0 + io_fail_s + DEFAULT_MARGIN_S + 0.5:
            assert not hanging, ts
    assert tr.hang_seconds_total(T0 + 30) == pytest.approx(h.duration)


def test_acceptance_link_down_15s_times_out_then_fails_until_link_returns() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    out = Outage(down=2.0, up=17.0, interval=1.0, timeout=10.0, inflight=8)
    obs: list[tuple[float, bool, bool, float, float]] = []
    feed(tr, out.events, until=40.0, observe=obs)
    assert totals(tr) == (0, 1, 0)
    h = only(tr)
    assert h.outcome is T
    assert h.start == T0 + 2.0
    assert h.duration == pytest.approx(10.0, abs=1.5)
    for ts, hanging, failing, dur, _ in obs:
        if 2.0 <= ts < 12.0:
            assert hanging and not failing, ts
            assert dur == pytest.approx(ts - 2.0)
        if 12.1 <= ts < 17.0:
            assert failing and not hanging, ts
        if ts > 17.0 + 1.0 + DEFAULT_MARGIN_S + 0.5:
            assert not failing and not hanging, ts
    assert not tr.failing


def test_acceptance_deadline_exposed_while_hanging() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    tr.on_io_error(T0, "retry")
    assert tr.deadline == T0 + 10.0
    tr.on_io_error(T0 + 10.0, "report")
    assert tr.deadline is None and tr.hang_start is None


def test_acceptance_timeout_zero_hangs_throughout_monotonically() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    out = Outage(down=1.0, up=31.0, interval=1.0, timeout=0.0, inflight=16)
    obs: list[tuple[float, bool, bool, float, float]] = []
    feed(tr, out.events, until=30.9, tick=0.25, observe=obs)
    assert tr.hanging and tr.deadline is None
    assert totals(tr) == (0, 0, 0)
    during = [o for o in obs if o[0] >= 1.0]
    assert all(o[1] and not o[2] for o in during)
    durs = [o[3] for o in during]
    assert all(b >= a for a, b in itertools.pairwise(durs))
    assert durs[-1] == pytest.approx(29.75)
    secs = [o[4] for o in obs]
    assert all(b >= a for a, b in itertools.pairwise(secs))
    # Then the link returns: one recovered hang of about 30 s.
    tr.advance(T0 + 40)
    h = only(tr)
    assert h.outcome is R and h.duration == pytest.approx(30.0, abs=1.5)


def test_acceptance_restarted_exporter_keeps_open_hang_start() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    for i in range(6):
        tr.on_io_error(T0 + i, "retry")
    tr.advance(T0 + 5.5)
    saved = json.loads(json.dumps(tr.snapshot()))
    # Exporter down for 20 s; the disk still fails.
    tr2 = DiskHangTracker.restore(saved, now=T0 + 26.0)
    assert tr2.hanging and tr2.hang_start == T0
    tr2.on_io_error(T0 + 26.3, "retry")
    tr2.advance(T0 + 28.0)
    tr2.on_io_error(T0 + 27.3, "retry")  # slightly late delivery
    tr2.on_io_error(T0 + 28.3, "retry")
    tr2.advance(T0 + 29.0)
    assert tr2.hanging and tr2.hang_start == T0
    assert tr2.duration(T0 + 29.0) == pytest.approx(29.0)
    # Storage returns: attempts stop, the hang ends recovered with its original start.
    tr2.advance(T0 + 40.0)
    h = only(tr2)
    assert h == CompletedHang(T0, h.end, R, io_error_events=9)
    assert h.end == pytest.approx(T0 + 29.3)


# --------------------------------------------------------------------------- recovery


def test_recovery_end_is_last_error_plus_spacing_and_detected_after_margin() -> None:
    tr = DiskHangTracker(2.0, 0.0, margin_s=1.0)
    for i in range(4):
        tr.on_io_error(T0 + 2 * i, "retry")  # 0, 2, 4, 6
    tr.advance(T0 + 6 + 3.0)  # exactly at the threshold: not yet (strictly longer)
    assert tr.hanging
    tr.advance(T0 + 9.001)
    assert not tr.hanging
    h = only(tr)
    assert (h.start, h.end, h.outcome) == (T0, T0 + 8.0, R)
    assert tr.hang_seconds_total(T0 + 100) == pytest.approx(8.0)


def test_observed_spacing_longer_than_interval_is_learned() -> None:
    # Dead link: each failing IO takes 2.5 s, so attempts come every 3.5 s with interval 1 s.
    tr = DiskHangTracker(1.0, 0.0, margin_s=3.0)
    for i in range(5):
        tr.on_io_error(T0 + 3.5 * i, "retry")
        tr.advance(T0 + 3.5 * i + 3.4)
    assert tr.hanging
    assert tr.observed_spacing == pytest.approx(3.5)
    assert tr.expected_spacing == pytest.approx(6.5)
    tr.advance(T0 + 14.0 + 6.0)
    assert tr.hanging  # 6 s silence < 6.5 s expected
    tr.advance(T0 + 14.0 + 6.6)
    h = only(tr)
    assert h.end == pytest.approx(T0 + 17.5) and h.outcome is R


def test_bursts_of_inflight_requests_measure_gap_between_bursts() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    for k in range(5):
        for j in range(100):
            tr.on_io_error(T0 + 1.2 * k + j * 0.0005, "retry")
    assert tr.observed_spacing == pytest.approx(1.2 - 99 * 0.0005, abs=1e-6)
    assert tr.hanging and totals(tr) == (0, 0, 0)


def test_new_hang_after_recovery_is_a_second_hang() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 1, "retry")
    tr.on_io_error(T0 + 10, "retry")  # silence of 9 s: the first hang ended meanwhile
    assert tr.hanging and tr.hang_start == T0 + 10
    assert totals(tr) == (1, 0, 0)
    assert only(tr).end == pytest.approx(T0 + 2.0)


def test_event_itself_proves_time_passed_before_it() -> None:
    # No advance() between two hangs: the second event's timestamp ends the first.
    tr = DiskHangTracker(1.0, 10.0, margin_s=0.5)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 5, "report")  # 5 s of silence before this report
    assert totals(tr) == (1, 0, 0)
    assert tr.failing  # a report on a non-hanging disk: errors reach the guest


# --------------------------------------------------------------------------- blockstats


def test_blockstats_confirm_recovery_sooner() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=5.0)
    tr.on_blockstats(T0 - 1, 1000)
    for i in range(5):
        tr.on_io_error(T0 + i, "retry")
    tr.on_blockstats(T0 + 0.5, 1000)  # baseline after the hang started
    tr.on_blockstats(T0 + 4.5, 1000)  # still failing: flat
    assert tr.hanging
    tr.on_blockstats(T0 + 5.5, 1010)  # success between 4.5 and 5.5
    assert not tr.hanging
    h = only(tr)
    assert h.outcome is R and h.end == pytest.approx(T0 + 5.0)  # last error + interval


def test_blockstats_bound_end_by_sample_time() -> None:
    tr = DiskHangTracker(3.0, 0.0)
    tr.on_io_error(T0, "retry")
    tr.on_blockstats(T0 + 0.5, 7)
    tr.on_blockstats(T0 + 1.5, 9)  # success before last error + 3 s
    h = only(tr)
    assert h.end == pytest.approx(T0 + 1.5)


def test_blockstats_rise_straddling_hang_start_is_not_recovery() -> None:
    # Sampled every 10 s: the guest did IO before the link died.
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_blockstats(T0, 100)
    for i in range(9):
        tr.on_io_error(T0 + 5 + i, "retry")
    tr.on_blockstats(T0 + 10, 150)
    assert tr.hanging
    tr.on_blockstats(T0 + 13.5, 150)
    assert tr.hanging
    tr.on_blockstats(T0 + 14.5, 151)
    assert not tr.hanging and only(tr).end == pytest.approx(T0 + 14.0)


def test_blockstats_rise_before_last_error_is_not_recovery() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_io_error(T0, "retry")
    tr.on_blockstats(T0 + 0.1, 5)
    tr.on_io_error(T0 + 1, "retry")
    tr.on_blockstats(T0 + 1, 6)  # not after the last error
    assert tr.hanging


def test_blockstats_counter_reset_and_stale_samples_do_not_end_hang() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_io_error(T0, "retry")
    tr.on_blockstats(T0 + 0.2, 500)
    tr.on_blockstats(T0 + 0.4, 3)  # counters restarted: re-baseline only
    assert tr.hanging
    tr.on_blockstats(T0 + 0.3, 9999)  # stale sample, ignored
    assert tr.hanging
    tr.on_blockstats(T0 + 0.6, 3)
    assert tr.hanging
    tr.on_blockstats(T0 + 0.8, 4)
    assert not tr.hanging


def test_blockstats_during_simulated_outage() -> None:
    tr = DiskHangTracker(1.0, 10.0, margin_s=10.0)  # silence alone would take 11 s
    out = Outage(down=3.0, up=10.0, interval=1.0, timeout=10.0, inflight=4)
    feed(tr, out.events, until=12.0, blockstats=(1.0, out))
    h = only(tr)
    assert h.outcome is R and h.duration == pytest.approx(7.0, abs=1.5)


def test_blockstats_without_baseline_do_nothing() -> None:
    tr = DiskHangTracker()
    tr.on_io_error(T0, "retry")
    tr.on_blockstats(T0 + 0.5, 10)
    assert tr.hanging


# --------------------------------------------------------------------------- timeout / failing


def test_report_on_hanging_disk_is_timeout_at_report_time() -> None:
    tr = DiskHangTracker(1.0, 3.0)
    for i in range(3):
        tr.on_io_error(T0 + i, "retry")
    tr.on_io_error(T0 + 3.0, "report")
    h = only(tr)
    assert (h.start, h.end, h.outcome) == (T0, T0 + 3.0, T)
    assert tr.failing and not tr.hanging
    assert tr.hang_seconds_total(T0 + 3) == pytest.approx(3.0)


def test_many_reports_count_one_timeout() -> None:
    tr = DiskHangTracker(1.0, 3.0)
    tr.on_io_error(T0, "retry")
    for j in range(500):
        tr.on_io_error(T0 + 3 + j * 0.05, "report")
    assert totals(tr) == (0, 1, 0)
    assert tr.failing


def test_failing_ends_by_silence() -> None:
    tr = DiskHangTracker(1.0, 3.0, margin_s=1.0)
    for i in range(3):
        tr.on_io_error(T0 + i, "retry")
    tr.on_io_error(T0 + 3, "report")
    tr.on_io_error(T0 + 4, "report")
    tr.advance(T0 + 6.0)
    assert tr.failing
    tr.advance(T0 + 6.01)
    assert not tr.failing and not tr.hanging
    assert totals(tr) == (0, 1, 0)


def test_failing_ends_by_blockstats() -> None:
    tr = DiskHangTracker(1.0, 3.0, margin_s=100.0)
    tr.on_blockstats(T0 - 5, 10)
    tr.on_io_error(T0, "retry")
    tr.on_blockstats(T0 + 2, 10)  # straddles the timeout: not after the failing start
    tr.on_io_error(T0 + 3, "report")
    tr.on_blockstats(T0 + 3.5, 12)
    assert tr.failing  # previous sample predates the failing period
    tr.on_io_error(T0 + 4, "report")
    tr.on_blockstats(T0 + 4.5, 12)
    assert tr.failing
    tr.on_blockstats(T0 + 5.5, 13)
    assert not tr.failing
    assert totals(tr) == (0, 1, 0)


def test_report_without_hang_is_failing_not_a_hang() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    for j in range(20):
        tr.on_io_error(T0 + j * 0.1, "report")
    assert tr.failing and not tr.hanging
    assert totals(tr) == (0, 0, 0) and tr.hang_seconds_total(T0 + 2) == 0.0
    tr.advance(T0 + 1.9 + 2.01)
    assert not tr.failing


def test_retry_while_failing_starts_new_hang() -> None:
    # QEMU resets its timeout clock only on a successful IO, so a `retry` after reports means
    # the disk recovered in between and failed again.
    tr = DiskHangTracker(1.0, 3.0, margin_s=50.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 3, "report")
    tr.on_io_error(T0 + 4, "report")
    tr.on_io_error(T0 + 6, "retry")
    assert tr.hanging and not tr.failing and tr.hang_start == T0 + 6
    assert tr.deadline == T0 + 9
    assert totals(tr) == (0, 1, 0)


def test_stale_retry_while_failing_is_ignored() -> None:
    tr = DiskHangTracker(1.0, 3.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 3, "report")
    tr.on_io_error(T0 + 2.9, "retry")  # late delivery of an attempt of the timed-out hang
    assert tr.failing and not tr.hanging and totals(tr) == (0, 1, 0)


def test_deadline_passing_without_report_keeps_hanging() -> None:
    # QEMU checks the timeout only when an attempt fails; the exporter waits for the report.
    tr = DiskHangTracker(1.0, 3.0, margin_s=5.0)
    tr.on_io_error(T0, "retry")
    tr.advance(T0 + 4.0)
    assert tr.hanging and tr.deadline == T0 + 3.0


# --------------------------------------------------------------------------- stop policy


def test_stop_policy_pause_then_resume_recovers_at_resume() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0 + 0.001)
    assert tr.hanging and tr.paused and tr.hang_start == T0
    tr.advance(T0 + 600)  # paused for 10 minutes: silence proves nothing
    assert tr.hanging
    assert tr.hang_seconds_total(T0 + 600) == pytest.approx(600.0)
    tr.on_resume(T0 + 600.5)
    assert tr.hanging and not tr.paused
    tr.advance(T0 + 600.5 + 2.0)
    assert tr.hanging  # within expected spacing
    tr.advance(T0 + 600.5 + 2.01)
    h = only(tr)
    assert (h.start, h.end, h.outcome) == (T0, T0 + 600.5, R)
    assert tr.hang_seconds_total(T0 + 700) == pytest.approx(600.5)


def test_stop_policy_resume_then_error_again_continues_same_hang() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.on_resume(T0 + 30)
    tr.on_io_error(T0 + 30.2, "stop")  # cont retried the request, it failed again
    tr.on_stop(T0 + 30.2)
    tr.advance(T0 + 100)
    assert tr.hanging and tr.hang_start == T0 and totals(tr) == (0, 0, 0)
    tr.on_resume(T0 + 120)
    tr.advance(T0 + 125)
    h = only(tr)
    assert (h.start, h.end, h.outcome) == (T0, T0 + 120, R)


def test_stop_policy_resume_quickly_end_is_resume_not_interval() -> None:
    tr = DiskHangTracker(5.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.on_resume(T0 + 0.3)
    tr.advance(T0 + 10)
    assert only(tr).end == pytest.approx(T0 + 0.3)


def test_stop_policy_recovery_confirmed_by_blockstats_after_resume() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=30.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.on_blockstats(T0 + 1, 50)
    tr.on_blockstats(T0 + 2, 51)  # while paused: ignored
    assert tr.hanging
    tr.on_resume(T0 + 5)
    tr.on_blockstats(T0 + 6, 60)
    h = only(tr)
    assert h.end == T0 + 5 and h.outcome is R


def test_stop_policy_vm_gone_while_paused() -> None:
    tr = DiskHangTracker()
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.advance(T0 + 50)
    tr.on_vm_gone(T0 + 40)  # late: never ends before a moment it was known to persist
    h = only(tr)
    assert h.outcome is V and h.end == T0 + 50
    assert tr.hang_seconds_total(T0 + 50) == pytest.approx(50)
    assert not tr.paused


def test_user_pause_during_retry_hang_does_not_end_it() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 1, "retry")
    tr.on_stop(T0 + 1.5)
    tr.advance(T0 + 60)
    assert tr.hanging
    tr.on_resume(T0 + 60)
    tr.on_io_error(T0 + 60.5, "retry")
    assert tr.observed_spacing == pytest.approx(1.0)  # the pause is not an attempt gap
    tr.on_stop(T0 + 61)
    tr.on_resume(T0 + 70)
    tr.advance(T0 + 80)  # no error after the resume: recovered at resume
    h = only(tr)
    assert h.outcome is R and h.end == pytest.approx(T0 + 70)


def test_stop_and_resume_without_hang_are_harmless() -> None:
    tr = DiskHangTracker()
    tr.on_stop(T0)
    tr.on_resume(T0 + 1)
    tr.advance(T0 + 100)
    assert not tr.hanging and totals(tr) == (0, 0, 0)


# --------------------------------------------------------------------------- vm gone


def test_vm_gone_mid_hang() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    for i in range(4):
        tr.on_io_error(T0 + i, "retry")
    tr.on_vm_gone(T0 + 3.5)
    h = only(tr)
    assert (h.start, h.end, h.outcome) == (T0, T0 + 3.5, V)
    assert not tr.hanging and totals(tr) == (0, 0, 1)
    tr.advance(T0 + 100)
    assert totals(tr) == (0, 0, 1)


def test_vm_gone_mid_failing_counts_no_hang() -> None:
    tr = DiskHangTracker(1.0, 2.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 2, "report")
    tr.on_io_error(T0 + 2.5, "report")
    tr.on_vm_gone(T0 + 2.6)
    assert not tr.failing and not tr.hanging
    assert totals(tr) == (0, 1, 0)


def test_vm_gone_after_silence_is_recovered_first() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_vm_gone(T0 + 10)
    assert totals(tr) == (1, 0, 0)
    assert only(tr).end == pytest.approx(T0 + 1)


def test_vm_gone_before_start_never_negative() -> None:
    tr = DiskHangTracker()
    tr.on_io_error(T0 + 5, "retry")
    tr.on_vm_gone(T0 + 4)
    h = only(tr)
    assert h.end >= h.start and h.outcome is V


def test_vm_comes_back_and_fails_again() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_io_error(T0, "retry")
    tr.on_vm_gone(T0 + 2)
    tr.on_io_error(T0 + 1.5, "retry")  # stale, from the old QEMU
    assert not tr.hanging
    tr.on_io_error(T0 + 20, "retry")
    assert tr.hang_start == T0 + 20 and totals(tr) == (0, 0, 1)


def test_disconnect_suspends_silence_inference_until_reconnect() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_disconnect(T0 + 0.5)
    tr.advance(T0 + 30)
    assert tr.hanging
    tr.on_reconnect(T0 + 30)
    tr.advance(T0 + 31.9)
    assert tr.hanging
    tr.advance(T0 + 32.1)
    h = only(tr)
    assert h.outcome is R and h.end == pytest.approx(T0 + 1.0)


def test_disconnect_then_lost_for_good_is_vm_gone() -> None:
    tr = DiskHangTracker()
    tr.on_io_error(T0, "retry")
    tr.on_disconnect(T0 + 1)
    tr.on_vm_gone(T0 + 20)
    h = only(tr)
    assert h.outcome is V and h.end == T0 + 20


# --------------------------------------------------------------------------- policy change


def test_policy_change_mid_hang_moves_deadline_and_spacing() -> None:
    tr = DiskHangTracker(1.0, 10.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 1, "retry")
    tr.set_policy(5.0, 30.0)
    assert tr.retry_interval_s == 5.0 and tr.retry_timeout_s == 30.0
    assert tr.deadline == T0 + 30
    assert tr.hang_start == T0
    tr.advance(T0 + 6.9)  # 5.9 s silence < 6 s expected under the new interval
    assert tr.hanging
    tr.on_io_error(T0 + 6, "retry")
    tr.set_policy(1.0, 0.0)
    assert tr.deadline is None
    tr.advance(T0 + 20)
    h = only(tr)
    # Observed spacing (5 s) now exceeds the interval: the estimate uses it.
    assert h.end == pytest.approx(T0 + 11.0)


# --------------------------------------------------------------------------- out of order


def test_out_of_order_earlier_attempt_moves_start_back() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    tr.on_io_error(T0 + 1.0, "retry")
    tr.on_io_error(T0 + 0.8, "retry")
    assert tr.hang_start == T0 + 0.8 and tr.last_error == T0 + 1.0
    assert tr.deadline == T0 + 10.8


def test_out_of_order_never_before_previous_hang_end() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=0.5)
    tr.on_io_error(T0, "retry")
    tr.advance(T0 + 5)
    first = only(tr)
    tr.on_io_error(T0 + 10, "retry")
    tr.on_io_error(first.end - 0.5, "retry")
    assert tr.hang_start == T0 + 10
    tr.on_io_error(first.end + 0.1, "retry")
    assert tr.hang_start == first.end + 0.1


def test_out_of_order_report_before_start_is_ignored() -> None:
    tr = DiskHangTracker(1.0, 3.0)
    tr.on_io_error(T0 + 5, "retry")
    tr.on_io_error(T0 + 4, "report")
    assert tr.hanging and not tr.failing


def test_out_of_order_resume_before_last_error_does_not_end() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.on_io_error(T0 + 10, "stop")
    tr.on_resume(T0 + 9)
    tr.advance(T0 + 100)
    # Resume is older than the last error: treated as resumed, end estimated from the error.
    h = only(tr)
    assert h.start == T0 and T0 + 10 <= h.end <= T0 + 100


def test_old_advance_does_not_rewind() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.advance(T0 + 1.5)
    tr.advance(T0 - 100)
    assert tr.hanging and tr.duration(T0 - 100) == pytest.approx(1.5)


def test_report_end_never_before_start_when_late() -> None:
    tr = DiskHangTracker(1.0, 3.0)
    tr.on_io_error(T0 + 2, "retry")
    tr.on_io_error(T0 + 2, "report")
    h = only(tr)
    assert h.end == h.start == T0 + 2 and h.outcome is T


# --------------------------------------------------------------------------- counters


def test_hang_seconds_total_never_decreases_across_recovery() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=2.0)
    seen: list[float] = []
    t = 0.0
    for i in range(10):
        tr.on_io_error(T0 + i, "retry")
    while t < 20:
        tr.advance(T0 + t)
        seen.append(tr.hang_seconds_total(T0 + t))
        t += 0.1
    assert all(b >= a for a, b in itertools.pairwise(seen))
    assert seen[-1] == pytest.approx(10.0)
    assert totals(tr) == (1, 0, 0)


def test_drain_completed_returns_each_hang_once_in_order() -> None:
    tr = DiskHangTracker(1.0, 2.0, margin_s=0.5)
    tr.on_io_error(T0, "retry")
    tr.advance(T0 + 10)
    tr.on_io_error(T0 + 20, "retry")
    tr.on_io_error(T0 + 21, "retry")
    tr.on_io_error(T0 + 22, "report")
    tr.advance(T0 + 30)
    tr.on_io_error(T0 + 40, "retry")
    tr.on_vm_gone(T0 + 41)
    done = tr.drain_completed()
    assert [h.outcome for h in done] == [R, T, V]
    assert tr.drain_completed() == []
    assert totals(tr) == (1, 1, 1)
    assert tr.hang_seconds_total(T0 + 50) == pytest.approx(sum(h.duration for h in done))


# --------------------------------------------------------------------------- snapshot / restore


def test_snapshot_is_json_and_round_trips_idle_counters() -> None:
    tr = DiskHangTracker(2.0, 20.0, margin_s=1.5)
    tr.on_io_error(T0, "retry")
    tr.on_vm_gone(T0 + 3)
    snap = tr.snapshot()
    data = json.loads(json.dumps(snap, allow_nan=False))
    tr2 = DiskHangTracker.restore(data, now=T0 + 10)
    assert dict(tr2.hangs_total) == {R: 0, T: 0, V: 1}
    assert tr2.hang_seconds_total(T0 + 10) == pytest.approx(3.0)
    assert (tr2.retry_interval_s, tr2.retry_timeout_s, tr2.margin_s) == (2.0, 20.0, 1.5)
    assert not tr2.hanging and not tr2.failing


def test_snapshot_fresh_tracker_round_trips() -> None:
    snap = json.loads(json.dumps(DiskHangTracker().snapshot(), allow_nan=False))
    tr = DiskHangTracker.restore(snap, now=T0)
    assert not tr.hanging and totals(tr) == (0, 0, 0)


def test_restore_mid_hang_then_recovery_estimated_end() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=2.0)
    for i in range(5):
        tr.on_io_error(T0 + i, "retry")
    snap = json.loads(json.dumps(tr.snapshot()))
    # Restored long after: the disk recovered while the exporter was down.
    tr2 = DiskHangTracker.restore(snap, now=T0 + 100)
    assert tr2.hanging and tr2.hang_start == T0
    tr2.advance(T0 + 102.9)
    assert tr2.hanging  # silence is counted from the restore
    tr2.advance(T0 + 103.1)
    h = only(tr2)
    assert (h.start, h.outcome) == (T0, R)
    assert h.end == pytest.approx(T0 + 5.0)  # last error + spacing, not the restore time
    assert tr2.hang_seconds_total(T0 + 200) == pytest.approx(5.0)


def test_restore_uses_fresh_policy() -> None:
    tr = DiskHangTracker(1.0, 10.0)
    tr.on_io_error(T0, "retry")
    tr2 = DiskHangTracker.restore(tr.snapshot(), now=T0 + 1, retry_timeout_s=5.0)
    assert tr2.deadline == T0 + 5.0


def test_restore_mid_failing_then_silence_ends_it() -> None:
    tr = DiskHangTracker(1.0, 2.0, margin_s=1.0)
    tr.on_io_error(T0, "retry")
    tr.on_io_error(T0 + 2, "report")
    tr2 = DiskHangTracker.restore(json.loads(json.dumps(tr.snapshot())), now=T0 + 50)
    assert tr2.failing and totals(tr2) == (0, 1, 0)
    tr2.advance(T0 + 52.1)
    assert not tr2.failing


def test_restore_paused_stop_hang_stays_until_resume() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    tr.on_io_error(T0, "stop")
    tr.on_stop(T0)
    tr.advance(T0 + 10)
    tr2 = DiskHangTracker.restore(tr.snapshot(), now=T0 + 60)
    assert tr2.paused and tr2.hanging
    # Only what was known before the restart counts; time paused from now on counts again.
    assert tr2.hang_seconds_total(T0 + 60) == pytest.approx(10.0)
    tr2.advance(T0 + 100)
    assert tr2.hanging
    assert tr2.hang_seconds_total(T0 + 100) == pytest.approx(100.0)
    tr2.on_resume(T0 + 100)
    tr2.advance(T0 + 103)
    assert only(tr2).end == T0 + 100


def test_restore_with_clock_behind_snapshot_never_ends_in_future() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_io_error(T0 + 50, "retry")
    tr2 = DiskHangTracker.restore(tr.snapshot(), now=T0 + 10)  # host clock stepped back
    tr2.on_vm_gone(T0 + 11)
    h = only(tr2)
    assert h.end >= h.start


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=99),
        lambda d: d.pop("hangs_total"),
        lambda d: d.update(hangs_total={"recovered": -1}),
        lambda d: d.update(hangs_total={"recovered": 1.5}),
        lambda d: d.update(retry_interval_s="1"),
        lambda d: d.update(hang_start=float("nan")),
        lambda d: d.update(observed_spacing=-1.0),
        lambda d: d.update(hang_seconds_completed=True),
    ],
)
def test_restore_rejects_malformed(mutate: object) -> None:
    tr = DiskHangTracker()
    tr.on_io_error(T0, "retry")
    data = tr.snapshot()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ValueError):
        DiskHangTracker.restore(data, now=T0 + 1)


def test_restore_rejects_non_mapping() -> None:
    with pytest.raises(ValueError):
        DiskHangTracker.restore([], now=T0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- io_error_events


def test_io_error_events_count_a_timed_out_hangs_attempts_and_its_report() -> None:
    """The journal's ``io_error_events``: every failed attempt of the hang (all in-flight
    requests) and the report that timed it out; the reports after it belong to no hang."""
    tr = DiskHangTracker(1.0, 3.0)
    for k in range(3):
        for j in range(4):
            tr.on_io_error(T0 + k + j * 1e-3, "retry")
    tr.on_io_error(T0 + 3.0, "report")
    for k in range(10):
        tr.on_io_error(T0 + 3.1 + k * 0.05, "report")  # failing: the guest sees each error
    h = only(tr)
    assert (h.outcome, h.io_error_events) == (T, 3 * 4 + 1)


def test_io_error_events_of_consecutive_hangs_are_their_own() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    for k in range(5):
        tr.on_io_error(T0 + k, "retry")
    tr.advance(T0 + 20)
    tr.on_io_error(T0 + 30, "retry")
    tr.on_io_error(T0 + 30, "ignore")  # the guest saw success: not an error of the hang
    tr.advance(T0 + 40)
    assert [(h.outcome, h.io_error_events) for h in tr.drain_completed()] == [(R, 5), (R, 1)]


def test_io_error_events_survive_a_restore_mid_hang() -> None:
    tr = DiskHangTracker(1.0, 0.0, margin_s=1.0)
    for k in range(4):
        tr.on_io_error(T0 + k, "retry")
    tr2 = DiskHangTracker.restore(json.loads(json.dumps(tr.snapshot())), now=T0 + 4)
    tr2.on_io_error(T0 + 4, "retry")
    tr2.advance(T0 + 20)
    assert only(tr2).io_error_events == 5


def test_a_hang_found_stopped_has_no_events_of_its_own() -> None:
    tr = DiskHangTracker(1.0, 0.0)
    tr.on_found_stopped(T0)
    tr.on_io_error(T0 + 1, "stop")  # after cont, the request fails again
    tr.on_vm_gone(T0 + 2)
    h = only(tr)
    assert (h.outcome, h.io_error_events) == (V, 1)
