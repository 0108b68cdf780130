"""exporter.alert_push: the pure alert computation, and the pusher against a real Alertmanager."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from exporter.alert_push import (
    ALERT_HANG,
    FRACTION_ALERTS,
    AlertingConfig,
    AlertPusher,
    OpenHang,
    _rfc3339,
    desired_alerts,
    next_crossing,
    open_hangs,
)
from exporter.hang.machine import DiskHangTracker
from exporter.model.state import VMState
from tests.artefacts.artefacts import alert_rules
from tests.harness import free_port, wait_for
from tests.pipeline.procs import Alertmanager, alertmanager_config

CFG = AlertingConfig(alertmanager_urls=("http://127.0.0.1:1",), instance="hv1:9738", job="qemu-iohang")


def hang(start: float = 1000.0, timeout: float = 10.0, **kw: object) -> OpenHang:
    return OpenHang(
        vm=str(kw.get("vm", "vm1")),
        device=str(kw.get("device", "virtio-disk0")),
        labels=tuple(kw.get("labels", ())),  # type: ignore[arg-type]
        start=start,
        retry_timeout=timeout,
    )


def names(alerts: dict) -> set[str]:
    return {dict(k)["alertname"] for k in alerts}


# --- pure ---------------------------------------------------------------------------------------


def test_hang_alert_at_start_then_thresholds() -> None:
    h = hang(start=1000.0, timeout=10.0)
    assert names(desired_alerts([h], 1000.0, CFG)) == {ALERT_HANG}
    assert names(desired_alerts([h], 1004.9, CFG)) == {ALERT_HANG}
    assert names(desired_alerts([h], 1005.0, CFG)) == {ALERT_HANG, "QemuIOHangApproachingTimeout"}
    assert names(desired_alerts([h], 1008.0, CFG)) == {
        ALERT_HANG,
        "QemuIOHangApproachingTimeout",
        "QemuIOHangNearTimeout",
    }
    assert desired_alerts([], 1008.0, CFG) == {}


def test_starts_at_is_the_crossing_time() -> None:
    alerts = desired_alerts([hang(start=1000.0, timeout=10.0)], 1009.0, CFG)
    by_name = {dict(k)["alertname"]: a for k, a in alerts.items()}
    assert by_name[ALERT_HANG].starts_at == 1000.0
    assert by_name["QemuIOHangApproachingTimeout"].starts_at == 1005.0
    assert by_name["QemuIOHangNearTimeout"].starts_at == 1008.0


def test_labels_are_those_of_the_rules_result() -> None:
    cfg = AlertingConfig(
        alertmanager_urls=("http://x",),
        instance="hv1:9738",
        job="qemu-iohang",
        external_labels={"replica": "a", "empty": ""},
    )
    h = hang(labels=(("cluster", "prod-a"), ("rack", ""), ("job", "evil")))
    alerts = desired_alerts([h], 1009.0, cfg)
    for key in alerts:
        labels = dict(key)
        sev = {"QemuDiskIOHang": "warning", **{v: k for k, v in FRACTION_ALERTS.items()}}[labels["alertname"]]
        assert labels == {
            "alertname": labels["alertname"],
            "severity": sev,
            "vm": "vm1",
            "device": "virtio-disk0",
            "instance": "hv1:9738",
            "job": "qemu-iohang",
            "cluster": "prod-a",  # static label; empty ones are no labels in Prometheus
            "replica": "a",  # Prometheus external label
        }


def test_alert_names_severities_and_thresholds_match_the_rules() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert rules[ALERT_HANG]["labels"]["severity"] == "warning"
    assert "for" not in rules[ALERT_HANG]
    defaults = AlertingConfig().fractions
    for severity, name in FRACTION_ALERTS.items():
        rule = rules[name]
        assert rule["labels"]["severity"] == severity
        assert "for" not in rule
        m = re.search(r">=\s*([0-9.]+)", rule["expr"])
        assert m is not None and float(m.group(1)) == defaults[severity], name


def test_no_fraction_alerts_without_timeout_and_options() -> None:
    assert names(desired_alerts([hang(timeout=0.0)], 1e6, CFG)) == {ALERT_HANG}
    cfg = AlertingConfig(alertmanager_urls=("http://x",), hang_alert=False, fractions={"critical": 0.9})
    assert names(desired_alerts([hang()], 1008.9, cfg)) == set()
    assert names(desired_alerts([hang()], 1009.0, cfg)) == {"QemuIOHangNearTimeout"}


def test_next_crossing() -> None:
    hs = [hang(start=1000.0, timeout=10.0), hang(start=1001.0, timeout=4.0, device="d2")]
    assert next_crossing(hs, 1000.0, CFG) == 1003.0  # d2 at 50 % of 4 s
    assert next_crossing(hs, 1003.0, CFG) == pytest.approx(1004.2)
    assert next_crossing(hs, 1004.2, CFG) == 1005.0
    assert next_crossing(hs, 1008.0, CFG) is None
    assert next_crossing([hang(timeout=0.0)], 0.0, CFG) is None


def test_open_hangs_from_real_trackers() -> None:
    t_hanging = DiskHangTracker(1.0, 10.0, 1.0)
    t_hanging.on_io_error(500.0, "retry")
    t_idle = DiskHangTracker(1.0, 10.0, 1.0)
    vm = VMState.qmp("/run/x/a.qmp", static_labels={"cluster": "prod-a", "rack": ""})
    vm.name = "web"
    gone = VMState.qmp("/run/x/gone.qmp")
    trackers = {vm.socket: {"virtio-disk0": t_hanging, "virtio-disk1": t_idle}, "/run/x/other.qmp": {}}
    assert open_hangs(trackers, [vm, gone]) == (
        OpenHang("web", "virtio-disk0", (("cluster", "prod-a"),), 500.0, 10.0),
    )


# --- against a real Alertmanager ------------------------------------------------------------


async def _am_alerts(am: Alertmanager, **filters: str) -> list[dict]:
    return await am.alerts(**filters)


async def test_push_merge_resolve_on_real_alertmanager(short_tmp: Path) -> None:
    async with Alertmanager(short_tmp / "am", alertmanager_config("http://127.0.0.1:9")) as am:
        cfg = AlertingConfig(
            alertmanager_urls=(am.url,),
            instance="hv1:9738",
            job="qemu-iohang",
            resend_interval_seconds=30.0,
        )
        pusher = AlertPusher(cfg)
        await pusher.start()
        try:
            # A hang that started 4.7 s ago on a 10 s timeout: QemuDiskIOHang now, the warning
            # 0.3 s from now, pushed by the pusher's own timer (no further update() call).
            start = time.time() - 4.7
            pusher.update([hang(start=start, timeout=10.0, labels=(("cluster", "prod-a"),))])
            got = await wait_for(
                lambda: _am_alerts(am, alertname=ALERT_HANG), timeout=5, what="hang alert in AM"
            )
            assert got[0]["labels"] == {
                "alertname": ALERT_HANG,
                "severity": "warning",
                "vm": "vm1",
                "device": "virtio-disk0",
                "instance": "hv1:9738",
                "job": "qemu-iohang",
                "cluster": "prod-a",
            }
            assert got[0]["status"]["state"] == "active"
            warn = await wait_for(
                lambda: _am_alerts(am, alertname="QemuIOHangApproachingTimeout"),
                timeout=5,
                what="warning in AM",
            )
            seen = time.time()
            assert seen - (start + 5.0) < 1.0, "threshold crossing pushed late"
            assert warn[0]["startsAt"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 5)))

            # Prometheus' rule sends the same alert (same labels, later startsAt, its own
            # annotations): Alertmanager holds ONE alert, with the earlier startsAt.
            prom_alert = {
                "labels": warn[0]["labels"],
                "annotations": {"summary": "from prometheus"},
                "startsAt": _rfc3339(time.time()),
                "generatorURL": "http://prometheus/graph",
            }
            async with (
                aiohttp.ClientSession() as s,
                s.post(am.url + "/api/v2/alerts", json=[prom_alert]) as r,
            ):
                assert r.status == 200
            merged = await _am_alerts(am, alertname="QemuIOHangApproachingTimeout")
            assert len(merged) == 1
            assert merged[0]["startsAt"] == warn[0]["startsAt"]
            assert merged[0]["fingerprint"] == warn[0]["fingerprint"]

            # The hang ends: everything resolved (gone from the active list).
            pusher.update([])

            async def all_resolved() -> bool:
                return await _am_alerts(am) == []

            await wait_for(all_resolved, timeout=5, what="alerts resolved in AM")
            pushes = {
                s.labels["result"]: s.value
                for m in pusher.collect()
                if m.name == "qemu_exporter_alert_pushes"
                for s in m.samples
            }
            assert pushes.get("success", 0) >= 2
            assert pushes.get("connect_error", 0) == 0
        finally:
            await pusher.stop()


async def test_down_alertmanager_is_retried_and_counted(short_tmp: Path) -> None:
    port = free_port()
    cfg = AlertingConfig(
        alertmanager_urls=(f"http://127.0.0.1:{port}",),
        instance="hv1:9738",
        backoff_initial_seconds=0.1,
        backoff_max_seconds=0.5,
        timeout_seconds=1.0,
    )
    pusher = AlertPusher(cfg)
    await pusher.start()
    try:
        # update() never blocks, whatever the Alertmanager does.
        t0 = time.monotonic()
        pusher.update([hang(start=time.time(), timeout=60.0)])
        assert time.monotonic() - t0 < 0.05

        def errors() -> float:
            return sum(
                s.value
                for m in pusher.collect()
                if m.name == "qemu_exporter_alert_pushes"
                for s in m.samples
                if s.labels["result"] == "connect_error" and s.name.endswith("_total")
            )

        async def failed_twice() -> bool:
            return errors() >= 2

        await wait_for(failed_twice, timeout=5, what="connect errors counted")
        am = Alertmanager(short_tmp / "am", alertmanager_config("http://127.0.0.1:9"))
        am.port = port
        async with am:
            got = await wait_for(
                lambda: _am_alerts(am, alertname=ALERT_HANG), timeout=10, what="alert after AM came up"
            )
            assert got[0]["labels"]["vm"] == "vm1"
    finally:
        await pusher.stop()


async def test_disabled_pusher_does_nothing() -> None:
    pusher = AlertPusher(AlertingConfig())
    assert not pusher.cfg.enabled
    await pusher.start()
    pusher.update([hang()])
    await pusher.stop()
    assert [m.samples for m in pusher.collect()] == [[], []]


def test_update_from_sync_code_before_start() -> None:
    pusher = AlertPusher(CFG)
    pusher.update([hang()])  # no loop running, no task: must not raise
    assert asyncio.iscoroutinefunction(pusher.start)
