"""Push path: the exporter posts its hang alerts straight to Alertmanager (opt-in).

Why
===
A disk with ``retry_timeout=10s`` fails its guest 10 s after the first failed attempt.  The rules
in ``alerts/qemu-iohang.rules.yml`` need a scrape and an evaluation (plus Prometheus' own send
delay) before Alertmanager hears of the hang, which with typical intervals is after the guest has
already seen the error.  So the exporter, which learns of the hang from QEMU's first
``BLOCK_IO_ERROR`` event, posts the alerts itself to Alertmanager's v2 API
(``POST /api/v2/alerts``):

* ``QemuDiskIOHang`` (severity ``warning``) when the hang has lasted as long as the rule
  requires: ``max(HANG_MIN_SECONDS, HANG_MIN_RETRY_INTERVALS x retry_interval)`` (30 s, 3 x;
  ``exporter/model/alerts.py``, which the rule generator reads too), so a blip never pages;
* ``QemuIOHangApproachingTimeout`` (``warning``) when the hang has used ``fractions.warning``
  (default: the rule's 0.5) of its ``retry_timeout``, and ``QemuIOHangNearTimeout``
  (``critical``) at ``fractions.critical`` (0.8) — at once, only for disks with a non-zero
  timeout, like the rules;
* each resolved (``endsAt`` = now) when the hang ends (any outcome).

Their annotations are the rules' (``exporter/model/alerts.py``): the same summary and runbook link
(``alerting.runbook_base_url``, default the rules' ``docs/runbooks.md``), and the rule's
description template rendered with the alert's labels and ``$value`` at the crossing (the
threshold: the hang's age, or the share of the timeout), as Prometheus renders it when the rule
first fires.

A clean shutdown does not resolve the pushed alerts: the state file keeps open hangs across a
restart, and the restarted exporter pushes them again (same labels, same ``startsAt``) as soon as
it has read the VM's disks, so a restart within ``endsAt`` (4 x the resend interval) neither
resolves nor re-fires a real hang; a hang that ended while the exporter was down is pushed once
more and resolved when the restored tracker sees it is over, or, if the exporter never comes
back, expires at its ``endsAt``.

The pushed alerts carry **exactly the labels the rules' alerts carry** — ``alertname``,
``severity``, the series labels (``vm``, ``device``, the configured static labels), the
``instance`` and ``job`` Prometheus attaches to the scraped series (configured, since the exporter
cannot know them), and Prometheus' ``external_labels`` if any — so Alertmanager sees one alert
(same fingerprint) whichever of the two paths reported it first, and keeps the earliest
``startsAt``.  If the push fails, the rule still fires.

Design
======
:func:`desired_alerts` is a pure function of a snapshot of the open hangs and the time.  An
:class:`AlertPusher` (its own asyncio task) receives snapshots through :meth:`AlertPusher.update`
(synchronous, O(1), never blocks: call it from the hang tick), diffs what should fire against what
was sent, and

* queues new or changed alerts at once, firing ones again every ``resend_interval_seconds``
  (Alertmanager resolves an alert whose ``endsAt`` passed; firing alerts are sent with
  ``endsAt = now + 4 x resend interval``, like Prometheus does, so a dead exporter's alerts
  resolve by themselves), and resolutions of alerts that are no longer wanted;
* sleeps until the earliest of: a new snapshot, the next threshold crossing
  (:func:`next_crossing`), the next resend — so a crossing is posted when it happens, not at
  the next tick;
* posts through one sender task per Alertmanager with a bounded, coalescing queue (one entry per
  alert: a newer state replaces an unsent older one; beyond ``max_pending`` the oldest entries
  are dropped and counted), aiohttp with a total timeout, retried with capped exponential backoff
  and jitter while the Alertmanager is down.

Self-metrics (registered only when alerting is configured; :meth:`AlertPusher.collect`):
`exporter.metrics.ALERT_PUSHES` and `exporter.metrics.ALERT_PUSH_DROPPED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.config import AlertingConfig
from exporter.metrics import ALERT_PUSH_DROPPED, ALERT_PUSHES
from exporter.model.alerts import (
    ALERT_HANG,
    FRACTION_ALERTS,
    hang_alert_threshold,
    hang_annotations,
    render_template,
    runbook_url,
    timeout_fraction_annotations,
)

__all__ = [
    "ALERT_HANG",
    "Alert",
    "AlertPusher",
    "OpenHang",
    "desired_alerts",
    "next_crossing",
    "open_hangs",
]

if TYPE_CHECKING:
    from exporter.model.state import Disk

log = logging.getLogger("exporter.alerting.push")

API_PATH: Final[str] = "/api/v2/alerts"
#: Labels the exporter sets itself; static/external labels may not override them.
RESERVED_LABELS: Final[frozenset[str]] = frozenset(
    {"alertname", "severity", "vm", "device", "instance", "job"}
)
#: A crossing is treated as reached this much early (timer wake-up granularity, clock skew
#: between asyncio's monotonic clock and the wall clock of QEMU's timestamps).
_CROSSING_SLACK_S: Final[float] = 0.002


@dataclass(frozen=True, slots=True)
class OpenHang:
    """One hanging disk, as the pusher needs it."""

    vm: str
    device: str
    #: Static labels of the VM (only non-empty values: an empty label is no label in Prometheus).
    labels: tuple[tuple[str, str], ...]
    #: Unix time the hang started (QEMU's timestamp of the first failed attempt).
    start: float
    #: retry_timeout in seconds; 0 = never times out.
    retry_timeout: float
    #: retry_interval in seconds; None when the disk shows none (no
    #: `exporter.metrics.RETRY_INTERVAL` series: the rule then uses its seconds alone).
    retry_interval: float | None = None


LabelSet = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert that should be firing.  ``labels`` (sorted) identify it, like Alertmanager's
    fingerprint; a change of ``annotations`` or ``starts_at`` is re-sent at once."""

    labels: LabelSet
    annotations: LabelSet
    starts_at: float

    def payload(self, now: float, ends_at: float, generator_url: str) -> dict[str, Any]:
        p: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": _rfc3339(min(self.starts_at, now)),
            "endsAt": _rfc3339(ends_at),
        }
        if generator_url:
            p["generatorURL"] = generator_url
        return p


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _labels(cfg: AlertingConfig, name: str, severity: str, hang: OpenHang) -> LabelSet:
    labels: dict[str, str] = {k: v for k, v in cfg.external_labels.items() if v}
    labels.update((k, v) for k, v in hang.labels if v and k not in RESERVED_LABELS)
    labels.update(alertname=name, severity=severity, vm=hang.vm, device=hang.device, job=cfg.job)
    if cfg.instance:
        labels["instance"] = cfg.instance
    return tuple(sorted(labels.items()))


@functools.lru_cache(maxsize=65536)
def _render(text: str, labels: LabelSet, value: float) -> str:
    """Rendering is the costly part of planning; an open hang's texts never change."""
    return render_template(text, dict(labels), value)


def _alert(
    cfg: AlertingConfig,
    name: str,
    severity: str,
    hang: OpenHang,
    texts: tuple[str, str],
    value: float,
    starts_at: float,
) -> Alert:
    """The alert with the rule's annotations, its templates rendered with ``value``."""
    labels = _labels(cfg, name, severity, hang)
    summary, description = (_render(t, labels, value) for t in texts)
    annotations = (
        ("description", description),
        ("runbook_url", runbook_url(cfg.runbook_base_url, name)),
        ("summary", summary),
    )
    return Alert(labels, annotations, starts_at)


def _thresholds(hang: OpenHang, cfg: AlertingConfig) -> Iterator[tuple[str, float, float]]:
    """(alert name, threshold value, crossing time) of every pushed alert of a hang; the value is
    the rule's ``$value`` at the crossing (the hang's age, or the share of retry_timeout)."""
    if cfg.hang_alert:
        after = hang_alert_threshold(hang.retry_interval)
        yield ALERT_HANG, after, hang.start + after
    if hang.retry_timeout <= 0:
        return
    for severity, fraction in cfg.fractions.items():
        if severity in FRACTION_ALERTS:
            yield FRACTION_ALERTS[severity], fraction, hang.start + fraction * hang.retry_timeout


_SEVERITY: Final[Mapping[str, str]] = {ALERT_HANG: "warning", **{n: s for s, n in FRACTION_ALERTS.items()}}


def desired_alerts(hangs: Iterable[OpenHang], now: float, cfg: AlertingConfig) -> dict[LabelSet, Alert]:
    """The alerts that should be firing at ``now`` for these open hangs (pure)."""
    out: dict[LabelSet, Alert] = {}
    for h in hangs:
        for name, value, at in _thresholds(h, cfg):
            if now + _CROSSING_SLACK_S < at:
                continue
            texts = hang_annotations() if name == ALERT_HANG else timeout_fraction_annotations(name, value)
            a = _alert(cfg, name, _SEVERITY[name], h, texts, value, at)
            out[a.labels] = a
    return out


def next_crossing(hangs: Iterable[OpenHang], now: float, cfg: AlertingConfig) -> float | None:
    """The earliest threshold crossing after ``now`` (None: none pending)."""
    best: float | None = None
    for h in hangs:
        for _name, _value, at in _thresholds(h, cfg):
            if at > now + _CROSSING_SLACK_S and (best is None or at < best):
                best = at
    return best


class _TrackerLike(Protocol):
    @property
    def hanging(self) -> bool: ...
    @property
    def hang_start(self) -> float | None: ...
    @property
    def retry_timeout_s(self) -> float: ...
    @property
    def retry_interval_s(self) -> float: ...


class _VMLike(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def vm(self) -> str: ...
    @property
    def static_labels(self) -> dict[str, str]: ...
    @property
    def disks(self) -> Mapping[str, Disk]: ...


def open_hangs(
    trackers: Mapping[str, Mapping[str, _TrackerLike]], vms: Iterable[_VMLike]
) -> tuple[OpenHang, ...]:
    """Snapshot of the open hangs: ``trackers`` is ``HangTracking.trackers`` (VM key -> device ->
    DiskHangTracker), ``vms`` the watched VMs for the VM name, static labels and disks.
    Disks of VMs not watched any more are left out (the metrics leave them out too).  A disk
    whose policy shows no retry_interval (no `exporter.metrics.RETRY_INTERVAL` series) gets
    ``retry_interval=None``, as the rule sees it; otherwise the tracker's (the same value)."""
    out: list[OpenHang] = []
    for vm in vms:
        devs = trackers.get(vm.key)
        if not devs:
            continue
        static = tuple(sorted((k, v) for k, v in vm.static_labels.items() if v))
        for dev, t in devs.items():
            start = t.hang_start
            if t.hanging and start is not None:
                disk = vm.disks.get(dev)
                shown = disk is None or disk.policy.retry_interval_ms is not None
                interval = t.retry_interval_s if shown else None
                out.append(OpenHang(vm.vm, dev, static, start, t.retry_timeout_s, interval))
    out.sort(key=lambda h: (h.vm, h.device))
    return tuple(out)


@dataclass
class _Sent:
    alert: Alert
    at: float


def _display_url(url: str) -> str:
    """The URL without user:password (for labels and logs)."""
    u = urllib.parse.urlsplit(url)
    netloc = u.hostname or ""
    if u.port is not None:
        netloc += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path.rstrip("/"), "", ""))


class _Target:
    """One Alertmanager: a coalescing queue and the task that posts it."""

    RESULTS: Final = ("success", "http_error", "timeout", "connect_error", "other_error")

    def __init__(self, url: str, max_pending: int) -> None:
        self.url = url.rstrip("/") + API_PATH
        self.name = _display_url(url)
        self.max_pending = max_pending
        self.pending: dict[LabelSet, dict[str, Any]] = {}
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()  # nothing queued, nothing in flight
        self.idle.set()
        self.results: dict[str, int] = dict.fromkeys(self.RESULTS, 0)
        self.dropped = 0
        self.failing = False
        self.task: asyncio.Task[None] | None = None

    def put(self, key: LabelSet, payload: dict[str, Any]) -> None:
        self.pending.pop(key, None)  # newest last (dict order = age)
        self.pending[key] = payload
        self.idle.clear()
        while len(self.pending) > self.max_pending:
            del self.pending[next(iter(self.pending))]
            self.dropped += 1
        self.ready.set()


class AlertPusher(Collector):
    """Pushes hang alerts to Alertmanager; see the module docstring.

    ``await start()`` / ``await stop()`` in the exporter's event loop; ``update(hangs)`` from
    anywhere in that loop (the hang tick).  ``clock`` must be the clock of the hang timestamps.
    """

    def __init__(
        self,
        cfg: AlertingConfig,
        clock: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self._hangs: tuple[OpenHang, ...] = ()
        self._sent: dict[LabelSet, _Sent] = {}
        self._targets = [_Target(u, cfg.max_pending) for u in cfg.alertmanager_urls]
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._own_session = session is None
        self._session = session

    # -- caller side ---------------------------------------------------------------------

    def update(self, hangs: Sequence[OpenHang]) -> None:
        """The current open hangs.  Non-blocking; the pusher reacts in its own task."""
        snap = tuple(hangs)
        if snap == self._hangs:
            return
        self._hangs = snap
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        if not self._targets:
            return
        self._wake = asyncio.Event()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
                headers={"User-Agent": "qemu-iohang-exporter"},
            )
        for t in self._targets:
            t.task = asyncio.create_task(self._send_loop(t), name=f"alert-push {t.name}")
        self._task = asyncio.create_task(self._plan_loop(), name="alert-push")

    async def stop(self, flush_timeout: float | None = None) -> None:
        """Stop.  Firing alerts are **not** resolved: a restart restores the open hangs from the
        state file and pushes them again (same labels and ``startsAt``), so resolving them here
        would resolve and re-fire a real hang; if the exporter does not come back they expire at
        their ``endsAt`` (or stay firing through the rules).  Pending posts get up to
        ``flush_timeout`` (default: the request timeout) to go out."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sent:
            valid_for = 4 * self.cfg.resend_interval_seconds
            log.info(
                "leaving pushed alerts firing: a restart pushes them again, else they expire",
                extra={
                    "alerts": len(self._sent),
                    "first_expires_at": _rfc3339(min(s.at for s in self._sent.values()) + valid_for),
                },
            )
        wait = self.cfg.timeout_seconds if flush_timeout is None else flush_timeout
        if self._targets and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(t.idle.wait() for t in self._targets)), wait)
        for t in self._targets:
            if t.task is not None:
                t.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t.task
                t.task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- planning ------------------------------------------------------------------------

    def plan(self, now: float) -> float | None:
        """Diff desired vs. sent at ``now``, queue what must go out; return when to plan next."""
        cfg = self.cfg
        desired = desired_alerts(self._hangs, now, cfg)
        gen = cfg.effective_generator_url()
        valid_for = 4 * cfg.resend_interval_seconds
        for key, alert in desired.items():
            prev = self._sent.get(key)
            if prev is None or prev.alert != alert or now - prev.at >= cfg.resend_interval_seconds:
                if prev is None:
                    log.info("pushing alert", extra=_log_fields(alert))
                self._enqueue(key, alert.payload(now, now + valid_for, gen))
                self._sent[key] = _Sent(alert, now)
        for key in [k for k in self._sent if k not in desired]:
            prev = self._sent.pop(key)
            log.info("resolving pushed alert", extra=_log_fields(prev.alert))
            self._enqueue(key, prev.alert.payload(now, now, gen))
        wake: list[float] = [s.at + cfg.resend_interval_seconds for s in self._sent.values()]
        crossing = next_crossing(self._hangs, now, cfg)
        if crossing is not None:
            wake.append(crossing)
        return min(wake) if wake else None

    def _enqueue(self, key: LabelSet, payload: dict[str, Any]) -> None:
        for t in self._targets:
            t.put(key, payload)

    async def _plan_loop(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                when = self.plan(self.clock())
            except Exception:
                log.exception("alert push planning failed")
                when = self.clock() + 1.0
            timeout = None if when is None else max(0.0, when - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # -- sending -------------------------------------------------------------------------

    async def _send_loop(self, t: _Target) -> None:
        backoff = self.cfg.backoff_initial_seconds
        while True:
            await t.ready.wait()
            t.ready.clear()
            if not t.pending:
                continue
            batch = t.pending
            t.pending = {}
            result = await self._post(t, list(batch.values()))
            t.results[result] += 1
            if result == "success":
                if t.failing:
                    log.info("alertmanager reachable again", extra={"alertmanager": t.name})
                t.failing = False
                backoff = self.cfg.backoff_initial_seconds
                if not t.pending:
                    t.idle.set()
                continue
            # Put the batch back unless a newer state of the same alert arrived meanwhile.
            newer = t.pending
            t.pending = {}
            for k, p in batch.items():
                if k not in newer:
                    t.put(k, p)
            for k, p in newer.items():
                t.put(k, p)
            if not t.failing:
                log.warning(
                    "cannot push alerts to alertmanager, retrying with backoff",
                    extra={"alertmanager": t.name, "result": result},
                )
            t.failing = True
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # jitter
            backoff = min(backoff * 2, self.cfg.backoff_max_seconds)
            t.ready.set()

    async def _post(self, t: _Target, alerts: list[dict[str, Any]]) -> str:
        assert self._session is not None
        try:
            async with self._session.post(
                t.url, json=alerts, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds)
            ) as r:
                body = await r.text()
                if 200 <= r.status < 300:
                    return "success"
                log.warning(
                    "alertmanager rejected alerts",
                    extra={"alertmanager": t.name, "status": r.status, "body": body[:200]},
                )
                return "http_error"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientConnectionError:
            return "connect_error"
        except (aiohttp.ClientError, OSError, ValueError):
            return "other_error"

    # -- metrics -------------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        return [
            ALERT_PUSHES.metric(
                ALERT_PUSHES.labels,
                [((t.name, result), n) for t in self._targets for result, n in t.results.items()],
            ),
            ALERT_PUSH_DROPPED.metric(
                ALERT_PUSH_DROPPED.labels, [((t.name,), t.dropped) for t in self._targets]
            ),
        ]

    # -- introspection (tests, debugging) ------------------------------------------------

    @property
    def firing(self) -> list[Alert]:
        """Alerts currently considered firing (sent or queued)."""
        return [s.alert for s in self._sent.values()]


def _log_fields(alert: Alert) -> dict[str, str]:
    labels = dict(alert.labels)
    return {k: labels.get(k, "") for k in ("alertname", "vm", "device")}
