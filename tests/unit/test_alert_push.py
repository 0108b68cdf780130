"""exporter.alerting.push: the pure alert computation, and the pusher against a real Alertmanager."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter.alerting.push import (
    ALERT_HANG,
    AlertPusher,
    OpenHang,
    _rfc3339,
    desired_alerts,
    next_crossing,
    open_hangs,
)
from exporter.config import AlertingConfig
from exporter.hang.machine import DiskHangTracker
from exporter.model import alerts as alert_defs
from exporter.model.alerts import FRACTION_ALERTS, humanize_duration, humanize_percentage, render_template
from exporter.model.policy import DiskPolicy, PolicyVerdict
from exporter.model.state import Disk, VMState
from tests.prometheus.artefacts import ROOT, RULES_FILE, alert_rules, load_module
from tests.support.binaries import require_binary
from tests.support.procs import free_port
from tests.support.prometheus import Alertmanager, alertmanager_config
from tests.support.waits import wait_for

CFG = AlertingConfig(alertmanager_urls=("http://127.0.0.1:1",), instance="hv1:9738", job="qemu-iohang")


def hang(
    start: float = 1000.0, timeout: float = 10.0, interval: float | None = 1.0, **kw: object
) -> OpenHang:
    return OpenHang(
        vm=str(kw.get("vm", "vm1")),
        device=str(kw.get("device", "virtio-disk0")),
        labels=tuple(kw.get("labels", ())),  # type: ignore[arg-type]
        start=start,
        retry_timeout=timeout,
        retry_interval=interval,
    )


def names(alerts: dict) -> set[str]:
    return {dict(k)["alertname"] for k in alerts}


# --- pure ---------------------------------------------------------------------------------------


def test_fraction_alerts_at_once_hang_alert_after_the_rules_minimum() -> None:
    """A 60 s timeout, retry_interval 1 s: 50 % at 30 s and 80 % at 48 s, QemuDiskIOHang once the
    hang is max(30 s, 3 x 1 s) old, not before."""
    h = hang(start=1000.0, timeout=60.0)
    assert names(desired_alerts([h], 1000.0, CFG)) == set()
    assert names(desired_alerts([h], 1029.9, CFG)) == set()
    assert names(desired_alerts([h], 1030.0, CFG)) == {ALERT_HANG, "QemuIOHangApproachingTimeout"}
    assert names(desired_alerts([h], 1048.0, CFG)) == {
        ALERT_HANG,
        "QemuIOHangApproachingTimeout",
        "QemuIOHangNearTimeout",
    }
    assert desired_alerts([], 1048.0, CFG) == {}
    # A short timeout: the fraction alerts come long before QemuDiskIOHang would.
    short = hang(start=1000.0, timeout=10.0)
    assert names(desired_alerts([short], 1005.0, CFG)) == {"QemuIOHangApproachingTimeout"}
    assert names(desired_alerts([short], 1009.9, CFG)) == {
        "QemuIOHangApproachingTimeout",
        "QemuIOHangNearTimeout",
    }


@pytest.mark.parametrize(
    ("interval", "threshold"),
    [
        (1.0, 30.0),  # 3 intervals < 30 s: the seconds
        (None, 30.0),  # no retry_interval (no feature, werror=stop): the seconds alone
        (0.0, 30.0),
        (10.0, 30.0),  # exactly 3 intervals = 30 s
        (12.5, 37.5),  # 3 intervals > 30 s
        (20.0, 60.0),
    ],
)
def test_blip_never_pages_hang_alert_threshold(interval: float | None, threshold: float) -> None:
    h = hang(start=1000.0, timeout=0.0, interval=interval)
    assert alert_defs.hang_alert_threshold(interval) == threshold
    # Any hang that ends before the threshold (a blip of any length up to there) never pushes it.
    for age in (0.0, 1.0, 3.0, 7.0, threshold - 0.01):
        assert desired_alerts([h], 1000.0 + age, CFG) == {}, age
    (alert,) = desired_alerts([h], 1000.0 + threshold, CFG).values()
    assert dict(alert.labels)["alertname"] == ALERT_HANG
    assert alert.starts_at == 1000.0 + threshold
    assert next_crossing([h], 1000.0, CFG) == 1000.0 + threshold
    assert next_crossing([h], 1000.0 + threshold, CFG) is None


def test_hang_alert_threshold_is_the_rules(tmp_path: Path) -> None:
    """The numbers in the committed rule are the constants the push path uses, and the generator
    reads them from the same module (patching it changes the rule)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == ALERT_HANG]
    m = re.search(
        r"qemu_block_io_hang_duration_seconds\{[^}]*\} >= ([0-9.]+)\s+unless\s+"
        r"qemu_block_io_hang_duration_seconds\{[^}]*\}\s+< ([0-9.]+) \* qemu_block_retry_interval_seconds",
        rule["expr"],
    )
    assert m is not None, rule["expr"]
    assert float(m.group(1)) == alert_defs.HANG_MIN_SECONDS
    assert float(m.group(2)) == alert_defs.HANG_MIN_RETRY_INTERVALS
    gen = load_module(ROOT / "alerts" / "generate.py")
    assert gen.HANG_MIN_SECONDS is alert_defs.HANG_MIN_SECONDS
    assert gen.HANG_MIN_RETRY_INTERVALS is alert_defs.HANG_MIN_RETRY_INTERVALS
    assert gen.HANG_TIMEOUT_WARNING_RATIO is alert_defs.HANG_TIMEOUT_WARNING_RATIO
    assert gen.HANG_TIMEOUT_CRITICAL_RATIO is alert_defs.HANG_TIMEOUT_CRITICAL_RATIO
    assert gen.RUNBOOK_BASE_URL is alert_defs.RUNBOOK_BASE_URL


def test_starts_at_is_the_crossing_time() -> None:
    alerts = desired_alerts([hang(start=1000.0, timeout=60.0, interval=20.0)], 1061.0, CFG)
    by_name = {dict(k)["alertname"]: a for k, a in alerts.items()}
    assert by_name[ALERT_HANG].starts_at == 1060.0  # 3 x 20 s
    assert by_name["QemuIOHangApproachingTimeout"].starts_at == 1030.0
    assert by_name["QemuIOHangNearTimeout"].starts_at == 1048.0


def test_labels_are_those_of_the_rules_result() -> None:
    cfg = AlertingConfig(
        alertmanager_urls=("http://x",),
        instance="hv1:9738",
        job="qemu-iohang",
        external_labels={"replica": "a", "empty": ""},
    )
    h = hang(timeout=60.0, labels=(("cluster", "prod-a"), ("rack", ""), ("job", "evil")))
    alerts = desired_alerts([h], 1050.0, cfg)
    assert len(alerts) == 3
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
    assert names(desired_alerts([hang(timeout=0.0)], 1029.0, CFG)) == set()
    cfg = AlertingConfig(alertmanager_urls=("http://x",), hang_alert=False, fractions={"critical": 0.9})
    assert names(desired_alerts([hang()], 1008.9, cfg)) == set()
    assert names(desired_alerts([hang()], 1009.0, cfg)) == {"QemuIOHangNearTimeout"}


def test_next_crossing() -> None:
    hs = [hang(start=1000.0, timeout=10.0), hang(start=1001.0, timeout=4.0, device="d2")]
    assert next_crossing(hs, 1000.0, CFG) == 1003.0  # d2 at 50 % of 4 s
    assert next_crossing(hs, 1003.0, CFG) == pytest.approx(1004.2)
    assert next_crossing(hs, 1004.2, CFG) == 1005.0
    assert next_crossing(hs, 1008.0, CFG) == 1030.0  # QemuDiskIOHang of the first
    assert next_crossing(hs, 1031.0, CFG) is None
    assert next_crossing([hang(timeout=0.0)], 0.0, CFG) == 1030.0
    no_hang_alert = AlertingConfig(alertmanager_urls=("http://x",), hang_alert=False)
    assert next_crossing([hang(timeout=0.0)], 0.0, no_hang_alert) is None


def _disk(dev: str, interval_ms: int | None) -> Disk:
    policy = DiskPolicy("retry", "retry", interval_ms, 10000, interval_ms is not None)
    return Disk(
        device=dev,
        drive=f"drive-{dev}",
        node_name=f"node-{dev}",
        qdev=dev,
        qom_path=f"/machine/peripheral/{dev}",
        qdev_type="virtio-blk",
        policy=policy,
        verdict=PolicyVerdict(violations=()),
    )


def test_open_hangs_from_real_trackers() -> None:
    t_hanging = DiskHangTracker(2.0, 10.0, 1.0)
    t_hanging.on_io_error(500.0, "retry")
    t_idle = DiskHangTracker(1.0, 10.0, 1.0)
    # No retry_interval shown (QEMU without the feature): the tracker uses QEMU's 1 s, the rule
    # has no retry_interval series and uses its seconds alone.
    t_no_interval = DiskHangTracker(1.0, 0.0, 1.0)
    t_no_interval.on_io_error(501.0, "stop")
    vm = VMState.qmp("/run/x/a.qmp", static_labels={"cluster": "prod-a", "rack": ""})
    vm.name = "web"
    vm.disks = {
        d.device: d for d in (_disk("virtio-disk0", 2000), _disk("virtio-disk1", 1000), _disk("sda", None))
    }
    gone = VMState.qmp("/run/x/gone.qmp")
    trackers = {
        vm.socket: {"virtio-disk0": t_hanging, "virtio-disk1": t_idle, "sda": t_no_interval},
        "/run/x/other.qmp": {},
    }
    assert open_hangs(trackers, [vm, gone]) == (
        OpenHang("web", "sda", (("cluster", "prod-a"),), 501.0, 0.0, None),
        OpenHang("web", "virtio-disk0", (("cluster", "prod-a"),), 500.0, 10.0, 2.0),
    )


# --- annotations: the rules' ------------------------------------------------------------------


def _rule_annotations() -> dict[str, dict[str, str]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return {r["alert"]: r["annotations"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_pushed_annotations_are_the_rules() -> None:
    """For each pushed alert: summary and runbook_url are the committed rule's, the description is
    the rule's template with the alert's labels and $value at the crossing (written out here)."""
    rules = _rule_annotations()
    h = hang(start=1000.0, timeout=60.0, interval=20.0, vm="web", labels=(("cluster", "prod-a"),))
    alerts = {dict(k)["alertname"]: a for k, a in desired_alerts([h], 1060.0, CFG).items()}
    value = {ALERT_HANG: "1m 0s", "QemuIOHangApproachingTimeout": "50%", "QemuIOHangNearTimeout": "80%"}
    assert set(alerts) == set(value)
    for name, alert in alerts.items():
        rule = rules[name]
        pushed = dict(alert.annotations)
        assert pushed.keys() == rule.keys(), name
        assert pushed["summary"] == rule["summary"], name
        assert pushed["runbook_url"] == rule["runbook_url"] == f"docs/runbooks.md#{name.lower()}"
        expected = (
            rule["description"]
            .replace("{{ $labels.vm }}", "web")
            .replace("{{ $labels.device }}", "virtio-disk0")
            .replace("{{ $labels.instance }}", "hv1:9738")
            .replace("{{ $value | humanizeDuration }}", value[name])
            .replace("{{ $value | humanizePercentage }}", value[name])
        )
        assert "{{" not in expected, expected
        assert pushed["description"] == expected, name


def test_runbook_base_url_is_the_generators(tmp_path: Path) -> None:
    """The same base in alerting.runbook_base_url and --runbook-base-url: the same links."""
    base = "https://git.internal/ops/qemu-iohang-exporter/blob/main/docs/runbooks.md"
    gen = load_module(ROOT / "alerts" / "generate.py")
    rules, cr = tmp_path / "rules.yml", tmp_path / "cr.yml"
    assert (
        gen.main(["--runbook-base-url", base, "--rules-out", str(rules), "--prometheus-rule-out", str(cr)])
        == 0
    )
    urls = {
        r["alert"]: r["annotations"]["runbook_url"]
        for g in yaml.safe_load(rules.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    cfg = AlertingConfig(alertmanager_urls=("http://x",), instance="hv1:9738", runbook_base_url=base)
    pushed = desired_alerts([hang(timeout=60.0)], 1050.0, cfg)
    assert len(pushed) == 3
    for key, alert in pushed.items():
        assert dict(alert.annotations)["runbook_url"] == urls[dict(key)["alertname"]]


def test_no_invented_runbook_address() -> None:
    assert AlertingConfig().runbook_base_url == "docs/runbooks.md"
    text = (ROOT / "exporter" / "alerting" / "push.py").read_text() + (
        ROOT / "exporter" / "model" / "alerts.py"
    ).read_text()
    assert "github.com" not in text


@pytest.mark.parametrize(
    ("value", "duration", "percentage"),
    # What Prometheus' humanizeDuration / humanizePercentage print (Go's %.4g).
    [
        (0.0, "0s", "0%"),
        (0.5, "500ms", "50%"),
        (0.8, "800ms", "80%"),
        (0.0015, "1.5ms", "0.15%"),
        (1.0, "1s", "100%"),
        (30.0, "30s", "3000%"),
        (37.5, "37.5s", "3750%"),
        (59.99, "59.99s", "5999%"),
        (60.0, "1m 0s", "6000%"),
        (3661.7, "1h 1m 1s", "3.662e+05%"),
        (90061.0, "1d 1h 1m 1s", "9.006e+06%"),
        (0.123456, "123.5ms", "12.35%"),
    ],
)
def test_humanize_like_prometheus(value: float, duration: str, percentage: str) -> None:
    assert humanize_duration(value) == duration
    assert humanize_percentage(value) == percentage


def test_render_template_refuses_what_it_cannot_render_like_prometheus() -> None:
    assert render_template("{{ $labels.vm }} {{$labels.nope}}|", {"vm": "a"}, 1.0) == "a |"
    with pytest.raises(ValueError, match="not supported"):
        render_template("{{ $value | humanize }}", {}, 1.0)
    with pytest.raises(ValueError, match="not supported"):
        render_template("{{ $value }}", {}, 1.0)


# Hangs to compare with the rules as Prometheus evaluates them: (labels, retry_interval or None,
# retry_timeout or None).  Each is its own promtool test; the series report the hang's age.
_PROMTOOL_HANGS: list[tuple[str, float | None, float | None]] = [
    ("a", 1.0, None),  # 30 s
    ("b", 12.5, None),  # 37.5 s
    ("c", None, None),  # no retry_interval series: 30 s
    ("d", 20.0, 0.0),  # 60 s, timeout 0: no fraction alert
    ("e", 1.0, 10.0),  # 50 % at 5 s, 80 % at 8 s
    ("f", 2.0, 45.0),  # 50 % at 22.5 s, 80 % at 36 s, QemuDiskIOHang at 30 s
]


def _promtool_case(vm: str, interval: float | None, timeout: float | None) -> dict[str, Any]:
    """A promtool test: the push path's alerts of one hang, expected from the committed rules at
    each crossing (labels and annotations rendered by Prometheus), and none half a second
    earlier for that alert name."""
    start = 1000.0
    h = OpenHang(vm, "virtio-disk0", (("cluster", "prod-a"),), start, timeout or 0.0, interval)
    sel = f'job="qemu-iohang",instance="hv1:9738",vm="{vm}",device="virtio-disk0",cluster="prod-a"'
    steps = 200  # 100 s every 500 ms
    series = [
        {"series": f"qemu_block_io_hang{{{sel}}}", "values": f"1x{steps}"},
        {"series": f"qemu_block_io_hang_duration_seconds{{{sel}}}", "values": f"0+0.5x{steps}"},
    ]
    if interval is not None:
        series.append(
            {"series": f"qemu_block_retry_interval_seconds{{{sel}}}", "values": f"{interval:g}x{steps}"}
        )
    if timeout is not None:
        series.append(
            {"series": f"qemu_block_retry_timeout_seconds{{{sel}}}", "values": f"{timeout:g}x{steps}"}
        )
    checks: list[dict[str, Any]] = []
    crossings: dict[str, float] = {}
    t = start
    while (nxt := next_crossing([h], t, CFG)) is not None:
        for key in desired_alerts([h], nxt, CFG):
            crossings.setdefault(dict(key)["alertname"], nxt)
        t = nxt
    assert crossings, vm
    for name, at in crossings.items():
        age_ms = round((at - start) * 1000)
        assert age_ms % 500 == 0 and age_ms > 0, (name, age_ms)
        (alert,) = [a for k, a in desired_alerts([h], at, CFG).items() if dict(k)["alertname"] == name]
        checks.append({"eval_time": f"{age_ms - 500}ms", "alertname": name, "exp_alerts": []})
        checks.append(
            {
                "eval_time": f"{age_ms}ms",
                "alertname": name,
                "exp_alerts": [
                    {
                        "exp_labels": {k: v for k, v in alert.labels if k != "alertname"},
                        "exp_annotations": dict(alert.annotations),
                    }
                ],
            }
        )
    return {"interval": "500ms", "input_series": series, "alert_rule_test": checks}


@pytest.mark.promtool
def test_pushed_alerts_are_what_prometheus_fires_from_the_rules(tmp_path: Path) -> None:
    """promtool evaluates the committed rules over series of each hang: at each crossing the push
    path computes, the rule fires the same alert (labels and annotations, its templates rendered
    by Prometheus), and half a second earlier it does not."""
    promtool = require_binary("promtool")
    (tmp_path / RULES_FILE.name).write_text(RULES_FILE.read_text())
    doc = {
        "rule_files": [RULES_FILE.name],
        "evaluation_interval": "500ms",
        "tests": [_promtool_case(*c) for c in _PROMTOOL_HANGS],
    }
    test_file = tmp_path / "push.test.yml"
    test_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


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
            # A hang that started 49.7 s ago on a 100 s timeout: QemuDiskIOHang now (older than
            # 30 s), the warning 0.3 s from now, pushed by the pusher's own timer (no further
            # update() call).
            start = time.time() - 49.7
            pusher.update([hang(start=start, timeout=100.0, labels=(("cluster", "prod-a"),))])
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
            assert seen - (start + 50.0) < 1.0, "threshold crossing pushed late"
            assert warn[0]["startsAt"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 50)))

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
        pusher.update([hang(start=time.time() - 31.0, timeout=0.0)])
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
