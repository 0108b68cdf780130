"""The hand-over of events from libvirt's event thread to the asyncio loop (`EventInbox`): in
batches, in bounded memory while the loop is behind (errors coalesced per disk: `ErrorRun`), and
the libvirt VMs' stream position (how far their events are handled).  Thread-safe where it must
be: `EventInbox.put` and `EventInbox.put_event` run in libvirt's event thread, everything else
on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from exporter.model.events import event_time


class ErrorRun:
    """``BLOCK_IO_ERROR``s of one disk with one operation and action, coalesced by `EventInbox`
    while the loop is behind: the same ``details`` text (QEMU's event data as libvirt forwards
    it) of the same domain and session, each at most ``merge_gap`` after the previous.  Counts
    and the first and last QEMU timestamps are exact, and the largest gap between consecutive
    ones is kept (`exporter.model.events.BlockIOErrorRun`)."""

    __slots__ = ("count", "details", "first", "last", "max_gap", "session", "uuid")

    def __init__(self, session: int, uuid: str, details: str, ts: float) -> None:
        self.session, self.uuid, self.details = session, uuid, details
        self.count = 1
        self.first = self.last = ts
        self.max_gap = 0.0

    def add(self, ts: float) -> None:
        gap = ts - self.last
        if gap > self.max_gap:
            self.max_gap = gap
        self.last = ts
        self.count += 1


class EventInbox:
    """Hands items from libvirt's event thread to the asyncio loop, in batches: one wake-up of
    the loop per batch, not per event (an IO-error storm is thousands of events a second).
    The loop takes what waits `HANDOVER_S` after the first item arrived: a wake-up (a thread
    switch and the GIL passed over) per event was half the exporter's CPU per event at a few
    hundred events a second (docs/libvirt.md).  At most `BATCH` items are handled per turn of
    the loop, so that a storm never holds a scrape back for longer than one batch.

    **Bounded while behind.**  libvirtd sends whatever the exporter is offered; the event
    thread copies each event and returns to libvirt at once, so that libvirtd is drained at any
    rate (what libvirtd cannot send waits in libvirtd's own memory, ~5 KB per event, until its
    keepalive drops the connection: docs/libvirt.md).  Once `COALESCE_AFTER` items wait, a
    ``BLOCK_IO_ERROR`` whose text equals a waiting one of the same domain joins it (`ErrorRun`)
    instead of queueing one more item: an outage longer than the exporter can keep up with costs
    it one entry per failing disk, not one per event.  ``stop`` errors are never joined (each
    pauses the VM), nor are errors more than ``merge_gap`` apart (the hang margin: no gap
    within a run can then be silence); any other event of a domain closes its runs, so that
    none of its later errors overtakes it (domains are independent of each other).

    **The stream position** (`VMState.stream`): hang tracking must not take time whose events
    are not handled yet for silence (docs/hangs.md, "lag is not silence").  While items wait,
    the stream is read up to the QEMU timestamp of the oldest waiting one.  With nothing
    waiting, it is read up to the newest QEMU timestamp handed over while events keep coming
    (within `QUIET_S`: libvirtd may well hold more, a backlog being caught up), and up to now
    once the stream is quiet.  What libvirtd holds is otherwise unseen; a stopped process, whose
    event thread stopped too, is the heartbeat's to report (`exporter.runtime.liveness.GAP_SECONDS`,
    at most `QUIET_S`)."""

    BATCH = 256
    COALESCE_AFTER = BATCH
    QUIET_S = 0.5
    #: How long the first item waits for others before the loop takes them: far below any
    #: hang margin (the stream position counts them as waiting meanwhile).
    HANDOVER_S = 0.02

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: Callable[[tuple[Any, ...] | ErrorRun], None],
        clock: Callable[[], float],
        merge_gap: float = 0.0,
    ) -> None:
        self._loop, self._handle, self._clock = loop, handle, clock
        self.merge_gap = merge_gap
        #: (stream position, item), oldest first.
        self._items: deque[tuple[float, tuple[Any, ...] | ErrorRun]] = deque()
        #: Runs still waiting, that later errors may join: by domain, then event text.
        self._runs: dict[str, dict[str, ErrorRun]] = {}
        self._lock = threading.Lock()
        self._scheduled = False
        self._in_ts = -math.inf  # newest QEMU timestamp handed over
        self._in_at = -math.inf  # when it arrived
        #: Events that joined a run instead of queueing (for benchmarks and tests).
        self.coalesced = 0

    def put(self, item: tuple[Any, ...], domain: str | None = None) -> None:
        """Queue an item that is not a QEMU event (lifecycle, device added, close), of
        ``domain`` (None: of every domain, e.g. the connection closing)."""
        with self._lock:
            if self._runs:
                if domain is None:
                    self._runs.clear()
                else:
                    self._runs.pop(domain, None)
            pos = self._in_ts if self._in_ts > -math.inf else self._clock()
            self._append(pos, item)

    def put_event(self, session: int, uuid: str, name: str, seconds: int, micros: int, details: Any) -> None:
        """Queue a QEMU event libvirt forwarded (its callback's arguments)."""
        ts = event_time(seconds, micros)
        with self._lock:
            if ts is not None:
                if ts > self._in_ts:
                    self._in_ts = ts
                self._in_at = self._clock()
            runs = self._runs.get(uuid)
            if (
                ts is not None
                and name == "BLOCK_IO_ERROR"
                and type(details) is str
                and '"stop"' not in details
            ):
                run = runs.get(details) if runs is not None else None
                if runs is not None and run is not None:
                    if run.session == session and 0.0 <= ts - run.last <= self.merge_gap:
                        run.add(ts)
                        self.coalesced += 1
                        return
                    del runs[details]  # closed: later errors join a new run, or queue plainly
                if len(self._items) >= self.COALESCE_AFTER:
                    run = ErrorRun(session, uuid, details, ts)
                    self._runs.setdefault(uuid, {})[details] = run
                    self._append(ts, run)
                    return
            elif runs is not None:
                del self._runs[uuid]
            pos = ts if ts is not None else self._in_ts if self._in_ts > -math.inf else self._clock()
            self._append(pos, ("qemu", session, uuid, name, seconds, micros, details))

    def _append(self, pos: float, item: tuple[Any, ...] | ErrorRun) -> None:
        """(Under the lock.)  Queue, and wake the loop unless a drain is already due."""
        self._items.append((pos, item))
        if self._scheduled:
            return
        self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self._loop.call_soon_threadsafe(self._loop.call_later, self.HANDOVER_S, self._drain)

    @property
    def waiting(self) -> int:
        """Items waiting (a run counts once)."""
        return len(self._items)

    def read_through(self, now: float) -> float:
        """How far the stream is handled (class docstring), at most ``now``."""
        with self._lock:
            if self._items:
                return min(now, self._items[0][0])
            if now - self._in_at < self.QUIET_S:
                return min(now, self._in_ts)
            return now

    def _drain(self) -> None:
        with self._lock:
            n = min(len(self._items), self.BATCH)
            items = [self._items.popleft()[1] for _ in range(n)]
            if self._runs:  # handed over: nothing joins them any more
                for item in items:
                    if type(item) is ErrorRun:
                        runs = self._runs.get(item.uuid)
                        if runs is not None and runs.get(item.details) is item:
                            del runs[item.details]
                            if not runs:
                                del self._runs[item.uuid]
            more = bool(self._items)
            self._scheduled = more  # still scheduled: the rest is handled on the next turn
        for item in items:
            self._handle(item)
        if more:
            self._loop.call_soon(self._drain)
