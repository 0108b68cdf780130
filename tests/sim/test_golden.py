"""Golden-file test of the complete /metrics output in both formats, and `promtool check
metrics` on the text one.

Like node_exporter's end-to-end test: a fixed simulated fleet, the whole exposition compared
line by line, so any change of a name, label, HELP text or ordering is a visible diff.  The
OpenMetrics page is the one Prometheus gets (it asks for OpenMetrics first): scraped with
Prometheus 3's Accept header from the same exporter, it must differ from the text page only in
headers and ``# EOF``, and prometheus_client's strict OpenMetrics parser must read it.
Regenerate with ``UPDATE_GOLDEN=1 pytest tests/sim/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bench.prometheus import PROMETHEUS_3_ACCEPT
from tests.prometheus.artefacts import contract_metrics
from tests.sim.test_exporter_sim import (
    EXPECTED_VIOLATIONS,
    all_disks_seen,
    fleet,
    fleet_config,
    running,
)
from tests.support.binaries import require_binary
from tests.support.exporter import FULL_PAGE, ExporterProcess
from tests.support.procs import REPO
from tests.support.scrape import Metrics

#: The two pages, each in both formats: the default page (the default collectors), and the
#: full one (every collector on: ``FULL_PAGE``).
PAGES: dict[str, dict[str, bool]] = {"default": {}, "full": FULL_PAGE}


def golden(page: str, ext: str) -> Path:
    return REPO / "tests" / "golden" / f"{'metrics' if page == 'default' else f'metrics-{page}'}.{ext}"


# Values that depend on the machine or on timing, not on the exporter's logic.
_VOLATILE = [
    (re.compile(r"^(qemu_exporter_build_info\{).*(\} )"), r"\1<build labels>\2"),
    (re.compile(r"^(qemu_block_idle_seconds\{.*\}) .*$"), r"\1 <seconds>"),
    (re.compile(r"^(qemu_exporter_event_loop_lag_seconds) .*$"), r"\1 <seconds>"),
    (re.compile(r"^(qemu_exporter_collector_duration_seconds\{.*\}) .*$"), r"\1 <seconds>"),
    # The process's own figures and its garbage collector's counts (prometheus_client's).
    (re.compile(r"^(process_\w+|python_gc_\w+)(\{[^}]*\})? .*$"), r"\1\2 <value>"),
    (re.compile(r'socket="[^"]*/([^"/]+)"'), r'socket="<dir>/\1"'),
]


def normalise(text: str) -> str:
    out = []
    for line in text.splitlines():
        for pattern, repl in _VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out) + "\n"


async def full_output(short_tmp: Path, page: str = "full") -> tuple[str, str]:
    """The text page once every disk is seen, and the OpenMetrics page scraped right after."""
    config = {**fleet_config(short_tmp), "collectors": PAGES[page]}
    async with running(fleet(short_tmp)), ExporterProcess(short_tmp, config) as exp:
        m = await exp.wait_metrics(
            lambda m: all_disks_seen(m) and _polled(m, page), what=f"every disk, polled ({page} page)"
        )
        async with (
            aiohttp.ClientSession() as s,
            s.get(exp.url + "/metrics", headers={"Accept": PROMETHEUS_3_ACCEPT}) as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"] == (
                "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"
            )
            return m.text, await r.text()


@pytest.mark.parametrize("page", PAGES)
async def test_metrics_output_matches_golden_file(short_tmp: Path, page: str) -> None:
    raw_text, raw_om = await full_output(short_tmp, page)
    text, om = normalise(raw_text), normalise(raw_om)
    prom, openmetrics = golden(page, "prom"), golden(page, "openmetrics")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        prom.write_text(text)
        openmetrics.write_text(om)
    assert text == prom.read_text(), f"{page} page changed: review, then UPDATE_GOLDEN=1"
    assert om == openmetrics.read_text(), f"{page} OpenMetrics page changed: review, then UPDATE_GOLDEN=1"
    # Same samples in the same order; only comments differ (and `# EOF` ends OpenMetrics).
    assert om.endswith("\n# EOF\n")
    assert _samples(om) == _samples(text)
    parsed = {f.name: f.type for f in text_string_to_metric_families(raw_om)}  # strict: raises if invalid
    assert parsed["qemu_block_io_hang_completed_duration_seconds"] == "histogram"
    assert ("qemu_block_read_bytes" in parsed) == (page == "full")


def test_the_default_page_is_the_default_collectors() -> None:
    """Each family of the full page is on the default page exactly when its collector is a
    default one (the exporter's own few families always), and the durations name each enabled
    collector."""
    import exporter.metrics as m
    from exporter.metrics import Family
    from exporter.model.collectors import COLLECTORS, DEFAULT_COLLECTORS

    collector_of = {v.name: v.collector for v in vars(m).values() if isinstance(v, Family)}
    collector_of |= {f.name: f.collector for f, _attr in m.BLOCKSTATS}
    families = {
        page: set(re.findall(r"^# TYPE (\S+) ", golden(page, "prom").read_text(), re.M)) for page in PAGES
    }
    ours = {name.removesuffix("_total") for name in families["full"] if name.startswith("qemu_")}
    assert ours <= set(collector_of)
    default = {n for n in ours if collector_of[n] in DEFAULT_COLLECTORS | {""}}
    assert {n.removesuffix("_total") for n in families["default"] if n.startswith("qemu_")} == default
    for page, enabled in (("default", DEFAULT_COLLECTORS), ("full", frozenset(COLLECTORS))):
        named = set(
            re.findall(
                r'^qemu_exporter_collector_duration_seconds\{collector="(\w+)"\}',
                golden(page, "prom").read_text(),
                re.M,
            )
        )
        # libvirt: no libvirt URI in the fleet's config, nothing to time.
        assert named == enabled - {"libvirt"}, page


def _polled(m: Metrics, page: str) -> bool:
    """Every VM polled once: its blockstats are shown (full page), or, on the default page,
    which shows none, its run state."""
    if page == "full":
        return len(m.find("qemu_block_read_bytes_total")) == len(EXPECTED_VIOLATIONS)
    return len(m.find("qemu_vm_status")) == len(m.find("qemu_vm_info"))


def _samples(page: str) -> list[str]:
    return [line for line in page.splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("page", PAGES)
async def test_promtool_check_metrics_is_clean(short_tmp: Path, page: str) -> None:
    promtool = require_binary("promtool")
    text, _om = await full_output(short_tmp, page)
    Metrics(text)  # parses
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_every_family_on_the_page_is_in_docs_metrics_md() -> None:
    """docs/metrics.md is the contract dashboards and alerts are checked against: every family
    of the golden page is listed there, with its type."""
    documented = contract_metrics()
    on_page = dict(re.findall(r"^# TYPE (\S+) (\S+)$", golden("full", "prom").read_text(), re.M))
    assert on_page and {n: t for n, t in on_page.items() if documented.get(n) != t} == {}
