"""Every metric the exporter exposes, declared once, and how each is read from the model.

Each family is a `Family` (name, help, type, which labels, the collector that shows it) in the
declarations below; the readers after them (``_vm``, ``_policy``, ``_stats``, ``_hang_*``...)
say how its samples are read from the model, and `READERS` which part of a VM's state each
reader shows (its version says when to read it again) and in which order the page shows them.
How the samples become exposition text, cached per VM, is `exporter.exposition`.

A new per-VM metric: declare its `Family` with its collector (`exporter.model.collectors`), yield
its samples from that collector's reader in `READERS`, and document it in docs/metrics.md; the
golden files (tests/golden) show the change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from exporter.hang.outcome import HangOutcome
from exporter.model.state import Part, VMState

if TYPE_CHECKING:
    from exporter.hang.machine import DiskHangTracker

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
    "Time this scrape spent on each enabled collector (--collector.NAME).",
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
VM_BLIND_INTERVALS = _counter(
    "qemu_exporter_vm_blind_intervals",
    "Intervals in which the VM's events could not be seen (its session was down while it ran).",
    VM,
    collector="session",
)
VM_BLIND_SECONDS = _counter(
    "qemu_exporter_vm_blind_seconds",
    "Seconds in which the VM's events could not be seen.",
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

# A disk's hang (`_hang_state`, `_hang_counts`: what changes with its state; `hang_timed`: with
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
BLIND_INTERVALS = _counter(
    "qemu_exporter_blind_intervals",
    "Intervals in which the exporter could not see events, by source (event_loop: it did not "
    "run; qmp: a VM's session was down; libvirt: a connection was down).",
    HOST,
    "source",
)
BLIND_SECONDS = _counter(
    "qemu_exporter_blind_seconds",
    "Seconds in which the exporter could not see events, by source.",
    HOST,
    "source",
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
    yield VM_BLIND_INTERVALS, (), vm.blind_intervals
    yield VM_BLIND_SECONDS, (), vm.blind_seconds


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


def hang_timed(dev: str, t: DiskHangTracker, now: float) -> Iterator[Sample]:
    yield HANG_DURATION, (dev,), t.duration(now)
    yield HANG_SECONDS, (dev,), t.hang_seconds_total(now)


def _state_key(t: DiskHangTracker) -> object:
    """Changes whenever what `_hang_state` reads changes."""
    return (t.hang_start, t.deadline, t.failing)


def _counts_key(t: DiskHangTracker) -> object:
    """Changes whenever what `_hang_counts` reads changes."""
    return tuple(t.hangs_total.values())


@dataclass(frozen=True, slots=True)
class Reader:
    """How one collector's per-VM families are read: from which part of the VM's state (they
    are re-rendered when its version moves)."""

    part: Part
    read: Callable[[VMState], Iterator[Sample]]
    families: tuple[Family, ...]

    @property
    def collector(self) -> str:
        return self.families[0].collector


#: Every per-VM reader; their order, with `HANG_FAMILIES` after `PAGE_SPLIT` of them, is the
#: order of the page.
READERS: tuple[Reader, ...] = (
    Reader(Part.IDENTITY, _vm, (QMP_UP, VM_INFO, VM_STATUS)),
    Reader(Part.IDENTITY, _feature, (RETRY_FEATURE,)),
    Reader(Part.IDENTITY, _policy, (DEVICE_INFO, RETRY_INTERVAL, RETRY_TIMEOUT, POLICY_OK, POLICY_VIOLATION)),
    Reader(Part.COUNTERS, _io_errors, (IO_ERROR_EVENTS,)),
    Reader(Part.STATS, _stats, (*(family for family, _attr in BLOCKSTATS), IDLE)),
    Reader(
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
            VM_BLIND_INTERVALS,
            VM_BLIND_SECONDS,
        ),
    ),
)
#: The readers whose families come before the hang view on the page (the rest come after it).
PAGE_SPLIT = 5
#: A disk's hang families in groups that change at different times: its state when a hang
#: starts or ends, its counts when one ends (`HANG_STEADY`, each kept while its key stays),
#: and the two that change with time (`HANG_TIMED`, rendered while a disk hangs or fails).
HANG_STEADY: tuple[
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
HANG_TIMED = (HANG_DURATION, HANG_SECONDS)
HANG_FAMILIES = (HANG, HANG_DURATION, HANG_START, HANG_DEADLINE, FAILING, HANGS, HANG_SECONDS)
HANG_COLLECTORS = frozenset(f.collector for f in HANG_FAMILIES)
