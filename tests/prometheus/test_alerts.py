"""Prometheus rules: generated file up to date, promtool check + unit tests, runbooks, coverage."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus.artefacts import (
    ALERT_TESTS_DIR,
    ROOT,
    RULES_FILE,
    RUNBOOKS,
    alert_rules,
    load_module,
    metric_names_in,
    runbook_anchors,
)
from tests.support.binaries import require_binary

GENERATOR = ROOT / "alerts" / "generate.py"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yml"

EXPECTED_ALERTS = {
    "QemuDiskIOHang",
    "QemuIOHangApproachingTimeout",
    "QemuIOHangNearTimeout",
    "QemuIOHangWithoutTimeout",
    "QemuIOHangTimedOut",
    "QemuDiskRetryPolicyViolation",
    "QemuVMPausedOnIOError",
    "QemuQMPDown",
    "QemuIOHangExporterDown",
    "QemuIOHangExporterAbsent",
    "QemuIOHangExporterBlind",
    "QemuStorageBackendOutage",
    "QemuStorageBackendOutageFleet",
    "QemuDiskOnFailingBackend",
}
#: Alerts that only feed Alertmanager's inhibition (severity "info", routed nowhere).
INHIBITOR_ALERTS = {"QemuDiskOnFailingBackend"}
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def test_committed_rules_match_generator() -> None:
    gen = load_module(GENERATOR)
    assert RULES_FILE.read_text() == gen.render_rules(), "run: python3 alerts/generate.py"


def test_prometheus_rule_matches_rules_file() -> None:
    gen = load_module(GENERATOR)
    assert PROMETHEUS_RULE.read_text() == gen.render_prometheus_rule(), "run: python3 alerts/generate.py"
    cr = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert cr["apiVersion"] == "monitoring.coreos.com/v1"
    assert cr["kind"] == "PrometheusRule"
    assert cr["spec"] == yaml.safe_load(RULES_FILE.read_text())


def test_generator_selector_is_applied(tmp_path: Path) -> None:
    gen = load_module(GENERATOR)
    text = gen.render_rules(selector='job="kvm-hosts"')
    assert 'job="qemu-iohang"' not in text
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert 'job="kvm-hosts"' in rule["expr"], rule


def test_expected_alerts_present() -> None:
    assert {r["alert"] for r in alert_rules()} == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_metadata(rule: dict) -> None:
    allowed = {"info"} if rule["alert"] in INHIBITOR_ALERTS else {"warning", "critical"}
    assert rule["labels"]["severity"] in allowed
    ann = rule["annotations"]
    assert ann["summary"] and ann["description"]
    # As shipped, the link is the runbook's path in this repository: it must resolve to the file
    # and to a section of it.
    path, _, anchor = ann["runbook_url"].partition("#")
    assert (ROOT / path).resolve() == RUNBOOKS
    assert anchor == rule["alert"].lower()
    assert anchor in runbook_anchors(), f"docs/runbooks.md has no section for #{anchor}"


def test_runbook_base_url_flag(tmp_path: Path) -> None:
    gen = load_module(GENERATOR)
    base = "https://git.internal/ops/qemu-iohang-exporter/blob/main/docs/runbooks.md"
    rules, cr = tmp_path / "rules.yml", tmp_path / "cr.yml"
    argv = ["--runbook-base-url", base, "--rules-out", str(rules), "--prometheus-rule-out", str(cr)]
    assert gen.main(argv) == 0
    urls = [
        r["annotations"]["runbook_url"]
        for g in yaml.safe_load(rules.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert urls == [f"{base}#{name.lower()}" for name in (r["alert"] for r in alert_rules())]
    assert base in cr.read_text()
    assert gen.main([*argv, "--check"]) == 0
    assert gen.main(["--rules-out", str(rules), "--prometheus-rule-out", str(cr), "--check"]) == 1


@pytest.mark.parametrize(
    "base",
    ["https://wiki.internal/runbooks.md#top", "ftp://wiki.internal/runbooks.md", "docs/run books.md", ""],
)
def test_runbook_base_url_flag_refuses_what_cannot_carry_an_anchor(
    tmp_path: Path, base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The generator refuses what the exporter's alerting.runbook_base_url refuses (same check)."""
    gen = load_module(GENERATOR)
    rules, cr = tmp_path / "rules.yml", tmp_path / "cr.yml"
    with pytest.raises(SystemExit) as exc:
        gen.main(["--runbook-base-url", base, "--rules-out", str(rules), "--prometheus-rule-out", str(cr)])
    assert exc.value.code == 2
    assert "--runbook-base-url" in capsys.readouterr().err
    assert not rules.exists() and not cr.exists()


def test_runbook_internal_links_resolve() -> None:
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOKS.read_text())
    assert links
    assert set(links) - runbook_anchors() == set()


def test_hang_alerts_need_no_observed_error() -> None:
    """A disk found already hanging when the exporter starts has a hang whose start is "first
    seen", with no BLOCK_IO_ERROR counted: the rules must judge hangs by the hang series alone
    (the promtool tests also fire QemuDiskIOHang for such a disk)."""
    for rule in alert_rules():
        used = metric_names_in(rule["expr"])
        assert not used & {
            "qemu_block_io_error_events_total",
            "qemu_block_io_hang_start_timestamp_seconds",
        }, rule["alert"]


def test_unit_tests_cover_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in ALERT_TESTS_DIR.glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def _matcher_regex(matcher: str) -> re.Pattern[str]:
    name, op, value = re.fullmatch(r'(\w+)(=~|=)"(.*)"', matcher).groups()  # type: ignore[union-attr]
    assert name == "alertname"
    return re.compile(value if op == "=~" else re.escape(value))


def test_backend_outage_inhibits_exactly_the_alerts_it_explains() -> None:
    """The Alertmanager example inhibits, on disks of a failing backend, the per-disk alerts the
    generator's BACKEND_EXPLAINED_ALERTS names, by the disk's labels; the outage alerts are
    paged per backend and the inhibitor alert goes nowhere."""
    gen = load_module(GENERATOR)
    am = yaml.safe_load(ALERTMANAGER.read_text())
    names = {r["alert"] for r in alert_rules()}
    rules = [
        r for r in am["inhibit_rules"] if r["source_matchers"] == ['alertname="QemuDiskOnFailingBackend"']
    ]
    assert len(rules) == 1
    target = _matcher_regex(rules[0]["target_matchers"][0])
    assert {n for n in names if target.fullmatch(n)} == set(gen.BACKEND_EXPLAINED_ALERTS)
    assert "QemuIOHangTimedOut" not in gen.BACKEND_EXPLAINED_ALERTS
    assert rules[0]["equal"] == ["job", "instance", "vm", "device"]
    routes = {r["matchers"][0]: r for r in am["route"]["routes"]}
    assert routes['alertname="QemuDiskOnFailingBackend"']["receiver"] == "blackhole"
    outage = routes['alertname=~"QemuStorageBackendOutage(Fleet)?"']
    assert outage["receiver"] == "oncall" and "backend" in outage["group_by"]
    receivers = {r["name"]: r for r in am["receivers"]}
    assert set(receivers["blackhole"]) == {"name"}  # no notifier at all


@pytest.mark.promtool
def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    for path in (RULES_FILE,):
        r = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout


@pytest.mark.promtool
def test_promtool_unit_tests() -> None:
    promtool = require_binary("promtool")
    files = sorted(str(p) for p in ALERT_TESTS_DIR.glob("*.yml"))
    assert files
    r = subprocess.run([promtool, "test", "rules", *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.promtool
@pytest.mark.parametrize(
    ("constant", "value", "alert"),
    [
        # Loosen the warning threshold.
        ("HANG_TIMEOUT_WARNING_RATIO", 0.3, "QemuIOHangApproachingTimeout"),
        # Page on the first failed attempt again (a blip), or ignore the retry_interval.
        ("HANG_MIN_SECONDS", 0, "QemuDiskIOHang"),
        ("HANG_MIN_RETRY_INTERVALS", 1, "QemuDiskIOHang"),
        # Make the blip threshold longer than the tests expect.
        ("HANG_MIN_SECONDS", 40, "QemuDiskIOHang"),
        # A backend outage from two disks, from a smaller share, or the share rule off.
        ("BACKEND_OUTAGE_MIN_DISKS", 2, "QemuStorageBackendOutage"),
        ("BACKEND_OUTAGE_MIN_SHARE", 0.3, "QemuStorageBackendOutage"),
        ("BACKEND_OUTAGE_MIN_SHARE", 1.5, "QemuStorageBackendOutage"),
    ],
)
def test_promtool_unit_tests_can_fail(tmp_path: Path, constant: str, value: float, alert: str) -> None:
    """Change a threshold: the unit tests must notice, naming the alert."""
    promtool = require_binary("promtool")
    gen = load_module(GENERATOR)
    setattr(gen, constant, value)
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES_FILE.name).write_text(gen.render_rules())
    for p in ALERT_TESTS_DIR.glob("*.yml"):
        (tmp_path / "tests" / p.name).write_text(p.read_text())
    r = subprocess.run(
        [promtool, "test", "rules", *map(str, (tmp_path / "tests").glob("*.yml"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert alert in r.stdout + r.stderr
