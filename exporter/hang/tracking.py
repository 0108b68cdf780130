"""Connects the pure hang state machine (`exporter.hang.machine`) to the sources, metrics and disk.

* Feeds each disk's `DiskHangTracker` with the typed events of its VM (timestamps from QEMU),
  blockstats samples and session changes (`EventSink`), whichever source watches the VM.
* Yields the hang metrics at scrape time (`HangView`).
* Ticks twice a second: lets silence end hangs (QEMU announces no recovery), moves completed
  hangs into the host-wide histogram, and persists open hangs so that an exporter restart keeps
  a hang's start (atomic write: temp file, fsync, rename).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from exporter.hang.blast import backend_families
from exporter.hang.machine import CompletedHang, DiskHangTracker, HangOutcome
from exporter.metrics import TEXT, Format, HangView, family_header, fmt_value, format_families, label_text
from exporter.model.events import BlockIOError, RunStateChange, VMEvent
from exporter.model.sink import EventSink
from exporter.model.state import Disk, VMState

log = logging.getLogger("exporter.hang")

#: Buckets of the completed-hang histogram, seconds: retry timeouts are typically 10 s to minutes.
HANG_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

STATE_VERSION = 1

#: Completed hangs kept per disk for the status page (`HangTracking.recent`), and for how long
#: after its latest one ended: enough to tell "flapping" from "one outage", bounded in memory.
RECENT_PER_DISK = 10
RECENT_WINDOW_S = 3600.0


def disk_policy_seconds(disk: Disk) -> tuple[float, float]:
    """(interval, timeout) QEMU applies.  Without visible values, QEMU's device defaults
    (1000 ms, 0) are what acts (domain.md §2)."""
    p = disk.policy
    interval = p.retry_interval_ms / 1000.0 if p.retry_interval_ms is not None else 1.0
    timeout = p.retry_timeout_ms / 1000.0 if p.retry_timeout_ms is not None else 0.0
    return interval, timeout


class _Histogram:
    def __init__(self) -> None:
        self.buckets: dict[HangOutcome, list[int]] = {o: [0] * len(HANG_BUCKETS) for o in HangOutcome}
        self.count: dict[HangOutcome, int] = dict.fromkeys(HangOutcome, 0)
        self.sum: dict[HangOutcome, float] = dict.fromkeys(HangOutcome, 0.0)

    def observe(self, hang: CompletedHang) -> None:
        d = max(0.0, hang.duration)
        o = hang.outcome
        self.count[o] += 1
        self.sum[o] += d
        b = self.buckets[o]
        for i, le in enumerate(HANG_BUCKETS):
            if d <= le:
                b[i] += 1

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(
            "qemu_block_io_hang_completed_duration_seconds",
            "Durations of completed IO hangs on this host, by outcome.",
            labels=["outcome"],
        )
        for o in HangOutcome:
            buckets = [(_le(le), float(n)) for le, n in zip(HANG_BUCKETS, self.buckets[o], strict=True)]
            buckets.append(("+Inf", float(self.count[o])))
            h.add_metric([o.value], buckets, self.sum[o])
        return h


def _le(v: float) -> str:
    return str(float(v))


class HangTracking(EventSink, HangView):
    def __init__(self, margin_s: float, state_file: str | None = None) -> None:
        self.margin_s = margin_s
        self.state_file = state_file
        # VMState.key -> device -> tracker
        self.trackers: dict[str, dict[str, DiskHangTracker]] = {}
        #: The VM of each key in ``trackers``: how far its stream is read (`VMState.read_through`).
        self._vms: dict[str, VMState] = {}
        self.histogram = _Histogram()
        #: (VMState.key, device) -> its latest completed hangs, oldest first (status page).
        self.recent: dict[tuple[str, str], deque[RecentHang]] = {}
        self._saved: dict[str, Any] = self._load()
        self._last_written_key: object = None
        self._task: asyncio.Task[None] | None = None
        #: Called with ``trackers`` after every tick and at once when a hang starts (alert push).
        self.on_change: Callable[[Mapping[str, Mapping[str, DiskHangTracker]]], None] | None = None
        # Scrape-time text cache: per VM key, a version changed by every EventSink call, and
        # the VM's rendered lines (see `render`).
        self._versions: dict[str, int] = {}
        self._text: dict[str, _HangText] = {}
        self._headers: dict[Format, list[str]] = {}
        self._backends: list[GaugeMetricFamily] | None = None  # see `render`

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "ignoring unreadable hang state file", extra={"path": self.state_file, "err": str(exc)}
            )
            return {}
        if (
            not isinstance(doc, dict)
            or doc.get("version") != STATE_VERSION
            or not isinstance(doc.get("disks"), dict)
        ):
            log.warning("ignoring hang state file of another format", extra={"path": self.state_file})
            return {}
        disks: dict[str, Any] = doc["disks"]
        return disks

    def _state_key(self) -> object:
        """What must be persisted changed?  Coarse on purpose: at most one write a second."""
        return tuple(
            (sock, dev, t.hang_start, t.failing, math.floor(t.last_error or 0), tuple(t.hangs_total.values()))
            for sock, devs in sorted(self.trackers.items())
            for dev, t in sorted(devs.items())
        )

    def save(self) -> None:
        if not self.state_file:
            return
        key = self._state_key()
        if key == self._last_written_key:
            return
        disks = dict(self._saved)  # keep entries of VMs not connected right now
        for sock, devs in self.trackers.items():
            disks[sock] = {dev: t.snapshot() for dev, t in devs.items()}
        doc = {"version": STATE_VERSION, "disks": disks}
        directory = os.path.dirname(os.path.abspath(self.state_file))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".hangs-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.state_file)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot write hang state file", extra={"path": self.state_file, "err": str(exc)})
            return
        self._last_written_key = key

    # -- EventSink ---------------------------------------------------------------------

    def _changed(self, key: str) -> None:
        self._versions[key] = next(_versions)

    def on_disks(self, vm: VMState, now: float) -> None:
        self._changed(vm.key)
        self._vms[vm.key] = vm
        devs = self.trackers.setdefault(vm.key, {})
        saved = self._saved.get(vm.key, {})
        for dev in list(devs):
            if dev not in vm.disks:  # unplugged: whatever hang it had cannot go on
                devs[dev].on_vm_gone(now)
                self._drain(devs.pop(dev), vm.key, dev)
        for dev, disk in vm.disks.items():
            interval, timeout = disk_policy_seconds(disk)
            tracker = devs.get(dev)
            if tracker is not None:
                tracker.set_policy(interval, timeout)
                self._found_stopped(vm, dev, tracker, now)
                continue
            snap = saved.pop(dev, None) if isinstance(saved, dict) else None
            if snap is not None:
                try:
                    tracker = DiskHangTracker.restore(
                        snap, now, retry_interval_s=interval, retry_timeout_s=timeout, margin_s=self.margin_s
                    )
                    if tracker.hanging:
                        log.info(
                            "resumed open hang from state file",
                            extra={"vm": vm.vm, "device": dev, "start": tracker.hang_start},
                        )
                except ValueError as exc:
                    log.warning(
                        "ignoring saved hang state", extra={"vm": vm.vm, "device": dev, "err": str(exc)}
                    )
                    tracker = None
            devs[dev] = tracker = tracker or DiskHangTracker(interval, timeout, self.margin_s)
            self._found_stopped(vm, dev, tracker, now)
            if vm.status in ("paused", "io-error"):
                tracker.on_stop(now)

    def _found_stopped(self, vm: VMState, dev: str, tracker: DiskHangTracker, now: float) -> None:
        """A VM already paused on this disk's IO error when first seen (or seen again) shows
        the hang from that moment: an operator must see a VM stuck since before the exporter
        started (docs/hangs.md, "first seen")."""
        if vm.status == "io-error" and dev in vm.io_failed and not tracker.hanging:
            tracker.on_found_stopped(now)
            log.info("found VM paused on an IO error", extra={"vm": vm.vm, "device": dev})
            if self.on_change is not None:
                self.on_change(self.trackers)

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        devs = self.trackers.get(vm.key)
        if not devs:
            return
        self._changed(vm.key)
        ts = event.time
        if ts is None:
            return
        if isinstance(event, BlockIOError):
            tracker = devs.get(event.device) if event.device is not None else None
            if tracker is not None:
                was_hanging = tracker.hanging
                tracker.on_io_error(ts, event.action)
                if not was_hanging and tracker.hanging and self.on_change is not None:
                    self.on_change(self.trackers)
        elif isinstance(event, RunStateChange):
            if event.name == "STOP":
                for t in devs.values():
                    t.on_stop(ts)
            elif event.name == "RESUME":
                for t in devs.values():
                    t.on_resume(ts)
            elif event.name in ("SHUTDOWN", "RESET"):
                for t in devs.values():
                    t.on_vm_gone(ts)

    def on_blockstats(self, vm: VMState, now: float) -> None:
        devs = self.trackers.get(vm.key)
        if not devs:
            return
        # A sample changes what is shown only of a hanging or failing disk: every 5 s per VM,
        # an idle VM keeps its rendered text.
        if any(t.hanging or t.failing for t in devs.values()):
            self._changed(vm.key)
        for dev, st in vm.blockstats.items():
            t = devs.get(dev)
            if t is not None:
                t.on_blockstats(now, st.ok_ops)

    def on_session_start(self, vm: VMState, now: float) -> None:
        self._changed(vm.key)
        for t in self.trackers.get(vm.key, {}).values():
            t.on_reconnect(now)

    def on_session_end(self, vm: VMState, now: float, vm_gone: bool) -> None:
        self._changed(vm.key)
        for t in self.trackers.get(vm.key, {}).values():
            if vm_gone:
                t.on_vm_gone(now)
            else:
                t.on_disconnect(now)

    def on_connect_failed(self, vm: VMState, now: float, reason: str) -> None:
        # Nothing listens on the socket: the QEMU process is gone, and with it any hang.
        if reason in ("refused", "not_found"):
            self.on_removed(vm, now)

    def on_removed(self, vm: VMState, now: float) -> None:
        self._changed(vm.key)
        devs = self.trackers.pop(vm.key, {})
        for dev, t in devs.items():
            t.on_vm_gone(now)
            self._drain(t, vm.key, dev)
        self._saved.pop(vm.key, None)
        self._vms.pop(vm.key, None)  # after the drain: the recent hangs keep the VM's name

    # -- ticking -----------------------------------------------------------------------

    def _drain(self, tracker: DiskHangTracker, key: str, device: str) -> None:
        if tracker.has_completed:
            ring = self.recent.get((key, device))
            if ring is None:
                ring = self.recent[(key, device)] = deque(maxlen=RECENT_PER_DISK)
            known = self._vms.get(key)
            vm = known.vm if known is not None else key
            for hang in tracker.drain_completed():
                self.histogram.observe(hang)
                ring.append(RecentHang(vm, device, hang))

    def _forget_old(self, now: float) -> None:
        """Drop the recent hangs of disks whose latest hang ended over `RECENT_WINDOW_S` ago."""
        cutoff = now - RECENT_WINDOW_S
        for k in [k for k, ring in self.recent.items() if not ring or ring[-1].hang.end < cutoff]:
            del self.recent[k]

    def _read_through(self, key: str, now: float) -> float:
        vm = self._vms.get(key)
        return now if vm is None else vm.read_through(now)

    def tick(self, now: float) -> None:
        """Let silence end hangs: each VM's trackers are advanced to the time up to which its
        stream is read, not to ``now`` (a reader behind in a storm is no silence)."""
        for key, devs in self.trackers.items():
            through: float | None = None
            for dev, t in devs.items():
                if t.active:  # an idle tracker has nothing to learn from the time
                    if through is None:
                        through = self._read_through(key, now)
                    t.advance(through)
                self._drain(t, key, dev)
        self._forget_old(now)
        self.save()
        if self.on_change is not None:
            self.on_change(self.trackers)

    async def run(self, clock: Any, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick(clock())
            except Exception:
                log.exception("hang tracking tick failed")

    # -- HangView ----------------------------------------------------------------------

    def collect(self, vms: Sequence[VMState], label_names: Sequence[str], now: float) -> Iterable[Metric]:
        disk = [*label_names, "device"]
        hang = GaugeMetricFamily("qemu_block_io_hang", "1 while IO on the disk is hanging.", labels=disk)
        duration = GaugeMetricFamily(
            "qemu_block_io_hang_duration_seconds", "Age of the current IO hang, 0 when none.", labels=disk
        )
        start = GaugeMetricFamily(
            "qemu_block_io_hang_start_timestamp_seconds",
            "Unix time the current IO hang started.",
            labels=disk,
        )
        deadline = GaugeMetricFamily(
            "qemu_block_io_hang_deadline_timestamp_seconds",
            "Unix time the current IO hang reaches retry_timeout.",
            labels=disk,
        )
        failing = GaugeMetricFamily(
            "qemu_block_io_failing", "1 while IO errors reach the guest (after a timeout).", labels=disk
        )
        total = CounterMetricFamily(
            "qemu_block_io_hangs", "Completed IO hangs by outcome.", labels=[*disk, "outcome"]
        )
        seconds = CounterMetricFamily(
            "qemu_block_io_hang_seconds", "Seconds spent in IO hangs (completed and current).", labels=disk
        )
        for vm in vms:
            devs = self.trackers.get(vm.key, {})
            base = [vm.vm, *(vm.static_labels.get(k, "") for k in label_names[1:])]
            through = vm.read_through(now)
            for dev in sorted(vm.disks):
                t = devs.get(dev)
                if t is None:
                    continue
                t.advance(through)
                labels = [*base, dev]
                hang.add_metric(labels, 1 if t.hanging else 0)
                duration.add_metric(labels, t.duration(now))
                if t.hang_start is not None:
                    start.add_metric(labels, t.hang_start)
                if t.deadline is not None:
                    deadline.add_metric(labels, t.deadline)
                failing.add_metric(labels, 1 if t.failing else 0)
                for outcome, n in t.hangs_total.items():
                    total.add_metric([*labels, outcome.value], n)
                seconds.add_metric(labels, t.hang_seconds_total(now))
        for key, devs in self.trackers.items():
            for dev, t in devs.items():
                self._drain(t, key, dev)
        per_disk = [hang, duration, start, deadline, failing, total, seconds, self.histogram.family()]
        return [*per_disk, *backend_families(vms, self.trackers)]

    def render(
        self, vms: Sequence[VMState], label_names: Sequence[str], now: float, fmt: Format = TEXT
    ) -> list[str]:
        """The text of `collect` in ``fmt``, reusing a VM's lines while neither the VM nor its
        trackers changed and none of its disks is hanging or failing (only those depend on
        time).  The lines are the same in both formats; headers and histogram are not."""
        headers = self._headers.get(fmt)
        if headers is None:
            headers = self._headers[fmt] = [
                family_header(m.name, m.documentation, m.type, fmt, m.unit)
                for m in list(self.collect([], label_names, now))[:_PER_DISK_FAMILIES]
            ]
        cache: dict[str, _HangText] = {}
        chunks: list[_HangText] = []
        names = tuple(label_names)
        rendered = 0
        for vm in vms:
            key = (vm.version, self._versions.get(vm.key), names)
            entry = self._text.get(vm.key)
            # Unchanged and idle: its trackers have nothing to say about the passing time
            # (`DiskHangTracker.advance` only ends hangs and failing periods), so neither they
            # nor their lines are touched.  Most VMs of a host are in that case at any scrape.
            if entry is None or entry.vm is not vm or entry.key != key or entry.volatile:
                devs = self.trackers.get(vm.key, {})
                used = [(dev, devs[dev]) for dev in sorted(vm.disks) if dev in devs]
                through: float | None = None
                for dev, t in used:
                    if t.active:
                        if through is None:
                            through = vm.read_through(now)
                        t.advance(through)
                    self._drain(t, vm.key, dev)
                # Label text depends on the VM's identity only: a hanging VM is re-rendered at
                # every scrape, its labels need not be.
                same_labels = entry is not None and entry.vm is vm and entry.key[0::2] == key[0::2]
                labels = entry.labels if entry is not None and same_labels else {}
                entry = _HangText(vm, key, used, label_names, now, labels)
                rendered += 1
            cache[vm.key] = entry
            chunks.append(entry)
        # The per-backend counts depend on exactly what re-renders a VM's lines (its disks, its
        # trackers, its hanging or failing disks) and on which VMs are shown: recounted only
        # then, not over all 4000 disks of an idle host at every scrape (~2.5 ms at 1000 VMs).
        if rendered or self._backends is None or cache.keys() != self._text.keys():
            self._backends = backend_families(vms, self.trackers)
        self._text = cache
        parts: list[str] = []
        for i, header in enumerate(headers):
            parts.append(header)
            parts.extend(c.lines[i] for c in chunks)
        parts.append(format_families([self.histogram.family(), *self._backends], fmt))
        return parts


_versions = itertools.count(1)
#: Families of `HangTracking.collect` rendered per VM by `_HangText`; the histogram and the
#: per-backend aggregates follow them, formatted at each scrape.
_PER_DISK_FAMILIES = 7


@dataclass(frozen=True, slots=True)
class RecentHang:
    """A completed hang with the VM (its `vm` label when it ended) and device it happened on."""

    vm: str
    device: str
    hang: CompletedHang


class _HangText:
    """One VM's hang sample lines, per family of `HangTracking.collect` (histogram aside).

    A hanging disk's lines are re-rendered at every scrape (its duration grows), but only two
    of its nine change with time: the others are kept per disk while its hang, deadline,
    failing state and counts stay (``_DiskLines``).  In a storm, with all 4000 disks of 1000
    VMs hanging, this was 46 % of a scrape's CPU (py-spy, 20,000 events/s, round 3)."""

    def __init__(
        self,
        vm: VMState,
        key: tuple[int, int | None, tuple[str, ...]],
        trackers: list[tuple[str, DiskHangTracker]],
        label_names: Sequence[str],
        now: float,
        labels: dict[str, _DiskLines],
    ) -> None:
        self.vm = vm
        self.key = key
        #: Per device: its label text and steady lines (reused while the VM's identity and
        #: the label names stay the same).
        self.labels = labels
        self.volatile = any(t.hanging or t.failing for _dev, t in trackers)
        out: list[list[str]] = [[] for _ in range(7)]
        hang, duration, start, deadline, failing, total, seconds = out
        base: list[str] | None = None
        for dev, t in trackers:
            cached = labels.get(dev)
            if cached is None:
                if base is None:
                    base = [vm.vm, *(vm.static_labels.get(k, "") for k in label_names[1:])]
                cached = labels[dev] = _DiskLines([*label_names, "device"], [*base, dev])
            steady = cached.steady(t)
            dl = cached.dl
            hang.append(steady[0])
            duration.append(f"qemu_block_io_hang_duration_seconds{dl} {fmt_value(t.duration(now))}\n")
            start.append(steady[1])
            deadline.append(steady[2])
            failing.append(steady[3])
            total.append(steady[4])
            seconds.append(f"qemu_block_io_hang_seconds_total{dl} {fmt_value(t.hang_seconds_total(now))}\n")
        self.lines = ["".join(lines) for lines in out]


class _DiskLines:
    """A disk's label text and the lines of its state that do not change with time."""

    __slots__ = ("_key", "_outcomes", "_steady", "dl")

    def __init__(self, names: list[str], values: list[str]) -> None:
        self.dl = label_text(names, values)
        self._outcomes = {o: label_text([*names, "outcome"], [*values, o.value]) for o in HangOutcome}
        self._key: object = None
        self._steady: tuple[str, str, str, str, str] = ("", "", "", "", "")

    def steady(self, t: DiskHangTracker) -> tuple[str, str, str, str, str]:
        """(hang, start, deadline, failing, hangs_total) lines; "" where there is no sample."""
        key = (t.hang_start, t.deadline, t.failing, tuple(t.hangs_total.values()))
        if key != self._key:
            dl = self.dl
            start = (
                ""
                if t.hang_start is None
                else f"qemu_block_io_hang_start_timestamp_seconds{dl} {fmt_value(t.hang_start)}\n"
            )
            deadline = (
                ""
                if t.deadline is None
                else f"qemu_block_io_hang_deadline_timestamp_seconds{dl} {fmt_value(t.deadline)}\n"
            )
            total = "".join(
                f"qemu_block_io_hangs_total{self._outcomes[outcome]} {fmt_value(n)}\n"
                for outcome, n in t.hangs_total.items()
            )
            self._steady = (
                f"qemu_block_io_hang{dl} {fmt_value(1 if t.hanging else 0)}\n",
                start,
                deadline,
                f"qemu_block_io_failing{dl} {fmt_value(1 if t.failing else 0)}\n",
                total,
            )
            self._key = key
        return self._steady
