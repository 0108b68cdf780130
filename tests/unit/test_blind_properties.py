"""Property tests: a stall or a reconnection is never silence, and coalesced runs of errors are
exactly their events (issue 26).

The exporter is blind while its event loop does not run (SIGSTOP, swapped out, frozen) and
while a source is disconnected.  Events of such an interval are delivered late (QEMU, libvirtd
before its keepalive gives up) or never (the connection dropped).  Whichever, one continuous
outage is one hang: the tracker is told of the interval (`DiskHangTracker.on_blind`,
``on_disconnect``/``on_reconnect``) before it may infer silence from the time after it.
"""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.hang.machine import DiskHangTracker
from exporter.hang.outcome import HangOutcome

T0 = 1_700_000_000.0
EXAMPLES = int(os.environ.get("HANG_EXAMPLES", "300"))

#: How the exporter went blind: its loop stopped and the events were read late (QMP; libvirtd
#: within its keepalive), its loop stopped and the events were lost (libvirtd dropped the
#: connection meanwhile), or a session / connection was down and reconnected.
MODES = ("late", "lost", "disconnect")


def errors_of(interval: float, gaps: list[float]) -> list[float]:
    """A continuous outage: errors never more than ``interval`` apart."""
    out, t = [], T0
    for g in gaps:
        out.append(t)
        t += g * interval
    return out


def blind_intervals(
    errors: list[float], spans: list[tuple[float, float, str]]
) -> list[tuple[float, float, str]]:
    """Non-overlapping intervals inside the outage, after its first error (``spans``: where in
    the outage it starts, its length in seconds, its mode)."""
    first, last = errors[0], errors[-1]
    out: list[tuple[float, float, str]] = []
    for where, length, mode in sorted(spans):
        s = first + 1e-3 + where * (last - first)
        if out and s <= out[-1][1]:
            continue
        out.append((s, s + length, mode))
    return out


def play(
    tr: DiskHangTracker,
    errors: list[float],
    blinds: list[tuple[float, float, str]],
    ticks: list[float],
    tell: bool = True,
) -> None:
    """Feed ``errors`` as the exporter would: in order, the silence between them inferred at
    ticks no later than its read position (the next error not yet fed), nothing at all during a
    blind interval, which is told (``tell``) before the first tick after it; the interval's
    errors come right after it (``late``) or never (``lost``, ``disconnect``)."""
    ticks_left = iter(ticks)
    pending = list(errors)
    done = T0 - 1.0  # position: every error up to here has been fed

    def tick_towards(nxt: float) -> None:
        nonlocal done
        frac = next(ticks_left, 1.0)
        position = done + frac * (nxt - done)
        tr.advance(position)
        done = max(done, position)

    for s, f, mode in blinds:
        while pending and pending[0] < s:
            tick_towards(pending[0])
            done = pending[0]
            tr.on_io_error(pending.pop(0), "retry")
        if mode == "disconnect":
            tr.on_disconnect(s)
        inside = [e for e in pending if e <= f]
        pending = [e for e in pending if e > f]
        if mode == "disconnect":
            tr.on_reconnect(f)
        elif tell:
            tr.on_blind(s, f)
        if mode == "late":  # the backlog, read after the stall: everything up to it was there
            for e in inside:
                tr.on_io_error(e, "retry")
        done = max(done, f)
    while pending:
        tick_towards(pending[0])
        done = pending[0]
        tr.on_io_error(pending.pop(0), "retry")


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.sampled_from([0.001, 0.2, 1.0]),
    st.floats(0.0, 2.0),
    st.lists(st.floats(0.001, 1.0), min_size=2, max_size=60),
    st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 60.0), st.sampled_from(MODES)), max_size=4),
    st.lists(st.floats(0.0, 1.0), max_size=80),
)
def test_a_stall_or_reconnection_never_splits_a_continuous_hang(
    interval: float,
    margin: float,
    gaps: list[float],
    spans: list[tuple[float, float, str]],
    ticks: list[float],
) -> None:
    """However long the exporter was blind (up to a minute, far beyond any expected spacing),
    and whether the interval's events came late or never, one continuous outage stays one hang
    from its first error, and ends (recovered) once the disk is silent afterwards."""
    errors = errors_of(interval, gaps)
    blinds = blind_intervals(errors, spans)
    tr = DiskHangTracker(interval, 0.0, margin)
    play(tr, errors, blinds, ticks)
    assert tr.hanging and tr.hang_start == errors[0]
    assert sum(tr.hangs_total.values()) == 0
    tr.advance(max(errors[-1], *(f for _s, f, _m in blinds), T0) + 100 + 3 * interval)
    assert dict(tr.hangs_total) == {
        HangOutcome.RECOVERED: 1,
        HangOutcome.TIMED_OUT: 0,
        HangOutcome.VM_GONE: 0,
    }
    (hang,) = tr.drain_completed()
    assert hang.start == errors[0]


def test_an_untold_stall_splits_the_hang() -> None:
    """The same play without telling the tracker of a 35 s stall whose events were lost (what
    libvirt mode did before: the first tick after SIGCONT saw 35 s of "silence"): one
    continuous outage becomes a recovered hang and a new one.  Shows the property can fail."""
    errors = errors_of(0.001, [1.0] * 50_000)  # 50 s of errors, one per millisecond
    blinds = [(T0 + 5.0, T0 + 40.0, "lost")]
    tr = DiskHangTracker(0.001, 0.0, 1.0)
    play(tr, errors, blinds, [1.0] * 100, tell=False)
    assert tr.hangs_total[HangOutcome.RECOVERED] == 1 and tr.hanging


def runs_of(events: list[tuple[float, str]], merge_gap: float) -> list[list[tuple[float, str]]]:
    """``events`` coalesced as `exporter.libvirt.inbox.EventInbox` does: consecutive events of
    one action at most ``merge_gap`` apart make one run."""
    runs: list[list[tuple[float, str]]] = []
    for ts, action in events:
        if runs and runs[-1][-1][1] == action and 0.0 <= ts - runs[-1][-1][0] <= merge_gap:
            runs[-1].append((ts, action))
        else:
            runs.append([(ts, action)])
    return runs


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.sampled_from([0.001, 0.2, 1.0]),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([0.0, 3.0]),
    st.lists(
        st.tuples(st.floats(0.0, 4.0), st.sampled_from(["retry", "retry", "report", "ignore"])),
        min_size=1,
        max_size=80,
    ),
    st.lists(st.floats(0.0, 1.0), max_size=80),
)
def test_coalesced_runs_are_exactly_their_events(
    interval: float,
    margin: float,
    timeout: float,
    steps: list[tuple[float, str]],
    ticks: list[float],
) -> None:
    """Errors handed over as runs (merged while at most the margin apart) leave the tracker
    exactly as one by one: the same hangs with the same starts, ends and outcomes, the same
    state and counters, whatever the actions, the gaps (some long enough to end a hang), the
    policy, and ticks between the runs (one by one also ticks inside them)."""
    events, t = [], T0
    for dt, action in steps:
        if action == "retry" and events and events[-1][1] == "report":
            dt = max(dt, 1e-3)  # QEMU retries again only after an IO succeeded: later than the report
        t += dt
        events.append((t, action))
    one = DiskHangTracker(interval, timeout, margin)
    run = DiskHangTracker(interval, timeout, margin)
    tick = iter(ticks)
    done = T0 - 1.0
    for events_of_run in runs_of(events, margin):
        (first, action), (last, _a) = events_of_run[0], events_of_run[-1]
        position = done + next(tick, 0.0) * (first - done)  # a tick before the run: same for both
        one.advance(position)
        run.advance(position)
        for ts, act in events_of_run:
            one.advance(ts)  # one by one, silence is also looked at inside the run
            one.on_io_error(ts, act)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(events_of_run)]
        run.on_io_errors(first, last, len(events_of_run), max(gaps, default=0.0), action)
        done = last
    end = events[-1][0] + 100.0
    for tr in (one, run):
        tr.advance(end)
    assert (run.hanging, run.hang_start, run.failing) == (one.hanging, one.hang_start, one.failing)
    assert dict(run.hangs_total) == dict(one.hangs_total)
    assert run.observed_spacing == one.observed_spacing
    got, want = run.drain_completed(), one.drain_completed()
    assert [(h.start, h.outcome, h.io_error_events) for h in got] == [
        (h.start, h.outcome, h.io_error_events) for h in want
    ]
    assert all(abs(a.end - b.end) < 1e-6 for a, b in zip(got, want, strict=True))
    assert abs(run.hang_seconds_total(end) - one.hang_seconds_total(end)) < 1e-6
