"""Every metric the exporter exposes, declared once, and the one renderer that writes them.

Each family is a `Family` (name, help, type, which labels) in the declarations below; the
functions after them (``_identity``, ``_counters``, ``_stats``, ``_hang_*``, ``*_metric(s)``)
say how its samples are read from the model.  Both ways out of a scrape use those samples:

* `ExporterCollector.collect` turns them into prometheus_client families (what
  ``generate_latest`` formats: the reference, and the path for the rarely used ``dots`` and
  ``values`` escapings);
* `ExporterCollector.render` turns them into exposition lines with `_Lines`, cached per VM and
  per part of its state, re-rendered only when that part changed (`VMState.changed`,
  `HangTracking.version`), and joins the cached lines family by family.  prometheus_client
  formats every sample of every scrape (~3 us each: 110,000 series at 1000 VMs x 4 disks took
  ~0.5 s in the text format, 1.2-2.1 s in OpenMetrics); the cached path 4-5 ms in-process
  and 11-18 ms over HTTP at rest (`bench.render`, `bench.fleet`; docs/performance.md).

The two are byte-equal (tests/integration/test_bench_smoke.py, for 17 Accept headers) because
the sample lines are the same in both formats for every family rendered per VM (checked against
prometheus_client 0.26's two encoders: both write ``name{labels} floatToGoString(value)``, labels
sorted, values escaped alike; no ``_created`` sample, no timestamp, no exemplar).  Only headers
(`family_header`), host-wide families (formatted by prometheus_client at each scrape: a few
series) and OpenMetrics' ``# EOF`` differ.  docs/metrics.md documents every family.

A new per-VM metric: declare its `Family` with its collector (`exporter.model.collectors`), yield
its samples from that collector's reader in `_READERS` (which names the part of `VMState` it
shows; the readers' order is the page's), and document it in docs/metrics.md; the golden files
(tests/golden) show the change.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from itertools import chain
from operator import itemgetter
from time import perf_counter
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.exposition import (
    ALLOWUTF8,
    UNDERSCORES,
    escape_label_name,
    escape_metric_name,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.hang.machine import HangOutcome
from exporter.hang.tracking import HANG_BUCKETS
from exporter.model.collectors import COLLECTORS
from exporter.model.sink import EventSink
from exporter.model.state import ConnectionState, Part, VMState

if TYPE_CHECKING:
    from exporter.hang.blast import BackendCounts
    from exporter.hang.machine import DiskHangTracker
    from exporter.hang.tracking import Histogram

# --- declarations -------------------------------------------------------------------------


class Scope(Enum):
    """Which labels a family's samples carry before its own."""

    HOST = "host"  # none: host-wide aggregates
    VM = "vm"  # vm, then the configured static labels
    DISK = "disk"  # those, then device


@dataclass(frozen=True, eq=False, slots=True)
class Family:
    """One metric family.  ``labels`` are its own, after those of its ``scope``."""

    name: str
    help: str
    type: Literal["gauge", "counter", "histogram"]
    scope: Scope
    labels: tuple[str, ...] = ()
    #: The collector (`exporter.model.collectors`) that shows it; "" for the exporter's own few
    #: families, always shown.
    collector: str = ""
    #: The name its samples carry (counters: ``_total``).
    sample_name: str = field(init=False)
    #: Equal for two families whose samples carry the same label names.
    label_key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_name", self.name + "_total" if self.type == "counter" else self.name)
        object.__setattr__(self, "label_key", ",".join((self.scope.value, *self.labels)))

    def label_names(self, base: Sequence[str] = ()) -> list[str]:
        """Every label name, given the VM's (``vm`` and static labels)."""
        if self.scope is Scope.HOST:
            return list(self.labels)
        if self.scope is Scope.VM:
            return [*base, *self.labels]
        return [*base, "device", *self.labels]

    def metric(
        self, label_names: Sequence[str], samples: Iterable[tuple[Sequence[str], float]] = ()
    ) -> Metric:
        """A prometheus_client family with ``samples`` (label values, value)."""
        cls = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        m = cls(self.name, self.help, labels=label_names)
        for values, value in samples:
            m.add_metric(values, value)
        return m


def _gauge(name: str, help: str, scope: Scope, *labels: str, collector: str = "") -> Family:
    return Family(name, help, "gauge", scope, labels, collector)


def _counter(name: str, help: str, scope: Scope, *labels: str, collector: str = "") -> Family:
    return Family(name, help, "counter", scope, labels, collector)


HOST, VM, DISK = Scope.HOST, Scope.VM, Scope.DISK

BUILD_INFO = _gauge(
    "qemu_exporter_build_info",
    "Build information of qemu-iohang-exporter.",
    HOST,
    "version",
    "python_version",
    "qemu_qmp_version",
)
VMS = _gauge("qemu_exporter_vms", "QMP sockets currently watched.", HOST)
COLLECTOR_DURATION = _gauge(
    "qemu_exporter_collector_duration_seconds",
    "Time this scrape spent on each enabled collector (exporter.model.collectors).",
    HOST,
    "collector",
)

# A VM's identity and run state (`_vm`), its policy (`_policy`, `_feature`).
QMP_UP = _gauge("qemu_qmp_up", "1 when the QMP session is established and answering.", VM, collector="vm")
VM_INFO = _gauge(
    "qemu_vm_info", "VM metadata from QMP.", VM, "uuid", "qemu_version", "socket", collector="vm"
)
VM_STATUS = _gauge(
    "qemu_vm_status", "Current run state of the VM (query-status).", VM, "status", collector="vm"
)
RETRY_FEATURE = _gauge(
    "qemu_vm_retry_feature", "1 when this QEMU supports the retry error policy.", VM, collector="feature"
)
DEVICE_INFO = _gauge(
    "qemu_block_device_info",
    "Guest disk, its error policy as read with qom-get, and its storage backend.",
    DISK,
    "drive",
    "node_name",
    "qdev_type",
    "werror",
    "rerror",
    "backend",
    collector="policy",
)
RETRY_INTERVAL = _gauge(
    "qemu_block_retry_interval_seconds", "retry_interval of the disk device.", DISK, collector="policy"
)
RETRY_TIMEOUT = _gauge(
    "qemu_block_retry_timeout_seconds",
    "retry_timeout of the disk device; 0 means never.",
    DISK,
    collector="policy",
)
POLICY_OK = _gauge(
    "qemu_block_retry_policy_ok",
    "1 when the disk satisfies the required retry policy.",
    DISK,
    collector="policy",
)
POLICY_VIOLATION = _gauge(
    "qemu_block_retry_policy_violation",
    "1 for each retry policy rule the disk fails.",
    DISK,
    "rule",
    collector="policy",
)

# A VM's counters: its disks' IO errors (`_io_errors`), its session's (`_session`).
IO_ERROR_EVENTS = _counter(
    "qemu_block_io_error_events",
    "BLOCK_IO_ERROR events received.",
    DISK,
    "operation",
    "action",
    collector="hang",
)
CONNECT_ATTEMPTS = _counter(
    "qemu_exporter_qmp_connect_attempts", "QMP connection attempts.", VM, collector="session"
)
CONNECT_ERRORS = _counter(
    "qemu_exporter_qmp_connect_errors",
    "Failed QMP connection attempts by reason.",
    VM,
    "reason",
    collector="session",
)
DISCONNECTS = _counter(
    "qemu_exporter_qmp_disconnects", "Established QMP sessions that ended.", VM, collector="session"
)
COMMAND_ERRORS = _counter(
    "qemu_exporter_qmp_command_errors",
    "Failed QMP commands.",
    VM,
    "command",
    "reason",
    collector="session",
)
QMP_EVENTS = _counter("qemu_exporter_qmp_events", "QMP events received.", VM, "event", collector="session")
UNMATCHED = _counter(
    "qemu_exporter_io_error_events_unmatched",
    "BLOCK_IO_ERROR events that matched no known disk.",
    VM,
    collector="session",
)
INTERNAL_ERRORS = _counter(
    "qemu_exporter_internal_errors",
    "Unexpected errors in a QMP watcher (each logged).",
    VM,
    collector="session",
)


def _stat(kind: Literal["gauge", "counter"], name: str, help: str) -> Family:
    return Family(name, help, kind, DISK, (), "blockstats")


# A VM's query-blockstats sample (`_stats`), with the BlockStats attribute each one shows.
BLOCKSTATS: tuple[tuple[Family, str], ...] = (
    (
        _stat("counter", "qemu_block_read_bytes", "Bytes read by the guest (query-blockstats rd_bytes)."),
        "read_bytes",
    ),
    (_stat("counter", "qemu_block_written_bytes", "Bytes written by the guest (wr_bytes)."), "written_bytes"),
    (
        _stat("counter", "qemu_block_read_operations", "Read operations completed (rd_operations)."),
        "read_ops",
    ),
    (
        _stat("counter", "qemu_block_write_operations", "Write operations completed (wr_operations)."),
        "write_ops",
    ),
    (
        _stat("counter", "qemu_block_flush_operations", "Flush operations completed (flush_operations)."),
        "flush_ops",
    ),
    (
        _stat(
            "counter", "qemu_block_failed_read_operations", "Failed read operations (failed_rd_operations)."
        ),
        "failed_read_ops",
    ),
    (
        _stat(
            "counter", "qemu_block_failed_write_operations", "Failed write operations (failed_wr_operations)."
        ),
        "failed_write_ops",
    ),
    (
        _stat(
            "counter",
            "qemu_block_failed_flush_operations",
            "Failed flush operations (failed_flush_operations).",
        ),
        "failed_flush_ops",
    ),
    (
        _stat("counter", "qemu_block_read_time_seconds", "Total time spent on reads (rd_total_time_ns)."),
        "read_time_s",
    ),
    (
        _stat("counter", "qemu_block_write_time_seconds", "Total time spent on writes (wr_total_time_ns)."),
        "write_time_s",
    ),
    (
        _stat(
            "counter", "qemu_block_flush_time_seconds", "Total time spent on flushes (flush_total_time_ns)."
        ),
        "flush_time_s",
    ),
)
IDLE = _stat("gauge", "qemu_block_idle_seconds", "Time since the last IO on the disk (idle_time_ns).")

# A disk's hang (`_hang_state`, `_hang_counts`: what changes with its state; `_hang_timed`: with
# time too).
HANG = _gauge("qemu_block_io_hang", "1 while IO on the disk is hanging.", DISK, collector="hang")
HANG_DURATION = _gauge(
    "qemu_block_io_hang_duration_seconds",
    "Age of the current IO hang, 0 when none.",
    DISK,
    collector="hang",
)
HANG_START = _gauge(
    "qemu_block_io_hang_start_timestamp_seconds",
    "Unix time the current IO hang started.",
    DISK,
    collector="hang",
)
HANG_DEADLINE = _gauge(
    "qemu_block_io_hang_deadline_timestamp_seconds",
    "Unix time the current IO hang reaches retry_timeout.",
    DISK,
    collector="hang",
)
FAILING = _gauge(
    "qemu_block_io_failing",
    "1 while IO errors reach the guest (after a timeout).",
    DISK,
    collector="hang",
)
HANGS = _counter("qemu_block_io_hangs", "Completed IO hangs by outcome.", DISK, "outcome", collector="hang")
HANG_SECONDS = _counter(
    "qemu_block_io_hang_seconds",
    "Seconds spent in IO hangs (completed and current).",
    DISK,
    collector="hangtime",
)
HANG_COMPLETED = Family(
    "qemu_block_io_hang_completed_duration_seconds",
    "Durations of completed IO hangs on this host, by outcome.",
    "histogram",
    HOST,
    ("outcome",),
    "hang",
)

# The blast radius: per storage backend (`exporter.hang.blast`), no vm label, so that
# ``sum by (backend)`` over every host gives the fleet-wide picture.
BACKEND_DISKS = _gauge(
    "qemu_storage_backend_disks",
    "Disks on the storage backend (of VMs whose session is up).",
    HOST,
    "backend",
    collector="backend",
)
BACKEND_HANGING = _gauge(
    "qemu_storage_backend_hanging_disks",
    "Disks on the storage backend whose IO is hanging now.",
    HOST,
    "backend",
    collector="backend",
)
BACKEND_FAILING = _gauge(
    "qemu_storage_backend_failing_disks",
    "Disks on the storage backend whose IO errors reach the guest now (after a timeout).",
    HOST,
    "backend",
    collector="backend",
)
BACKEND_AFFECTED_VMS = _gauge(
    "qemu_storage_backend_affected_vms",
    "VMs with at least one hanging or failing disk on the storage backend.",
    HOST,
    "backend",
    collector="backend",
)

# Other collectors' families (libvirt connections, alert push, liveness).
LIBVIRT_UP = _gauge(
    "qemu_libvirt_up",
    "1 while the libvirt connection is open and its events flow.",
    HOST,
    "uri",
    collector="libvirt",
)
LIBVIRT_CONNECT_ERRORS = _counter(
    "qemu_exporter_libvirt_connect_errors",
    "Failed libvirt connection attempts by reason.",
    HOST,
    "uri",
    "reason",
    collector="libvirt",
)
LIBVIRT_CALL_ERRORS = _counter(
    "qemu_exporter_libvirt_call_errors",
    "libvirt calls that failed or timed out (each re-opens the connection).",
    HOST,
    "uri",
    "call",
    "reason",
    collector="libvirt",
)
ALERT_PUSHES = _counter(
    "qemu_exporter_alert_pushes", "POSTs of alerts to Alertmanager by result.", HOST, "alertmanager", "result"
)
ALERT_PUSH_DROPPED = _counter(
    "qemu_exporter_alert_push_dropped",
    "Alert updates dropped because the queue for an unreachable Alertmanager was full.",
    HOST,
    "alertmanager",
)
JOURNAL_RECORDS = _counter(
    "qemu_exporter_hang_journal_records",
    "Completed IO hangs written to the hang journal (hang.journal_file).",
    HOST,
)
JOURNAL_DROPPED = _counter(
    "qemu_exporter_hang_journal_dropped_records",
    "Completed IO hangs never written to the hang journal: too many were waiting for a failing disk.",
    HOST,
)
JOURNAL_WRITE_ERRORS = _counter(
    "qemu_exporter_hang_journal_write_errors",
    "Failed writes of the hang journal (each logged; the records are kept and retried).",
    HOST,
)
JOURNAL_CORRUPT = _counter(
    "qemu_exporter_hang_journal_corrupt_lines",
    "Hang journal lines skipped when the journal was loaded at start (a line torn by a crash, "
    "or not a record).",
    HOST,
)
LOOP_LAG = _gauge(
    "qemu_exporter_event_loop_lag_seconds",
    "Largest delay of the exporter's event-loop heartbeat within the recent window "
    "(health.loop_lag_window_seconds): how long no QMP socket was read.",
    HOST,
)

# --- how each family is read from the model ------------------------------------------------

#: One sample: its family, the values of the labels after the VM's own (device first for a
#: DISK family, then the family's labels), and its value.
Sample = tuple[Family, tuple[str, ...], float]


def _vm(vm: VMState) -> Iterator[Sample]:
    yield QMP_UP, (), 1 if vm.up else 0
    if not vm.up:
        return  # no stale series for a VM whose QEMU is gone
    yield VM_INFO, (vm.uuid, vm.qemu_version, vm.socket), 1
    if vm.status:
        yield VM_STATUS, (vm.status,), 1


def _feature(vm: VMState) -> Iterator[Sample]:
    if vm.up and vm.retry_feature is not None:  # unknown through libvirt unless a disk retries
        yield RETRY_FEATURE, (), 1 if vm.retry_feature else 0


def _policy(vm: VMState) -> Iterator[Sample]:
    if not vm.up:
        return
    for dev in sorted(vm.disks):
        d = vm.disks[dev]
        p = d.policy
        yield DEVICE_INFO, (dev, d.drive, d.node_name, d.qdev_type, p.werror, p.rerror, d.backend), 1
        if p.retry_interval_ms is not None:
            yield RETRY_INTERVAL, (dev,), p.retry_interval_ms / 1000.0
        if p.retry_timeout_ms is not None:
            yield RETRY_TIMEOUT, (dev,), p.retry_timeout_ms / 1000.0
        yield POLICY_OK, (dev,), 1 if d.verdict.ok else 0
        for rule in d.verdict.violations:
            yield POLICY_VIOLATION, (dev, rule.value), 1


def _io_errors(vm: VMState) -> Iterator[Sample]:
    if vm.up:
        for (dev, op, action), n in sorted(vm.io_errors.items()):
            if dev in vm.disks:
                yield IO_ERROR_EVENTS, (dev, op, action), n


def _session(vm: VMState) -> Iterator[Sample]:
    yield CONNECT_ATTEMPTS, (), vm.connect_attempts
    for reason, n in sorted(vm.connect_errors.items()):
        yield CONNECT_ERRORS, (reason,), n
    yield DISCONNECTS, (), vm.disconnects
    for (command, reason), n in sorted(vm.command_errors.items()):
        yield COMMAND_ERRORS, (command, reason), n
    for event, n in sorted(vm.events.items()):
        yield QMP_EVENTS, (event,), n
    yield UNMATCHED, (), vm.unmatched_io_errors
    yield INTERNAL_ERRORS, (), vm.internal_errors


def _stats(vm: VMState) -> Iterator[Sample]:
    if not vm.up:
        return
    for dev in sorted(vm.disks):
        st = vm.blockstats.get(dev)
        if st is None:
            continue
        labels = (dev,)
        for family, attr in BLOCKSTATS:
            yield family, labels, getattr(st, attr)
        if st.idle_s is not None:
            yield IDLE, labels, st.idle_s


def _hang_state(dev: str, t: DiskHangTracker) -> Iterator[Sample]:
    labels = (dev,)
    yield HANG, labels, 1 if t.hanging else 0
    if t.hang_start is not None:
        yield HANG_START, labels, t.hang_start
    if t.deadline is not None:
        yield HANG_DEADLINE, labels, t.deadline
    yield FAILING, labels, 1 if t.failing else 0


#: Outcomes shown from zero.  A ``vm_gone`` hang ends with its VM, whose series leave the page
#: at that moment: a zero for it could never turn into a visible increase on the same series, so
#: it is shown once it happened (a VM that comes back under the same socket) and costs a fleet
#: nothing before.  ``timed_out`` from zero is what ``increase()`` in QemuIOHangTimedOut needs.
_DENSE_OUTCOMES = frozenset({HangOutcome.RECOVERED, HangOutcome.TIMED_OUT})


def _hang_counts(dev: str, t: DiskHangTracker) -> Iterator[Sample]:
    for outcome, n in t.hangs_total.items():
        if n or outcome in _DENSE_OUTCOMES:
            yield HANGS, (dev, outcome.value), n


def _hang_timed(dev: str, t: DiskHangTracker, now: float) -> Iterator[Sample]:
    yield HANG_DURATION, (dev,), t.duration(now)
    yield HANG_SECONDS, (dev,), t.hang_seconds_total(now)


def _state_key(t: DiskHangTracker) -> object:
    """Changes whenever what `_hang_state` reads changes."""
    return (t.hang_start, t.deadline, t.failing)


def _counts_key(t: DiskHangTracker) -> object:
    """Changes whenever what `_hang_counts` reads changes."""
    return tuple(t.hangs_total.values())


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


# --- the exposition formats ----------------------------------------------------------------

#: The two exposition formats.
Format = Literal["text", "openmetrics"]
TEXT: Format = "text"
OPENMETRICS: Format = "openmetrics"

#: Escaping schemes for which the cached lines are exact.  Every metric and label name the
#: exporter writes is a legacy Prometheus name (fixed names; static label names are checked by
#: `exporter.config.check_label_name`), which these two schemes leave as they are.  ``dots``
#: doubles every underscore, and prometheus_client's OpenMetrics encoder prefixes sample names
#: with ``U__`` under ``values``: those go through prometheus_client itself.
_CACHED_ESCAPINGS = frozenset({UNDERSCORES, ALLOWUTF8})
_EOF = "# EOF\n"


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def format_families(families: Iterable[Metric], fmt: Format = TEXT) -> str:
    """Families exactly as prometheus_client's encoder of ``fmt`` writes them (without the
    OpenMetrics ``# EOF``, which ends the whole page)."""
    if fmt == OPENMETRICS:
        page: bytes = openmetrics.generate_latest(_Families(families))  # type: ignore[no-untyped-call]
        return page.decode("utf-8")[: -len(_EOF)]
    return generate_latest(_Families(families)).decode("utf-8")


@runtime_checkable
class Rendered(Protocol):
    """A collector that writes its own exposition text (faster than its `collect`)."""

    def collect(self) -> Iterable[Metric]: ...

    def render(self, fmt: Format) -> list[str]:
        """Exactly what prometheus_client's encoder of ``fmt`` writes for `collect`."""
        ...


@runtime_checkable
class SelfTimed(Protocol):
    """A collector serving several of `exporter.model.collectors`, which times each itself."""

    durations: dict[str, float]


class Registry(CollectorRegistry):
    """A prometheus_client registry that remembers its collectors in order, so that
    `generate_text` and `generate_openmetrics` can ask those that render their own text, and
    times each by the name of the collector (`exporter.model.collectors`) it serves
    (`DurationCollector` shows the times)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.collectors: list[Collector] = []
        self._names: dict[int, str] = {}
        #: Seconds per collector name, of the page being generated (or the last one).
        self.durations: dict[str, float] = {}

    def register(self, collector: Collector, name: str = "") -> None:
        """Register ``collector``; with ``name``, its time counts as that collector's."""
        super().register(collector)
        self.collectors.append(collector)
        if name:
            self._names[id(collector)] = name

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.collectors.remove(collector)
        self._names.pop(id(collector), None)

    def _timed(self, collector: Collector, start: float) -> None:
        if isinstance(collector, SelfTimed):
            self.durations.update(collector.durations)
        elif (name := self._names.get(id(collector))) is not None:
            self.durations[name] = self.durations.get(name, 0.0) + perf_counter() - start

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's `collect` (what its encoders read), each collector timed."""
        self.durations = {}
        for collector in list(self.collectors):
            start = perf_counter()
            metrics = list(collector.collect())
            self._timed(collector, start)
            yield from metrics


def _generate(registry: Registry, fmt: Format) -> list[str]:
    out: list[str] = []
    registry.durations = {}
    for collector in registry.collectors:
        start = perf_counter()
        if isinstance(collector, Rendered):
            out.extend(collector.render(fmt))
        else:
            out.append(format_families(collector.collect(), fmt))
        registry._timed(collector, start)
    return out


def generate_text(registry: Collector, escaping: str = UNDERSCORES) -> bytes:
    """Byte for byte `prometheus_client.exposition.generate_latest(registry, escaping)`."""
    if not isinstance(registry, Registry) or escaping not in _CACHED_ESCAPINGS:
        return generate_latest(registry, escaping)
    return "".join(_generate(registry, TEXT)).encode("utf-8")


def generate_openmetrics(registry: Collector, escaping: str = UNDERSCORES, version: str = "1.0.0") -> bytes:
    """Byte for byte `prometheus_client.openmetrics.exposition.generate_latest(registry,
    escaping, version)`, from the same cached lines as `generate_text`.

    Prometheus asks for OpenMetrics first (2.x and 3.x alike); prometheus_client's encoder took
    1.2-2.1 s per scrape (p50) at 1000 VMs x 4 disks, this path what the text path costs
    (docs/performance.md).  ``version`` only decides whether prometheus_client writes native
    histogram samples (>= 2.0.0), which none of our families has; it is passed on to the
    encoder for the families it formats."""
    if not isinstance(registry, Registry) or escaping not in _CACHED_ESCAPINGS:
        page: bytes = openmetrics.generate_latest(registry, escaping, version)  # type: ignore[no-untyped-call]
        return page
    out = _generate(registry, OPENMETRICS)
    out.append(_EOF)
    return "".join(out).encode("utf-8")


def family_header(name: str, documentation: str, typ: str, fmt: Format = TEXT, unit: str = "") -> str:
    """``# HELP``/``# TYPE`` (and ``# UNIT``) lines as prometheus_client's encoder of ``fmt``
    writes them: the text format renames counters to ``_total`` (and info/stateset/unknown
    types), OpenMetrics keeps the family name, escapes ``"`` in HELP too, and writes the unit."""
    if fmt == OPENMETRICS:
        name = escape_metric_name(name, UNDERSCORES)
        doc = _escape_value(documentation)
        unit_line = f"# UNIT {name} {unit}\n" if unit else ""
        return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n{unit_line}"
    if typ == "counter":
        name += "_total"
    elif typ == "info":
        name, typ = name + "_info", "gauge"
    elif typ == "stateset":
        typ = "gauge"
    elif typ == "gaugehistogram":
        typ = "histogram"
    elif typ == "unknown":
        typ = "untyped"
    name = escape_metric_name(name, UNDERSCORES)
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {typ}\n"


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``{a="x",b="y"}`` as generate_latest writes a sample's labels (sorted by name)."""
    labels = dict(zip(names, values, strict=False))
    if not labels:
        return ""
    inner = ",".join(
        f'{escape_label_name(k, UNDERSCORES)}="{_escape_value(v)}"' for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


def fmt_value(v: float) -> str:
    """A sample value as generate_latest writes it."""
    if v == 1:
        return "1.0"
    if v == 0 and math.copysign(1.0, v) == 1.0:
        return "0.0"
    text: str = floatToGoString(v)  # type: ignore[no-untyped-call]
    return text


# --- the renderer ----------------------------------------------------------------------------


class _Lines:
    """Turns one VM's samples into exposition lines.  Label text is kept per (label names,
    values) for as long as the VM's identity (its ``vm`` and static labels) stays: a hanging
    disk's lines are rendered at every scrape, its labels once."""

    __slots__ = ("_base_names", "_base_values", "_labels")

    def __init__(self, base_names: Sequence[str], base_values: Sequence[str]) -> None:
        self._base_names = base_names
        self._base_values = base_values
        self._labels: dict[tuple[str, tuple[str, ...]], str] = {}

    def render(self, samples: Iterable[Sample]) -> dict[Family, str]:
        """The lines of each family of ``samples`` (in sample order)."""
        lines: dict[Family, list[str]] = {}
        cache = self._labels
        for family, values, value in samples:
            key = (family.label_key, values)
            text = cache.get(key)
            if text is None:
                names = family.label_names(self._base_names)
                text = cache[key] = label_text(names, [*self._base_values, *values])
            line = f"{family.sample_name}{text} {fmt_value(value)}\n"
            got = lines.get(family)
            if got is None:
                lines[family] = [line]
            else:
                got.append(line)
        return {family: "".join(got) for family, got in lines.items()}


@dataclass(frozen=True, slots=True)
class _Reader:
    """How one collector's per-VM families are read: from which part of the VM's state (they
    are re-rendered when its version moves)."""

    part: Part
    read: Callable[[VMState], Iterator[Sample]]
    families: tuple[Family, ...]

    @property
    def collector(self) -> str:
        return self.families[0].collector


#: Every per-VM reader; their order, with `_HANG_FAMILIES` after `_PAGE_SPLIT` of them, is the
#: order of the page.
_READERS: tuple[_Reader, ...] = (
    _Reader(Part.IDENTITY, _vm, (QMP_UP, VM_INFO, VM_STATUS)),
    _Reader(Part.IDENTITY, _feature, (RETRY_FEATURE,)),
    _Reader(
        Part.IDENTITY, _policy, (DEVICE_INFO, RETRY_INTERVAL, RETRY_TIMEOUT, POLICY_OK, POLICY_VIOLATION)
    ),
    _Reader(Part.COUNTERS, _io_errors, (IO_ERROR_EVENTS,)),
    _Reader(Part.STATS, _stats, (*(family for family, _attr in BLOCKSTATS), IDLE)),
    _Reader(
        Part.COUNTERS,
        _session,
        (
            CONNECT_ATTEMPTS,
            CONNECT_ERRORS,
            DISCONNECTS,
            COMMAND_ERRORS,
            QMP_EVENTS,
            UNMATCHED,
            INTERNAL_ERRORS,
        ),
    ),
)
#: The readers whose families come before the hang view on the page (the rest come after it).
_PAGE_SPLIT = 5
#: A disk's hang families in groups that change at different times: its state when a hang
#: starts or ends, its counts when one ends (`_HANG_STEADY`, each kept while its key stays),
#: and the two that change with time (`_HANG_TIMED`, rendered while a disk hangs or fails).
_HANG_STEADY: tuple[
    tuple[
        tuple[Family, ...],
        Callable[[DiskHangTracker], object],
        Callable[[str, DiskHangTracker], Iterator[Sample]],
    ],
    ...,
] = (
    ((HANG, HANG_START, HANG_DEADLINE, FAILING), _state_key, _hang_state),
    ((HANGS,), _counts_key, _hang_counts),
)
_HANG_TIMED = (HANG_DURATION, HANG_SECONDS)
_HANG_FAMILIES = (HANG, HANG_DURATION, HANG_START, HANG_DEADLINE, FAILING, HANGS, HANG_SECONDS)
_HANG_COLLECTORS = frozenset(f.collector for f in _HANG_FAMILIES)

#: Where each per-VM family's lines sit in `_VMText.text` (a list: joining a page reads 35
#: families x 1000 VMs of it, at C speed with `operator.itemgetter`).
_SLOT: dict[Family, int] = {
    family: i for i, family in enumerate((*(f for r in _READERS for f in r.families), *_HANG_FAMILIES))
}
_HANG_STEADY_SLOTS = tuple(tuple(_SLOT[f] for f in families) for families, _key, _reader in _HANG_STEADY)
_HANG_TIMED_SLOTS = tuple(_SLOT[f] for f in _HANG_TIMED)


@dataclass(frozen=True, slots=True)
class _Refresh:
    """One enabled reader, as `_VMText.refresh` runs it."""

    collector: str
    version_attr: str
    slots: tuple[int, ...]
    read: Callable[[VMState], Iterator[Sample]]


def _plan(readers: Iterable[_Reader]) -> tuple[_Refresh, ...]:
    return tuple(
        _Refresh(r.collector, VMState.version_attr(r.part), tuple(_SLOT[f] for f in r.families), r.read)
        for r in readers
    )


class _VMText:
    """One VM's cached lines per family (`_SLOT`), and the versions of its state they show."""

    __slots__ = ("hang_key", "hang_state", "hang_volatile", "identity", "lines", "text", "versions", "vm")

    def __init__(
        self, vm: VMState, base_names: Sequence[str], base_values: Sequence[str], readers: int
    ) -> None:
        self.vm = vm
        #: The version of the VM's identity (its labels) this entry was made for.
        self.identity = vm.version
        self.lines = _Lines(base_names, base_values)
        self.text: list[str] = [""] * len(_SLOT)
        #: Per enabled reader, the version of the VM's state its lines show.
        self.versions: list[int] = [-1] * readers
        self.hang_key: object = None
        self.hang_volatile = False
        #: Per group of `_HANG_STEADY`, the keys of the disks its lines show.
        self.hang_state: list[list[object] | None] = [None] * len(_HANG_STEADY)

    def refresh(self, plan: Sequence[_Refresh], durations: dict[str, float] | None = None) -> None:
        """Re-render each reader's lines whose part of the VM moved, adding the time to its
        collector's in ``durations``.  (A new identity gets a new `_VMText`: its label text may
        have changed.)"""
        vm, text, versions = self.vm, self.text, self.versions
        for i, step in enumerate(plan):
            version = getattr(vm, step.version_attr)
            if versions[i] != version:
                start = perf_counter()
                versions[i] = version
                for slot in step.slots:
                    text[slot] = ""
                for family, lines in self.lines.render(step.read(vm)).items():
                    text[_SLOT[family]] = lines
                if durations is not None:
                    durations[step.collector] += perf_counter() - start

    def refresh_hangs(self, hangs: HangSource, now: float) -> bool:
        """Re-render the hang lines when the VM or its trackers changed, or a disk hangs or
        fails (its duration grows).  Only the two `_HANG_TIMED` lines change with time: the
        others are kept while the disks' states stay (in a storm, re-rendering 4000 hanging
        disks' every line was half of a scrape's CPU)."""
        vm = self.vm
        key = (vm.version, hangs.version(vm.key))
        if key == self.hang_key and not self.hang_volatile:
            return False  # idle: nothing shown of it depends on the passing time
        self.hang_key = key
        shown = hangs.shown(vm, now)
        self.hang_volatile = any(t.active for _dev, t in shown)
        text = self.text
        for group, (slots, (_families, key_of, reader)) in enumerate(
            zip(_HANG_STEADY_SLOTS, _HANG_STEADY, strict=True)
        ):
            state = [key_of(t) for _dev, t in shown]
            if state != self.hang_state[group]:
                self.hang_state[group] = state
                for slot in slots:
                    text[slot] = ""
                for family, lines in self.lines.render(
                    chain.from_iterable(reader(d, t) for d, t in shown)
                ).items():
                    text[_SLOT[family]] = lines
        for slot in _HANG_TIMED_SLOTS:
            text[slot] = ""
        for family, lines in self.lines.render(
            chain.from_iterable(_hang_timed(d, t, now) for d, t in shown)
        ).items():
            text[_SLOT[family]] = lines
        return True


class ExporterCollector(EventSink):
    """Every per-VM metric of the enabled collectors, from the current state of the watched
    VMs: `collect` for prometheus_client, `render` for the cached text (the same samples, the
    same bytes).  ``durations`` holds, after each, the time it spent per collector.

    As an `EventSink` it renders a VM's new blockstats right after each poll: every VM is
    polled every few seconds, so by the next scrape (15-60 s) all 4000 disks' blockstats of
    1000 VMs changed; formatted in the scrape that was ~150 ms, formatted poll by poll it is
    spread over the poll interval and the scrape only joins text."""

    def __init__(
        self,
        vms: Callable[[], Sequence[VMState]],
        static_label_names: Sequence[str] = (),
        *,
        hangs: HangSource | None = None,
        clock: Callable[[], float],
        collectors: Iterable[str] = COLLECTORS,
    ) -> None:
        self._vms = vms
        self._static = tuple(static_label_names)
        self._base_names = ["vm", *self._static]
        self._hangs = hangs
        self._clock = clock
        enabled = frozenset(collectors)
        readers = [r for r in _READERS if r.collector in enabled]
        self._plan = _plan(readers)
        self._before = tuple(f for r in readers if r in _READERS[:_PAGE_SPLIT] for f in r.families)
        self._after = tuple(f for r in readers if r in _READERS[_PAGE_SPLIT:] for f in r.families)
        self._hang_families = tuple(f for f in _HANG_FAMILIES if f.collector in enabled)
        self._show_hangs = hangs is not None and bool(enabled & _HANG_COLLECTORS)
        self._histogram = "hang" in enabled
        self._backend = "backend" in enabled
        #: The per-VM and per-host collectors this one serves (for `durations`).
        self.names = sorted(
            {r.collector for r in readers}
            | ({f.collector for f in self._hang_families} if self._show_hangs else set())
            | ({"backend"} if self._backend and hangs is not None else set())
        )
        self.durations: dict[str, float] = {}
        self._build = (__version__, platform.python_version(), _dist_version("qemu.qmp"))
        self._cache: dict[int, _VMText] = {}
        self._backends: list[Metric] | None = None
        self._backend_keys: list[str] = []
        self._headers: dict[Format, dict[Family, str]] = {}
        self._build_text = {
            fmt: format_families([build_info_metric(self._build)], fmt) for fmt in (TEXT, OPENMETRICS)
        }

    def _base(self, vm: VMState) -> list[str]:
        return [vm.vm, *(vm.static_labels.get(k, "") for k in self._static)]

    def _sorted(self) -> list[VMState]:
        return sorted(self._vms(), key=lambda v: (v.vm, v.key))

    def _entry(self, vm: VMState, durations: dict[str, float] | None = None) -> _VMText:
        """``vm``'s cached text (a new one when its labels changed), parts brought up to date."""
        entry = self._cache.get(id(vm))
        if entry is None or entry.vm is not vm or entry.identity != vm.version:
            # A new identity may mean new label values: start from empty label text (an
            # id() of a VM that is gone may be reused, hence the `is` check).
            entry = _VMText(vm, self._base_names, self._base(vm), len(self._plan))
        entry.refresh(self._plan, durations)
        return entry

    def on_blockstats(self, vm: VMState, now: float) -> None:
        # Not the first sample of a session (vm.up is set after it): when a whole fleet
        # connects, the next scrape renders everything once anyway.
        if vm.up:
            self._cache[id(vm)] = self._entry(vm)

    def _host_metrics(self, hangs: HangSource, shown: Sequence[VMState], recount: bool) -> list[Metric]:
        """The histogram, and the per-backend counts.  Those depend on exactly what re-renders
        a VM's hang lines (its disks, its trackers, its hanging or failing disks) and on which
        VMs are shown: recounted only then, not over all 4000 disks of an idle host at every
        scrape (~2.5 ms at 1000 VMs)."""
        out = [histogram_metric(hangs.histogram)] if self._histogram else []
        if not self._backend:
            return out
        start = perf_counter()
        keys = [vm.key for vm in shown]
        if recount or self._backends is None or keys != self._backend_keys:
            self._backends = backend_metrics(hangs.backend_counts(shown))
            self._backend_keys = keys
        self.durations["backend"] += perf_counter() - start
        return [*out, *self._backends]

    def _join(
        self, parts: list[str], h: dict[Family, str], families: Iterable[Family], texts: list[list[str]]
    ) -> None:
        durations = self.durations
        for family in families:
            start = perf_counter()
            parts.append(h[family])
            parts.extend(map(itemgetter(_SLOT[family]), texts))
            durations[family.collector] += perf_counter() - start

    def render(self, fmt: Format) -> list[str]:
        """The text of `collect` in ``fmt``, from per-VM lines re-rendered only for the parts
        of VMs that changed since the previous scrape (the lines serve both formats)."""
        self.durations = durations = dict.fromkeys(self.names, 0.0)
        vms = self._sorted()
        now = self._clock()
        h = self._headers.get(fmt)
        if h is None:
            h = self._headers[fmt] = {
                family: family_header(family.name, family.help, family.type, fmt) for family in _SLOT
            }
        entries = [self._entry(vm, durations) for vm in vms]
        self._cache = {id(e.vm): e for e in entries}  # the VMs gone drop out
        vms_line = f"{VMS.name} {fmt_value(len(vms))}\n"
        parts = [self._build_text[fmt], family_header(VMS.name, VMS.help, VMS.type, fmt), vms_line]
        texts = [e.text for e in entries]
        self._join(parts, h, self._before, texts)
        if self._show_hangs:
            assert self._hangs is not None
            start = perf_counter()
            shown = [e for e in entries if e.vm.up]
            rendered = [e.refresh_hangs(self._hangs, now) for e in shown]
            durations["hang" if "hang" in durations else "hangtime"] += perf_counter() - start
            self._join(parts, h, self._hang_families, [e.text for e in shown])
            start = perf_counter()
            host = self._host_metrics(self._hangs, [e.vm for e in shown], any(rendered))
            text = format_families(host, fmt)
            if self._histogram:
                durations["hang"] += perf_counter() - start
            parts.append(text)
        self._join(parts, h, self._after, texts)
        return parts

    def collect(self) -> Iterator[Metric]:
        self.durations = durations = dict.fromkeys(self.names, 0.0)
        vms = self._sorted()
        now = self._clock()
        samples: dict[Family, list[tuple[list[str], float]]] = {family: [] for family in _SLOT}
        for step in self._plan:
            start = perf_counter()
            for vm in vms:
                base = self._base(vm)
                for family, values, value in step.read(vm):
                    samples[family].append(([*base, *values], value))
            durations[step.collector] += perf_counter() - start
        shown = [vm for vm in vms if vm.up]
        if self._show_hangs:
            assert self._hangs is not None
            start = perf_counter()
            for vm in shown:
                base = self._base(vm)
                for dev, t in self._hangs.shown(vm, now):
                    steady = (reader(dev, t) for _families, _key, reader in _HANG_STEADY)
                    for family, values, value in chain(*steady, _hang_timed(dev, t, now)):
                        samples[family].append(([*base, *values], value))
            durations["hang" if "hang" in durations else "hangtime"] += perf_counter() - start

        def metric(family: Family) -> Metric:
            return family.metric(family.label_names(self._base_names), samples[family])

        yield build_info_metric(self._build)
        yield VMS.metric((), [((), len(vms))])
        yield from map(metric, self._before)
        if self._show_hangs:
            assert self._hangs is not None
            yield from map(metric, self._hang_families)
            yield from self._host_metrics(self._hangs, shown, recount=True)
        yield from map(metric, self._after)


class DurationCollector:
    """`COLLECTOR_DURATION`: what this scrape spent per collector, as `Registry` measured it (registered last, so that it sees every other collector's time)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> list[Metric]:
        d = self._registry.durations
        return [COLLECTOR_DURATION.metric(COLLECTOR_DURATION.labels, [((n,), d[n]) for n in sorted(d)])]


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
