"""Property tests of exporter.hang invariants over random, partly out-of-order event streams."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.hang.machine import DiskHangTracker
from exporter.hang.outcome import HangOutcome
from exporter.hang.tracking import HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import BlockStats, Disk, VMState

T0 = 1_700_000_000.0

KINDS = ("retry", "report", "stop", "ignore", "STOP", "RESUME", "gone", "stats", "advance",
         "disconnect", "reconnect", "policy", "restore", "blind", "run")  # fmt: skip

op = st.tuples(
    st.sampled_from(KINDS),
    # Mostly forward steps, sometimes a step back (late delivery).
    st.one_of(
        st.floats(0.0, 3.0, allow_nan=False),
        st.floats(-1.0, 0.0, allow_nan=False),
        st.floats(0.0, 30.0, allow_nan=False),
    ),
    st.integers(0, 5),
)

policy = st.tuples(
    st.sampled_from([0.1, 0.5, 1.0, 2.0]),
    st.sampled_from([0.0, 1.0, 3.0, 10.0]),
    st.sampled_from([0.0, 0.5, 2.0]),
)


@settings(max_examples=int(os.environ.get("HANG_EXAMPLES", "300")), deadline=None)
@given(policy, st.lists(op, max_size=120))
def test_invariants(pol: tuple[float, float, float], ops: list[tuple[str, float, int]]) -> None:
    interval, timeout, margin = pol
    tr = DiskHangTracker(interval, timeout, margin)
    t = T0
    high = T0  # latest time fed
    ops_counter = 0
    prev_counts = dict(tr.hangs_total)
    prev_secs = 0.0
    completed = []
    blind = False
    errors_fed = 0
    for kind, dt, arg in ops:
        t += dt
        high = max(high, t)
        if kind in ("retry", "report", "stop", "ignore"):
            tr.on_io_error(t, kind)
            errors_fed += kind != "ignore"
        elif kind == "STOP":
            tr.on_stop(t)
        elif kind == "RESUME":
            tr.on_resume(t)
        elif kind == "gone":
            tr.on_vm_gone(t)
            blind = False
        elif kind == "stats":
            ops_counter += arg if arg < 5 else -ops_counter  # 5: counters restart
            tr.on_blockstats(t, ops_counter)
        elif kind == "disconnect":
            tr.on_disconnect(t)
            blind = True
        elif kind == "reconnect":
            tr.on_reconnect(t)
            blind = False
        elif kind == "blind":
            tr.on_blind(t - arg, t)  # the event loop did not run for the last `arg` seconds
        elif kind == "run":
            errors_fed += arg + 1
            tr.on_io_errors(t - arg * 0.1, t, arg + 1, min(arg * 0.1, margin), ("retry", "report")[arg % 2])
        elif kind == "policy":
            tr.set_policy([0.5, 1.0, 3.0][arg % 3], [0.0, 2.0, 5.0][arg % 3])
        elif kind == "restore":
            snap = json.loads(json.dumps(tr.snapshot(), allow_nan=False))
            before = (tr.hanging, tr.hang_start, tr.failing, dict(tr.hangs_total))
            done_before = tr.drain_completed()
            tr = DiskHangTracker.restore(snap, now=high)
            assert (tr.hanging, tr.hang_start, tr.failing, dict(tr.hangs_total)) == before
            completed += done_before
            blind = False
        else:
            tr.advance(t)

        counts = dict(tr.hangs_total)
        assert set(counts) == set(HangOutcome)
        assert all(counts[o] >= prev_counts[o] for o in HangOutcome)
        prev_counts = counts
        secs = tr.hang_seconds_total(high)
        assert secs >= prev_secs - 1e-6
        prev_secs = secs
        assert not (tr.hanging and tr.failing)
        assert tr.active == (tr.hanging or tr.failing)
        if not tr.active:
            # What HangTracking relies on to leave idle trackers alone: time changes nothing.
            later = copy.deepcopy(tr)
            later.advance(high + 1e6)
            seen = (later.hanging, later.failing, later.has_completed, dict(later.hangs_total))
            assert seen == (tr.hanging, tr.failing, tr.has_completed, dict(tr.hangs_total))
            assert later.hang_seconds_total(high + 1e6) == tr.hang_seconds_total(high + 1e6)
        assert tr.duration(high) >= 0.0
        if tr.hanging:
            start = tr.hang_start
            assert start is not None and start <= high
            if tr.retry_timeout_s > 0:
                assert tr.deadline == start + tr.retry_timeout_s
            else:
                assert tr.deadline is None
        else:
            assert tr.hang_start is None and tr.deadline is None
        for h in tr.drain_completed():
            assert h.start <= h.end <= high  # never beyond the time observed
            completed.append(h)

    tr.advance(high + 1e6)  # everything not paused/blind ends eventually
    completed += tr.drain_completed()
    assert sum(tr.hangs_total.values()) == len(completed)
    # The journal's io_error_events: each hang's own events, none counted twice or invented
    # (a restored tracker keeps the count of its open hang).
    assert all(h.io_error_events >= 1 for h in completed)
    assert sum(h.io_error_events for h in completed) <= errors_fed
    prev_end = -1.0
    total = 0.0
    for h in completed:
        assert h.start <= h.end <= high + 1e6
        assert h.start >= prev_end - 1e-9  # hangs never overlap
        prev_end = h.end
        total += h.duration
    if tr.hanging:
        # Only a paused VM or a lost session keeps a hang open through endless silence.
        assert tr.paused or blind
        assert tr.hang_seconds_total(high + 1e6) >= total - 1e-6
    else:
        assert abs(tr.hang_seconds_total(high + 1e6) - total) < 1e-6 * max(1.0, total)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.2, 5.0),
    st.floats(1.0, 60.0),
    st.integers(1, 50),
    st.floats(0.0, 2.0),
)
def test_steady_outage_recovers_once_near_truth(
    interval: float, down: float, inflight: int, io_fail: float
) -> None:
    """A link down for `down` s with no timeout: exactly one hang, recovered, whose duration is
    within one attempt spacing of the truth (the first attempt after the link returns)."""
    tr = DiskHangTracker(interval, 0.0)
    spacing = interval + io_fail
    k = 0
    while k * spacing < down:
        for j in range(inflight):
            tr.on_io_error(T0 + k * spacing + j * 1e-4, "retry")
        k += 1
        tr.advance(T0 + k * spacing - 1e-3)
    true_end = k * spacing
    tr.advance(T0 + true_end + 3 * spacing + 10.0)
    done = tr.drain_completed()
    assert len(done) == 1 and done[0].outcome is HangOutcome.RECOVERED
    assert abs(done[0].duration - true_end) <= spacing + 1e-3


# --- stream order: replies and events interleaved as QEMU wrote them -------------------------

IO_EVERY = 0.01  # a busy guest: one successful IO every 10 ms while the storage works


def continuous_outage(
    interval: float, gaps: list[float], sample_offsets: list[float]
) -> tuple[list[float], float, list[tuple[float, str]], Callable[[float], int]]:
    """One outage as QEMU writes it: errors never more than ``interval`` apart (continuous),
    blockstats replies at ``T0 + offset``, all in QEMU's order (a tie: either order is
    possible); ``ok_ops(w)`` is the successful IOs completed before ``w``, none during the
    outage.  Returns (error times, true end, stream, ok_ops)."""
    errors, t = [], T0
    for g in gaps:
        errors.append(t)
        t += g * interval
    end_true = errors[-1] + interval  # the next attempt succeeds

    def ok_ops(w: float) -> int:
        done = max(0.0, min(w, T0) - (T0 - 100))
        if w > end_true:
            done += w - end_true
        return int(done / IO_EVERY)

    stream = [(w, "error") for w in errors] + [(T0 + off, "stats") for off in sample_offsets]
    stream.sort(key=lambda item: item[0])
    return errors, end_true, stream, ok_ops


@settings(max_examples=int(os.environ.get("HANG_EXAMPLES", "300")), deadline=None)
@given(
    st.sampled_from([0.2, 1.0]),
    st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30),
    st.lists(st.one_of(st.floats(-0.3, 0.0), st.floats(-3.0, 35.0)), max_size=25),
    st.lists(st.floats(0.0, 0.5), min_size=60, max_size=60),
)
def test_a_continuous_error_run_is_one_hang_in_any_interleaving(
    interval: float, gaps: list[float], sample_offsets: list[float], lags: list[float]
) -> None:
    """QEMU writes errors (QEMU-stamped) and blockstats replies (not stamped) into one ordered
    stream; the exporter reads each line some time later and stamps a reply with that time.
    However the replies fall between the errors and however late they are read (less than the
    margin: lag is not silence here), one continuous run of errors is exactly one hang."""
    margin = 1.0
    errors, end_true, stream, ok_ops = continuous_outage(interval, gaps, sample_offsets)
    tr = DiskHangTracker(interval, 0.0, margin)
    read = T0 - 100
    for (w, kind), lag in zip(stream, lags, strict=False):
        read = max(read, w + lag)  # lines are read in order, each no earlier than written
        tr.advance(read)  # the exporter's tick runs between lines
        if kind == "error":
            tr.on_io_error(w, "retry")
        else:
            tr.on_blockstats(read, ok_ops(w))
    tr.advance(max(read, errors[-1]) + 100)
    assert not tr.hanging
    assert dict(tr.hangs_total) == {
        HangOutcome.RECOVERED: 1,
        HangOutcome.TIMED_OUT: 0,
        HangOutcome.VM_GONE: 0,
    }
    (hang,) = tr.drain_completed()
    assert hang.start == errors[0]
    assert errors[-1] <= hang.end <= end_true + margin + interval


class _ReaderPosition:
    """Where a QMP reader stands in its stream, as `ReadOnlyQMPClient.read_through` reports
    it (`exporter.model.state.StreamClock`): ``now`` while it waits with nothing unread, else
    the last time it had handled everything it had received."""

    def __init__(self) -> None:
        self.through = T0 - 100
        self.waiting = False

    def read_through(self, now: float) -> float:
        return now if self.waiting else min(now, self.through)


def _retry_vm(interval: float) -> VMState:
    vm = VMState.qmp("/run/lag/vm0.qmp")
    p = DiskPolicy("retry", "retry", round(interval * 1000), 0, True)
    vm.set_disks({"d0": Disk("d0", "drive0", "node0", "d0", "q", "virtio-blk", p, verify(p, PolicyConfig()))})
    return vm


@settings(max_examples=int(os.environ.get("HANG_EXAMPLES", "300")), deadline=None)
@given(
    st.sampled_from([0.1, 0.2, 1.0]),
    st.lists(st.floats(0.001, 1.0), min_size=1, max_size=40),
    st.lists(st.floats(-3.0, 45.0), max_size=20),
    st.lists(
        st.tuples(st.floats(0.0, 30.0), st.floats(0.0, 1.0), st.floats(0.0, 0.5)), min_size=70, max_size=70
    ),
)
def test_being_behind_in_reading_is_not_silence(
    interval: float,
    gaps: list[float],
    sample_offsets: list[float],
    reads: list[tuple[float, float, float]],
) -> None:
    """A reader arbitrarily far behind (up to 30 s, far beyond the 1 s default margin) never splits one
    continuous run of errors, because hang tracking advances a VM only as far as its stream is
    read (`VMState.read_through`) and a blockstats sample is stamped with the time its command
    was sent (QEMU wrote it later).  The hang is shown all along, and ends once the reader has
    caught up and the disk is silent."""
    errors, _end_true, stream, ok_ops = continuous_outage(interval, gaps, sample_offsets)
    vm = _retry_vm(interval)
    reader = _ReaderPosition()
    vm.stream = reader
    hangs = HangTracking(margin_s=1.0)
    hangs.on_disks(vm, T0 - 100)
    tracker = hangs.trackers[vm.key]["d0"]
    read = T0 - 100
    for (w, kind), (lag, known, send_delay) in zip(stream, reads, strict=False):
        read = max(read, w + lag)  # each line read in order, no earlier than written
        # The tick between lines: the reader has handled everything before this line, and
        # knows it at best up to this line's write time (it has not read it yet).
        reader.through = max(reader.through, reader.through + known * (min(read, w) - reader.through))
        hangs.tick(read)
        if errors[0] < w <= errors[-1]:
            assert tracker.hanging, "a continuous hang ended while the reader was behind"
        if kind == "error":
            hangs.on_event(vm, BlockIOError(w, "d0", "write", "retry"))
        else:
            vm.blockstats["d0"] = BlockStats(read_ops=ok_ops(w))
            hangs.on_blockstats(vm, w - send_delay)  # stamped when sent: before QEMU wrote it
    reader.waiting = True  # caught up: nothing unread, silence is silence now
    hangs.tick(max(read, errors[-1]) + 100)
    assert not tracker.hanging
    assert dict(tracker.hangs_total) == {
        HangOutcome.RECOVERED: 1,
        HangOutcome.TIMED_OUT: 0,
        HangOutcome.VM_GONE: 0,
    }


def test_lag_split_a_hang_when_ticks_used_the_wall_clock() -> None:
    """The case above with a reader 5 s behind and ticks at wall-clock time (no stream
    position: libvirt, or this exporter before it tracked how far each stream is read): silence
    was inferred from the lag, and one continuous hang became several.  Shows that the property
    test can fail."""
    vm = _retry_vm(0.1)
    hangs = HangTracking(margin_s=1.0)
    hangs.on_disks(vm, T0 - 100)
    for k in range(100):  # 10 s of errors, every 100 ms, each read 5 s after it was written
        w = T0 + k * 0.1
        hangs.tick(w + 5.0)
        hangs.on_event(vm, BlockIOError(w, "d0", "write", "retry"))
    hangs.tick(T0 + 100)
    assert hangs.trackers[vm.key]["d0"].hangs_total[HangOutcome.RECOVERED] > 1
