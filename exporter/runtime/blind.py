"""Blind intervals: when the exporter could not see events, counted and shown.

A stall is never silence.  The exporter is blind

* while its **event loop does not run**: a stopped, frozen or swapped-out process, or a loop
  blocked by a bug.  The heartbeat (`exporter.runtime.liveness`) measures the gap.  QEMU keeps the
  events of a QMP socket for the exporter meanwhile (they are read late, none lost); libvirtd
  keeps them too, in its own memory, until its keepalive gives the silent client up and drops
  the connection (then they are lost: docs/libvirt.md);
* while a **source is disconnected**: a VM's QMP session ended while the VM ran on, or a libvirt
  connection is down, until it is back.  Events sent meanwhile are lost to the exporter.

Hang tracking treats both as blind (`DiskHangTracker.on_blind`, ``on_disconnect``): a hang open
before the interval and fed again after it is one hang.  This module makes them visible:
counted by source (`exporter.metrics.BLIND_INTERVALS`, `BLIND_SECONDS`), per VM for sessions
(`VM_BLIND_INTERVALS`, `VM_BLIND_SECONDS`, from `VMState`), and the latest ones listed on the
status page, because the IO error counters (`IO_ERROR_EVENTS`) are lower bounds across them.
An interval is counted when it ends (its length is known then); one still going on shows as the
VM or connection being down.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import Metric

from exporter.metrics import BLIND_INTERVALS, BLIND_SECONDS
from exporter.model.sink import EventSink
from exporter.model.state import VMState

#: The ``source`` label: the exporter's event loop, a VM's QMP session, a libvirt connection.
EVENT_LOOP: Final[str] = "event_loop"
QMP: Final[str] = "qmp"
LIBVIRT: Final[str] = "libvirt"
SOURCES: Final[tuple[str, ...]] = (EVENT_LOOP, QMP, LIBVIRT)

#: Blind intervals kept for the status page (the latest first there).
RECENT: Final[int] = 20


@dataclass(frozen=True, slots=True)
class BlindInterval:
    """One interval: ``name`` is the VM (``qmp``), the URI (``libvirt``) or "" (``event_loop``)."""

    source: str
    name: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


class BlindSpots(EventSink):
    """Counts blind intervals.  Sessions are followed as a sink (each VM's, whatever its
    source); the loop's gaps come from `exporter.runtime.liveness.Liveness` (`loop_gap`), libvirt's
    dropped connections from `exporter.libvirt.source.LibvirtSource` (`connection`).

    ``loop_min_seconds``: the shortest loop gap counted (``health.max_loop_lag_seconds``: a lag
    the exporter calls unhealthy).  Hang tracking takes shorter gaps into account as well; they
    are not worth an operator's attention (a busy loop at 1000 VMs lags up to ~1.6 s)."""

    def __init__(self, loop_min_seconds: float) -> None:
        self.loop_min_seconds = loop_min_seconds
        self.intervals: Counter[str] = Counter(dict.fromkeys(SOURCES, 0))
        self.seconds: dict[str, float] = dict.fromkeys(SOURCES, 0.0)
        self.recent: deque[BlindInterval] = deque(maxlen=RECENT)
        self._since: dict[str, float] = {}  # VMState.key -> when its session dropped

    def _record(self, source: str, name: str, start: float, end: float) -> None:
        interval = BlindInterval(source, name, start, end)
        self.intervals[source] += 1
        self.seconds[source] += interval.seconds
        self.recent.append(interval)

    def loop_gap(self, start: float, end: float) -> None:
        """The event loop did not run from ``start`` to ``end`` (wall clock)."""
        if end - start >= self.loop_min_seconds:
            self._record(EVENT_LOOP, "", start, end)

    def connection(self, uri: str, start: float, end: float) -> None:
        """The libvirt connection to ``uri`` was down from ``start`` until re-established."""
        self._record(LIBVIRT, uri, start, end)

    # -- sessions (EventSink) ------------------------------------------------------------

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        if not vm_gone:  # the VM may run on: its events are lost until the session is back
            self._since[vm.key] = now

    def on_session_start(self, vm: VMState, now: float) -> None:
        since = self._since.pop(vm.key, None)
        if since is None:
            return
        vm.blind_intervals += 1
        vm.blind_seconds += max(0.0, now - since)
        if vm.source == QMP:  # libvirt's domains are blind together: counted per connection
            self._record(QMP, vm.vm, since, now)

    def on_connect_failed(self, vm: VMState, now: float, reason: str) -> None:
        if reason in ("refused", "not_found"):  # QEMU is gone: there was nothing left to see
            self._since.pop(vm.key, None)

    def on_removed(self, vm: VMState, now: float) -> None:
        self._since.pop(vm.key, None)

    # -- what is shown -------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        return [
            BLIND_INTERVALS.metric(BLIND_INTERVALS.labels, [((s,), self.intervals[s]) for s in SOURCES]),
            BLIND_SECONDS.metric(BLIND_SECONDS.labels, [((s,), self.seconds[s]) for s in SOURCES]),
        ]

    def status(self) -> dict[str, Any]:
        """The ``blind`` part of the status snapshot (`exporter.web.status`)."""
        return {
            "intervals": sum(self.intervals.values()),
            "seconds": sum(self.seconds.values()),
            "by_source": {s: {"intervals": self.intervals[s], "seconds": self.seconds[s]} for s in SOURCES},
            "recent": [
                {"source": b.source, "name": b.name, "start": b.start, "end": b.end, "seconds": b.seconds}
                for b in reversed(self.recent)
            ],
        }
