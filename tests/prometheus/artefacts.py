"""Helpers shared by the artefact tests (alerts, dashboards, deploy files).

``used_metric_names()`` is the list of metric names the operator artefacts rely on; a test that
scrapes a real exporter can check it against ``/metrics`` (recording-rule names are excluded,
``up`` too: Prometheus makes it).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "alerts" / "qemu-iohang.rules.yml"
ALERT_TESTS_DIR = ROOT / "alerts" / "tests"
DASHBOARD_DIR = ROOT / "dashboards" / "grafana"
METRICS_DOC = ROOT / "docs" / "metrics.md"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# Series that Prometheus itself produces, not the exporter.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_module(path: Path) -> ModuleType:
    """Import a generator script (alerts/generate.py, dashboards/generate.py) by path."""
    spec = importlib.util.spec_from_file_location(f"_gen_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the metric contract ----------------------------------------------------------------------


@cache
def contract_metrics() -> dict[str, str]:
    """Metric name -> type, from the tables of docs/metrics.md."""
    out: dict[str, str] = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*([a-z]+)\s*\|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def contract_series_names() -> set[str]:
    """Names that may appear in a query: metrics plus the _bucket/_sum/_count of histograms."""
    names = set()
    for name, kind in contract_metrics().items():
        names.add(name)
        if kind in ("histogram", "summary"):
            names.update(name + s for s in HISTOGRAM_SUFFIXES)
    return names


# --- PromQL -----------------------------------------------------------------------------------

_GRAFANA_RANGE_VARS = re.compile(
    r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}"
)
_GRAFANA_VARS = re.compile(r"\$\{[A-Za-z0-9_:]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z0-9_]+\]\]")


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana template variables so the expression is plain PromQL."""
    expr = _GRAFANA_RANGE_VARS.sub("5m", expr)
    return _GRAFANA_VARS.sub("x", expr)


def parse_promql(expr: str) -> Any:
    """Parse with promql-parser; raises ValueError on a syntax error."""
    import promql_parser

    return promql_parser.parse(expr)


def metric_names_in(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (by name or by {__name__="…"})."""
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(parse_promql(expr), visit)
    return names


# --- alerts -----------------------------------------------------------------------------------


def load_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in load_rules() if "alert" in r]


def recording_rule_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def alert_exprs() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every rule expression."""
    for r in load_rules():
        yield (r.get("alert") or r["record"], r["expr"])


# --- dashboards -------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def dashboard_exprs(path: Path) -> Iterator[tuple[str, str]]:
    """(where, Grafana expression) for every panel target and template-variable query."""
    dash = json.loads(path.read_text())
    for panel in iter_panels(dash.get("panels", [])):
        for t in panel.get("targets", []):
            if t.get("expr"):
                yield (f"{path.name}: panel {panel.get('title')!r} ref {t.get('refId')}", t["expr"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = _LABEL_VALUES.match(q) or _QUERY_RESULT.match(q)
        if m:
            q = m.group(1)
        yield (f"{path.name}: variable {var['name']}", q)


def all_exprs() -> list[tuple[str, str]]:
    """Every PromQL expression of alerts and dashboards, Grafana variables replaced."""
    out = list(alert_exprs())
    for f in dashboard_files():
        out.extend((where, grafana_to_promql(e)) for where, e in dashboard_exprs(f))
    return out


def used_metric_names() -> set[str]:
    """Exporter metric names used by the alerts and dashboards (recording rules and ``up`` left out)."""
    names: set[str] = set()
    for _where, expr in all_exprs():
        names |= metric_names_in(expr)
    return names - recording_rule_names() - PROMETHEUS_SERIES


# --- runbooks ---------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", RUNBOOKS.read_text(), re.M)}
