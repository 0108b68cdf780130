"""Connects the pure hang state machine (`exporter.hang.machine`) to the sources, metrics and disk.

* Feeds each disk's `DiskHangTracker` with the typed events of its VM (timestamps from QEMU),
  blockstats samples and session changes (`EventSink`), whichever source watches the VM.
* Gives a scrape the trackers to show (`exporter.metrics.HangSource`).
* Ticks twice a second: lets silence end hangs (QEMU announces no recovery), moves completed
  hangs into the host-wide histogram, the recent hangs and the hang journal (`on_completed`),
  and persists both the open hangs (so
  that an exporter restart keeps a hang's start) and the recent ones (the status page's
  history) (atomic write: temp file, fsync, rename).
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

from exporter.hang.blast import BackendCounts, backend_counts
from exporter.hang.machine import DiskHangTracker
from exporter.hang.outcome import CompletedHang, HangOutcome
from exporter.model.events import BlockIOError, BlockIOErrorRun, RunStateChange, VMEvent
from exporter.model.sink import EventSink
from exporter.model.state import Disk, VMState

log = logging.getLogger("exporter.hang")

#: Buckets of the completed-hang histogram, seconds: retry timeouts are typically 10 s to minutes.
HANG_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

STATE_VERSION = 1

#: Least time between two `HangTracking.on_change` calls for hangs that start (the alert push
#: learns of a new hang at most this late; each call walks every tracker).
CHANGE_COALESCE_S = 0.1

#: Completed hangs kept per disk for the status page (`HangTracking.recent`), and for how long
#: after its latest one ended: enough to tell "flapping" from "one outage", bounded in memory.
RECENT_PER_DISK = 10
RECENT_WINDOW_S = 3600.0

#: A blind interval still going on is told again once it grew by this much (`apply_blind`).
BLIND_STEP_S = 0.25


def disk_policy_seconds(disk: Disk) -> tuple[float, float]:
    """(interval, timeout) QEMU applies.  Without visible values, QEMU's device defaults
    (1000 ms, 0) are what acts (domain.md §2)."""
    p = disk.policy
    interval = p.retry_interval_ms / 1000.0 if p.retry_interval_ms is not None else 1.0
    timeout = p.retry_timeout_ms / 1000.0 if p.retry_timeout_ms is not None else 0.0
    return interval, timeout


class Histogram:
    """The completed hangs' durations per outcome, in `HANG_BUCKETS` (cumulative), their count
    and their sum: what `exporter.metrics` shows as a Prometheus histogram."""

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


class HangTracking(EventSink):
    def __init__(self, margin_s: float, state_file: str | None = None) -> None:
        self.margin_s = margin_s
        self.state_file = state_file
        # VMState.key -> device -> tracker
        self.trackers: dict[str, dict[str, DiskHangTracker]] = {}
        #: The VM of each key in ``trackers``: how far its stream is read (`VMState.read_through`).
        self._vms: dict[str, VMState] = {}
        self.histogram = Histogram()
        doc = self._load()
        #: (VMState.key, device) -> its latest completed hangs, oldest first (status page).
        self.recent: dict[tuple[str, str], deque[RecentHang]] = restore_recent(doc.get("recent"))
        self._saved: dict[str, Any] = doc.get("disks", {})
        self._last_written_key: object = None
        self._task: asyncio.Task[None] | None = None
        #: Called with ``trackers`` after every tick and as soon as hangs start (alert push).
        self.on_change: Callable[[Mapping[str, Mapping[str, DiskHangTracker]]], None] | None = None
        self._change_pending = False
        self._last_told = -math.inf
        #: Called with (VMState.key, device, hang, retry_timeout_s) for each completed hang, as
        #: it is drained (the hang journal, `exporter.hang.journal`).
        self.on_completed: Callable[[str, str, CompletedHang, float], None] | None = None
        #: Per VM key, a version changed by every EventSink call (`version`): the scrape's
        #: text cache re-renders a VM's hang lines only when it moved.
        self._versions: dict[str, int] = {}
        #: The latest interval in which the exporter's event loop did not run (wall clock), or
        #: None (`exporter.runtime.liveness.Liveness.loop_blind`); `apply_blind` reads it.
        self.loop_blind: Callable[[], tuple[float, float] | None] | None = None
        self._blind_until = -math.inf

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        """The state file's document (``disks``: each tracker's snapshot; ``recent``: the
        recent hangs, `save_recent`), or {} when there is none worth reading."""
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
        return doc

    def _state_key(self) -> object:
        """What must be persisted changed?  Coarse on purpose: at most one write a second."""
        trackers = tuple(
            (sock, dev, t.hang_start, t.failing, math.floor(t.last_error or 0), tuple(t.hangs_total.values()))
            for sock, devs in sorted(self.trackers.items())
            for dev, t in sorted(devs.items())
        )
        return trackers, sum(map(len, self.recent.values()))

    def save(self) -> None:
        if not self.state_file:
            return
        key = self._state_key()
        if key == self._last_written_key:
            return
        disks = dict(self._saved)  # keep entries of VMs not connected right now
        for sock, devs in self.trackers.items():
            disks[sock] = {dev: t.snapshot() for dev, t in devs.items()}
        doc = {"version": STATE_VERSION, "disks": disks, "recent": save_recent(self.recent)}
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
            self._hang_started()

    def on_event(self, vm: VMState, event: VMEvent) -> None:
        devs = self.trackers.get(vm.key)
        if not devs:
            return
        self._changed(vm.key)
        ts = event.time
        if ts is None:
            return
        if type(event) is BlockIOError or type(event) is BlockIOErrorRun:  # (type(): the fastest test)
            tracker = devs.get(event.device) if event.device is not None else None
            if tracker is not None:
                was_hanging = tracker.hanging
                if type(event) is BlockIOErrorRun:  # several, coalesced (libvirt, while behind)
                    tracker.on_io_errors(event.first, ts, event.events, event.max_gap, event.action)
                else:
                    tracker.on_io_error(ts, event.action)
                if not was_hanging and tracker.hanging:
                    self._hang_started()
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

    def _hang_started(self) -> None:
        """Tell `on_change` soon: at once after a quiet spell, then at most every
        `CHANGE_COALESCE_S`, however many hangs start meanwhile.  `on_change` walks every tracker
        (the alert push's snapshot of open hangs): called per hang start it was quadratic when a
        host's storage failed, 4000 disks starting to hang held the loop for 17 s at 1000 VMs
        (measured: docs/performance-history.md)."""
        if self.on_change is None or self._change_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # fed synchronously (tests, tools): no loop to wait on
            self.on_change(self.trackers)
            return
        self._change_pending = True
        at = self._last_told + CHANGE_COALESCE_S
        if at <= loop.time():
            loop.call_soon(self._tell_change)
        else:
            loop.call_at(at, self._tell_change)

    def _tell_change(self) -> None:
        self._change_pending = False
        self._last_told = asyncio.get_running_loop().time()
        if self.on_change is not None:
            self.on_change(self.trackers)

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
                if self.on_completed is not None:
                    self.on_completed(key, device, hang, tracker.retry_timeout_s)

    def _forget_old(self, now: float) -> None:
        """Drop the recent hangs of disks whose latest hang ended over `RECENT_WINDOW_S` ago."""
        cutoff = now - RECENT_WINDOW_S
        for k in [k for k, ring in self.recent.items() if not ring or ring[-1].hang.end < cutoff]:
            del self.recent[k]

    def _read_through(self, key: str, now: float) -> float:
        vm = self._vms.get(key)
        return now if vm is None else vm.read_through(now)

    def _advance(self, key: str, trackers: Iterable[tuple[str, DiskHangTracker]], now: float) -> None:
        """Advance the VM's active trackers to the time up to which its stream is read, not to
        ``now`` (a reader behind in a storm is no silence; an idle tracker has nothing to learn
        from the time), and drain their completed hangs."""
        through: float | None = None
        for dev, t in trackers:
            if t.active:
                if through is None:
                    through = self._read_through(key, now)
                t.advance(through)
            self._drain(t, key, dev)

    def apply_blind(self) -> None:
        """Tell every tracker of the latest interval in which the event loop did not run
        (`loop_blind`), once: before any silence is inferred (`tick`, `shown`, the status),
        since after a stop any of them may run before the heartbeat that measures it.  A gap
        still going on grows while it is read: it is told again only once it grew by a
        heartbeat, so that a scrape right after a stop does not walk every tracker per VM."""
        gap = self.loop_blind() if self.loop_blind is not None else None
        if gap is None or gap[1] < self._blind_until + BLIND_STEP_S:
            return
        self._blind_until = gap[1]
        for devs in self.trackers.values():
            for t in devs.values():
                t.on_blind(*gap)

    def tick(self, now: float) -> None:
        """Let silence end hangs (`_advance`), forget old recent hangs, persist, tell."""
        self.apply_blind()
        for key, devs in self.trackers.items():
            self._advance(key, devs.items(), now)
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

    # -- what a scrape shows (`exporter.metrics.HangSource`) ----------------------------------

    def version(self, key: str) -> int | None:
        return self._versions.get(key)

    def shown(self, vm: VMState, now: float) -> list[tuple[str, DiskHangTracker]]:
        """``vm``'s trackers by device, advanced (`_advance`)."""
        devs = self.trackers.get(vm.key, {})
        used = [(dev, devs[dev]) for dev in sorted(vm.disks) if dev in devs]
        self.apply_blind()
        self._advance(vm.key, used, now)
        return used

    def backend_counts(self, vms: Sequence[VMState]) -> dict[str, BackendCounts]:
        """The per-backend counts (`exporter.hang.blast`) of the disks of ``vms``."""
        return backend_counts(vms, self.trackers)


_versions = itertools.count(1)


def save_recent(rings: Mapping[tuple[str, str], Iterable[RecentHang]]) -> list[list[Any]]:
    """The recent hangs as the state file keeps them: ``[key, device, vm, start, end,
    outcome]`` each, so that the status page's history survives a restart (an upgrade in the
    middle of an incident)."""
    return [
        [key, r.device, r.vm, r.hang.start, r.hang.end, r.hang.outcome.value]
        for (key, _device), ring in rings.items()
        for r in ring
    ]


def restore_recent(raw: object) -> dict[tuple[str, str], deque[RecentHang]]:
    """`save_recent`'s list back as rings; an entry that is not one (a file from another
    version, or edited) is left out, not fatal.  Old entries are dropped at the first tick."""
    rings: dict[tuple[str, str], deque[RecentHang]] = {}
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, list) or len(item) != 6:
            continue
        key, device, vm, start, end, outcome = item
        if not all(isinstance(x, str) for x in (key, device, vm)):
            continue
        try:
            hang = CompletedHang(float(start), float(end), HangOutcome(outcome))
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(hang.start) and math.isfinite(hang.end)) or hang.end < hang.start:
            continue
        ring = rings.get((key, device))
        if ring is None:
            ring = rings[(key, device)] = deque(maxlen=RECENT_PER_DISK)
        ring.append(RecentHang(vm, device, hang))
    return rings


@dataclass(frozen=True, slots=True)
class RecentHang:
    """A completed hang with the VM (its `vm` label when it ended) and device it happened on."""

    vm: str
    device: str
    hang: CompletedHang
