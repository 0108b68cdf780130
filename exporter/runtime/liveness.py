"""Liveness that means something: is the exporter still reading QEMU?

Why it matters: a QMP client that stays connected but stops reading does not just miss events,
QEMU queues every event for it in QEMU's own memory (docs/reliability.md has the figures).  An
exporter whose event loop is blocked, or one of whose readers has stopped, would grow every
QEMU it watches during exactly the outage it exists for.  So it must be noticed and restarted:

* **Event-loop heartbeat** (`Heartbeat`): a task that sleeps a short interval and measures how
  late it woke.  Everything the exporter does runs on that one loop, so its lateness (the loop
  lag) is how long every QMP socket went unread.  A stopped process (SIGSTOP) counts too: the
  monotonic clock runs on, and the first heartbeat after it reports the whole stop.
* **Stalled readers** (`StallDetector`): a QMP session whose reader has consumed no line for
  ``reader_stall_seconds`` while bytes wait in its kernel socket buffer (``FIONREAD``).  Bytes
  waiting alone are normal in a storm, and so is a quiet reader on a quiet socket; only both
  together, for that long, mean the reader is wedged while the loop is not.
* ``/healthz`` (`Liveness.problem`): 503 with a one-line reason while a reader is stalled or
  the loop lagged beyond ``max_loop_lag_seconds`` within the last ``loop_lag_window_seconds``
  (so a probe that could not get through during the lag still sees it afterwards).
* **systemd watchdog** (`watchdog`): ``WATCHDOG=1`` from the loop itself while it is healthy
  *now* (`Liveness.problem_now`: the latest heartbeat on time, no reader stalled).  A blocked
  loop sends nothing, so systemd restarts it after ``WatchdogSec``; a loop that is late at every
  heartbeat sends nothing either; a single spike that has passed does not withhold pings, or a
  transient stall longer than ``WatchdogSec/2 - window`` would become a restart.
* **Blind intervals** (`Liveness.loop_blind`, `Liveness.on_gap`): a heartbeat at least
  `GAP_SECONDS` late means the loop did not run for that long.  Hang tracking must not take that
  time for silence (`exporter.hang.tracking.HangTracking.apply_blind`), and must know of it
  *before* it next advances: after a stop, a tick or a scrape may well run before the heartbeat
  does, so the gap still going on (the pending heartbeat's lateness) counts too.
* `LivenessCollector`: `exporter.metrics.LOOP_LAG`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client.core import Metric
from qemu.qmp import Runstate

from exporter.config import HealthConfig
from exporter.metrics import LOOP_LAG
from exporter.runtime.fionread import fionread
from exporter.runtime.sd_notify import Notifier

if TYPE_CHECKING:
    from exporter.qmp_watch import VMWatcher

log = logging.getLogger("exporter.runtime.liveness")

#: How often the heartbeat wakes: the resolution of the lag measurement, at ~4 wake-ups a second.
HEARTBEAT_INTERVAL = 0.25
#: How often readers are checked for a stall (every n-th heartbeat).
_STALL_CHECK_EVERY = 4
#: A heartbeat this late (two missed beats): the loop did not run, hang tracking is told
#: (`Liveness.loop_blind`).  Far below any recovery margin worth configuring, far above the
#: milliseconds a healthy loop lags.  libvirt's stream position counts on it being at most its
#: quiet time (`exporter.libvirt.inbox.EventInbox.QUIET_S`).
GAP_SECONDS = 0.5


class Heartbeat:
    """Measures the event loop's lag: how late a task that sleeps `interval` wakes up."""

    def __init__(self, window: float, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.window = window
        self._samples: collections.deque[tuple[float, float]] = collections.deque()  # (when, lag)
        self._last = 0.0
        self._due: float | None = None  # when the next heartbeat is due (None: not started)

    def record(self, now: float, lag: float) -> None:
        self._last = lag
        self._samples.append((now, lag))
        horizon = now - self.window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def pending(self, now: float) -> float:
        """How late the heartbeat that has not run yet already is (a scrape or probe may be
        handled before it, in the same turn of the loop after a long block).  A heartbeat that
        stopped for any reason reads as an ever-growing lag, never as health."""
        return max(0.0, now - self._due) if self._due is not None else 0.0

    def last(self, now: float) -> float:
        """The current lag: the latest heartbeat's, or the pending one's if that is later."""
        return max(self._last, self.pending(now))

    def recent_max(self, now: float) -> tuple[float, float]:
        """(largest lag, when it was seen) within the last `window` seconds."""
        worst, when = self.pending(now), now
        horizon = now - self.window
        for t, lag in self._samples:
            if t >= horizon and lag > worst:
                worst, when = lag, t
        return worst, when

    async def beat(self, loop: asyncio.AbstractEventLoop) -> float:
        """Sleep one interval; record and return how late the wake-up was."""
        due = self._due = loop.time() + self.interval
        await asyncio.sleep(self.interval)
        now = loop.time()
        lag = max(0.0, now - due)
        self.record(now, lag)
        return lag


class WatchedReader(NamedTuple):
    """One QMP session as the stall detector sees it.  ``session`` identifies the session
    (a new one starts over; two VMs may share a name); ``lines`` is how many lines its reader
    has consumed so far; ``name`` is only for the reason shown."""

    name: str
    session: object
    lines: int
    fd: int


class Stall(NamedTuple):
    name: str
    pending_bytes: int
    seconds: float


class _Seen:
    __slots__ = ("lines", "session", "waiting_since")

    def __init__(self, session: object, lines: int) -> None:
        self.session = session
        self.lines = lines
        self.waiting_since: float | None = None


class StallDetector:
    """Finds sessions with bytes waiting in the socket while their reader makes no progress.

    Pure apart from ``pending_bytes`` (`fionread` by default): call `check` periodically with
    the current readers.  A reader is stalled once, at every check for ``stall_seconds``, it
    had bytes waiting and had read no new line.  Progress or an empty socket starts it over,
    so data that has only just arrived after a quiet hour is not mistaken for a stall.
    """

    def __init__(self, stall_seconds: float, pending_bytes: Callable[[int], int] = fionread) -> None:
        self.stall_seconds = stall_seconds
        self._pending_bytes = pending_bytes
        self._seen: dict[int, _Seen] = {}  # by id() of the session, which `_Seen` keeps alive

    def check(self, now: float, readers: Iterable[WatchedReader]) -> list[Stall]:
        stalls: list[Stall] = []
        seen: dict[int, _Seen] = {}
        for src in readers:
            key = id(src.session)
            prev = self._seen.get(key)
            if prev is None or prev.session is not src.session or prev.lines != src.lines:
                seen[key] = _Seen(src.session, src.lines)  # new session, or progress
                continue
            seen[key] = prev
            waiting = self._pending_bytes(src.fd)
            if waiting <= 0:
                prev.waiting_since = None
                continue
            if prev.waiting_since is None:
                prev.waiting_since = now
            elif now - prev.waiting_since >= self.stall_seconds:
                stalls.append(Stall(src.name, waiting, now - prev.waiting_since))
        self._seen = seen
        return stalls


def qmp_readers(watchers: Iterable[VMWatcher]) -> Iterator[WatchedReader]:
    """The established QMP sessions of ``watchers`` (the explicit hook: `VMWatcher.client`,
    `ReadOnlyQMPClient.lines_received` and `ReadOnlyQMPClient.fileno`)."""
    for w in watchers:
        client = w.client
        if client is None or client.runstate != Runstate.RUNNING:
            continue
        fd = client.fileno()
        if fd is not None:
            yield WatchedReader(w.vm.vm, client, client.lines_received, fd)


class Liveness:
    """The heartbeat and the stall detector, and what /healthz and the watchdog make of them."""

    def __init__(
        self,
        config: HealthConfig,
        readers: Callable[[], Iterable[WatchedReader]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.heartbeat = Heartbeat(config.loop_lag_window_seconds)
        self.stalls = StallDetector(config.reader_stall_seconds)
        self._readers = readers
        self._clock = clock  # the loop's clock (asyncio uses time.monotonic)
        self._wall = wall  # the clock of QEMU's event timestamps, for blind intervals
        self.stalled: list[Stall] = []
        #: Told of every heartbeat at least `GAP_SECONDS` late: (start, end), wall clock.
        self.on_gap: Callable[[float, float], None] | None = None
        self._last_gap: tuple[float, float] | None = None

    def loop_blind(self) -> tuple[float, float] | None:
        """The latest interval (wall clock) in which the loop did not run: the one still going
        on when the pending heartbeat is `GAP_SECONDS` late, else the latest completed one.
        Its start is the last heartbeat before it: the loop is only known to have run then."""
        pending = self.heartbeat.pending(self._clock())
        if pending >= GAP_SECONDS:
            end = self._wall()
            return end - pending - self.heartbeat.interval, end
        return self._last_gap

    def _gap(self, lag: float) -> None:
        end = self._wall()
        self._last_gap = (end - lag - self.heartbeat.interval, end)
        if self.on_gap is not None:
            self.on_gap(end - lag, end)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        beats = 0
        lagging = False
        while True:
            lag = await self.heartbeat.beat(loop)
            if lag >= GAP_SECONDS:
                self._gap(lag)
            if (lag > self.config.max_loop_lag_seconds) != lagging:  # logged per change, not per beat
                lagging = not lagging
                if lagging:
                    log.warning("event loop lagged", extra={"lag_seconds": round(lag, 3)})
                else:
                    log.info("event loop on time again")
            beats += 1
            if beats % _STALL_CHECK_EVERY == 0:
                self._check_stalls(loop.time())

    def _check_stalls(self, now: float) -> None:
        try:
            stalled = self.stalls.check(now, self._readers())
        except Exception:  # a bug here must not stop the heartbeat (which would stop the pings)
            log.exception("stall check failed")
            return
        before = {s.name for s in self.stalled}
        for s in stalled:
            if s.name not in before:
                log.warning(
                    "QMP reader stalled",
                    extra={"vm": s.name, "pending_bytes": s.pending_bytes, "seconds": round(s.seconds, 1)},
                )
        for name in before - {s.name for s in stalled}:
            log.info("QMP reader no longer stalled", extra={"vm": name})
        self.stalled = stalled

    def _stall_reason(self) -> str | None:
        if not self.stalled:
            return None
        s = max(self.stalled, key=lambda s: s.seconds)
        more = f" (and {len(self.stalled) - 1} more)" if len(self.stalled) > 1 else ""
        return (
            f"QMP reader stalled: vm={s.name} has {s.pending_bytes} bytes waiting, "
            f"no line read for {s.seconds:.0f}s{more}"
        )

    def recent_lag(self) -> float:
        """The largest loop lag within the window."""
        return self.heartbeat.recent_max(self._clock())[0]

    def problem(self) -> str | None:
        """Why /healthz should say 503, or None: a stalled reader, or a loop lag beyond the
        threshold within the window."""
        now = self._clock()
        lag, when = self.heartbeat.recent_max(now)
        if lag > self.config.max_loop_lag_seconds:
            limit = self.config.max_loop_lag_seconds
            return f"event loop lagged {lag:.3g}s (limit {limit:g}s) {now - when:.0f}s ago"
        return self._stall_reason()

    def problem_now(self) -> str | None:
        """Why the watchdog must not ping now, or None: the current heartbeat is late, or a
        reader is stalled.  (The mere fact that this runs shows the loop runs.)"""
        lag = self.heartbeat.last(self._clock())
        if lag > self.config.max_loop_lag_seconds:
            return f"event loop lagging {lag:.3g}s (limit {self.config.max_loop_lag_seconds:g}s)"
        return self._stall_reason()


class LivenessCollector:
    """`exporter.metrics.LOOP_LAG`: a small collector of its own, beside the main one."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness

    def collect(self) -> list[Metric]:
        return [LOOP_LAG.metric((), [((), self.liveness.recent_lag())])]


async def watchdog(notifier: Notifier, liveness: Liveness) -> None:
    """``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` while `Liveness.problem_now` finds nothing.

    Runs on the event loop, so a blocked loop sends nothing.  While unhealthy it checks again
    every heartbeat interval (not every half period), so that a recovered exporter pings at once.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    unhealthy: str | None = None
    while True:
        problem = liveness.problem_now()
        if problem is None:
            notifier.notify("WATCHDOG=1")
            if unhealthy is not None:
                log.info("healthy again: systemd watchdog pings resumed")
                notifier.notify("STATUS=healthy")
                unhealthy = None
            delay = interval
        else:
            if unhealthy is None:
                log.warning("unhealthy: systemd watchdog pings withheld", extra={"reason": problem})
                notifier.notify(f"STATUS=unhealthy: {problem}")
            unhealthy = problem
            delay = min(interval, liveness.heartbeat.interval)
        await asyncio.sleep(delay)
