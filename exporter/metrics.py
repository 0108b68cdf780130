"""Prometheus metrics, rendered at scrape time from the in-memory state.

A custom collector in the style of ``prometheus_client``'s: `collect()` walks the state that the
QMP sessions keep and yields metric families.  It never awaits anything, so a scrape costs the
same whether QEMU answers or not.  docs/metrics.md documents every family yielded here.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
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
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.model.state import BlockStats, ConnectionState, VMState

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


# --- fast text exposition -----------------------------------------------------------------
#
# prometheus_client formats every sample of every scrape (~3 us each: 110,000 series for 1000 VMs
# x 4 disks take ~0.5 s in the text format, 1.2-2.1 s in OpenMetrics).  `generate_text` and
# `generate_openmetrics` return the same bytes as its two `generate_latest`, but
# `ExporterCollector` renders each VM's lines only when that VM changed (`VMState.version` &c.)
# and concatenates cached per-VM chunks family by family.  docs/performance.md has the numbers.
#
# The sample lines are the same in both formats for every family we pre-render (checked against
# prometheus_client 0.26's two encoders: both write ``name{labels} floatToGoString(value)``,
# labels sorted, values escaped alike; our counters carry no ``_created`` sample, and no sample
# has a timestamp or exemplar), so one cached chunk serves both.  What differs is only written
# per family or per page: the ``# HELP``/``# TYPE`` lines (`family_header`), the families that
# prometheus_client formats itself (build info, the hang histogram, other collectors'), and the
# final ``# EOF``.

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

#: Set while `generate_text`/`generate_openmetrics` iterate the registry, to the format being
#: written: collectors may then yield `PrerenderedText` in that format.
_PRERENDER: ContextVar[Format | None] = ContextVar("prerender", default=None)


class PrerenderedText(Metric):
    """Exposition lines already in the format being written (seen only by `generate_text` and
    `generate_openmetrics`)."""

    def __init__(self, parts: list[str]) -> None:
        super().__init__("prerendered", "", "untyped")
        self.parts = parts


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


_EOF = "# EOF\n"


def format_families(families: Iterable[Metric], fmt: Format = TEXT) -> str:
    """Families exactly as prometheus_client's encoder of ``fmt`` writes them (without the
    OpenMetrics ``# EOF``, which ends the whole page)."""
    if fmt == OPENMETRICS:
        page: bytes = openmetrics.generate_latest(_Families(families))  # type: ignore[no-untyped-call]
        return page.decode("utf-8")[: -len(_EOF)]
    return generate_latest(_Families(families)).decode("utf-8")


def _generate(registry: Collector, fmt: Format) -> list[str]:
    out: list[str] = []
    token = _PRERENDER.set(fmt)
    try:
        for metric in registry.collect():
            if isinstance(metric, PrerenderedText):
                out.extend(metric.parts)
            else:
                out.append(format_families([metric], fmt))
    finally:
        _PRERENDER.reset(token)
    return out


def generate_text(registry: Collector, escaping: str = UNDERSCORES) -> bytes:
    """Byte for byte `prometheus_client.exposition.generate_latest(registry, escaping)`:
    collectors that can yield `PrerenderedText` do, every other metric is formatted by
    prometheus_client."""
    if escaping not in _CACHED_ESCAPINGS:
        return generate_latest(registry, escaping)
    return "".join(_generate(registry, TEXT)).encode("utf-8")


def generate_openmetrics(registry: Collector, escaping: str = UNDERSCORES, version: str = "1.0.0") -> bytes:
    """Byte for byte `prometheus_client.openmetrics.exposition.generate_latest(registry,
    escaping, version)`, from the same cached lines as `generate_text`.

    Prometheus asks for OpenMetrics first (2.x and 3.x alike); prometheus_client's encoder took
    1.2-2.1 s per scrape (p50) at 1000 VMs x 4 disks, this path 23-50 ms, what the text path
    costs (docs/performance.md).  ``version`` only decides whether prometheus_client writes
    native histogram samples (>= 2.0.0), which none of our families has; it is passed on to the
    encoder for the families it formats."""
    if escaping not in _CACHED_ESCAPINGS:
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


class HangView:
    """What the hang tracker contributes to a scrape.  The default contributes nothing."""

    def collect(self, vms: Sequence[VMState], label_names: Sequence[str], now: float) -> Iterable[Metric]:
        return ()

    def render(
        self, vms: Sequence[VMState], label_names: Sequence[str], now: float, fmt: Format = TEXT
    ) -> list[str]:
        """The text of what `collect` yields, in ``fmt`` (override to cache)."""
        return [format_families(self.collect(vms, label_names, now), fmt)]


class ConnectionCollector(Collector):
    """The libvirt connections (a few series: formatted by prometheus_client at each scrape)."""

    def __init__(self, connections: Callable[[], Sequence[ConnectionState]]) -> None:
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "qemu_libvirt_up", "1 while the libvirt connection is open and its events flow.", labels=["uri"]
        )
        errors = CounterMetricFamily(
            "qemu_exporter_libvirt_connect_errors",
            "Failed libvirt connection attempts by reason.",
            labels=["uri", "reason"],
        )
        calls = CounterMetricFamily(
            "qemu_exporter_libvirt_call_errors",
            "libvirt calls that failed or timed out (each re-opens the connection).",
            labels=["uri", "call", "reason"],
        )
        for c in sorted(self._connections(), key=lambda c: c.uri):
            up.add_metric([c.uri], 1 if c.up else 0)
            for reason, n in sorted(c.connect_errors.items()):
                errors.add_metric([c.uri, reason], n)
            for (call, reason), n in sorted(c.call_errors.items()):
                calls.add_metric([c.uri, call, reason], n)
        yield from (up, errors, calls)


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
        base = ["vm", *self._static]
        self._base_names = base
        self._disk_names = [*base, "device"]
        self._cache: dict[int, _VMText] = {}
        #: Per format: each family's header lines, and the build info family.
        self._headers: dict[Format, dict[str, str]] = {}
        self._build_text = {fmt: format_families([self._build_family()], fmt) for fmt in (TEXT, OPENMETRICS)}

    def _build_family(self) -> GaugeMetricFamily:
        build = GaugeMetricFamily(
            "qemu_exporter_build_info",
            "Build information of qemu-iohang-exporter.",
            labels=["version", "python_version", "qemu_qmp_version"],
        )
        build.add_metric(list(self._build), 1)
        return build

    def prerender(self, vm: VMState) -> None:
        """Render what changed of ``vm``'s lines now instead of at the next scrape.

        Called after every poll: every VM is polled every few seconds, so by the time
        Prometheus scrapes again (15-60 s) all 4000 disks' blockstats of 1000 VMs changed;
        formatted in the scrape that was ~150 ms, formatted poll by poll it is spread over the
        poll interval and the scrape only joins text."""
        self._cache[id(vm)] = self._refreshed(vm)

    def _refreshed(self, vm: VMState) -> _VMText:
        """``vm``'s cached text, brought up to date (created if it has none)."""
        entry = self._cache.get(id(vm))
        if entry is None or entry.vm is not vm:  # id() of a VM that is gone may be reused
            entry = _VMText(vm)
        entry.refresh(self)
        return entry

    def _render(self, fmt: Format) -> list[str]:
        """The text of `collect`'s families in ``fmt`` from per-VM chunks, re-rendered only
        for VMs that changed since the previous scrape (the chunks serve both formats)."""
        vms = sorted(self._vms(), key=lambda v: (v.vm, v.key))
        h = self._headers.get(fmt)
        if h is None:
            h = self._headers[fmt] = {
                name: family_header(name, doc, typ, fmt, unit) for name, doc, typ, unit in _vm_families()
            }
        cache: dict[int, _VMText] = {}
        chunks: list[_VMText] = []
        for vm in vms:
            entry = cache[id(vm)] = self._refreshed(vm)
            chunks.append(entry)
        self._cache = cache

        parts = [self._build_text[fmt], h["qemu_exporter_vms"]]
        parts.append(f"qemu_exporter_vms {fmt_value(len(vms))}\n")
        for i, name in enumerate(_IDENTITY_FAMILIES):
            parts.append(h[name])
            parts.extend(c.identity[i] for c in chunks)
        parts.append(h["qemu_block_io_error_events"])
        parts.extend(c.counters[0] for c in chunks)
        for i, name in enumerate(_STATS_FAMILIES):
            parts.append(h[name])
            parts.extend(c.stats[i] for c in chunks)
        parts.extend(self._hangs.render([v for v in vms if v.up], self._base_names, self._clock(), fmt))
        for i, name in enumerate(_COUNTER_FAMILIES[1:], start=1):
            parts.append(h[name])
            parts.extend(c.counters[i] for c in chunks)
        return parts

    def _base(self, vm: VMState) -> list[str]:
        return [vm.vm, *(vm.static_labels.get(k, "") for k in self._static)]

    def collect(self) -> Iterator[Metric]:
        fmt = _PRERENDER.get()
        if fmt is not None:
            yield PrerenderedText(self._render(fmt))
            return
        vms = sorted(self._vms(), key=lambda v: (v.vm, v.key))
        base = ["vm", *self._static]
        disk = [*base, "device"]

        yield self._build_family()
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
            "Guest disk, its error policy as read with qom-get, and its storage backend.",
            labels=[*disk, "drive", "node_name", "qdev_type", "werror", "rerror", "backend"],
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
            if vm.retry_feature is not None:  # unknown through libvirt unless a disk retries
                feature.add_metric(b, 1 if vm.retry_feature else 0)
            for dev in sorted(vm.disks):
                d = vm.disks[dev]
                db = [*b, dev]
                p = d.policy
                dev_info.add_metric(
                    [*db, d.drive, d.node_name, d.qdev_type, p.werror, p.rerror, d.backend], 1
                )
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


# Per-VM families of `ExporterCollector.collect`, by the part of VMState they show.
_IDENTITY_FAMILIES = (
    "qemu_qmp_up",
    "qemu_vm_info",
    "qemu_vm_status",
    "qemu_vm_retry_feature",
    "qemu_block_device_info",
    "qemu_block_retry_interval_seconds",
    "qemu_block_retry_timeout_seconds",
    "qemu_block_retry_policy_ok",
    "qemu_block_retry_policy_violation",
)
_STATS_FAMILIES = (*(name for name, _doc, _attr, _kind in _BLOCKSTATS), "qemu_block_idle_seconds")
# qemu_block_io_error_events first: it is yielded among the identity families.
_COUNTER_FAMILIES = (
    "qemu_block_io_error_events",
    "qemu_exporter_qmp_connect_attempts",
    "qemu_exporter_qmp_connect_errors",
    "qemu_exporter_qmp_disconnects",
    "qemu_exporter_qmp_command_errors",
    "qemu_exporter_qmp_events",
    "qemu_exporter_io_error_events_unmatched",
    "qemu_exporter_internal_errors",
)


def _vm_families() -> list[tuple[str, str, str, str]]:
    """(name, help, type, unit) of every family `collect` yields, read from `collect` itself so
    the two can never disagree."""
    collector = ExporterCollector(lambda: (), clock=lambda: 0.0)
    token = _PRERENDER.set(None)
    try:
        return [(m.name, m.documentation, m.type, m.unit) for m in collector.collect()]
    finally:
        _PRERENDER.reset(token)


class _VMText:
    """One VM's sample lines, per family, for each part of its state; rebuilt when it changes."""

    def __init__(self, vm: VMState) -> None:
        self.vm = vm
        self.identity_key: object = None
        self.counters_key: object = None
        self.stats_key: object = None
        self.identity: list[str] = []
        self.counters: list[str] = []
        self.stats: list[str] = []

    def refresh(self, c: ExporterCollector) -> None:
        vm = self.vm
        if self.identity_key != vm.version:
            self.identity_key = vm.version
            self._render_identity(c)
        key = (vm.version, vm.counters_version)
        if self.counters_key != key:
            self.counters_key = key
            self._render_counters(c)
        key = (vm.version, vm.stats_version)
        if self.stats_key != key:
            self.stats_key = key
            self._render_stats(c)

    def _render_identity(self, c: ExporterCollector) -> None:
        vm = self.vm
        b = c._base(vm)
        base = label_text(c._base_names, b)
        out: list[list[str]] = [[] for _ in _IDENTITY_FAMILIES]
        up, info, status, feature, dev_info, interval, timeout, ok, viol = out
        up.append(f"qemu_qmp_up{base} {fmt_value(1 if vm.up else 0)}\n")
        if vm.up:
            names = [*c._base_names, "uuid", "qemu_version", "socket"]
            info.append(f"qemu_vm_info{label_text(names, [*b, vm.uuid, vm.qemu_version, vm.socket])} 1.0\n")
            if vm.status:
                labels = label_text([*c._base_names, "status"], [*b, vm.status])
                status.append(f"qemu_vm_status{labels} 1.0\n")
            if vm.retry_feature is not None:
                feature.append(f"qemu_vm_retry_feature{base} {fmt_value(1 if vm.retry_feature else 0)}\n")
            info_names = [*c._disk_names, "drive", "node_name", "qdev_type", "werror", "rerror", "backend"]
            rule_names = [*c._disk_names, "rule"]
            for dev in sorted(vm.disks):
                d = vm.disks[dev]
                db = [*b, dev]
                dl = label_text(c._disk_names, db)
                p = d.policy
                values = [*db, d.drive, d.node_name, d.qdev_type, p.werror, p.rerror, d.backend]
                labels = label_text(info_names, values)
                dev_info.append(f"qemu_block_device_info{labels} 1.0\n")
                if p.retry_interval_ms is not None:
                    v = fmt_value(p.retry_interval_ms / 1000.0)
                    interval.append(f"qemu_block_retry_interval_seconds{dl} {v}\n")
                if p.retry_timeout_ms is not None:
                    v = fmt_value(p.retry_timeout_ms / 1000.0)
                    timeout.append(f"qemu_block_retry_timeout_seconds{dl} {v}\n")
                ok.append(f"qemu_block_retry_policy_ok{dl} {fmt_value(1 if d.verdict.ok else 0)}\n")
                for rule in d.verdict.violations:
                    labels = label_text(rule_names, [*db, rule.value])
                    viol.append(f"qemu_block_retry_policy_violation{labels} 1.0\n")
        self.identity = ["".join(lines) for lines in out]

    def _render_counters(self, c: ExporterCollector) -> None:
        vm = self.vm
        b = c._base(vm)
        base = label_text(c._base_names, b)
        out: list[list[str]] = [[] for _ in _COUNTER_FAMILIES]
        io_err, attempts, conn_err, disc, cmd_err, events, unmatched, internal = out
        if vm.up:
            names = [*c._disk_names, "operation", "action"]
            for (dev, op, action), n in sorted(vm.io_errors.items()):
                if dev in vm.disks:
                    labels = label_text(names, [*b, dev, op, action])
                    io_err.append(f"qemu_block_io_error_events_total{labels} {fmt_value(n)}\n")
        attempts.append(f"qemu_exporter_qmp_connect_attempts_total{base} {fmt_value(vm.connect_attempts)}\n")
        names = [*c._base_names, "reason"]
        for reason, n in sorted(vm.connect_errors.items()):
            labels = label_text(names, [*b, reason])
            conn_err.append(f"qemu_exporter_qmp_connect_errors_total{labels} {fmt_value(n)}\n")
        disc.append(f"qemu_exporter_qmp_disconnects_total{base} {fmt_value(vm.disconnects)}\n")
        names = [*c._base_names, "command", "reason"]
        for (command, reason), n in sorted(vm.command_errors.items()):
            labels = label_text(names, [*b, command, reason])
            cmd_err.append(f"qemu_exporter_qmp_command_errors_total{labels} {fmt_value(n)}\n")
        names = [*c._base_names, "event"]
        for event, n in sorted(vm.events.items()):
            labels = label_text(names, [*b, event])
            events.append(f"qemu_exporter_qmp_events_total{labels} {fmt_value(n)}\n")
        v = fmt_value(vm.unmatched_io_errors)
        unmatched.append(f"qemu_exporter_io_error_events_unmatched_total{base} {v}\n")
        internal.append(f"qemu_exporter_internal_errors_total{base} {fmt_value(vm.internal_errors)}\n")
        self.counters = ["".join(lines) for lines in out]

    def _render_stats(self, c: ExporterCollector) -> None:
        vm = self.vm
        out: list[list[str]] = [[] for _ in _STATS_FAMILIES]
        if vm.up:
            b = c._base(vm)
            for dev in sorted(vm.disks):
                st = vm.blockstats.get(dev)
                if st is None:
                    continue
                dl = label_text(c._disk_names, [*b, dev])
                for i, (name, _doc, attr, kind) in enumerate(_BLOCKSTATS):
                    sample = name + "_total" if kind == "counter" else name
                    out[i].append(f"{sample}{dl} {fmt_value(getattr(st, attr))}\n")
                if st.idle_s is not None:
                    out[-1].append(f"qemu_block_idle_seconds{dl} {fmt_value(st.idle_s)}\n")
        self.stats = ["".join(lines) for lines in out]
