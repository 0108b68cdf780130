"""Prometheus metrics, rendered at scrape time from the in-memory state.

A custom collector in the style of ``prometheus_client``'s: `collect()` walks the state that the
QMP sessions keep and yields metric families.  It never awaits anything, so a scrape costs the
same whether QEMU answers or not.  docs/metrics.md documents every family yielded here.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.state import BlockStats, VMState

# (suffix-less name, help, attribute of BlockStats, type)
_BLOCKSTATS: tuple[tuple[str, str, str, str], ...] = (
    (
        "qemu_block_read_bytes",
        "Bytes read by the guest (query-blockstats rd_bytes).",
        "read_bytes",
        "counter",
    ),
    (
        "qemu_block_written_bytes",
        "Bytes written by the guest (wr_bytes).",
        "written_bytes",
        "counter",
    ),
    (
        "qemu_block_read_operations",
        "Read operations completed (rd_operations).",
        "read_ops",
        "counter",
    ),
    (
        "qemu_block_write_operations",
        "Write operations completed (wr_operations).",
        "write_ops",
        "counter",
    ),
    (
        "qemu_block_flush_operations",
        "Flush operations completed (flush_operations).",
        "flush_ops",
        "counter",
    ),
    (
        "qemu_block_failed_read_operations",
        "Failed read operations (failed_rd_operations).",
        "failed_read_ops",
        "counter",
    ),
    (
        "qemu_block_failed_write_operations",
        "Failed write operations (failed_wr_operations).",
        "failed_write_ops",
        "counter",
    ),
    (
        "qemu_block_failed_flush_operations",
        "Failed flush operations (failed_flush_operations).",
        "failed_flush_ops",
        "counter",
    ),
    (
        "qemu_block_read_time_seconds",
        "Total time spent on reads (rd_total_time_ns).",
        "read_time_s",
        "counter",
    ),
    (
        "qemu_block_write_time_seconds",
        "Total time spent on writes (wr_total_time_ns).",
        "write_time_s",
        "counter",
    ),
    (
        "qemu_block_flush_time_seconds",
        "Total time spent on flushes (flush_total_time_ns).",
        "flush_time_s",
        "counter",
    ),
)


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class HangView:
    """What the hang tracker contributes to a scrape.  The default contributes nothing."""

    def collect(self, vms: Sequence[VMState], label_names: Sequence[str], now: float) -> Iterable[Metric]:
        return ()


class ExporterCollector(Collector):
    """Yields every exporter metric from the current state of the watched VMs."""

    def __init__(
        self,
        vms: Callable[[], Sequence[VMState]],
        static_label_names: Sequence[str] = (),
        *,
        hangs: HangView | None = None,
        clock: Callable[[], float],
    ) -> None:
        self._vms = vms
        self._static = tuple(static_label_names)
        self._hangs = hangs or HangView()
        self._clock = clock
        self._build = (
            __version__,
            platform.python_version(),
            _dist_version("qemu.qmp"),
        )

    def _base(self, vm: VMState) -> list[str]:
        return [vm.vm, *(vm.static_labels.get(k, "") for k in self._static)]

    def collect(self) -> Iterator[Metric]:
        vms = sorted(self._vms(), key=lambda v: (v.vm, v.socket))
        base = ["vm", *self._static]
        disk = [*base, "device"]

        build = GaugeMetricFamily(
            "qemu_exporter_build_info",
            "Build information of qemu-iohang-exporter.",
            labels=["version", "python_version", "qemu_qmp_version"],
        )
        build.add_metric(list(self._build), 1)
        yield build
        yield GaugeMetricFamily("qemu_exporter_vms", "QMP sockets currently watched.", value=len(vms))

        up = GaugeMetricFamily(
            "qemu_qmp_up", "1 when the QMP session is established and answering.", labels=base
        )
        info = GaugeMetricFamily(
            "qemu_vm_info",
            "VM metadata from QMP.",
            labels=[*base, "uuid", "qemu_version", "socket"],
        )
        status = GaugeMetricFamily(
            "qemu_vm_status",
            "Current run state of the VM (query-status).",
            labels=[*base, "status"],
        )
        feature = GaugeMetricFamily(
            "qemu_vm_retry_feature",
            "1 when this QEMU supports the retry error policy.",
            labels=base,
        )
        dev_info = GaugeMetricFamily(
            "qemu_block_device_info",
            "Guest disk and its error policy as read with qom-get.",
            labels=[*disk, "drive", "node_name", "qdev_type", "werror", "rerror"],
        )
        interval = GaugeMetricFamily(
            "qemu_block_retry_interval_seconds", "retry_interval of the disk device.", labels=disk
        )
        timeout = GaugeMetricFamily(
            "qemu_block_retry_timeout_seconds",
            "retry_timeout of the disk device; 0 means never.",
            labels=disk,
        )
        ok = GaugeMetricFamily(
            "qemu_block_retry_policy_ok",
            "1 when the disk satisfies the required retry policy.",
            labels=disk,
        )
        viol = GaugeMetricFamily(
            "qemu_block_retry_policy_violation",
            "1 for each retry policy rule the disk fails.",
            labels=[*disk, "rule"],
        )
        io_err = CounterMetricFamily(
            "qemu_block_io_error_events",
            "BLOCK_IO_ERROR events received.",
            labels=[*disk, "operation", "action"],
        )
        stats = {
            name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=disk)
            for name, doc, _attr, kind in _BLOCKSTATS
        }
        idle = GaugeMetricFamily(
            "qemu_block_idle_seconds",
            "Time since the last IO on the disk (idle_time_ns).",
            labels=disk,
        )

        attempts = CounterMetricFamily(
            "qemu_exporter_qmp_connect_attempts", "QMP connection attempts.", labels=base
        )
        conn_err = CounterMetricFamily(
            "qemu_exporter_qmp_connect_errors",
            "Failed QMP connection attempts by reason.",
            labels=[*base, "reason"],
        )
        disc = CounterMetricFamily(
            "qemu_exporter_qmp_disconnects", "Established QMP sessions that ended.", labels=base
        )
        cmd_err = CounterMetricFamily(
            "qemu_exporter_qmp_command_errors",
            "Failed QMP commands.",
            labels=[*base, "command", "reason"],
        )
        events = CounterMetricFamily(
            "qemu_exporter_qmp_events", "QMP events received.", labels=[*base, "event"]
        )
        unmatched = CounterMetricFamily(
            "qemu_exporter_io_error_events_unmatched",
            "BLOCK_IO_ERROR events that matched no known disk.",
            labels=base,
        )

        internal = CounterMetricFamily(
            "qemu_exporter_internal_errors", "Unexpected errors in a QMP watcher (each logged).", labels=base
        )

        for vm in vms:
            b = self._base(vm)
            up.add_metric(b, 1 if vm.up else 0)
            attempts.add_metric(b, vm.connect_attempts)
            for reason, n in sorted(vm.connect_errors.items()):
                conn_err.add_metric([*b, reason], n)
            disc.add_metric(b, vm.disconnects)
            for (command, reason), n in sorted(vm.command_errors.items()):
                cmd_err.add_metric([*b, command, reason], n)
            for event, n in sorted(vm.events.items()):
                events.add_metric([*b, event], n)
            unmatched.add_metric(b, vm.unmatched_io_errors)
            internal.add_metric(b, vm.internal_errors)
            if not vm.up:
                continue  # no stale series for a VM whose QEMU is gone
            info.add_metric([*b, vm.uuid, vm.qemu_version, vm.socket], 1)
            if vm.status:
                status.add_metric([*b, vm.status], 1)
            feature.add_metric(b, 1 if vm.retry_feature else 0)
            for dev in sorted(vm.disks):
                d = vm.disks[dev]
                db = [*b, dev]
                p = d.policy
                dev_info.add_metric([*db, d.drive, d.node_name, d.qdev_type, p.werror, p.rerror], 1)
                if p.retry_interval_ms is not None:
                    interval.add_metric(db, p.retry_interval_ms / 1000.0)
                if p.retry_timeout_ms is not None:
                    timeout.add_metric(db, p.retry_timeout_ms / 1000.0)
                ok.add_metric(db, 1 if d.verdict.ok else 0)
                for rule in d.verdict.violations:
                    viol.add_metric([*db, rule.value], 1)
                st = vm.blockstats.get(dev)
                if st is not None:
                    _add_blockstats(stats, idle, db, st)
            for (dev, op, action), n in sorted(vm.io_errors.items()):
                if dev in vm.disks:
                    io_err.add_metric([*b, dev, op, action], n)

        yield from (up, info, status, feature, dev_info, interval, timeout, ok, viol, io_err)
        yield from stats.values()
        yield idle
        yield from self._hangs.collect([v for v in vms if v.up], base, self._clock())
        yield from (attempts, conn_err, disc, cmd_err, events, unmatched, internal)


def _add_blockstats(
    families: dict[str, GaugeMetricFamily | CounterMetricFamily],
    idle: GaugeMetricFamily,
    labels: list[str],
    st: BlockStats,
) -> None:
    for name, _doc, attr, _kind in _BLOCKSTATS:
        families[name].add_metric(labels, getattr(st, attr))
    if st.idle_s is not None:
        idle.add_metric(labels, st.idle_s)
