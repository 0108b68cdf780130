"""Per-disk IO hang state machine: pure, no I/O, no clock of its own.

Why a state machine at all
==========================
QEMU's retry policy (``werror=retry``/``rerror=retry``) holds a failing request and retries it
every ``retry_interval``; only after ``retry_timeout`` does the guest see the error.  QMP shows
the *start* of such a hang (``BLOCK_IO_ERROR`` with ``action: "retry"``, one event per failed
attempt of every failing request, unthrottled) and its *timeout* (``action: "report"``), but
**recovery emits nothing**: the next attempt simply succeeds.  The only traces are the end of
the ``retry`` events and rising successful-operation counters in ``query-blockstats``.  So the
end of a recovered hang must be inferred, and that is what this module does.

Every method takes the timestamps it needs (float Unix seconds): QEMU event timestamps come from
the host real-time clock, and ``now`` passed by the caller must come from the same clock.  The
module never reads a clock itself, which keeps it deterministic and testable.  All per-event
work is O(1) (hosts see thousands of error events per second in an event storm).

States of one disk (:class:`DiskHangTracker`)::

               retry / stop error             report (timed_out)
      IDLE ----------------------> HANGING ---------------------> FAILING
       ^ ^                           |  ^                           |  |
       | +---------------------------+  +---------------------------+  |
       |   silence (recovered),           retry / stop error:          |
       |   ok-ops rising (recovered),     new hang                     |
       |   VM gone (vm_gone)                                           |
       +---------------------------------------------------------------+
          silence, ok-ops rising, VM gone (no hang outcome: not a hang)

      IDLE --report--> FAILING   (report policy: errors reach the guest, no hang counted)

==========  ==================  =====================================================
state       event               next state, and why
==========  ==================  =====================================================
IDLE        ``retry`` error     HANGING, start = event time (first held request)
IDLE        ``stop`` error      HANGING (paused), start = event time (``stop`` policy)
IDLE        ``report`` error    FAILING (``report`` policy: the guest sees the error)
HANGING     ``retry``/``stop``  HANGING (further failed attempt; learns the spacing)
HANGING     ``report``          FAILING; hang ends ``timed_out`` at the report time
HANGING     silence / ok-ops    IDLE; hang ends ``recovered`` at the estimated end
HANGING     VM gone             IDLE; hang ends ``vm_gone`` at the event time
FAILING     ``report``          FAILING (QEMU reports every failing IO at once)
FAILING     ``retry``/``stop``  HANGING: QEMU's timeout clock was reset, which only a
                                successful IO does, so this is a new hang
FAILING     silence / ok-ops    IDLE (an IO succeeded, or the guest stopped failing)
FAILING     VM gone             IDLE
==========  ==================  =====================================================

The rules in full (the ``stop`` policy's paused sub-state, the expected spacing, a recovered
hang's end time, the order of inputs, the invariants) are in docs/hangs.md, "The rules".
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from exporter.hang.numbers import finite as _finite
from exporter.hang.numbers import non_negative as _non_negative
from exporter.hang.outcome import CompletedHang, HangOutcome
from exporter.hang.snapshot import SavedFailing, SavedHang, SavedTracker, parse

__all__ = [
    "DEFAULT_MARGIN_S",
    "DiskHangTracker",
]

#: Extra silence, beyond one expected attempt spacing, before a hang is declared over.  Two
#: seconds covers event delivery lag and scrape-time skew without making the hang gauge linger.
DEFAULT_MARGIN_S: Final[float] = 2.0

#: Completed hangs kept for :meth:`DiskHangTracker.drain_completed` when the caller never drains
#: (bounds memory in an event storm with flapping storage; the counters stay exact).
MAX_PENDING_COMPLETED: Final[int] = 4096

_NEG_INF: Final[float] = -math.inf


class DiskHangTracker:
    """Hang state of one disk, fed with QMP events, blockstats samples and the current time.

    ``retry_interval_s`` and ``retry_timeout_s`` are the device's ``retry_interval`` and
    ``retry_timeout`` in seconds (QMP gives milliseconds; 0 timeout = never times out).  For a
    disk whose policy is not visible (``auto``) use QEMU's device defaults, 1 s and 0, which is
    what QEMU then actually applies.
    """

    __slots__ = (
        "_anchor",
        "_blind",
        "_clock",
        "_completed",
        "_completed_s",
        "_counts",
        "_events",
        "_failing",
        "_failing_since",
        "_gap_ref",
        "_interval",
        "_known",
        "_last_end",
        "_last_err",
        "_last_report",
        "_margin",
        "_ops",
        "_ops_ts",
        "_paused",
        "_resume_ts",
        "_spacing",
        "_start",
        "_stop_pause",
        "_timeout",
    )

    def __init__(
        self,
        retry_interval_s: float = 1.0,
        retry_timeout_s: float = 0.0,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> None:
        self._interval = _non_negative("retry_interval_s", retry_interval_s)
        self._timeout = _non_negative("retry_timeout_s", retry_timeout_s)
        self._margin = _non_negative("margin_s", margin_s)
        # Latest time fed (event, sample or advance); never decreases.
        self._clock = _NEG_INF
        # Current hang (meaningful only while _start is not None).
        self._start: float | None = None
        self._last_err = 0.0  # latest failed attempt
        self._known = 0.0  # latest moment the hang is known to have persisted
        self._spacing = 0.0  # largest gap between consecutive errors of the hang
        self._gap_ref: float | None = None  # previous error for gap measurement
        self._resume_ts: float | None = None  # RESUME with no error since
        self._stop_pause = False  # the hang paused the VM (stop policy)
        self._events = 0  # BLOCK_IO_ERROR events of the hang (`CompletedHang.io_error_events`)
        # Silence is counted from here at the earliest (restore, reconnect, RESUME).
        self._anchor = _NEG_INF
        # VM / session.
        self._paused = False
        self._blind = False
        # Errors reaching the guest.
        self._failing = False
        self._failing_since = 0.0
        self._last_report = 0.0
        # Blockstats baseline.
        self._ops: int | None = None
        self._ops_ts = _NEG_INF
        # Results.
        self._counts: dict[HangOutcome, int] = dict.fromkeys(HangOutcome, 0)
        self._completed_s = 0.0
        self._last_end = _NEG_INF
        self._completed: deque[CompletedHang] = deque(maxlen=MAX_PENDING_COMPLETED)

    # ------------------------------------------------------------------ policy

    def set_policy(self, retry_interval_s: float, retry_timeout_s: float) -> None:
        """Apply a (re-read) policy.  Takes effect at once, also for a running hang: QEMU checks
        the timeout against the hang's start when an attempt fails, so the deadline moves with
        it, and the interval changes the spacing of the next attempts."""
        self._interval = _non_negative("retry_interval_s", retry_interval_s)
        self._timeout = _non_negative("retry_timeout_s", retry_timeout_s)

    @property
    def retry_interval_s(self) -> float:
        return self._interval

    @property
    def retry_timeout_s(self) -> float:
        return self._timeout

    @property
    def margin_s(self) -> float:
        return self._margin

    # ------------------------------------------------------------------ inputs

    def on_io_error(self, ts: float, action: str) -> None:
        """A ``BLOCK_IO_ERROR`` for this disk at QEMU time ``ts`` with its ``action``.

        * ``retry``: QEMU holds the request; the first one starts a hang (its start is this
          timestamp), later ones are further failed attempts.  On a FAILING disk it means QEMU's
          timeout clock was reset, which only a successful IO does: failing ends, a new hang
          starts.
        * ``stop``: QEMU pauses the VM on the error (upstream ``stop`` policy): a hang from this
          event until a RESUME not followed by another error.
        * ``report``: the error reaches the guest.  On a hanging disk that is the timeout
          (``timed_out``, end = this timestamp); the disk is then FAILING.
        * ``ignore`` (the guest sees success) and unknown actions change nothing.
        """
        t = _finite("ts", ts)
        self._tick(t)
        if action in ("retry", "stop", "report") and self._ops_ts >= t:
            # The latest sample was fed before this event, so QEMU wrote it before this event
            # (inputs come in stream order), whatever time it was stamped with when it was
            # read: a reply read late must not pass for a sample taken inside this hang.
            self._ops_ts = math.nextafter(t, _NEG_INF)
        if action in ("retry", "stop"):
            self._on_failed_attempt(t, stop=action == "stop")
        elif action == "report":
            self._on_report(t)

    def on_found_stopped(self, ts: float) -> None:
        """The VM was found paused by an IO error on this disk (run state ``io-error``, the
        disk's ``io-status`` "failed") while no hang is known: the exporter started, or its
        session came back, after the error.  A hang "first seen" at ``ts``: its true start is
        earlier and unknown.  It ends like any ``stop`` hang (RESUME, then no further error)."""
        if self._start is None:
            self.on_io_error(ts, "stop")
            self._events = 0  # no event of this hang was seen

    def on_stop(self, ts: float) -> None:
        """``STOP``: the VM is paused.  While paused no attempt runs (the disk is drained), so
        silence proves nothing and the hang is known to persist for as long as the pause."""
        t = _finite("ts", ts)
        self._tick(t)
        self._paused = True
        self._gap_ref = None  # a gap spanning a pause is not an attempt spacing
        if self._start is not None:
            self._known = max(self._known, t)

    def on_resume(self, ts: float) -> None:
        """``RESUME``: the VM runs again and QEMU retries the held request at once.  If no
        error follows within the expected spacing, the hang recovered (at this time for a
        ``stop`` hang)."""
        t = _finite("ts", ts)
        self._tick(t)
        self._paused = False
        self._anchor = max(self._anchor, t)
        if self._start is not None and t >= self._last_err:
            self._known = max(self._known, t)
            self._resume_ts = t

    def on_vm_gone(self, ts: float) -> None:
        """QEMU exited, ``SHUTDOWN``, ``RESET``, or the QMP connection was lost and the VM did not
        come back: a running hang ends ``vm_gone`` at ``ts``; failing ends (no guest is left to
        see errors); the blockstats baseline is dropped (a new QEMU restarts its counters)."""
        t = _finite("ts", ts)
        self._tick(t)
        if self._start is not None:
            self._end(HangOutcome.VM_GONE, t)
        self._failing = False
        self._paused = False
        self._blind = False
        self._ops = None
        self._ops_ts = _NEG_INF
        self._anchor = max(self._anchor, t)

    def on_disconnect(self, ts: float) -> None:
        """The QMP session dropped (the VM may still run): events may be missed, so nothing is
        inferred from silence until :meth:`on_reconnect` (or :meth:`on_vm_gone`)."""
        t = _finite("ts", ts)
        self._tick(t)
        self._blind = True
        self._gap_ref = None

    def on_reconnect(self, ts: float) -> None:
        """The QMP session is back: silence is counted again, from ``ts``."""
        t = _finite("ts", ts)
        self._blind = False
        self._anchor = max(self._anchor, t)
        self._gap_ref = None
        self._tick(t)

    def on_blind(self, start: float, end: float) -> None:
        """The exporter could see nothing from ``start`` to ``end``: its event loop did not run
        (a stopped, frozen or swapped-out process: the heartbeat shows the gap), so events of
        that interval were read late or, where the source dropped the connection meanwhile,
        never.  Silence up to ``start`` is silence; silence within the interval proves nothing.

        So a hang open before it stays open: it ends only if no error comes within the expected
        spacing counted from ``end`` (then ``recovered`` at its usual estimate, which lies
        before the interval).  Errors fed afterwards, whether their timestamps lie within the
        interval (a backlog delivered late) or after it, continue the same hang.  Intervals may
        be reported again, overlapping or extended: only the latest end counts."""
        s, e = _finite("start", start), _finite("end", end)
        if e < s:
            raise ValueError(f"blind interval ends before it starts: {start!r} > {end!r}")
        self._tick(s)
        self._anchor = max(self._anchor, e)
        self._gap_ref = None  # a gap spanning the interval is not an attempt spacing

    def on_io_errors(self, first: float, last: float, count: int, max_gap: float, action: str) -> None:
        """A run of ``count`` ``BLOCK_IO_ERROR``s of this disk with one ``action``, handed over
        as one (the libvirt source coalesces them while it is behind: `exporter.libvirt.source`):
        the first at ``first``, the last at ``last``, consecutive ones never more than
        ``max_gap`` apart.  Equivalent to feeding each of them with `on_io_error` as long as
        ``max_gap`` does not exceed the margin (the coalescer ensures it): no gap within the run
        can then be silence (the expected spacing is at least the margin), and the run's largest
        gap is what the state keeps of its interior (the observed spacing); its events count in
        the hang's (`CompletedHang.io_error_events`).  ``stop`` is never coalesced (each pauses
        the VM).  The run comes from one ordered stream: only out-of-order input makes an error
        stale (`on_io_error`), and a run whose first error is stale starts its hang at its
        last."""
        f, la, g = _finite("first", first), _finite("last", last), _non_negative("max_gap", max_gap)
        self.on_io_error(f, action)
        inner_events = count - (2 if la > f else 1)
        if inner_events > 0 and action in ("retry", "stop") and self._start is not None:
            self._events += inner_events
        if la <= f:
            return
        # Stand in for the interior: an attempt max_gap before the last (one existed at least
        # that late), so that the last is measured against it, as one by one.
        inner = max(f, la - g)
        if action in ("retry", "stop") and self._start is not None and inner >= self._start:
            self._last_err = max(self._last_err, inner)
            self._known = max(self._known, inner)
            self._gap_ref = inner
        elif action == "report" and self._failing:
            self._last_report = max(self._last_report, inner)
        self.on_io_error(la, action)

    def on_blockstats(self, ts: float, ok_ops: int) -> None:
        """A ``query-blockstats`` sample taken at ``ts``: ``ok_ops`` is the sum of successful
        ``rd_operations + wr_operations + flush_operations`` (QEMU counts failures separately).
        ``ts`` is the exporter's stamp of the sample (the QMP source: when its command was
        sent).  Feed samples and events in the order QEMU wrote them (a sample fed before an
        event precedes it, see `on_io_error`).

        A rise means some IO succeeded between the previous sample and this one.  QEMU resets
        its per-disk timeout clock on any successful IO, so this ends a hang (``recovered``)
        or a failing period - provided the previous sample was taken after the hang (failing)
        began, so the success cannot predate it, and this one after the last error.  A fall
        (new counters) only re-baselines.
        """
        t = _finite("ts", ts)
        if isinstance(ok_ops, bool) or not isinstance(ok_ops, int) or ok_ops < 0:
            raise ValueError(f"ok_ops must be a non-negative int, got {ok_ops!r}")
        self._tick(t)
        prev, prev_ts = self._ops, self._ops_ts
        if prev is not None and t < prev_ts:
            return  # stale sample
        self._ops, self._ops_ts = ok_ops, t
        if prev is None or ok_ops <= prev:
            return
        if (
            self._start is not None
            and not self._paused
            and not self._blind
            and prev_ts >= self._start
            and t > self._known
        ):
            self._end(HangOutcome.RECOVERED, min(self._recovery_estimate(), t))
        if self._failing and prev_ts >= self._failing_since and t > self._last_report:
            self._failing = False

    def advance(self, now: float) -> None:
        """Move time to ``now`` (host real-time clock): ends a hang, or a failing period, whose
        disk has been silent for longer than the expected spacing.  Call before reading."""
        self._tick(_finite("now", now))

    # ------------------------------------------------------------------ outputs

    @property
    def hanging(self) -> bool:
        return self._start is not None

    @property
    def failing(self) -> bool:
        """Errors are reaching the guest (after a timeout, or with the ``report`` policy)."""
        return self._failing

    @property
    def active(self) -> bool:
        """Hanging or failing: the only states in which the passing time changes anything."""
        return self._start is not None or self._failing

    @property
    def has_completed(self) -> bool:
        """Hangs completed and not yet drained (`drain_completed`)."""
        return bool(self._completed)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def hang_start(self) -> float | None:
        return self._start

    @property
    def last_error(self) -> float | None:
        """Latest failed attempt of the running hang."""
        return self._last_err if self._start is not None else None

    @property
    def deadline(self) -> float | None:
        """When the running hang times out (start + retry_timeout); None without a hang or with
        timeout 0 (QEMU then retries forever)."""
        if self._start is None or self._timeout <= 0:
            return None
        return self._start + self._timeout

    @property
    def observed_spacing(self) -> float:
        """Largest gap between consecutive errors of the current (or last) hang."""
        return self._spacing

    @property
    def expected_spacing(self) -> float:
        """Silence after which attempts are taken to have stopped failing."""
        return self._base_spacing() + self._margin

    def duration(self, now: float) -> float:
        """Age of the running hang at ``now`` (0 without one); never negative."""
        if self._start is None:
            return 0.0
        return max(0.0, max(_finite("now", now), self._clock) - self._start)

    @property
    def hangs_total(self) -> Mapping[HangOutcome, int]:
        """Completed hangs per outcome (all three present)."""
        return MappingProxyType(self._counts)

    def hang_seconds_total(self, now: float) -> float:
        """Seconds spent hanging: completed hangs plus the running one up to the last moment it
        is known to have lasted (see the module docstring: counting up to ``now`` would make the
        counter decrease when the hang is ended at its estimated end).  Non-decreasing across
        calls; ``now`` is validated but does not extend the running part - call
        :meth:`advance` first."""
        _finite("now", now)
        running = 0.0 if self._start is None else max(0.0, self._known - self._start)
        return self._completed_s + running

    def drain_completed(self) -> list[CompletedHang]:
        """Hangs completed since the last call, oldest first (for the duration histogram)."""
        out = list(self._completed)
        self._completed.clear()
        return out

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state, to survive an exporter restart (`exporter.hang.snapshot`)."""
        hang = None
        if self._start is not None:
            hang = SavedHang(
                self._start, self._last_err, self._known, self._stop_pause, self._resume_ts, self._events
            )
        return SavedTracker(
            retry_interval_s=self._interval,
            retry_timeout_s=self._timeout,
            margin_s=self._margin,
            observed_spacing=self._spacing,
            paused=self._paused,
            hangs_total=self._counts,
            hang_seconds_completed=self._completed_s,
            last_end=None if self._last_end == _NEG_INF else self._last_end,
            clock=None if self._clock == _NEG_INF else self._clock,
            hang=hang,
            failing=SavedFailing(self._failing_since, self._last_report) if self._failing else None,
        ).to_json()

    @classmethod
    def restore(
        cls,
        data: Mapping[str, Any],
        now: float,
        *,
        retry_interval_s: float | None = None,
        retry_timeout_s: float | None = None,
        margin_s: float | None = None,
    ) -> DiskHangTracker:
        """Rebuild a tracker from :meth:`snapshot` at time ``now``.

        A reloaded open hang keeps its start.  The exporter saw nothing while it was down, so
        silence is counted from ``now``: if no error comes within the expected spacing, the hang
        ends ``recovered`` at ``last_error + base spacing`` (bounded to ``[start, now]``).  The
        paused flag is kept; reconcile it with ``query-status`` (:meth:`on_stop` /
        :meth:`on_resume`).  Policy arguments override the saved policy (pass the freshly read
        one).  Raises ValueError on malformed data.
        """
        saved = parse(
            data, retry_interval_s=retry_interval_s, retry_timeout_s=retry_timeout_s, margin_s=margin_s
        )
        t = _finite("now", now)
        tr = cls(saved.retry_interval_s, saved.retry_timeout_s, saved.margin_s)
        tr._counts.update(saved.hangs_total)
        tr._completed_s = saved.hang_seconds_completed
        tr._last_end = _NEG_INF if saved.last_end is None else saved.last_end
        tr._clock = t if saved.clock is None else max(t, saved.clock)
        tr._spacing = saved.observed_spacing
        tr._paused = saved.paused
        if (hang := saved.hang) is not None:
            tr._start = hang.start
            tr._last_err = hang.last_error
            tr._known = min(tr._clock, hang.known_until)
            tr._stop_pause = hang.stop_pause
            tr._resume_ts = hang.resume_ts
            tr._events = hang.events
        if (failing := saved.failing) is not None:
            tr._failing = True
            tr._last_report = t if failing.last_report is None else failing.last_report
            tr._failing_since = tr._last_report if failing.since is None else failing.since
        tr._anchor = t
        tr._tick(t)
        return tr

    # ------------------------------------------------------------------ internals

    def _base_spacing(self) -> float:
        return max(self._interval, self._spacing)

    def _tick(self, t: float) -> None:
        """Time has reached ``t``: infer what silence up to ``t`` proves."""
        if t <= self._clock:
            return
        self._clock = t
        if self._blind:
            return
        if self._start is not None:
            if self._paused:
                self._known = max(self._known, t)
            else:
                ref = max(self._last_err, self._anchor)
                if self._resume_ts is not None:
                    ref = max(ref, self._resume_ts)
                if t > ref + self.expected_spacing:
                    self._end(HangOutcome.RECOVERED, self._recovery_estimate())
        if self._failing and t > max(self._last_report, self._anchor) + self.expected_spacing:
            self._failing = False

    def _recovery_estimate(self) -> float:
        """Unbounded estimate of when the first successful attempt happened (module doc)."""
        guess = self._last_err + self._base_spacing()
        if self._resume_ts is not None:
            return self._resume_ts if self._stop_pause else max(self._resume_ts, guess)
        return guess

    def _on_failed_attempt(self, t: float, *, stop: bool) -> None:
        if self._start is None:
            if t < self._last_end or (self._failing and t <= self._last_report):
                return  # stale: belongs to the previous hang / failing period
            self._failing = False
            self._start = t
            self._last_err = t
            self._known = t
            self._spacing = 0.0
            self._gap_ref = t
            self._resume_ts = None
            self._stop_pause = False
            self._events = 1
        elif t < self._start:
            # Out of order: an earlier attempt of this hang.  Move the start back (never before
            # the previous hang's end); the counters only grow from that.
            if t >= self._last_end:
                self._start = t
                self._events += 1
        else:
            self._events += 1
            if self._gap_ref is not None and t > self._gap_ref:
                self._spacing = max(self._spacing, t - self._gap_ref)
            if self._gap_ref is None or t > self._gap_ref:
                self._gap_ref = t
            if t > self._last_err:
                self._last_err = t
            self._known = max(self._known, t)
            if self._resume_ts is not None and t >= self._resume_ts:
                self._resume_ts = None
        if stop:
            # QEMU pauses the VM right after this event (STOP follows).
            self._paused = True
            self._stop_pause = True
            self._gap_ref = None

    def _on_report(self, t: float) -> None:
        if self._start is not None:
            if t < self._start:
                return  # stale: precedes this hang
            self._events += 1
            self._end(HangOutcome.TIMED_OUT, t)
            self._failing = True
            self._failing_since = t
            self._last_report = t
            return
        if t < self._last_end:
            return  # stale
        if not self._failing:
            self._failing = True
            self._failing_since = t
            self._last_report = t
        else:
            self._last_report = max(self._last_report, t)

    def _end(self, outcome: HangOutcome, end: float) -> None:
        start = self._start
        assert start is not None
        # Never after the latest time seen, never before the start or a moment the hang was
        # known to persist (keeps hang_seconds_total non-decreasing).
        end = max(min(end, self._clock), start, self._known)
        self._counts[outcome] += 1
        self._completed_s += end - start
        self._completed.append(CompletedHang(start, end, outcome, self._events))
        self._last_end = max(self._last_end, end)
        self._start = None
        self._resume_ts = None
        self._stop_pause = False
        self._gap_ref = None
