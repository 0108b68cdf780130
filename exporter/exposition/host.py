"""The host-wide families, built at each scrape from what the services count (a few series:
prometheus_client formats them): build info, the per-backend blast radius, the completed-hang
histogram, libvirt connections and the hang journal's counters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import (
    HistogramMetricFamily,
    Metric,
)

from exporter.hang.outcome import HangOutcome
from exporter.hang.tracking import HANG_BUCKETS
from exporter.metrics import (
    BACKEND_AFFECTED_VMS,
    BACKEND_DISKS,
    BACKEND_FAILING,
    BACKEND_HANGING,
    BUILD_INFO,
    HANG_COMPLETED,
    JOURNAL_CORRUPT,
    JOURNAL_DROPPED,
    JOURNAL_RECORDS,
    JOURNAL_WRITE_ERRORS,
    LIBVIRT_CALL_ERRORS,
    LIBVIRT_CONNECT_ERRORS,
    LIBVIRT_UP,
)
from exporter.model.state import ConnectionState, VMState

if TYPE_CHECKING:
    from exporter.hang.blast import BackendCounts
    from exporter.hang.machine import DiskHangTracker
    from exporter.hang.tracking import Histogram


def build_info_metric(build: Sequence[str]) -> Metric:
    return BUILD_INFO.metric(BUILD_INFO.labels, [(build, 1)])


def backend_metrics(counts: dict[str, BackendCounts]) -> list[Metric]:
    """The four per-backend gauges (`exporter.hang.blast.backend_counts`)."""
    rows = [((b,), counts[b]) for b in sorted(counts)]
    return [
        BACKEND_DISKS.metric(BACKEND_DISKS.labels, [(b, c.disks) for b, c in rows]),
        BACKEND_HANGING.metric(BACKEND_HANGING.labels, [(b, c.hanging) for b, c in rows]),
        BACKEND_FAILING.metric(BACKEND_FAILING.labels, [(b, c.failing) for b, c in rows]),
        BACKEND_AFFECTED_VMS.metric(BACKEND_AFFECTED_VMS.labels, [(b, c.vms) for b, c in rows]),
    ]


def connection_metrics(connections: Sequence[ConnectionState]) -> list[Metric]:
    """The libvirt connections' families (a few series)."""
    conns = sorted(connections, key=lambda c: c.uri)
    return [
        LIBVIRT_UP.metric(LIBVIRT_UP.labels, [((c.uri,), 1 if c.up else 0) for c in conns]),
        LIBVIRT_CONNECT_ERRORS.metric(
            LIBVIRT_CONNECT_ERRORS.labels,
            [((c.uri, reason), n) for c in conns for reason, n in sorted(c.connect_errors.items())],
        ),
        LIBVIRT_CALL_ERRORS.metric(
            LIBVIRT_CALL_ERRORS.labels,
            [
                ((c.uri, call, reason), n)
                for c in conns
                for (call, reason), n in sorted(c.call_errors.items())
            ],
        ),
    ]


class ConnectionCollector:
    """The libvirt connections (a few series: formatted by prometheus_client at each scrape)."""

    def __init__(self, connections: Callable[[], Sequence[ConnectionState]]) -> None:
        self._connections = connections

    def collect(self) -> list[Metric]:
        return connection_metrics(self._connections())


class HangSource(Protocol):
    """What the hang tracking (`exporter.hang.tracking.HangTracking`) gives a scrape."""

    histogram: Histogram

    def version(self, key: str) -> int | None:
        """Changes whenever the trackers of the VM with this key were fed anything."""
        ...

    def shown(self, vm: VMState, now: float) -> list[tuple[str, DiskHangTracker]]:
        """``vm``'s (device, tracker) pairs by device, advanced as far as its stream is read."""
        ...

    def backend_counts(self, vms: Sequence[VMState]) -> dict[str, BackendCounts]:
        """The per-backend counts of the disks of ``vms``."""
        ...


def histogram_metric(h: Histogram) -> Metric:
    """`HANG_COMPLETED` from the completed hangs' durations."""
    family = HistogramMetricFamily(
        HANG_COMPLETED.name, HANG_COMPLETED.help, labels=list(HANG_COMPLETED.labels)
    )
    for o in HangOutcome:
        buckets = [(str(float(le)), float(n)) for le, n in zip(HANG_BUCKETS, h.buckets[o], strict=True)]
        buckets.append(("+Inf", float(h.count[o])))
        family.add_metric([o.value], buckets, h.sum[o])
    return family


class JournalCounts(Protocol):
    """What the hang journal (`exporter.hang.journal.HangJournal`) counts."""

    written: int
    dropped: int
    write_errors: int
    corrupt: int


class JournalCollector:
    """The hang journal's counters (shown while the journal is on)."""

    def __init__(self, journal: JournalCounts) -> None:
        self._journal = journal

    def collect(self) -> list[Metric]:
        j = self._journal
        return [
            JOURNAL_RECORDS.metric((), [((), j.written)]),
            JOURNAL_DROPPED.metric((), [((), j.dropped)]),
            JOURNAL_WRITE_ERRORS.metric((), [((), j.write_errors)]),
            JOURNAL_CORRUPT.metric((), [((), j.corrupt)]),
        ]
