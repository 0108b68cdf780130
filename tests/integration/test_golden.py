"""Golden-file test of the complete /metrics output in both formats, and `promtool check
metrics` on the text one.

Like node_exporter's end-to-end test: a fixed simulated fleet, the whole exposition compared
line by line, so any change of a name, label, HELP text or ordering is a visible diff.  The
OpenMetrics page is the one Prometheus gets (it asks for OpenMetrics first): scraped with
Prometheus 3's Accept header from the same exporter, it must differ from the text page only in
headers and ``# EOF``, and prometheus_client's strict OpenMetrics parser must read it.
Regenerate with ``UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import aiohttp
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bench.prometheus import PROMETHEUS_3_ACCEPT
from tests.artefacts.artefacts import contract_metrics
from tests.integration.test_exporter_sim import (
    EXPECTED_VIOLATIONS,
    all_disks_seen,
    fleet,
    fleet_config,
    running,
)
from tests.support.binaries import require_binary
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.scrape import Metrics

GOLDEN = REPO / "tests" / "golden" / "metrics.prom"
GOLDEN_OPENMETRICS = REPO / "tests" / "golden" / "metrics.openmetrics"

# Values that depend on the machine or on timing, not on the exporter's logic.
_VOLATILE = [
    (re.compile(r"^(qemu_exporter_build_info\{).*(\} )"), r"\1<build labels>\2"),
    (re.compile(r"^(qemu_block_idle_seconds\{.*\}) .*$"), r"\1 <seconds>"),
    (re.compile(r"^(qemu_exporter_event_loop_lag_seconds) .*$"), r"\1 <seconds>"),
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


async def full_output(short_tmp: Path) -> tuple[str, str]:
    """The text page once every disk is seen, and the OpenMetrics page scraped right after."""
    async with running(fleet(short_tmp)), ExporterProcess(short_tmp, fleet_config(short_tmp)) as exp:
        m = await exp.wait_metrics(
            lambda m: (
                all_disks_seen(m) and len(m.find("qemu_block_read_bytes_total")) == len(EXPECTED_VIOLATIONS)
            ),
            what="every disk with its blockstats",
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


async def test_full_metrics_output_matches_golden_file(short_tmp: Path) -> None:
    raw_text, raw_om = await full_output(short_tmp)
    text, om = normalise(raw_text), normalise(raw_om)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
        GOLDEN_OPENMETRICS.write_text(om)
    assert text == GOLDEN.read_text(), "metrics output changed: review, then UPDATE_GOLDEN=1"
    assert om == GOLDEN_OPENMETRICS.read_text(), "OpenMetrics output changed: review, then UPDATE_GOLDEN=1"
    # Same samples in the same order; only comments differ (and `# EOF` ends OpenMetrics).
    assert om.endswith("\n# EOF\n")
    assert _samples(om) == _samples(text)
    parsed = {f.name: f.type for f in text_string_to_metric_families(raw_om)}  # strict: raises if invalid
    assert parsed["qemu_block_read_bytes"] == "counter"
    assert parsed["qemu_block_io_hang_completed_duration_seconds"] == "histogram"


def _samples(page: str) -> list[str]:
    return [line for line in page.splitlines() if not line.startswith("#")]


async def test_promtool_check_metrics_is_clean(short_tmp: Path) -> None:
    promtool = require_binary("promtool")
    text, _om = await full_output(short_tmp)
    Metrics(text)  # parses
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_every_family_on_the_page_is_in_docs_metrics_md() -> None:
    """docs/metrics.md is the contract dashboards and alerts are checked against: every family
    of the golden page is listed there, with its type."""
    documented = contract_metrics()
    on_page = dict(re.findall(r"^# TYPE (\S+) (\S+)$", GOLDEN.read_text(), re.M))
    assert on_page and {n: t for n, t in on_page.items() if documented.get(n) != t} == {}
