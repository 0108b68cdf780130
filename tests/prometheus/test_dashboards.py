"""Grafana dashboards: generated JSON up to date, structure, PromQL parses, metrics in contract."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.prometheus.artefacts import (
    DASHBOARD_DIR,
    PROMETHEUS_SERIES,
    ROOT,
    alert_exprs,
    all_exprs,
    contract_metrics,
    contract_series_names,
    dashboard_exprs,
    dashboard_files,
    grafana_to_promql,
    iter_panels,
    load_module,
    metric_names_in,
    parse_promql,
    recording_rule_names,
    used_metric_names,
)

GENERATOR = ROOT / "dashboards" / "generate.py"
EXPRS = all_exprs()


def test_committed_json_matches_generator() -> None:
    gen = load_module(GENERATOR)
    names = {p.name for p in dashboard_files()}
    assert names == set(gen.DASHBOARDS), "stale or stray JSON in dashboards/grafana/"
    for name in gen.DASHBOARDS:
        assert (DASHBOARD_DIR / name).read_text() == gen.render(name), (
            f"{name} is stale: run .venv/bin/python dashboards/generate.py"
        )


def test_generator_check_mode_detects_stale(tmp_path: Path) -> None:
    gen = load_module(GENERATOR)
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "qemu-iohang-vm.json").write_text("{}\n")
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_sdk_pinned_to_one_version() -> None:
    """grafana-foundation-sdk versions carry an epoch (a newer 10.x build sorts above 11.6): the
    generator must run with exactly the pinned one, the one installed."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = [r for reqs in extras.values() for r in reqs if r.startswith("grafana-foundation-sdk")]
    m = re.fullmatch(r"grafana-foundation-sdk==(\d+!\d+\.\d+\.\d+)", spec)
    assert m, spec
    assert importlib.metadata.version("grafana-foundation-sdk") == m.group(1)


def test_write_or_check(tmp_path: Path) -> None:
    """The helper both generators use: --check writes nothing and names each stale file."""
    gen = load_module(GENERATOR)
    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.json"
    assert gen.write_or_check({a: "1\n", b: "2\n"}, check=True, generator="x") == 1
    assert not a.exists() and not b.exists()
    assert gen.write_or_check({a: "1\n", b: "2\n"}, check=False, generator="x") == 0
    assert b.read_text() == "2\n"
    assert gen.write_or_check({a: "1\n", b: "2\n"}, check=True, generator="x") == 0


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] >= 39  # Grafana 11
    assert dash["uid"] and len(dash["uid"]) <= 40
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    ids = []
    for panel in dash["panels"]:
        ids.append(panel["id"])
        gp = panel["gridPos"]
        assert gp["x"] >= 0 and gp["x"] + gp["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Every query is scoped by the job and instance variables.
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], t["expr"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_vm_dashboard_variables_and_scoping() -> None:
    dash = json.loads((DASHBOARD_DIR / "qemu-iohang-vm.json").read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "vm", "device"]
    for where, expr in dashboard_exprs(DASHBOARD_DIR / "qemu-iohang-vm.json"):
        if "panel" in where:
            assert 'vm=~"$vm"' in expr, where


def test_overview_has_the_required_views() -> None:
    dash = json.loads((DASHBOARD_DIR / "qemu-iohang-overview.json").read_text())
    text = json.dumps(dash)
    for metric in (
        "qemu_exporter_vms",
        "qemu_qmp_up",
        "qemu_block_retry_policy_ok",
        "qemu_block_retry_policy_violation",
        "qemu_block_io_hang_deadline_timestamp_seconds",
        "qemu_block_io_hangs_total",
        "qemu_block_io_error_events_total",
    ):
        assert metric in text, metric


@pytest.mark.parametrize("where_expr", EXPRS, ids=[w for w, _ in EXPRS])
def test_promql_parses(where_expr: tuple[str, str]) -> None:
    where, expr = where_expr
    try:
        parse_promql(expr)
    except ValueError as e:
        pytest.fail(f"{where}: {e}\n{expr}")


def test_promql_parser_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_promql('sum(rate(qemu_block_read_bytes_total{job="x"}[5m])')
    assert grafana_to_promql('rate(x[$__rate_interval]) and y{vm=~"$vm"}') == ('rate(x[5m]) and y{vm=~"x"}')


def test_metric_names_in_contract() -> None:
    assert "qemu_block_io_hang" in contract_metrics()
    assert contract_metrics()["qemu_block_io_hang_completed_duration_seconds"] == "histogram"
    allowed = contract_series_names() | recording_rule_names() | PROMETHEUS_SERIES
    unknown: dict[str, set[str]] = {}
    for where, expr in EXPRS:
        bad = metric_names_in(expr) - allowed
        if bad:
            unknown[where] = bad
    assert unknown == {}, "metrics not in docs/metrics.md"


def test_used_metric_names() -> None:
    used = used_metric_names()
    assert "qemu_block_io_hang" in used
    assert "qemu_block_retry_policy_violation" in used
    assert "up" not in used
    assert not (used & recording_rule_names())
    assert metric_names_in('a{x="1"} / on() {__name__="b"}') == {"a", "b"}


def test_recording_rules_follow_naming_convention() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name


def test_provisioning_files() -> None:
    prov = DASHBOARD_DIR / "provisioning"
    dashboards = yaml.safe_load((prov / "dashboards" / "qemu-iohang.yml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    datasources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]


def _opt_in_series() -> dict[str, str]:
    """Every series name (counters with ``_total``, histograms with their suffixes) of a family
    behind a collector that is off by default, with that collector."""
    import exporter.metrics as m
    from exporter.model.collectors import DEFAULT_COLLECTORS

    families = [v for v in vars(m).values() if isinstance(v, m.Family)]
    families += [f for f, _attr in m.BLOCKSTATS]
    out: dict[str, str] = {}
    for f in families:
        if f.collector and f.collector not in DEFAULT_COLLECTORS:
            names = {f.name, f.sample_name}
            if f.type == "histogram":
                names |= {f.name + s for s in ("_bucket", "_sum", "_count")}
            out |= dict.fromkeys(names, f.collector)
    return out


def test_alerts_and_recording_rules_need_only_the_default_page() -> None:
    """Every shipped rule works on an exporter run with its defaults: no rule reads a series of
    an opt-in collector (issue 25)."""
    opt_in = _opt_in_series()
    assert "qemu_block_read_bytes_total" in opt_in  # the map is not empty by mistake
    bad = {where: metric_names_in(expr) & set(opt_in) for where, expr in alert_exprs()}
    assert {w: names for w, names in bad.items() if names} == {}


def test_a_panel_on_an_opt_in_collector_says_so() -> None:
    """A dashboard panel that reads a series of an opt-in collector names the flag in its
    description (it is empty on a default exporter); the others do not claim to need one."""
    opt_in = _opt_in_series()
    checked = 0
    for path in dashboard_files():
        dash = json.loads(path.read_text())
        for panel in iter_panels(dash.get("panels", [])):
            exprs = [grafana_to_promql(t["expr"]) for t in panel.get("targets", []) if t.get("expr")]
            needed = {opt_in[n] for e in exprs for n in metric_names_in(e) if n in opt_in}
            said = set(re.findall(r"--collector\.(\w+)", panel.get("description", "")))
            assert said == needed, (path.name, panel.get("title"))
            checked += bool(needed)
    assert checked >= 5
